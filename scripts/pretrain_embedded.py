"""Reproduce the small pretrained backbones that ship in clfast/assets/ from scratch (CPU, seeded).

    python scripts/pretrain_embedded.py --out clfast/assets --threads 1   # both: ≈ 12 min on one core
                                                                        # (ViT ≈ 5.5, CLIP ≈ 5.3)
    python scripts/pretrain_embedded.py --out /tmp/x --smoke            # 3 steps each, seconds

Writes into --out:
- vit_tiny_synth.safetensors   timm VisionTransformer, supervised CE on synth-pretrain (fp16)
- clip_tiny_synth.safetensors  open_clip CLIP, contrastive on synth-pretrain captions (fp16)
- clip_tiny_synth.json, clip_tiny_synth_vocab.json  the open_clip config and word vocabulary
- checksums.json               sha256 of every shipped file
- metrics.json                 losses, held-out quality (linear probe, zero-shot), feature fingerprints
and, with --write-descriptors, regenerates clfast/data/descriptors/synth_shapes.json.

Both image towers train with a locality prior at initialisation (sin-cos positions, mimetic attention),
dense per-patch-token supervision from the renderer's object masks (coverage, shape, colour, texture;
heads not saved) and 32 of 64 patch tokens per image (the object's first); see clfast/assets/README.md.

Results are bitwise reproducible on the same machine with the same --threads (save_fp16 writes the
safetensors header in a fixed order); elsewhere they agree up to floating-point reassociation.
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


def flip_with_coverage(x: torch.Tensor, cov: torch.Tensor, gen: torch.Generator):
    """``augment`` for images and their (B, 8, 8) patch coverage: the same random flips on both."""
    b = x.shape[0]
    fh = torch.rand(b, generator=gen) < 0.5
    fv = torch.rand(b, generator=gen) < 0.5
    x = torch.where(fh[:, None, None, None], x.flip(3), x)
    x = torch.where(fv[:, None, None, None], x.flip(2), x)
    cov = torch.where(fh[:, None, None], cov.flip(2), cov)
    return x, torch.where(fv[:, None, None], cov.flip(1), cov)


def patch_coverage(ds, patch: int = 4) -> torch.Tensor:
    """(N, 8, 8) fraction of each 4×4 patch covered by the object (from the renderer's masks)."""
    images, masks = synth.render(ds.scenes, return_masks=True)
    if not np.array_equal(images, ds.data):
        raise RuntimeError("re-rendered images differ from the dataset's")
    g = synth.IMAGE_SIZE // patch
    cov = masks[:, 0].reshape(len(ds), g, patch, g, patch).mean((2, 4))
    return torch.from_numpy(np.ascontiguousarray(cov, dtype=np.float32))


def keep_tokens(tokens: torch.Tensor, cov: torch.Tensor, keep: int, gen: torch.Generator):
    """Drop patch tokens for speed: keep the CLS token, every patch the object touches (up to
    ``keep``), and random background patches up to ``keep``. tokens (B, 1 + P, D), cov (B, P)."""
    if not keep or keep >= cov.shape[1]:
        return tokens, cov
    score = (cov > 0).float() + torch.rand(cov.shape, generator=gen)
    idx = score.topk(keep, dim=1).indices.sort(1).values
    patches = tokens[:, 1:].gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :1], patches], 1), cov.gather(1, idx)


def token_attribute_loss(head: torch.nn.Module, tokens: torch.Tensor, cov: torch.Tensor,
                         attrs: torch.Tensor, n_attr, threshold: float = 0.1) -> torch.Tensor:
    """Dense supervision of the patch tokens: every token predicts its object coverage (BCE), and
    every token the object covers (> ``threshold``) the object's shape, colour and texture."""
    z = head(tokens).float().flatten(0, 1)            # (B*P, 1 + sum(n_attr))
    c = cov.flatten()
    loss = F.binary_cross_entropy_with_logits(z[:, 0], c)
    sel = c > threshold
    if sel.any():
        a = attrs[:, None, :].expand(-1, cov.shape[1], -1).flatten(0, 1)[sel]
        loss = loss + sum(F.cross_entropy(zj, a[:, j])
                          for j, zj in enumerate(z[sel, 1:].split(n_attr, dim=1)))
    return loss


def sincos_pos_embed_(pos: torch.Tensor, grid: int) -> None:
    """Initialise a (1 + grid², D) positional embedding (CLS row zero) with 2-D sin-cos values."""
    from timm.layers import build_sincos2d_pos_embed
    with torch.no_grad():
        pos.view(-1, pos.shape[-1])[0].zero_()
        pos.view(-1, pos.shape[-1])[1:] = build_sincos2d_pos_embed([grid, grid], pos.shape[-1],
                                                                   temperature=10000.0)


def mimetic_init_(qkv_weight: torch.Tensor, proj_weight: torch.Tensor, num_heads: int,
                  gen: torch.Generator, a1=0.7, b1=0.7, a2=0.4, b2=0.4) -> None:
    """Mimetic initialisation of one attention layer (Trockman & Kolter, 2023): per head
    W_q^T W_k ≈ a1·Z + b1·I (queries attend to similar keys: with sin-cos positions, to nearby
    patches) and W_v^T W_o^T ≈ a2·Z − b2·I, Z Gaussian with variance 1/d. Rows of ``qkv_weight``
    are [q; k; v] (timm's qkv and open_clip's in_proj share this layout)."""
    d = proj_weight.shape[0]
    hd = d // num_heads
    with torch.no_grad():
        for h in range(num_heads):
            m = a1 * torch.randn(d, d, generator=gen) / d ** 0.5 + b1 * torch.eye(d)
            u, sv, vh = torch.linalg.svd(m)
            r = sv[:hd].sqrt()
            qkv_weight[h * hd:(h + 1) * hd] = (u[:, :hd] * r).t()
            qkv_weight[d + h * hd:d + (h + 1) * hd] = (vh[:hd].t() * r).t()
        m = a2 * torch.randn(d, d, generator=gen) / d ** 0.5 - b2 * torch.eye(d)
        u, sv, vh = torch.linalg.svd(m)
        r = sv.sqrt()
        qkv_weight[2 * d:] = (u * r).t()
        proj_weight.copy_(vh.t() * r)


def _explicit_attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
    """open_clip ``ResidualAttentionBlock.attention`` (self-attention only) written out with
    matmuls: on CPU, bf16 ``scaled_dot_product_attention``'s backward is several times slower for
    these 65-token sequences. Same weights, same maths; used for training only."""
    mha = self.attn
    b, n, d = q_x.shape
    h = mha.num_heads
    qkv = F.linear(q_x, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, h, d // h)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    s = (q * (d // h) ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        s = s + attn_mask
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return F.linear(o, mha.out_proj.weight, mha.out_proj.bias)


def save_fp16(model: torch.nn.Module, path: str, metadata: dict) -> None:
    """Save the state dict in fp16 as safetensors, byte-for-byte reproducibly.

    safetensors writes the ``__metadata__`` entries in hash-map order, which changes from process to
    process: identical weights gave different files (and sha256s) on every run. The header is
    rewritten here with sorted keys (same format: little-endian u64 length, JSON padded with spaces
    to a multiple of 8, then the unchanged tensor bytes, whose offsets are relative to them)."""
    from safetensors.torch import save
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    raw = save(state, metadata={k: str(v) for k, v in metadata.items()})
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + raw[8 + n:])


def loss_record(losses: list[float]) -> dict:
    """Final train loss (mean of the last 50 steps), the first 50 losses exactly, and a sha256 of
    every step's loss (float64 bytes): two runs agree bitwise iff their whole trajectories do."""
    import hashlib
    tail = losses[-max(1, min(50, len(losses) // 5)):]
    return {"final_train_loss": round(float(np.mean(tail)), 4), "first_losses": losses[:50],
            "losses_sha256": hashlib.sha256(np.asarray(losses, dtype=np.float64).tobytes()).hexdigest()}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------


def train_vit(args, data, out_dir: str) -> dict:
    import timm
    torch.manual_seed(args.seed)
    model = timm.create_model("vit_tiny_synth", pretrained=False)
    grid = model.patch_embed.grid_size[0]
    # Initialisation that gives attention a locality prior (the data is small; the budget minutes):
    # sin-cos positions and mimetic query-key / value-output products (see mimetic_init_).
    sincos_pos_embed_(model.pos_embed, grid)
    init_gen = torch.Generator().manual_seed(args.seed + 2)
    for blk in model.blocks:
        mimetic_init_(blk.attn.qkv.weight, blk.attn.proj.weight, blk.attn.num_heads, init_gen)
        blk.attn.fused_attn = False     # explicit attention: bf16 SDPA backward is slow on CPU
    # Auxiliary attribute heads (shape, colour, texture; training only, not saved): on the CLS
    # feature, and on every patch token (with object coverage), a dense signal that teaches the
    # tokens what they belong to and features that carry the attributes of unseen combinations.
    n_attr = (len(synth.SHAPES), len(synth.COLOURS), len(synth.TEXTURES))
    aux = torch.nn.Linear(model.embed_dim, sum(n_attr))
    tok_head = torch.nn.Linear(model.embed_dim, 1 + sum(n_attr))
    params = list(model.parameters()) + list(aux.parameters()) + list(tok_head.parameters())
    opt = torch.optim.AdamW(param_groups(model, 0.05) + param_groups(aux, 0.05)
                            + param_groups(tok_head, 0.05), lr=args.vit_lr, betas=(0.9, 0.999))
    images = data["images"]
    labels = torch.tensor(data["labels"])
    attrs = data["attributes"]
    coverage = data["coverage"]
    gen = torch.Generator().manual_seed(args.seed)
    steps, bs = args.vit_steps, args.vit_batch
    model.train()
    t0, losses = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.vit_lr, args.warmup)
        idx = torch.randint(len(labels), (bs,), generator=gen)
        x, cov = flip_with_coverage(images[idx].float() / 255, coverage[idx], gen)
        x = zoo.vit_normalize(x)
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            tokens = model._pos_embed(model.patch_embed(x))
            tokens, cov = keep_tokens(tokens, cov.flatten(1), args.keep_tokens, gen)
            tokens = model.norm(model.blocks(model.norm_pre(tokens)))
            feats = model.forward_head(tokens, pre_logits=True)
            logits, aux_logits = model.head(feats), aux(feats)
            tok_loss = token_attribute_loss(tok_head, tokens[:, 1:], cov, attrs[idx], n_attr)
        loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=0.1)
        aux_loss = sum(F.cross_entropy(z.float(), attrs[idx, j])
                       for j, z in enumerate(aux_logits.split(n_attr, dim=1)))
        loss_total = loss + args.aux_weight * aux_loss + args.token_weight * tok_loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == steps - 1:
            log(f"[vit] step {step + 1}/{steps} loss {loss.item():.4f} aux {aux_loss.item():.3f} "
                f"tokens {tok_loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s")
    seconds = time.time() - t0
    for blk in model.blocks:
        blk.attn.fused_attn = True
    path = os.path.join(out_dir, "vit_tiny_synth.safetensors")
    save_fp16(model, path, {"arch": "vit_tiny_synth", "data": "synth-pretrain", "steps": steps,
                            "batch": bs, "seed": args.seed})
    return {"steps": steps, "batch": bs, "keep_tokens": args.keep_tokens, "seconds": round(seconds, 1),
            **loss_record(losses), "file": os.path.basename(path)}


def train_clip(args, data, out_dir: str, tok) -> dict:
    import types
    torch.manual_seed(args.seed)
    model, _, _ = zoo.create_clip_tiny_synth(pretrained=False)
    model.train()
    visual = model.visual
    # The image tower gets the ViT's initialisation and training aids (see train_vit).
    grid = visual.grid_size[0]
    sincos_pos_embed_(visual.positional_embedding, grid)
    init_gen = torch.Generator().manual_seed(args.seed + 3)
    for blk in visual.transformer.resblocks:
        mimetic_init_(blk.attn.in_proj_weight, blk.attn.out_proj.weight, blk.attn.num_heads, init_gen)
    blocks = list(visual.transformer.resblocks) + list(model.transformer.resblocks)
    for blk in blocks:
        blk.attention = types.MethodType(_explicit_attention, blk)
    n_attr = (len(synth.SHAPES), len(synth.COLOURS), len(synth.TEXTURES))
    tok_head = torch.nn.Linear(visual.transformer.width, 1 + sum(n_attr))   # training only
    params = list(model.parameters()) + list(tok_head.parameters())
    opt = torch.optim.AdamW(param_groups(model, 0.05) + param_groups(tok_head, 0.05), lr=args.clip_lr,
                            betas=(0.9, 0.98), eps=1e-6)
    images = data["images"]
    tokens = data["caption_tokens"]        # (N, V, L): V caption variants per image
    attrs = data["attributes"]
    coverage = data["coverage"]
    gen = torch.Generator().manual_seed(args.seed + 1)
    steps, bs = args.clip_steps, args.batch
    t0, losses = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.clip_lr, args.warmup)
        idx = torch.randint(len(images), (bs,), generator=gen)
        var = torch.randint(tokens.shape[1], (bs,), generator=gen)
        text = tokens[idx, var]
        x, cov = flip_with_coverage(images[idx].float() / 255, coverage[idx], gen)
        x = zoo.clip_normalize(x)
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            # open_clip's VisionTransformer.forward with patch tokens dropped after the positions.
            t = visual.conv1(x).flatten(2).transpose(1, 2)
            t = torch.cat([visual.class_embedding.to(t.dtype).expand(bs, 1, -1), t], 1)
            t, cov = keep_tokens(t + visual.positional_embedding.to(t.dtype), cov.flatten(1),
                                 args.keep_tokens, gen)
            t = visual.ln_post(visual.transformer(visual.ln_pre(t)))
            img_f = t[:, 0] @ visual.proj
            txt_f = model.encode_text(text)
            tok_loss = token_attribute_loss(tok_head, t[:, 1:], cov, attrs[idx], n_attr)
        img_f, txt_f = F.normalize(img_f.float(), dim=-1), F.normalize(txt_f.float(), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.t()
        # Captions repeat within a batch: every identical caption is a positive.
        same = (text[:, None, :] == text[None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        (loss + args.clip_token_weight * tok_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % args.log_every == 0 or step == steps - 1:
            log(f"[clip] step {step + 1}/{steps} loss {loss.item():.4f} tokens {tok_loss.item():.3f} "
                f"scale {model.logit_scale.exp().item():.1f} {time.time() - t0:.0f}s")
    seconds = time.time() - t0
    for blk in blocks:
        del blk.attention                  # back to the class's method
    path = os.path.join(out_dir, "clip_tiny_synth.safetensors")
    save_fp16(model, path, {"arch": "clip_tiny_synth", "data": "synth-pretrain captions",
                            "steps": steps, "batch": bs, "seed": args.seed})
    return {"steps": steps, "batch": bs, "keep_tokens": args.keep_tokens, "seconds": round(seconds, 1),
            **loss_record(losses), "file": os.path.basename(path)}


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
    p.add_argument("--vit-batch", type=int, default=32)
    p.add_argument("--vit-steps", type=int, default=3200)
    p.add_argument("--clip-steps", type=int, default=600)
    p.add_argument("--vit-lr", type=float, default=5e-4)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of the ViT's auxiliary shape/colour/texture losses on the CLS feature")
    p.add_argument("--token-weight", type=float, default=2.0,
                   help="weight of the per-patch-token coverage and attribute losses")
    p.add_argument("--clip-token-weight", type=float, default=1.0,
                   help="weight of the CLIP image tower's per-patch-token losses")
    p.add_argument("--keep-tokens", type=int, default=32,
                   help="patch tokens kept per training image (object first; 0 or 64: all)")
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
            "attributes": torch.tensor([ds.class_defs[y].ids for y in ds.targets]),
            "coverage": patch_coverage(ds)}
    log(f"rendered synth-pretrain (and its object masks): {len(ds)} images in {time.time() - t0:.1f}s")
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
