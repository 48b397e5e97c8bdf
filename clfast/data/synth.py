"""Procedural RGB data that ships with clfast: no files, no download, deterministic.

A *class* is a combination of shape × colour × texture (10 × 5 × 4 = 200 classes). Each image is a
scene of one object (classification, 32×32) or 1–4 objects (VQA, 64×64, one object per 32×32 quadrant,
so objects have the size the shipped towers were pretrained on), drawn at a random position, scale,
rotation and colour jitter over a random dark or light background with a gradient and pixel noise.
Every scene also yields a caption ("a small red striped triangle on a dark background") and
templated question–answer pairs about its attributes. The renderer takes the image size from the scenes.

The class vocabulary is split by the parity of (shape + colour + texture):

- ``synth-pretrain``: the even half (100 classes), used only to pretrain the shipped backbones;
- ``synth-shapes``: the odd half (100 classes), the class-incremental benchmark.

VQA: ``synth-vqa`` (6 tasks: one per question family, or with ``task_split="scene"`` one per background ×
shape group with every family in each; see :class:`SynthVQA`) and ``synth-vqa-pretrain`` (the same
questions on scenes of synth-pretrain classes only, one task: the offline warm-up set of a VQA head,
never synth-vqa's scenes, never a synth-shapes class). All share the answer vocabulary ``VQA_ANSWERS``.

Both halves contain every shape, colour and texture and every (shape, colour) pair, each with 2
textures, so the benchmark's classes are new *combinations* of attributes the backbones have seen.

Determinism: scene ``i`` of a split is drawn from ``np.random.default_rng([seed, stream, i])``,
where ``stream`` identifies (dataset, split); so any item can be generated on its own and train and
test never share a scene. Rendering is element-wise numpy on a 32×32 grid (signed distances,
anti-aliased by one pixel), batched over scenes; the same scene renders to the same bytes whether it
is drawn alone or in a batch. 10,000 32×32 images take ≈ 4 s on one idle core (≈ 6 s on a busy one):
about 55 % drawing the scene parameters, 45 % rendering; 64×64 VQA scenes ≈ 1.6 ms each on a busy core.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import InMemoryImages
from .registry import register_dataset

IMAGE_SIZE = 32          # classification scenes (synth-pretrain, synth-shapes): the towers' pretraining size
VQA_IMAGE_SIZE = 64      # multi-object VQA scenes: one 32×32 quadrant per object

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "crescent",
          "heart")
SHAPE_PLURALS = {s: (s + "es" if s.endswith("s") else s + "s") for s in SHAPES}
COLOURS = ("red", "yellow", "green", "blue", "purple")
# Hue (degrees) of each colour's palette; the pattern colour of a texture is a dark shade of it.
COLOUR_HUES = {"red": 0.0, "yellow": 55.0, "green": 125.0, "blue": 225.0, "purple": 285.0}
TEXTURES = ("solid", "striped", "dotted", "checkered")
SIZES = ("small", "large")
BACKGROUNDS = ("dark", "light")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
VQA_FAMILIES = ("attribute", "count", "relation", "position", "existence", "size")
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}

# Closed answer vocabulary of synth-vqa (index = label).
VQA_ANSWERS = tuple(COLOURS) + tuple(SHAPES) + NUMBERS + POSITIONS + ("yes", "no") + SIZES

# Radius (pixels) of single objects; below SMALL_MAX the caption says "small".
SINGLE_RADIUS = (6.0, 13.0)
SMALL_MAX = 9.5
# Radius of the objects of a multi-object scene, by image size (each object sits in its own quadrant,
# of side image_size / 2). At 64×64 the radii are the pretraining ones (SINGLE_RADIUS), split around
# SMALL_MAX with a gap so that "small" and "large" stay apart; 32×32 is the first release's layout
# (objects smaller than anything the towers saw in pretraining), kept for comparison.
VQA_RADIUS = {32: {"small": (3.0, 4.5), "large": (5.5, 7.0)},
              64: {"small": (6.0, 8.5), "large": (10.5, 13.0)}}
# Task split "scene" (a CLOVE-scene analogue): a task is a background kind × a group of shapes, and
# its scenes draw their objects' shapes from that group only; every task mixes all question families.
SHAPE_GROUPS = (("circle", "square", "triangle"), ("star", "ring", "cross"),
                ("diamond", "hexagon", "crescent", "heart"))
SCENE_TASKS = tuple((bg, group) for bg in BACKGROUNDS for group in SHAPE_GROUPS)
TASK_SPLITS = ("family", "scene")

# Streams of the per-scene random generator, one per (dataset, split).
_STREAMS = {("synth-pretrain", "train"): 11, ("synth-pretrain", "test"): 12,
            ("synth-shapes", "train"): 21, ("synth-shapes", "test"): 22,
            ("synth-vqa", "train"): 31, ("synth-vqa", "test"): 32,
            ("synth-vqa-pretrain", "train"): 41, ("synth-vqa-pretrain", "test"): 42}


# --------------------------------------------------------------------------------------------------
# Classes


@dataclass(frozen=True)
class SynthClass:
    """One class of the vocabulary: a (shape, colour, texture) combination."""

    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"

    @property
    def ids(self) -> tuple[int, int, int]:
        return SHAPES.index(self.shape), COLOURS.index(self.colour), TEXTURES.index(self.texture)


def class_vocabulary() -> list[SynthClass]:
    """All 200 classes, shape-major order."""
    return [SynthClass(s, c, t) for s in SHAPES for c in COLOURS for t in TEXTURES]


def pretrain_classes() -> list[SynthClass]:
    """The 100 classes of synth-pretrain: (shape + colour + texture) even."""
    return [k for k in class_vocabulary() if sum(k.ids) % 2 == 0]


def shapes_classes() -> list[SynthClass]:
    """The 100 classes of synth-shapes: (shape + colour + texture) odd."""
    return [k for k in class_vocabulary() if sum(k.ids) % 2 == 1]


# --------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SynthObject:
    """One drawn object. Coordinates in pixels, (0, 0) is the top-left corner, y points down."""

    shape: str
    colour: str
    texture: str
    cx: float
    cy: float
    radius: float
    angle: float            # rotation, radians
    hsv: tuple[float, float, float]   # jittered primary colour, each in [0, 1]
    tex_phase: tuple[float, float]    # texture offset in [0, 1) periods
    size: str               # "small" | "large"
    quadrant: int           # 0..3, index into POSITIONS, from the centre

    @property
    def position(self) -> str:
        return POSITIONS[self.quadrant]

    def phrase(self, size: bool = True, texture: bool = True) -> str:
        words = ([self.size] if size else []) + [self.colour] + \
            ([self.texture] if texture else []) + [self.shape]
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SynthObject, ...]
    background: str                      # "dark" | "light"
    bg_hsv: tuple[float, float, float]
    bg_gradient: tuple[float, float]
    noise_sigma: float
    noise_key: tuple[int, ...]           # seeds the pixel noise
    image_size: int = IMAGE_SIZE         # side of the rendered image, pixels

    def caption(self) -> str:
        """Full caption, e.g. "a small red striped triangle on a dark background"."""
        if len(self.objects) == 1:
            return f"a {self.objects[0].phrase()} on a {self.background} background"
        parts = [f"a {o.phrase()} in the {o.position}" for o in self.objects]
        return f"{NUMBERS[len(parts)]} objects on a {self.background} background: " + \
            ", ".join(parts[:-1]) + " and " + parts[-1]


def _quadrant(cx: float, cy: float, size: int = IMAGE_SIZE) -> int:
    return 2 * int(cy >= size / 2) + int(cx >= size / 2)


def _scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream), int(index)])


def _background(rng: np.random.Generator, kind: Optional[str] = None):
    """Background parameters; ``kind`` forces "dark" or "light" (the draw is made anyway, so the
    stream advances the same)."""
    background = BACKGROUNDS[int(rng.integers(2))]
    background = kind if kind is not None else background
    v = rng.uniform(0.04, 0.30) if background == "dark" else rng.uniform(0.70, 0.96)
    bg_hsv = (float(rng.uniform()), float(rng.uniform(0.0, 0.3)), float(v))
    grad = (float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08)))
    sigma = float(rng.uniform(0.01, 0.05))
    return background, bg_hsv, grad, sigma


def _object_colour(rng: np.random.Generator, colour: str) -> tuple[float, float, float]:
    hue = (COLOUR_HUES[colour] + rng.uniform(-10.0, 10.0)) / 360.0 % 1.0
    return float(hue), float(rng.uniform(0.75, 1.0)), float(rng.uniform(0.8, 1.0))


def single_object_scene(klass: SynthClass, seed: int, stream: int, index: int) -> Scene:
    """The scene of item ``index`` of a classification split: one object of ``klass``."""
    rng = _scene_rng(seed, stream, index)
    r = float(rng.uniform(*SINGLE_RADIUS))
    lo, hi = r + 0.5, IMAGE_SIZE - r - 0.5
    cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    obj = SynthObject(
        shape=klass.shape, colour=klass.colour, texture=klass.texture, cx=cx, cy=cy, radius=r,
        angle=float(rng.uniform(0, 2 * math.pi)), hsv=_object_colour(rng, klass.colour),
        tex_phase=(float(rng.uniform()), float(rng.uniform())),
        size="small" if r < SMALL_MAX else "large", quadrant=_quadrant(cx, cy))
    background, bg_hsv, grad, sigma = _background(rng)
    return Scene((obj,), background, bg_hsv, grad, sigma, (int(seed), int(stream), int(index), 1))


def multi_object_scene(rng: np.random.Generator, n_objects: int, noise_key: tuple[int, ...], *,
                       image_size: int = IMAGE_SIZE, shapes: Sequence[str] = SHAPES,
                       textures: Optional[Callable[[int, int], Sequence[int]]] = None,
                       background: Optional[str] = None) -> Scene:
    """A scene of ``n_objects`` (1–4) objects, one per quadrant, with distinct (colour, shape).

    Args:
        rng: the scene's generator (every parameter is drawn from it, in a fixed order).
        n_objects: 1..4.
        noise_key: seeds the pixel noise.
        image_size: 32 or 64 (``VQA_RADIUS`` keys); each object sits in a quadrant of side
            ``image_size / 2`` with a radius from ``VQA_RADIUS[image_size][size]``.
        shapes: the shapes objects may take (the ``scene`` task split restricts them to a group).
        textures: ``textures(shape_id, colour_id) -> allowed texture ids`` (synth-vqa-pretrain keeps
            to the synth-pretrain classes); default every texture.
        background: force "dark" or "light"; default drawn.

    With the defaults the draws are those of the first release, so ``image_size=32`` reproduces its
    scenes exactly.
    """
    if not 1 <= n_objects <= 4:
        raise ValueError(f"n_objects must be in 1..4, got {n_objects}")
    if image_size not in VQA_RADIUS:
        raise ValueError(f"image_size must be one of {sorted(VQA_RADIUS)}, got {image_size!r}")
    shape_ids = [SHAPES.index(x) for x in shapes]
    if len(shape_ids) < 2:
        raise ValueError(f"shapes must name at least 2 shapes of {SHAPES}, got {shapes!r}")
    half = image_size / 2
    quadrants = rng.permutation(4)[:n_objects]
    # Few colours and shapes per scene, so that counts above one are common.
    colours = rng.permutation(len(COLOURS))[: int(rng.integers(1, 4))]
    chosen_shapes = rng.permutation(len(shape_ids))[: int(rng.integers(1, 4))]
    pairs = [(int(c), shape_ids[int(s)]) for c in colours for s in chosen_shapes]
    if len(pairs) < n_objects:                 # too few combinations: widen the colours
        colours = rng.permutation(len(COLOURS))[:3]
        chosen_shapes = rng.permutation(len(shape_ids))[:2]
        pairs = [(int(c), shape_ids[int(s)]) for c in colours for s in chosen_shapes]
    chosen = [pairs[j] for j in rng.permutation(len(pairs))[:n_objects]]
    objects = []
    for q, (c, s) in zip(quadrants, chosen):
        size = SIZES[int(rng.integers(2))]
        r = float(rng.uniform(*VQA_RADIUS[image_size][size]))
        slack = half / 2 - r - 0.5
        cx = (q % 2) * half + half / 2 + float(rng.uniform(-slack, slack))
        cy = (q // 2) * half + half / 2 + float(rng.uniform(-slack, slack))
        colour = COLOURS[c]
        allowed = list(range(len(TEXTURES))) if textures is None else list(textures(s, c))
        texture = TEXTURES[allowed[int(rng.integers(len(allowed)))]]
        objects.append(SynthObject(
            shape=SHAPES[s], colour=colour, texture=texture,
            cx=cx, cy=cy, radius=r, angle=float(rng.uniform(0, 2 * math.pi)),
            hsv=_object_colour(rng, colour), tex_phase=(float(rng.uniform()), float(rng.uniform())),
            size=size, quadrant=int(q)))
    bg, bg_hsv, grad, sigma = _background(rng, background)
    return Scene(tuple(objects), bg, bg_hsv, grad, sigma, noise_key, int(image_size))


def pretrain_textures(shape_id: int, colour_id: int) -> list[int]:
    """The 2 textures that make (shape, colour, texture) a synth-pretrain class (even id sum)."""
    return [t for t in range(len(TEXTURES)) if (shape_id + colour_id + t) % 2 == 0]


# --------------------------------------------------------------------------------------------------
# Rendering


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV → RGB; h, s, v arrays in [0, 1]; returns (..., 3)."""
    h = np.asarray(h, dtype=np.float64)
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(np.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _box(u, v, bx, by):
    qx, qy = np.abs(u) - bx, np.abs(v) - by
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _convex(u, v, verts):
    """Signed distance (exact inside, approximate outside) to a convex polygon, vertices CCW."""
    d = None
    n = len(verts)
    for k in range(n):
        (ax, ay), (bx, by) = verts[k], verts[(k + 1) % n]
        ex, ey = bx - ax, by - ay
        ln = math.hypot(ex, ey)
        nx, ny = ey / ln, -ex / ln           # outward normal of a counter-clockwise edge
        dk = (u - ax) * nx + (v - ay) * ny
        d = dk if d is None else np.maximum(d, dk)
    return d


def _regular(n, radius, phase=0.0):
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


_TRIANGLE = _regular(3, 1.0, -math.pi / 2)
_HEXAGON = _regular(6, 0.95)
_HEART_TIP = [(0.82, -0.08), (0.0, 0.95), (-0.82, -0.08)]
_STAR_INNER = 0.45


def _star(u, v):
    rho = np.hypot(u, v)
    sector = 2 * math.pi / 5
    phi = np.mod(np.arctan2(v, u), sector) - sector / 2
    qx, qy = rho * np.cos(phi), rho * np.abs(np.sin(phi))
    # Folded into one half-spike: the edge from the tip (1, 0) to the inner vertex.
    ax, ay = 1.0, 0.0
    bx, by = _STAR_INNER * math.cos(sector / 2), _STAR_INNER * math.sin(sector / 2)
    ex, ey = bx - ax, by - ay
    ln = math.hypot(ex, ey)
    return ((qx - ax) * ey - (qy - ay) * ex) / ln


def _shape_sdf(shape: str, u, v):
    """Signed distance to ``shape`` in units of the object radius (negative inside)."""
    if shape == "circle":
        return np.hypot(u, v) - 0.95
    if shape == "square":
        return _box(u, v, 0.78, 0.78)
    if shape == "triangle":
        return _convex(u, v, _TRIANGLE)
    if shape == "star":
        return _star(u, v)
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.7) - 0.28
    if shape == "cross":
        return np.minimum(_box(u, v, 1.0, 0.3), _box(u, v, 0.3, 1.0))
    if shape == "diamond":
        return (0.55 * np.abs(u) + np.abs(v) - 0.55) / math.hypot(0.55, 1.0)
    if shape == "hexagon":
        return _convex(u, v, _HEXAGON)
    if shape == "crescent":
        return np.maximum(np.hypot(u, v) - 1.0, -(np.hypot(u - 0.45, v) - 0.8))
    if shape == "heart":
        lobes = np.minimum(np.hypot(u + 0.42, v + 0.3) - 0.5, np.hypot(u - 0.42, v + 0.3) - 0.5)
        return np.minimum(lobes, _convex(u, v, _HEART_TIP))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, xs, ys, ph0, ph1):
    """Pattern weight in [0, 1] (1 = dark shade) in object-local pixel coordinates."""
    if texture == "solid":
        return np.zeros_like(xs)
    if texture == "striped":
        return np.clip(np.sin(2 * math.pi * (xs / 4.0 + ph0)) * 3.0 + 0.5, 0.0, 1.0)
    if texture == "dotted":
        fx = np.mod(xs / 4.0 + ph0, 1.0) - 0.5
        fy = np.mod(ys / 4.0 + ph1, 1.0) - 0.5
        return np.clip(1.6 - np.hypot(fx, fy) * 4.0, 0.0, 1.0)
    if texture == "checkered":
        s = np.sin(2 * math.pi * (xs / 6.0 + ph0)) * np.sin(2 * math.pi * (ys / 6.0 + ph1))
        return np.clip(s * 4.0 + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown texture {texture!r}")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(1, 1, W)`` and ``(1, H, 1)`` of a ``size × size`` image."""
    g = np.arange(size, dtype=np.float64) + 0.5
    return g[None, None, :], g[None, :, None]


def _draw_objects(objs: Sequence[SynthObject], size: int):
    """Alpha (M, H, W) and colour (M, H, W, 3) of each object on a ``size × size`` canvas, batched
    per shape and texture."""
    m = len(objs)
    alpha = np.zeros((m, size, size))
    colour = np.zeros((m, size, size, 3))
    col = lambda name: np.array([getattr(o, name) for o in objs], dtype=np.float64)[:, None, None]
    cx, cy, r, ang = col("cx"), col("cy"), col("radius"), col("angle")
    gx, gy = _grid(size)
    dx, dy = gx - cx, gy - cy
    ca, sa = np.cos(ang), np.sin(ang)
    xs, ys = ca * dx + sa * dy, -sa * dx + ca * dy      # object-local pixel coordinates
    hsv = np.array([o.hsv for o in objs], dtype=np.float64)
    primary = _hsv_to_rgb(hsv[:, 0], hsv[:, 1], hsv[:, 2])[:, None, None, :]   # (M,1,1,3)
    ph = np.array([o.tex_phase for o in objs], dtype=np.float64)[:, :, None, None]
    shapes = np.array([o.shape for o in objs])
    textures = np.array([o.texture for o in objs])
    for shape in SHAPES:
        idx = np.nonzero(shapes == shape)[0]
        if idx.size:
            d = _shape_sdf(shape, xs[idx] / r[idx], ys[idx] / r[idx]) * r[idx]
            alpha[idx] = np.clip(0.5 - d, 0.0, 1.0)
    for texture in TEXTURES:
        idx = np.nonzero(textures == texture)[0]
        if idx.size:
            t = _texture(texture, xs[idx], ys[idx], ph[idx, 0], ph[idx, 1])[..., None]
            colour[idx] = primary[idx] * (1.0 - 0.7 * t)
    return alpha, colour


def render(scenes: Sequence[Scene], *, return_masks: bool = False, chunk: Optional[int] = None):
    """Render scenes to uint8 images, at the scenes' ``image_size`` S (all scenes must share it).

    Args:
        scenes: N scenes.
        return_masks: also return each object's coverage.
        chunk: scenes per vectorised batch (memory bound; results do not depend on it); default
            1024 at 32×32, scaled down by the pixel count for larger images.

    Returns:
        images ``(N, S, S, 3)`` uint8; with ``return_masks``, also masks ``(N, 4, S, S)`` float32
        in [0, 1], the coverage of object slot k (zero where the scene has fewer objects).
    """
    n = len(scenes)
    sizes = {int(s.image_size) for s in scenes}
    if len(sizes) > 1:
        raise ValueError(f"scenes must share one image_size to be rendered together, got {sorted(sizes)}")
    size = sizes.pop() if sizes else IMAGE_SIZE
    if chunk is None:
        chunk = max(1, 1024 * IMAGE_SIZE * IMAGE_SIZE // (size * size))
    gx, gy = _grid(size)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, 4, size, size), dtype=np.float32) if return_masks else None
    for start in range(0, n, chunk):
        batch = scenes[start:start + chunk]
        b = len(batch)
        bg = np.array([s.bg_hsv for s in batch], dtype=np.float64)
        base = _hsv_to_rgb(bg[:, 0], bg[:, 1], bg[:, 2])[:, None, None, :]
        grad = np.array([s.bg_gradient for s in batch], dtype=np.float64)
        h = size / 2
        shade = grad[:, 0, None, None] * (gx - h) / h + grad[:, 1, None, None] * (gy - h) / h
        img = base + shade[..., None]
        flat = [(i, k, o) for i, s in enumerate(batch) for k, o in enumerate(s.objects)]
        if flat:
            alpha, colour = _draw_objects([o for _, _, o in flat], size)
            rows = np.array([i for i, _, _ in flat])
            slots = np.array([k for _, k, _ in flat])
            for k in range(4):                     # one object per scene per slot: no collisions
                sel = np.nonzero(slots == k)[0]
                if sel.size == 0:
                    continue
                a = alpha[sel][..., None]
                img[rows[sel]] = img[rows[sel]] * (1 - a) + colour[sel] * a
                if return_masks:
                    masks[start + rows[sel], k] = alpha[sel]
        noise = np.stack([np.random.default_rng(list(s.noise_key)).standard_normal(
            (size, size, 3)) * s.noise_sigma for s in batch])
        img = np.clip(img + noise, 0.0, 1.0)
        images[start:start + b] = np.round(img * 255.0).astype(np.uint8)
    return (images, masks) if return_masks else images


# --------------------------------------------------------------------------------------------------
# Text: captions, questions, answers


def caption_variants(obj: SynthObject, background: str) -> list[str]:
    """Caption templates of a single-object scene (CLIP pretraining draws one per step)."""
    full, short = obj.phrase(), obj.phrase(size=False)
    return [f"a {full} on a {background} background", f"a {short}", f"a {full}",
            f"a {short} on a {background} background", f"a picture of a {short}",
            f"a {obj.colour} {obj.shape} with a {obj.texture} pattern"]


def class_prompt(klass: SynthClass) -> str:
    """The zero-shot text of a class: "a red striped triangle"."""
    return f"a {klass.name}"


def _ref(o: SynthObject) -> str:
    return f"the {o.colour} {o.shape}"


def single_object_qa(scene: Scene) -> list[tuple[str, str, str]]:
    """(family, question, answer) pairs about a one-object scene, one per family and attribute."""
    (o,) = scene.objects
    other = [c for c in COLOURS if c != o.colour][0]
    return [
        ("attribute", f"what color is the {o.shape}", o.colour),
        ("attribute", f"what shape is the {o.colour} object", o.shape),
        ("attribute", f"what pattern does the {o.shape} have", o.texture),
        ("count", "how many objects are there", "one"),
        ("position", f"where is {_ref(o)}", o.position),
        ("existence", f"is there a {o.colour} {o.shape}", "yes"),
        ("existence", f"is there a {other} {o.shape}", "no"),
        ("size", f"what size is {_ref(o)}", o.size),
    ]


def vqa_question(family: str, scene: Scene, rng: np.random.Generator,
                 shapes: Sequence[str] = SHAPES) -> tuple[str, str]:
    """One templated (question, answer) of ``family`` about ``scene``; the answer is in VQA_ANSWERS.

    ``shapes``: the shapes the scene could hold (its task's group in the ``scene`` split); questions
    about absent objects name only these, so that "no" and "zero" are never given away by a shape
    that cannot occur in the task.
    """
    objs = scene.objects
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    if family == "attribute":
        o = pick(objs)
        if rng.uniform() < 0.5:
            return f"what color is the object in the {o.position}", o.colour
        return f"what shape is the object in the {o.position}", o.shape
    if family == "count":
        kind = int(rng.integers(3))
        if kind == 0:
            return "how many objects are there", NUMBERS[len(objs)]
        if kind == 1:
            c = pick(objs).colour if rng.uniform() < 0.8 else pick(COLOURS)
            return f"how many {c} objects are there", NUMBERS[sum(o.colour == c for o in objs)]
        s = pick(objs).shape if rng.uniform() < 0.8 else pick(tuple(shapes))
        return f"how many {SHAPE_PLURALS[s]} are there", NUMBERS[sum(o.shape == s for o in objs)]
    if family == "relation":
        by_quadrant = {o.quadrant: o for o in objs}
        options = []
        for o in objs:
            row, colm = divmod(o.quadrant, 2)
            for word, (drow, dcol) in RELATIONS.items():
                r2, c2 = row + drow, colm + dcol
                if 0 <= r2 < 2 and 0 <= c2 < 2 and 2 * r2 + c2 in by_quadrant:
                    options.append((o, word, by_quadrant[2 * r2 + c2]))
        if not options:
            raise ValueError("a relation question needs two objects in adjacent quadrants")
        anchor, word, target = pick(options)
        if rng.uniform() < 0.5:
            return f"what shape is {word} {_ref(anchor)}", target.shape
        return f"what color is the object {word} {_ref(anchor)}", target.colour
    if family == "position":
        o = pick(objs)
        return f"where is {_ref(o)}", o.position
    if family == "existence":
        present = {(o.colour, o.shape) for o in objs}
        if rng.uniform() < 0.5:
            c, s = pick(sorted(present))
            return f"is there a {c} {s}", "yes"
        absent = [(c, s) for c in COLOURS for s in shapes if (c, s) not in present]
        # Half of the negatives share an attribute with an object present, so both must be read.
        near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
        c, s = pick(near if near and rng.uniform() < 0.5 else absent)
        return f"is there a {c} {s}", "no"
    if family == "size":
        o = pick(objs)
        if rng.uniform() < 0.5:
            return f"what size is {_ref(o)}", o.size
        return f"is {_ref(o)} small or large", o.size
    raise ValueError(f"unknown question family {family!r}; expected one of {VQA_FAMILIES}")


def text_vocabulary() -> list[str]:
    """Every word the captions, prompts, questions and answers can use, sorted."""
    words = set()
    words.update(SHAPES, SHAPE_PLURALS.values(), COLOURS, TEXTURES, SIZES, BACKGROUNDS, NUMBERS)
    for phrase in POSITIONS + tuple(RELATIONS) + VQA_ANSWERS:
        words.update(phrase.split())
    words.update("a the on in and of is are there what where how many color shape size pattern "
                 "does have object objects background picture with small large or".split())
    return sorted(words)


# --------------------------------------------------------------------------------------------------
# Datasets


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _check_positive(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class SynthClassification(InMemoryImages):
    """One-object scenes of a list of classes; item ``i`` has label ``i % num_classes``.

    Items are ``(image, label)``: image a float tensor ``(3, 32, 32)`` in [0, 1] (or whatever
    ``transform`` makes of it), label an int. ``targets`` holds all labels, ``data`` the uint8 images
    ``(N, 32, 32, 3)``; ``caption(i)``, ``captions(i)``, ``qa(i)`` and ``scene(i)`` describe item i.
    """

    def __init__(self, name: str, classes: Sequence[SynthClass], split: str, n_per_class: int,
                 seed: int = 0, transform: Optional[Callable] = None):
        self.name = name
        self.split = _check_split(split)
        self.seed = int(seed)
        self.n_per_class = _check_positive("n_per_class", n_per_class)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        self.transform = transform
        self.class_defs = list(classes)
        self.classes = [k.name for k in self.class_defs]
        stream = _STREAMS[(name, split)]
        n = len(self.class_defs) * self.n_per_class
        self.targets = [i % len(self.class_defs) for i in range(n)]
        self.scenes = [single_object_scene(self.class_defs[y], self.seed, stream, i)
                       for i, y in enumerate(self.targets)]
        self.data = render(self.scenes)
        self._images = torch.from_numpy(self.data).permute(0, 3, 1, 2).contiguous()

    def scene(self, index: int) -> Scene:
        return self.scenes[index]

    def caption(self, index: int) -> str:
        return self.scenes[index].caption()

    def captions(self, index: int) -> list[str]:
        s = self.scenes[index]
        return caption_variants(s.objects[0], s.background)

    def qa(self, index: int) -> list[tuple[str, str, str]]:
        return single_object_qa(self.scenes[index])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
                f"classes={len(self.classes)}, n={len(self)}, seed={self.seed})")


@register_dataset("synth-pretrain", kind="classification", num_classes=100, default_tasks=1,
                  description="procedural shapes, the 100 pretraining classes (disjoint from synth-shapes)")
def synth_pretrain(split: str = "train", root=None, transform=None, *, seed: int = 0,
                   n_per_class: Optional[int] = None) -> SynthClassification:
    """synth-pretrain: 100 classes × 300 train / 20 test images (``n_per_class`` overrides)."""
    n = n_per_class if n_per_class is not None else (300 if split == "train" else 20)
    return SynthClassification("synth-pretrain", pretrain_classes(), split, n, seed, transform)


@register_dataset("synth-shapes", kind="classification", num_classes=100, default_tasks=10,
                  description="procedural shapes, 100 held-out classes, 10 tasks × 10 classes")
def synth_shapes(split: str = "train", root=None, transform=None, *, seed: int = 0,
                 n_per_class: Optional[int] = None) -> SynthClassification:
    """synth-shapes: 100 classes × 100 train / 25 test images (``n_per_class`` overrides)."""
    n = n_per_class if n_per_class is not None else (100 if split == "train" else 25)
    return SynthClassification("synth-shapes", shapes_classes(), split, n, seed, transform)


class SynthVQA(Dataset):
    """Multi-object scenes with one templated question each; the tasks are question families or scenes.

    Task splits (``task_split``):

    - ``"family"`` (default): item ``i`` asks a question of family ``VQA_FAMILIES[i % 6]`` and belongs
      to task ``i % 6``. Each family has its own question templates, so the question text alone names
      the task: textual keys (a question embedding) separate these tasks trivially, and results on
      this split say little about task inference from text.
    - ``"scene"``: a CLOVE-scene analogue. Task ``k = i % 6`` is ``SCENE_TASKS[k]``, a background kind
      × a group of shapes (``SHAPE_GROUPS``): its scenes have that background and draw their shapes
      from that group only; the family cycles within each task (``VQA_FAMILIES[(i // 6) % 6]``), so
      every task mixes all families and the question text shares its templates across tasks (only the
      shape words differ). The answer distribution shifts between tasks (shape answers of a task come
      from its group), as it does between CLOVE's scene categories.

    Items are dicts: ``image`` (3, S, S) float in [0, 1] (or transformed), ``question`` str, ``answer``
    str, ``label`` int (index into ``classes``, the closed answer vocabulary ``VQA_ANSWERS``), ``task``
    int. ``targets``, ``task_ids``, ``families`` (family index per item) and ``questions`` hold them for
    every item. S = ``image_size``: 64 by default, so that each object (one per 32×32 quadrant) has a
    pretraining-sized radius (``VQA_RADIUS``); 32 gives the first release's smaller objects.
    """

    def __init__(self, split: str, n_per_task: int, seed: int = 0,
                 transform: Optional[Callable] = None, *, image_size: int = VQA_IMAGE_SIZE,
                 task_split: str = "family"):
        self._setup("synth-vqa", split, n_per_task, seed, transform, image_size)
        if task_split not in TASK_SPLITS:
            raise ValueError(f"task_split must be one of {TASK_SPLITS}, got {task_split!r}")
        self.task_split = task_split
        T = len(VQA_FAMILIES)
        if task_split == "family":
            self.task_names = list(VQA_FAMILIES)
            plan = [(i % T, i % T, SHAPES, None) for i in range(T * self.n_per_task)]
        else:
            self.task_names = [f"{bg} background, {'/'.join(g)}" for bg, g in SCENE_TASKS]
            plan = [(i % T, (i // T) % T, SCENE_TASKS[i % T][1], SCENE_TASKS[i % T][0])
                    for i in range(T * self.n_per_task)]
        self._generate(plan, textures=None)

    # shared by synth-vqa-pretrain ------------------------------------------------------------------
    def _setup(self, name: str, split: str, n_per_task: int, seed: int, transform, image_size: int) -> None:
        self.name = name
        self.split = _check_split(split)
        self.seed = int(seed)
        self.n_per_task = _check_positive("n_per_task", n_per_task)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        if isinstance(image_size, bool) or image_size not in VQA_RADIUS:
            raise ValueError(f"image_size must be one of {sorted(VQA_RADIUS)}, got {image_size!r}")
        self.transform = transform
        self.image_size = int(image_size)
        self.classes = list(VQA_ANSWERS)

    def _generate(self, plan, textures) -> None:
        """Draw item ``i`` from ``plan[i] = (task, family index, shapes, background or None)``."""
        stream = _STREAMS[(self.name, self.split)]
        self.scenes, self.questions, self.answers, self.task_ids, self.families = [], [], [], [], []
        half = self.image_size / 2
        for i, (task, fam, shapes, background) in enumerate(plan):
            rng = _scene_rng(self.seed, stream, i)
            family = VQA_FAMILIES[fam]
            low = 2 if family == "relation" else 1
            scene = multi_object_scene(rng, int(rng.integers(low, 5)), (self.seed, stream, i, 1),
                                       image_size=self.image_size, shapes=shapes, textures=textures,
                                       background=background)
            if family == "relation" and len(scene.objects) == 2 and \
                    {o.quadrant for o in scene.objects} in ({0, 3}, {1, 2}):
                # Diagonal pair: no left/right/above/below neighbour; move one object next door.
                o = scene.objects[1]
                q = o.quadrant ^ 1
                moved = dataclasses.replace(o, cx=o.cx + ((q % 2) - (o.quadrant % 2)) * half, quadrant=q)
                scene = dataclasses.replace(scene, objects=(scene.objects[0], moved))
            q, a = vqa_question(family, scene, rng, shapes)
            self.scenes.append(scene)
            self.questions.append(q)
            self.answers.append(a)
            self.task_ids.append(int(task))
            self.families.append(int(fam))
        self.targets = [self.classes.index(a) for a in self.answers]
        self.data = render(self.scenes)
        self._images = torch.from_numpy(self.data).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        img = self._images[index].float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return {"image": img, "question": self.questions[index], "answer": self.answers[index],
                "label": self.targets[index], "task": self.task_ids[index]}

    def scene(self, index: int) -> Scene:
        return self.scenes[index]

    def caption(self, index: int) -> str:
        return self.scenes[index].caption()

    def __repr__(self) -> str:
        split = f", task_split={self.task_split!r}" if hasattr(self, "task_split") else ""
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, tasks={len(self.task_names)}"
                f"{split}, answers={len(self.classes)}, image_size={self.image_size}, n={len(self)}, "
                f"seed={self.seed})")


class SynthVQAPretrain(SynthVQA):
    """The offline warm-up set: synth-vqa's question families and templates on scenes built only from
    the synth-pretrain classes, as one task.

    Every object is a synth-pretrain class (its texture is one of the two that make (shape, colour,
    texture) a pretraining class, :func:`pretrain_textures`), so no object is a synth-shapes class;
    scenes come from their own generator streams, so none is a synth-vqa scene. Rendered like
    synth-vqa (64×64 by default); the answer vocabulary is ``VQA_ANSWERS``, so a head warmed up here
    answers synth-vqa's questions. Item ``i`` asks family ``VQA_FAMILIES[i % 6]``; ``task_ids`` are all 0.
    """

    def __init__(self, split: str, n: int, seed: int = 0, transform: Optional[Callable] = None, *,
                 image_size: int = VQA_IMAGE_SIZE):
        self._setup("synth-vqa-pretrain", split, n, seed, transform, image_size)
        self.task_names = ["synth-vqa-pretrain"]
        T = len(VQA_FAMILIES)
        self._generate([(0, i % T, SHAPES, None) for i in range(self.n_per_task)], textures=pretrain_textures)


@register_dataset("synth-vqa", kind="vqa", num_classes=len(VQA_ANSWERS), default_tasks=6,
                  description="procedural 1–4 object scenes (64×64), 6 tasks: question families "
                              "(task_split=family) or scene kinds (task_split=scene), closed answers")
def synth_vqa(split: str = "train", root=None, transform=None, *, seed: int = 0,
              n_per_task: Optional[int] = None, image_size: int = VQA_IMAGE_SIZE,
              task_split: str = "family") -> SynthVQA:
    """synth-vqa: 6 tasks × 2,000 train / 500 test questions (``n_per_task`` overrides).

    ``task_split``: ``"family"`` (a task per question family) or ``"scene"`` (a task per background ×
    shape group, every family in every task); see :class:`SynthVQA`. ``image_size``: 64 (default) or 32.
    """
    n = n_per_task if n_per_task is not None else (2000 if split == "train" else 500)
    return SynthVQA(split, n, seed, transform, image_size=image_size, task_split=task_split)


@register_dataset("synth-vqa-pretrain", kind="vqa", num_classes=len(VQA_ANSWERS), default_tasks=1,
                  description="warm-up VQA: synth-vqa's questions on scenes of synth-pretrain classes, one task")
def synth_vqa_pretrain(split: str = "train", root=None, transform=None, *, seed: int = 0,
                       n: Optional[int] = None, image_size: int = VQA_IMAGE_SIZE) -> SynthVQAPretrain:
    """synth-vqa-pretrain: 6,000 train / 1,200 test questions (``n`` overrides), one task."""
    size = n if n is not None else (6000 if split == "train" else 1200)
    return SynthVQAPretrain(split, size, seed, transform, image_size=image_size)
