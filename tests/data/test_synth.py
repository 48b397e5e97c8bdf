"""The shipped data: procedural synth datasets, scikit-learn digits, registry, descriptors."""

import colorsys
import json

import numpy as np
import pytest
import torch

from clfast.data import create_dataset, dataset_info, list_datasets
from clfast.data import synth as S
from clfast.data.class_descriptors import (DESCRIPTOR_DIR, load_descriptors, synth_shapes_descriptors,
                                           write_descriptors)


@pytest.fixture(scope="module")
def shapes_test():
    return create_dataset("synth-shapes", "test", n_per_class=3)


@pytest.fixture(scope="module")
def vqa_test():
    return create_dataset("synth-vqa", "test", n_per_task=60)


# ------------------------------------------------------------------------------------------------
# Classes


def test_class_vocabulary_and_disjoint_halves():
    vocab = S.class_vocabulary()
    names = [k.name for k in vocab]
    assert len(vocab) >= 200 and len(set(names)) == len(names)
    pre, shp = S.pretrain_classes(), S.shapes_classes()
    assert len(pre) == 100 and len(shp) == 100
    assert not set(k.name for k in pre) & set(k.name for k in shp)
    assert set(k.name for k in pre) | set(k.name for k in shp) == set(names)
    # Both halves use every attribute value and every (shape, colour) pair.
    for half in (pre, shp):
        assert {k.shape for k in half} == set(S.SHAPES)
        assert {k.colour for k in half} == set(S.COLOURS)
        assert {k.texture for k in half} == set(S.TEXTURES)
        assert len({(k.shape, k.colour) for k in half}) == len(S.SHAPES) * len(S.COLOURS)
    ds_pre = create_dataset("synth-pretrain", "test", n_per_class=1)
    ds_shp = create_dataset("synth-shapes", "test", n_per_class=1)
    assert not set(ds_pre.classes) & set(ds_shp.classes)


# ------------------------------------------------------------------------------------------------
# Determinism and splits


def test_same_seed_bitwise_identical_different_seed_differs():
    a = create_dataset("synth-shapes", "test", n_per_class=2, seed=0)
    b = create_dataset("synth-shapes", "test", n_per_class=2, seed=0)
    c = create_dataset("synth-shapes", "test", n_per_class=2, seed=1)
    assert a.data.dtype == np.uint8 and a.data.shape == (200, 32, 32, 3)
    assert np.array_equal(a.data, b.data)
    assert a.targets == b.targets == c.targets
    differs = [not np.array_equal(a.data[i], c.data[i]) for i in range(len(a))]
    assert all(differs)
    assert [a.caption(i) for i in range(len(a))] == [b.caption(i) for i in range(len(b))]


def test_item_renders_alone_as_in_a_batch():
    ds = create_dataset("synth-vqa", "test", n_per_task=5)
    for i in (0, 7, 29):
        alone = S.render([ds.scene(i)])[0]
        assert np.array_equal(alone, ds.data[i])
    # Chunking of the vectorised renderer does not change a byte either.
    assert np.array_equal(S.render(ds.scenes, chunk=7), ds.data)


def test_fixed_split_and_labels(shapes_test):
    train = create_dataset("synth-shapes", "train", n_per_class=3)
    assert len(shapes_test) == len(train) == 300
    assert shapes_test.targets == [i % 100 for i in range(300)]
    # Train and test scenes come from different streams: no image is shared.
    tr = {x.tobytes() for x in train.data}
    assert not any(x.tobytes() in tr for x in shapes_test.data)
    # Default sizes: 25 test images per class.
    assert len(create_dataset("synth-shapes", "test")) == 2500
    assert dataset_info("synth-shapes").default_tasks == 10


def test_getitem_interface_and_transform(shapes_test):
    img, y = shapes_test[5]
    assert isinstance(img, torch.Tensor) and img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and isinstance(y, int) and y == 5
    assert torch.equal(img, torch.from_numpy(shapes_test.data[5]).permute(2, 0, 1).float() / 255)
    ds = create_dataset("synth-shapes", "test", n_per_class=1, transform=lambda x: x * 2 - 1)
    assert ds[0][0].min() < 0
    assert shapes_test.name == "synth-shapes" and len(shapes_test.classes) == 100
    batch = next(iter(torch.utils.data.DataLoader(shapes_test, batch_size=8)))
    assert batch[0].shape == (8, 3, 32, 32) and batch[1].tolist() == list(range(8))


# ------------------------------------------------------------------------------------------------
# Captions and QA agree with the pixels


def _hue_of(rgb):
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    return h * 360.0


def _nearest_colour(rgb):
    h = _hue_of(rgb)
    dist = {c: min(abs(h - hue), 360 - abs(h - hue)) for c, hue in S.COLOUR_HUES.items()}
    return min(dist, key=dist.get)


def test_caption_colour_size_position_match_pixels(shapes_test):
    images, masks = S.render(shapes_test.scenes, return_masks=True)
    areas = {"small": [], "large": []}
    checked = 0
    for i in range(len(shapes_test)):
        words = shapes_test.caption(i).split()
        obj = shapes_test.scene(i).objects[0]
        colour = next(w for w in words if w in S.COLOURS)
        size = next(w for w in words if w in S.SIZES)
        assert colour == obj.colour and size == obj.size
        m = masks[i, 0]
        inside = m > 0.99
        assert inside.sum() >= 4
        # The brightest half of the object's pixels (the primary colour, not the pattern shade).
        px = images[i][inside].astype(np.float64) / 255
        bright = px[px.max(1) >= np.median(px.max(1))].mean(0)
        assert _nearest_colour(bright) == colour, (i, shapes_test.caption(i), bright)
        areas[size].append(m.sum())
        # The object's coverage centroid is in the quadrant its position QA names, where the
        # object is clearly off both midlines (a crescent's centroid sits up to 0.6 r off-centre).
        ys, xs = np.nonzero(m > 0.5)
        q = 2 * int(ys.mean() + 0.5 >= 16) + int(xs.mean() + 0.5 >= 16)
        qa = {q_: a for f, q_, a in shapes_test.qa(i)}
        if min(abs(obj.cx - 16), abs(obj.cy - 16)) > 0.7 * obj.radius:
            checked += 1
            assert qa[f"where is the {obj.colour} {obj.shape}"] == S.POSITIONS[q]
        assert qa[f"what color is the {obj.shape}"] == colour
    assert np.mean(areas["large"]) > 1.8 * np.mean(areas["small"])
    assert checked >= 10


def test_caption_background_matches_pixels(shapes_test):
    images, masks = S.render(shapes_test.scenes, return_masks=True)
    for i in range(len(shapes_test)):
        bg = masks[i, 0] < 0.01
        lum = images[i][bg].mean() / 255
        word = "dark" if "dark background" in shapes_test.caption(i) else "light"
        assert (lum < 0.45) if word == "dark" else (lum > 0.55), (i, lum)


def test_shapes_are_distinct_masks():
    base = dict(colour="red", cx=16.0, cy=16.0, radius=12.0, angle=0.3, hsv=(0.0, 1.0, 1.0),
                tex_phase=(0.0, 0.0), size="large", quadrant=3)
    masks = {}
    for shape in S.SHAPES:
        obj = S.SynthObject(shape=shape, texture="solid", **base)
        scene = S.Scene((obj,), "dark", (0.0, 0.0, 0.1), (0.0, 0.0), 0.0, (0,))
        masks[shape] = S.render([scene], return_masks=True)[1][0, 0] > 0.5
        assert 40 < masks[shape].sum() < 0.9 * 32 * 32, shape
    for a in S.SHAPES:
        for b in S.SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.9, (a, b, iou)


def test_texture_changes_pixels_inside_the_object():
    base = dict(shape="square", colour="blue", cx=16.0, cy=16.0, radius=12.0, angle=0.0,
                hsv=(0.62, 1.0, 1.0), tex_phase=(0.1, 0.2), size="large", quadrant=3)
    stds = {}
    for t in S.TEXTURES:
        scene = S.Scene((S.SynthObject(texture=t, **base),), "dark", (0.0, 0.0, 0.1), (0.0, 0.0), 0.0, (0,))
        img, m = S.render([scene], return_masks=True)
        stds[t] = img[0][m[0, 0] > 0.99].max(-1).std()   # spread of the brightness
    assert stds["solid"] < 2 and all(stds[t] > 20 for t in ("striped", "dotted", "checkered"))


ALLOWED = {"attribute": set(S.COLOURS) | set(S.SHAPES), "count": set(S.NUMBERS),
           "relation": set(S.COLOURS) | set(S.SHAPES), "position": set(S.POSITIONS),
           "existence": {"yes", "no"}, "size": set(S.SIZES)}


def _check_questions(ds):
    """Every answer is the one the scene gives; returns the answers seen per family."""
    seen = {f: set() for f in S.VQA_FAMILIES}
    for i in range(len(ds)):
        fam = S.VQA_FAMILIES[ds.families[i]]
        q, a = ds.questions[i], ds.answers[i]
        objs = ds.scene(i).objects
        assert a in ALLOWED[fam] and ds.classes[ds.targets[i]] == a
        seen[fam].add(a)
        assert 1 <= len(objs) <= 4 and len({o.quadrant for o in objs}) == len(objs)
        assert len({(o.colour, o.shape) for o in objs}) == len(objs)
        if q == "how many objects are there":
            assert a == S.NUMBERS[len(objs)]
        elif q.startswith("how many") and q.split()[2] in S.COLOURS:
            assert a == S.NUMBERS[sum(o.colour == q.split()[2] for o in objs)]
        elif q.startswith("how many"):
            shape = next(s for s in S.SHAPES if S.SHAPE_PLURALS[s] == q.split()[2])
            assert a == S.NUMBERS[sum(o.shape == shape for o in objs)]
        elif q.startswith("is there a"):
            c, s = q.split()[3:5]
            assert (a == "yes") == any(o.colour == c and o.shape == s for o in objs)
        elif q.startswith("where is the"):
            c, s = q.split()[3:5]
            (o,) = [o for o in objs if o.colour == c and o.shape == s]
            assert a == o.position
        elif fam == "relation":
            assert len(objs) >= 2
    return seen


def test_vqa_families_answers_and_consistency(vqa_test):
    assert len(vqa_test.task_names) == 6 and len(set(vqa_test.task_names)) == 6
    assert vqa_test.classes == list(S.VQA_ANSWERS) and len(set(vqa_test.classes)) == len(vqa_test.classes)
    assert sorted(set(vqa_test.task_ids)) == list(range(6))
    assert np.bincount(vqa_test.task_ids).tolist() == [60] * 6
    assert vqa_test.families == vqa_test.task_ids          # task_split="family": a task per family
    seen = _check_questions(vqa_test)
    # Every family shows more than one answer (no constant family).
    assert all(len(v) >= 2 for v in seen.values()), seen
    item = vqa_test[3]
    assert set(item) == {"image", "question", "answer", "label", "task"}
    assert item["image"].shape == (3, 64, 64) and item["task"] == 3


def test_vqa_position_answers_match_mask_centroids(vqa_test):
    images, masks = S.render(vqa_test.scenes, return_masks=True)
    assert images.shape[1:] == (64, 64, 3) and masks.shape[2:] == (64, 64)
    for i in range(len(vqa_test)):
        for k, o in enumerate(vqa_test.scene(i).objects):
            ys, xs = np.nonzero(masks[i, k] > 0.5)
            assert len(ys) > 0
            q = 2 * int(ys.mean() + 0.5 >= 32) + int(xs.mean() + 0.5 >= 32)
            assert S.POSITIONS[q] == o.position
            # the whole object lies inside its own quadrant
            assert (xs // 32 == o.quadrant % 2).all() and (ys // 32 == o.quadrant // 2).all()


def test_vqa_objects_have_pretraining_size(vqa_test):
    """At 64×64 a VQA object covers as many pixels as the single objects the towers were pretrained on
    (radius 6–13 at 32×32); the first release's 32×32 scenes drew them 2–4 times smaller."""
    pre = create_dataset("synth-pretrain", "test", n_per_class=1)
    area = lambda ds: np.array([m.sum() for m, sc in zip(S.render(ds.scenes, return_masks=True)[1], ds.scenes)
                                for m in m[:len(sc.objects)]])
    a_pre, a64 = area(pre), area(vqa_test)
    a32 = area(create_dataset("synth-vqa", "test", n_per_task=60, image_size=32))
    radii = np.array([o.radius for sc in vqa_test.scenes for o in sc.objects])
    assert radii.min() >= S.SINGLE_RADIUS[0] and radii.max() <= S.SINGLE_RADIUS[1]
    assert 0.6 < np.median(a64) / np.median(a_pre) < 1.6, (np.median(a64), np.median(a_pre))
    assert np.median(a32) < 0.5 * np.median(a_pre)
    sizes = {sz: np.array([o.radius for sc in vqa_test.scenes for o in sc.objects if o.size == sz])
             for sz in S.SIZES}
    assert sizes["small"].max() < sizes["large"].min()      # a gap: the size answer is visible


def test_vqa_image_size_32_is_the_first_release():
    """``image_size=32`` draws the first release's scenes: its bytes are pinned here."""
    import hashlib
    ds = create_dataset("synth-vqa", "test", n_per_task=50, image_size=32)
    assert ds.data.shape == (300, 32, 32, 3)
    assert hashlib.sha256(ds.data.tobytes()).hexdigest().startswith("f5d55be6e3f81242")
    with pytest.raises(ValueError, match="image_size"):
        create_dataset("synth-vqa", "test", n_per_task=1, image_size=48)


def test_vqa_scene_split_mixes_families_and_keeps_to_its_scene():
    ds = create_dataset("synth-vqa", "test", n_per_task=36, task_split="scene")
    assert ds.task_split == "scene" and len(ds.task_names) == 6
    assert np.bincount(ds.task_ids).tolist() == [36] * 6
    _check_questions(ds)
    images, masks = S.render(ds.scenes, return_masks=True)
    templates = {t: set() for t in range(6)}
    words = set(S.COLOURS) | set(S.SHAPES) | set(S.SHAPE_PLURALS.values()) | set(S.POSITIONS)
    for i, t in enumerate(ds.task_ids):
        background, group = S.SCENE_TASKS[t]
        sc = ds.scene(i)
        assert sc.background == background and {o.shape for o in sc.objects} <= set(group)
        lum = images[i][masks[i].sum(0) < 0.01].mean() / 255
        assert (lum < 0.45) if background == "dark" else (lum > 0.55)
        # questions about absent objects name only the task's shapes
        named = {w for w in ds.questions[i].split() if w in S.SHAPES} | \
            {s for s in S.SHAPES if S.SHAPE_PLURALS[s] in ds.questions[i].split()}
        assert named <= set(group), (ds.questions[i], group)
        templates[t].add(" ".join("_" if w in words else w for w in ds.questions[i].split()))
    # every family in every task, equally often
    for t in range(6):
        fams = [ds.families[i] for i in range(len(ds)) if ds.task_ids[i] == t]
        assert np.bincount(fams, minlength=6).tolist() == [6] * 6
    # the question templates are shared between tasks (under task_split="family" they never are)
    shared = set.intersection(*templates.values())
    assert len(shared) >= 5, shared
    fam = create_dataset("synth-vqa", "test", n_per_task=36)
    by_task = [{" ".join("_" if w in words else w for w in fam.questions[i].split())
                for i in range(len(fam)) if fam.task_ids[i] == t} for t in range(6)]
    assert all(not by_task[a] & by_task[b] for a in range(6) for b in range(a + 1, 6))
    with pytest.raises(ValueError, match="task_split"):
        create_dataset("synth-vqa", "test", n_per_task=1, task_split="shape")


def test_vqa_pretrain_uses_only_pretraining_classes_and_its_own_scenes():
    ds = create_dataset("synth-vqa-pretrain", "test", n=180)
    assert ds.name == "synth-vqa-pretrain" and ds.classes == list(S.VQA_ANSWERS)
    assert set(ds.task_ids) == {0} and ds.task_names == ["synth-vqa-pretrain"]
    assert ds.data.shape == (180, 64, 64, 3)
    assert np.bincount(ds.families).tolist() == [30] * 6
    _check_questions(ds)
    pre = {k.name for k in S.pretrain_classes()}
    shapes = {k.name for k in S.shapes_classes()}
    objs = [o for sc in ds.scenes for o in sc.objects]
    names = {f"{o.colour} {o.texture} {o.shape}" for o in objs}
    assert names <= pre and not names & shapes
    assert len(names) > 60                                 # and it covers most of them
    # never one of synth-vqa's scenes (either split), never one of its own train scenes
    train = create_dataset("synth-vqa-pretrain", "train", n=60)
    own = {x.tobytes() for x in ds.data}
    for other in (train, create_dataset("synth-vqa", "train", n_per_task=10),
                  create_dataset("synth-vqa", "test", n_per_task=10)):
        assert not any(x.tobytes() in own for x in other.data)
    # a mutant that ignored the pretraining textures would show synth-shapes classes here
    anyway = S.multi_object_scene(np.random.default_rng(0), 4, (0,), image_size=64, textures=S.pretrain_textures)
    assert all(sum(S.SynthClass(o.shape, o.colour, o.texture).ids) % 2 == 0 for o in anyway.objects)


def test_text_vocabulary_covers_captions_and_questions(shapes_test, vqa_test):
    from clfast.backbones.tokenizer import split_words
    vocab = set(S.text_vocabulary()) | {",", ":", "?", "."}
    words = set()
    for i in range(0, len(shapes_test), 7):
        for c in shapes_test.captions(i):
            words.update(split_words(c))
        for _, q, a in shapes_test.qa(i):
            words.update(split_words(q) + split_words(a))
    for i in range(len(vqa_test)):
        words.update(split_words(vqa_test.questions[i]) + split_words(vqa_test.caption(i)))
    assert words <= vocab, words - vocab


# ------------------------------------------------------------------------------------------------
# Digits


def test_digits_real_data():
    from sklearn.datasets import load_digits
    train, test = create_dataset("digits", "train"), create_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 355
    assert train.classes == [str(d) for d in range(10)] and dataset_info("digits").default_tasks == 5
    assert not set(train.indices) & set(test.indices)
    raw = load_digits()
    for ds in (train, test):
        img, y = ds[11]
        assert img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1 and 0.9 < img.max()
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
        j = ds.indices[11]
        assert y == int(raw.target[j])
        # Downsampled back to 8×8, the image is the scikit-learn digit.
        small = torch.nn.functional.avg_pool2d(img[:1][None], 4)[0, 0].numpy()
        assert np.corrcoef(small.ravel(), raw.images[j].ravel())[0, 1] > 0.9
    assert np.bincount(test.targets).min() >= 34   # 20 % of each class


# ------------------------------------------------------------------------------------------------
# Registry and errors


def test_registry_names_and_errors():
    assert {"synth-pretrain", "synth-shapes", "synth-vqa", "synth-vqa-pretrain", "digits"} <= set(list_datasets())
    with pytest.raises(ValueError, match="synth-shapes"):
        create_dataset("synth-shape")
    with pytest.raises(ValueError, match="split"):
        create_dataset("synth-shapes", split="val")
    with pytest.raises(TypeError, match="transform"):
        create_dataset("digits", transform=3)
    with pytest.raises(ValueError, match="n_per_class"):
        create_dataset("synth-shapes", n_per_class=0)
    with pytest.raises(ValueError, match="n_per_task"):
        create_dataset("synth-vqa", n_per_task=-1)
    with pytest.raises(TypeError):
        create_dataset("synth-shapes", bogus=1)


# ------------------------------------------------------------------------------------------------
# Descriptors


def test_shipped_descriptors_match_generator(tmp_path, shapes_test):
    shipped = load_descriptors("synth-shapes", classes=shapes_test.classes)
    assert shipped == synth_shapes_descriptors()
    assert list(shipped) == shapes_test.classes
    assert all(4 <= len(v) <= 10 and len(set(v)) == len(v) for v in shipped.values())
    # Classes sharing an attribute share its phrases.
    a, b = shipped["red striped circle"], shipped["blue solid circle"]
    assert set(a) & set(b) and set(a) != set(b)
    path = tmp_path / "d.json"
    write_descriptors(str(path), {"x": ["p"], "y": ["q"]})
    with pytest.raises(ValueError, match="keys"):
        load_descriptors(str(path), classes=["y", "x"])
    path.write_text(json.dumps({"x": "not a list"}))
    with pytest.raises(ValueError, match="phrases"):
        load_descriptors(str(path))
    with pytest.raises(FileNotFoundError):
        load_descriptors("no-such-dataset")
    assert DESCRIPTOR_DIR.endswith("descriptors")
