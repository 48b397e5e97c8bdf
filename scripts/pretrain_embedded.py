"""Reproduce the small pretrained backbones that ship in clfast/assets/ from scratch (CPU, seeded).

    python scripts/pretrain_embedded.py --out clfast/assets --threads 1   # both: ≈ 40 min on a busy
                                                                        # machine, ≈ 12 min on 2 idle cores
    python scripts/pretrain_embedded.py --out /tmp/x --smoke            # 3 steps each, seconds

Writes into --out:
- vit_tiny_synth.safetensors   timm VisionTransformer, supervised CE on synth-pretrain (fp16)
- clip_tiny_synth.safetensors  open_clip CLIP, contrastive on synth-pretrain captions (fp16)
- clip_tiny_synth.json, clip_tiny_synth_vocab.json  the open_clip config and word vocabulary
- checksums.json               sha256 of every shipped file
- metrics.json                 losses, held-out quality (linear probe, zero-shot), feature fingerprints
and, with --write-descriptors, regenerates clfast/data/descriptors/synth_shapes.json.

Results are bitwise reproducible on the same machine with the same --threads; elsewhere they agree
up to floating-point reassociation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, ROOT)

from clfast.backbones import tokenizer as tokenizer_mod  # noqa: E402
from clfast.backbones import zoo  # noqa: E402
from clfast.data import synth  # noqa: E402
from clfast.data import class_descriptors  # noqa: E402

EXTRA_WORDS = [",", ":", "?", ".", "an", "photo", "image", "this", "colour", "shapes", "it"]
FINGERPRINT_SEED = 1234


def fingerprint_input() -> torch.Tensor:
    """A fixed (4, 3, 32, 32) input in [0, 1] that needs no generator (for feature fingerprints)."""
    g = torch.arange(4 * 3 * 32 * 32, dtype=torch.float64).reshape(4, 3, 32, 32)
    return (0.5 + 0.5 * torch.sin(g * 0.0137) * torch.cos(g * 0.00071)).float()


def fingerprint_texts() -> list[str]:
    return ["a small red striped triangle on a dark background", "a blue dotted heart",
            "what color is the object in the top left", "a large green checkered ring"]


def build_vocabulary(context_length: int = 32) -> tokenizer_mod.WordTokenizer:
    words = sorted(set(synth.text_vocabulary()) | set(EXTRA_WORDS))
    return tokenizer_mod.WordTokenizer(words, context_length)


def clip_config(vocab_size: int) -> dict:
    return {"embed_dim": 128,
            "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 192, "layers": 6,
                           "head_width": 64, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 32, "vocab_size": vocab_size, "width": 128, "heads": 2,
                         "layers": 4, "mlp_ratio": 4.0}}


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "pos_embed" in name or "cls_token" in name or "positional" in name
         or "class_embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation: random horizontal and vertical flips (no class depends on handedness)."""
    b = x.shape[0]
    fh = torch.rand(b, generator=gen) < 0.5
    fv = torch.rand(b, generator=gen) < 0.5
    x = torch.where(fh[:, None, None, None], x.flip(3), x)
    return torch.where(fv[:, None, None, None], x.flip(2), x)


def save_fp16(model: torch.nn.Module, path: str, metadata: dict) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={k: str(v) for k, v in metadata.items()})


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------


def train_vit(args, data, out_dir: str) -> dict:
    import timm
    torch.manual_seed(args.seed)
    model = timm.create_model("vit_tiny_synth", pretrained=False)
    # Auxiliary attribute heads (shape, colour, texture; training only, not saved): a denser signal
    # than the 100-way class alone, and features that carry the attributes of unseen combinations.
    n_attr = (len(synth.SHAPES), len(synth.COLOURS), len(synth.TEXTURES))
    aux = torch.nn.Linear(model.embed_dim, sum(n_attr))
    opt = torch.optim.AdamW(param_groups(model, 0.05) + param_groups(aux, 0.05),
                            lr=args.vit_lr, betas=(0.9, 0.999))
    images = data["images"]
    labels = torch.tensor(data["labels"])
    attrs = data["attributes"]
    gen = torch.Generator().manual_seed(args.seed)
    steps, bs = args.vit_steps, args.vit_batch
    model.train()
    t0, losses = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.vit_lr, args.warmup)
        idx = torch.randint(len(labels), (bs,), generator=gen)
        x = zoo.vit_normalize(augment(images[idx].float() / 255, gen))
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
            logits, aux_logits = model.head(feats), aux(feats)
        loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=0.1)
        aux_loss = sum(F.cross_entropy(z.float(), attrs[idx, j])
                       for j, z in enumerate(aux_logits.split(n_attr, dim=1)))
        loss_total = loss + args.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters()), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == steps - 1:
            log(f"[vit] step {step + 1}/{steps} loss {loss.item():.4f} aux {aux_loss.item():.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s")
    seconds = time.time() - t0
    path = os.path.join(out_dir, "vit_tiny_synth.safetensors")
    save_fp16(model, path, {"arch": "vit_tiny_synth", "data": "synth-pretrain", "steps": steps,
                            "batch": bs, "seed": args.seed})
    tail = losses[-max(1, min(50, len(losses) // 5)):]
    return {"steps": steps, "batch": bs, "seconds": round(seconds, 1),
            "final_train_loss": round(float(np.mean(tail)), 4), "file": os.path.basename(path)}


def train_clip(args, data, out_dir: str, tok) -> dict:
    torch.manual_seed(args.seed)
    model, _, _ = zoo.create_clip_tiny_synth(pretrained=False)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=args.clip_lr, betas=(0.9, 0.98), eps=1e-6)
    images = data["images"]
    tokens = data["caption_tokens"]        # (N, V, L): V caption variants per image
    gen = torch.Generator().manual_seed(args.seed + 1)
    steps, bs = args.clip_steps, args.batch
    t0, losses = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.clip_lr, args.warmup)
        idx = torch.randint(len(images), (bs,), generator=gen)
        var = torch.randint(tokens.shape[1], (bs,), generator=gen)
        text = tokens[idx, var]
        x = zoo.clip_normalize(augment(images[idx].float() / 255, gen))
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            img_f, txt_f, scale = model(x, text)
        img_f, txt_f = img_f.float(), txt_f.float()
        logits = scale.float() * img_f @ txt_f.t()
        # Captions repeat within a batch: every identical caption is a positive.
        same = (text[:, None, :] == text[None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % args.log_every == 0 or step == steps - 1:
            log(f"[clip] step {step + 1}/{steps} loss {loss.item():.4f} "
                f"scale {scale.item():.1f} {time.time() - t0:.0f}s")
    seconds = time.time() - t0
    path = os.path.join(out_dir, "clip_tiny_synth.safetensors")
    save_fp16(model, path, {"arch": "clip_tiny_synth", "data": "synth-pretrain captions",
                            "steps": steps, "batch": bs, "seed": args.seed})
    tail = losses[-max(1, min(50, len(losses) // 5)):]
    return {"steps": steps, "batch": bs, "seconds": round(seconds, 1),
            "final_train_loss": round(float(np.mean(tail)), 4), "file": os.path.basename(path)}


# --------------------------------------------------------------------------------------------------
# Quality


@torch.no_grad()
def vit_features(model, images_u8: torch.Tensor, bs: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images_u8), bs):
        x = zoo.vit_normalize(images_u8[i:i + bs].float() / 255)
        out.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(out).numpy()


def linear_probe(train_x, train_y, test_x, test_y, max_iter: int = 1000) -> float:
    """Top-1 of a multinomial logistic regression on standardised frozen features."""
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=max_iter, C=1.0)
    from threadpoolctl import threadpool_limits
    # One BLAS thread: lbfgs on a problem this small is ~25× slower with threads on a busy machine.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == np.asarray(test_y)).mean())


@torch.no_grad()
def clip_zero_shot(model, tok, images_u8: torch.Tensor, labels, class_defs, bs: int = 256) -> float:
    text = tok([synth.class_prompt(k) for k in class_defs])
    t = F.normalize(model.encode_text(text), dim=-1)
    correct = 0
    for i in range(0, len(images_u8), bs):
        x = zoo.clip_normalize(images_u8[i:i + bs].float() / 255)
        f = F.normalize(model.encode_image(x), dim=-1)
        pred = (f @ t.t()).argmax(1)
        correct += int((pred == torch.as_tensor(labels[i:i + bs])).sum())
    return correct / len(labels)


def evaluate(args, out_dir: str, which: list[str], tok) -> dict:
    """Held-out quality from the *saved* fp16 files, plus feature fingerprints."""
    import timm
    res = {}
    small = args.smoke
    shapes_tr = synth.synth_shapes("train", n_per_class=2 if small else 30)
    shapes_te = synth.synth_shapes("test", n_per_class=1 if small else 10)
    tr_u8 = torch.from_numpy(shapes_tr.data).permute(0, 3, 1, 2)
    te_u8 = torch.from_numpy(shapes_te.data).permute(0, 3, 1, 2)
    fp_in = fingerprint_input()
    if "vit" in which:
        model = timm.create_model("vit_tiny_synth", pretrained=True, pretrained_cfg_overlay=dict(
            file=os.path.join(out_dir, "vit_tiny_synth.safetensors"))).eval()
        pre = synth.synth_pretrain("test", n_per_class=1 if small else 20)
        with torch.no_grad():
            logits = model(zoo.vit_normalize(torch.from_numpy(pre.data).permute(0, 3, 1, 2).float() / 255))
        res["vit_synth_pretrain_test_acc"] = float((logits.argmax(1) == torch.tensor(pre.targets)).float().mean())
        res["vit_linear_probe_synth_shapes"] = linear_probe(
            vit_features(model, tr_u8), shapes_tr.targets, vit_features(model, te_u8), shapes_te.targets)
        with torch.no_grad():
            feats = model.forward_head(model.forward_features(zoo.vit_normalize(fp_in)), pre_logits=True)
        res["vit_fingerprint"] = [round(float(v), 5) for v in feats[:, :8].flatten()]
        # Reference: a randomly initialised model of the same architecture.
        torch.manual_seed(args.seed)
        rand = timm.create_model("vit_tiny_synth", pretrained=False).eval()
        res["vit_random_init_linear_probe_synth_shapes"] = linear_probe(
            vit_features(rand, tr_u8), shapes_tr.targets, vit_features(rand, te_u8), shapes_te.targets)
    if "clip" in which:
        model, _, _ = zoo.create_clip_tiny_synth(
            checkpoint_path=os.path.join(out_dir, "clip_tiny_synth.safetensors"))
        res["clip_zero_shot_synth_shapes"] = clip_zero_shot(
            model, tok, te_u8, shapes_te.targets, shapes_te.class_defs)
        pre = synth.synth_pretrain("test", n_per_class=1 if small else 20)
        res["clip_zero_shot_synth_pretrain"] = clip_zero_shot(
            model, tok, torch.from_numpy(pre.data).permute(0, 3, 1, 2), pre.targets, pre.class_defs)
        with torch.no_grad():
            img = model.encode_image(zoo.clip_normalize(fp_in))
            txt = model.encode_text(tok(fingerprint_texts()))
        res["clip_image_fingerprint"] = [round(float(v), 5) for v in img[:, :8].flatten()]
        res["clip_text_fingerprint"] = [round(float(v), 5) for v in txt[:, :8].flatten()]
    res["chance_synth_shapes"] = 1 / len(shapes_tr.classes)
    res["probe_data"] = {"train": len(shapes_tr), "test": len(shapes_te)}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "clfast", "assets"), help="output folder")
    p.add_argument("--which", default="vit,clip", help="comma list: vit, clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixes the reduction order)")
    p.add_argument("--batch", type=int, default=128, help="CLIP batch")
    p.add_argument("--vit-batch", type=int, default=64)
    p.add_argument("--vit-steps", type=int, default=1200)
    p.add_argument("--clip-steps", type=int, default=400)
    p.add_argument("--vit-lr", type=float, default=2e-3)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of the ViT's auxiliary shape/colour/texture losses")
    p.add_argument("--n-per-class", type=int, default=300, help="synth-pretrain images per class")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (slower)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--no-eval", dest="eval", action="store_false")
    p.add_argument("--smoke", action="store_true", help="3 steps each on tiny data (tests the recipe)")
    p.add_argument("--write-descriptors", action="store_true",
                   help="also regenerate clfast/data/descriptors/synth_shapes.json")
    args = p.parse_args(argv)
    which = [w.strip() for w in args.which.split(",") if w.strip()]
    bad = [w for w in which if w not in ("vit", "clip")]
    if bad or not which:
        p.error(f"--which takes 'vit', 'clip' or both, got {args.which!r}")
    if args.smoke:
        args.vit_steps = args.clip_steps = 3
        args.n_per_class, args.batch, args.vit_batch, args.warmup, args.log_every = 2, 16, 16, 1, 1
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    if args.write_descriptors:
        class_descriptors.write_descriptors(
            os.path.join(class_descriptors.DESCRIPTOR_DIR, "synth_shapes.json"),
            class_descriptors.synth_shapes_descriptors())

    tok = build_vocabulary()
    vocab_path = os.path.join(args.out, "clip_tiny_synth_vocab.json")
    config_path = os.path.join(args.out, "clip_tiny_synth.json")
    tok.save(vocab_path)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(clip_config(tok.vocab_size), f, indent=1)
        f.write("\n")
    for path, shipped in ((vocab_path, zoo.CLIP_TINY_SYNTH_VOCAB), (config_path, zoo.CLIP_TINY_SYNTH_CONFIG)):
        if os.path.abspath(path) != os.path.abspath(shipped) and os.path.isfile(shipped):
            with open(path, "rb") as a, open(shipped, "rb") as b:
                if a.read() != b.read():
                    log(f"note: {os.path.basename(path)} differs from the shipped {shipped}")

    t0 = time.time()
    ds = synth.synth_pretrain("train", n_per_class=args.n_per_class, seed=args.seed)
    data = {"images": torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), "labels": ds.targets,
            "attributes": torch.tensor([ds.class_defs[y].ids for y in ds.targets])}
    log(f"rendered synth-pretrain: {len(ds)} images in {time.time() - t0:.1f}s")
    metrics = {"command": "python scripts/pretrain_embedded.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "torch": torch.__version__, "threads": args.threads, "seed": args.seed,
               "pretrain_images": len(ds)}
    if "vit" in which:
        metrics["vit"] = train_vit(args, data, args.out)
    if "clip" in which:
        variants = [ds.captions(i) for i in range(len(ds))]
        flat = tok([c for v in variants for c in v])
        data["caption_tokens"] = flat.view(len(ds), len(variants[0]), -1)
        metrics["clip"] = train_clip(args, data, args.out, tok)
    if args.eval:
        metrics["quality"] = evaluate(args, args.out, which, tok)
        log("quality: " + json.dumps({k: v for k, v in metrics["quality"].items()
                                      if "fingerprint" not in k}))
    files = [f for f in ("vit_tiny_synth.safetensors", "clip_tiny_synth.safetensors",
                         "clip_tiny_synth.json", "clip_tiny_synth_vocab.json")
             if os.path.isfile(os.path.join(args.out, f))]
    checksums = {f: zoo.sha256_file(os.path.join(args.out, f)) for f in files}
    with open(os.path.join(args.out, "checksums.json"), "w", encoding="utf-8") as f:
        json.dump(checksums, f, indent=1)
        f.write("\n")
    metrics["sha256"] = checksums
    metrics["total_seconds"] = round(time.time() - t_start, 1)
    metrics_path = os.path.join(args.out, "metrics.json")
    if set(which) != {"vit", "clip"} and os.path.isfile(metrics_path):
        # A run of one model keeps the other model's record (each model reseeds on its own, so
        # the default command still reproduces both).
        with open(metrics_path, encoding="utf-8") as f:
            old = json.load(f)
        quality = {**old.get("quality", {}), **metrics.get("quality", {})}
        metrics = {**old, **metrics, "quality": quality}
    with open(metrics_path, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
        f.write("\n")
    for name, digest in checksums.items():
        log(f"sha256 {digest}  {name}")
    log(f"done in {metrics['total_seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
