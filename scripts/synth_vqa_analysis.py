"""What synth-vqa offers a VQA method: answer priors per question family and what the tiny towers see.

1. **Answer distribution** (``--part answers``): per task, the majority-answer rate on the test split and
   two blind baselines trained on the train split: the most frequent answer of the task (family), and the
   most frequent answer of each exact question string ("question-only": a model that never looks at the
   image; unseen questions fall back to the family's majority).
2. **Linear probe** (``--part probe``): does the shipped ``clip_tiny_synth`` image tower carry an object's
   colour, shape and texture in the tokens of the quadrant it sits in? Scenes of 64×64 run the tower at
   64 px (its 8×8 position embeddings interpolated bicubically to 16×16, as a ViT-B/16 runs at 384 px),
   the first release's 32×32 scenes at its native 32 px; the feature of an object is the mean of the
   final (post-LN) patch tokens of its quadrant, or their mean weighted by the object's coverage of each
   patch (what an attention over tokens could pick out); a logistic regression is fit on train scenes and
   scored on test scenes. Reference: the same probe on synth-pretrain's single-object images (mean of all
   tokens), with about as many objects. ``64-tiled`` runs the tower at 32 px on each quadrant instead.

Run: ``python scripts/synth_vqa_analysis.py [--part answers|probe|all] [--n 300]``; prints a table.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import numpy as np
import torch

from clfast.data import create_dataset
from clfast.data import synth as S


def answer_stats(ds_train, ds_test) -> list[dict]:
    """Per task of ``ds_test``: n, majority-answer rate, family-majority and question-only blind accuracy
    (both fit on ``ds_train``), in percent."""
    by_task = defaultdict(Counter)
    by_question = defaultdict(Counter)
    for q, a, t in zip(ds_train.questions, ds_train.answers, ds_train.task_ids):
        by_task[t][a] += 1
        by_question[(t, q)][a] += 1
    rows = []
    for t, name in enumerate(ds_test.task_names):
        idx = [i for i, tt in enumerate(ds_test.task_ids) if tt == t]
        answers = [ds_test.answers[i] for i in idx]
        major = by_task[t].most_common(1)[0][0]
        blind = [by_question[(t, ds_test.questions[i])].most_common(1)[0][0] if by_question[(t, ds_test.questions[i])]
                 else major for i in idx]
        rows.append({"task": name, "n": len(idx),
                     "majority_rate": 100 * Counter(answers).most_common(1)[0][1] / len(idx),
                     "family_majority": 100 * np.mean([a == major for a in answers]),
                     "question_only": 100 * np.mean([b == a for b, a in zip(blind, answers)]),
                     "distinct_questions": len({ds_test.questions[i] for i in idx})})
    return rows


@torch.no_grad()
def tower_tokens(visual, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Final patch tokens ``(N, g, g, D)`` of open_clip's ``VisionTransformer`` on ``(N, 3, S, S)`` images in
    [0, 1] (OpenAI-normalised here), its position embeddings resized bicubically to the ``g = S / patch`` grid."""
    from clfast.backbones.zoo import clip_normalize

    pos = visual.positional_embedding                     # (1 + g0², D)
    g0 = int(round((pos.shape[0] - 1) ** 0.5))
    out = []
    for k in range(0, len(images), batch):
        x = visual.conv1(clip_normalize(images[k:k + batch]))
        g = x.shape[-1]
        grid = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        if g != g0:
            grid = torch.nn.functional.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
        p = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(g * g, -1)])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1) + p
        x = visual.ln_pre(x)
        x = visual.transformer(x)
        x = visual.ln_post(x)[:, 1:]
        out.append(x.reshape(x.shape[0], g, g, -1))
    return torch.cat(out)


def tiled_tokens(visual, images: torch.Tensor) -> torch.Tensor:
    """Tokens ``(N, g, g, D)`` of the tower run at its own size on each quadrant of ``(N, 3, S, S)`` images
    (four ``S/2`` tiles, no position-embedding interpolation), laid back out as one grid."""
    n, _, size, _ = images.shape
    h = size // 2
    tiles = images.reshape(n, 3, 2, h, 2, h).permute(0, 2, 4, 1, 3, 5).reshape(n * 4, 3, h, h)
    t = tower_tokens(visual, tiles)                                    # (4N, g/2, g/2, D)
    gh = t.shape[1]
    return t.reshape(n, 2, 2, gh, gh, -1).permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * gh, 2 * gh, -1)


def object_features(visual, ds, tiled: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One row per object: ``{"quadrant": mean token of its quadrant, "object": mean of the tokens weighted by
    the object's coverage of each patch}``, and its colour / shape / texture ids. ``tiled``: the tower runs on
    each quadrant separately (:func:`tiled_tokens`)."""
    tokens = (tiled_tokens if tiled else tower_tokens)(visual, ds._images.float() / 255)
    g = tokens.shape[1]
    _, masks = S.render(ds.scenes, return_masks=True)
    cover = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(masks), g)     # (N, 4, g, g)
    h = g // 2
    feats, labels = defaultdict(list), defaultdict(list)
    for i, sc in enumerate(ds.scenes):
        for k, o in enumerate(sc.objects):
            r, c = divmod(o.quadrant, 2)
            feats["quadrant"].append(tokens[i, r * h:(r + 1) * h, c * h:(c + 1) * h].mean((0, 1)).numpy())
            w = cover[i, k][..., None]
            feats["object"].append(((tokens[i] * w).sum((0, 1)) / w.sum()).numpy())
            labels["colour"].append(S.COLOURS.index(o.colour))
            labels["shape"].append(S.SHAPES.index(o.shape))
            labels["texture"].append(S.TEXTURES.index(o.texture))
    return {k: np.stack(v) for k, v in feats.items()}, {k: np.asarray(v) for k, v in labels.items()}


def single_features(visual, ds) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    tokens = tower_tokens(visual, ds._images.float() / 255)
    objs = [sc.objects[0] for sc in ds.scenes]
    return tokens.mean((1, 2)).numpy(), {
        "colour": np.array([S.COLOURS.index(o.colour) for o in objs]),
        "shape": np.array([S.SHAPES.index(o.shape) for o in objs]),
        "texture": np.array([S.TEXTURES.index(o.texture) for o in objs])}


def probe(train, test) -> dict[str, float]:
    """Test accuracy (percent) of a logistic regression per attribute, on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (xa, ya), (xb, yb) = train, test
    scaler = StandardScaler().fit(xa)
    xa, xb = scaler.transform(xa), scaler.transform(xb)
    out = {}
    for k in ("colour", "shape", "texture"):
        clf = LogisticRegression(max_iter=3000, C=1.0).fit(xa, ya[k])
        out[k] = 100 * float((clf.predict(xb) == yb[k]).mean())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("answers", "probe", "all"), default="all")
    ap.add_argument("--n", type=int, default=300, help="train questions per task (test: a third)")
    ap.add_argument("--probes", default="32,64,64-tiled",
                    help="comma-separated: 32 (32×32 scenes), 64 (64×64, tower at 64 px), 64-tiled (64×64, "
                         "tower at 32 px on each quadrant)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n_tr, n_te = args.n, max(args.n // 3, 1)
    if args.part in ("answers", "all"):
        for split in ("family", "scene"):
            tr = create_dataset("synth-vqa", "train", n_per_task=n_tr, task_split=split)
            te = create_dataset("synth-vqa", "test", n_per_task=n_te, task_split=split)
            print(f"\nsynth-vqa task_split={split}: answers per task (test n={n_te}, blind baselines fit on "
                  f"train n={n_tr})")
            print(f"{'task':<48} {'majority %':>10} {'family-majority %':>18} {'question-only %':>16} {'#questions':>10}")
            for r in answer_stats(tr, te):
                print(f"{r['task']:<48} {r['majority_rate']:>10.1f} {r['family_majority']:>18.1f} "
                      f"{r['question_only']:>16.1f} {r['distinct_questions']:>10d}")
            if split == "scene":   # the families inside the scene tasks
                fam_tr = [S.VQA_FAMILIES[f] for f in tr.families]
                fam_te = [S.VQA_FAMILIES[f] for f in te.families]
                tr.task_ids, tr.task_names = [S.VQA_FAMILIES.index(f) for f in fam_tr], list(S.VQA_FAMILIES)
                te.task_ids, te.task_names = [S.VQA_FAMILIES.index(f) for f in fam_te], list(S.VQA_FAMILIES)
                print("  the same questions grouped by family:")
                for r in answer_stats(tr, te):
                    print(f"  {r['task']:<46} {r['majority_rate']:>10.1f} {r['family_majority']:>18.1f} "
                          f"{r['question_only']:>16.1f} {r['distinct_questions']:>10d}")
    if args.part in ("probe", "all"):
        from clfast.backbones import create_clip_tiny_synth

        model, _, _ = create_clip_tiny_synth()
        visual = model.visual.eval()
        print("\nlinear probe of clip_tiny_synth's image tokens (test accuracy %, chance: colour 20, shape 10, "
              "texture 25)")
        print(f"{'input':<58} {'objects':>8} {'colour':>7} {'shape':>7} {'texture':>8}")
        # about as many objects as the scenes below hold (2.5 per scene)
        pre_tr = create_dataset("synth-pretrain", "train", n_per_class=max(n_tr * 6 * 5 // 2 // 100, 2))
        pre_te = create_dataset("synth-pretrain", "test", n_per_class=max(n_te * 6 * 5 // 2 // 100, 1))
        res = probe(single_features(visual, pre_tr), single_features(visual, pre_te))
        print(f"{'synth-pretrain single objects, 32 px (reference)':<58} {len(pre_te):>8d} {res['colour']:>7.1f} "
              f"{res['shape']:>7.1f} {res['texture']:>8.1f}", flush=True)
        for spec in args.probes.split(","):
            size, tiled = int(spec.split("-")[0]), spec.endswith("-tiled")
            tr = create_dataset("synth-vqa", "train", n_per_task=n_tr, image_size=size)
            te = create_dataset("synth-vqa", "test", n_per_task=n_te, image_size=size)
            (ftr, ytr), (fte, yte) = object_features(visual, tr, tiled), object_features(visual, te, tiled)
            tower = f"{size // 2} px per quadrant" if tiled else f"{size} px"
            for pool in ("quadrant", "object"):
                res = probe((ftr[pool], ytr), (fte[pool], yte))
                label = f"synth-vqa {size}×{size}, tower at {tower}, {pool} mean"
                print(f"{label:<58} {len(yte['shape']):>8d} {res['colour']:>7.1f} {res['shape']:>7.1f} "
                      f"{res['texture']:>8.1f}", flush=True)

if __name__ == "__main__":
    main()
