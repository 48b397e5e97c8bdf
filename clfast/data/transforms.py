"""Image transforms on float tensors ``(3, H, W)`` in [0, 1], the form every clfast dataset yields.

``build_transforms(input_size, train=...)`` gives the two pipelines the prompt-CL papers use:

- train (``augment=True``): ``RandomResizedCrop(input_size)`` (scale 0.08–1) + horizontal flip;
- eval (or train with ``augment=False``): ``Resize(int(input_size / crop_pct))`` (shorter side) +
  ``CenterCrop(input_size)``; an image already ``input_size × input_size`` passes unchanged.

``crop="none"`` is for VQA, where a crop can cut an object out of the image and a flip swaps left and
right, so both change position and relation answers (clumo.md §7): both pipelines resize the whole
image to ``input_size × input_size`` (no crop, aspect ratio not kept, as ALBEF's ``Resize((384, 384))``);
the train pipeline adds only what is asked for (``hflip``, ``extra``, e.g. a colour jitter), and is
deterministic when that is nothing.

No normalisation: the backbone normalises. The returned transform has ``deterministic`` (True for
the eval pipeline), so callers know when per-image feature caches are valid. Built on
``torchvision.transforms.v2``, which works on tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
CROPS = ("random", "none")

__all__ = ["build_transforms", "ImageTransform", "INTERPOLATIONS", "CROPS"]


def _v2():
    try:
        import torchvision.transforms.v2 as v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("clfast.data.transforms needs torchvision: pip install torchvision") from e
    return v2


class ImageTransform:
    """A picklable transform of one image ``(3, H, W)`` float in [0, 1] to ``(3, S, S)``.

    Args:
        input_size: output side S.
        random: True for the augmenting train pipeline, False for the deterministic eval one.
        crop_pct: eval only: resize the shorter side to ``int(S / crop_pct)``, then centre-crop S.
        interpolation: one of ``INTERPOLATIONS``.
        scale: train only: area range of ``RandomResizedCrop``.
        hflip: train only: probability of a horizontal flip.
        crop: ``"random"`` (the pipelines above) or ``"none"`` (resize the whole image to S × S in both;
            the train pipeline adds only ``hflip`` and ``extra``; ``scale`` and ``crop_pct`` unused).
    """

    def __init__(self, input_size: int, *, random: bool, crop_pct: float = 0.875,
                 interpolation: str = "bicubic", scale: Sequence[float] = (0.08, 1.0),
                 hflip: float = 0.5, extra: Sequence = (), crop: str = "random"):
        v2 = _v2()
        mode = getattr(v2.InterpolationMode, interpolation.upper())
        self.input_size = int(input_size)
        self.random = bool(random)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.crop = crop
        self._random_ops = False
        if crop == "none":
            # the resize is done in __call__ (skipped for an image already S × S)
            self._resize = v2.Resize((self.input_size, self.input_size), interpolation=mode, antialias=True)
            steps = []
            if self.random:
                if hflip > 0:
                    steps.append(v2.RandomHorizontalFlip(hflip))
                steps.extend(extra)
            self._random_ops = bool(steps)
            self.resize_size = self.input_size
        elif self.random:
            steps = [v2.RandomResizedCrop(self.input_size, scale=tuple(scale), interpolation=mode,
                                          antialias=True)]
            if hflip > 0:
                steps.append(v2.RandomHorizontalFlip(hflip))
            steps.extend(extra)
            self._random_ops = True
            self.resize_size = None
        else:
            self.resize_size = int(self.input_size / self.crop_pct)
            steps = [v2.Resize(self.resize_size, interpolation=mode, antialias=True),
                     v2.CenterCrop(self.input_size)]
        self._pipeline = v2.Compose(steps) if steps else None

    @property
    def deterministic(self) -> bool:
        """True when the output depends on the image only (no random op)."""
        return not self._random_ops

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise TypeError(f"image must be a tensor (C, H, W), got {got}")
        same = tuple(image.shape[-2:]) == (self.input_size, self.input_size)
        if self.crop == "none":
            out = image if same else self._resize(image).clamp_(0.0, 1.0)
            if not self._random_ops:
                return out
            out = self._pipeline(out)
            return out.clamp_(0.0, 1.0) if out.is_floating_point() else out
        if not self.random and same:
            return image
        out = self._pipeline(image)
        # Bicubic resampling overshoots; keep the [0, 1] contract.
        return out.clamp_(0.0, 1.0) if out.is_floating_point() else out

    def __repr__(self) -> str:
        if self.crop == "none":
            return (f"ImageTransform({'train' if self.random else 'eval'}, crop='none', resize={self.input_size}, "
                    f"then {self._pipeline if self._random_ops else 'nothing'})")
        if self.random:
            return f"ImageTransform(train, {self._pipeline})"
        return (f"ImageTransform(eval, resize={self.resize_size}, crop={self.input_size}, "
                f"interpolation={self.interpolation!r})")


def build_transforms(input_size: int, *, train: bool, augment: bool = True, crop_pct: float = 0.875,
                     interpolation: str = "bicubic", scale: Sequence[float] = (0.08, 1.0),
                     hflip: float = 0.5, extra: Sequence = (), crop: str = "random") -> ImageTransform:
    """The train or eval transform for a backbone taking ``input_size × input_size`` images.

    Args:
        input_size: the side of the backbone's input, e.g. 224 (ViT-B/16) or 32 (the synth models).
        train: the train pipeline (random crop + flip when ``augment``) or the eval one.
        augment: False makes the train pipeline the deterministic eval one.
        crop_pct: eval resize ratio, ``Resize(int(input_size / crop_pct)) + CenterCrop(input_size)``.
        interpolation: ``"bicubic"`` (timm's default for ViTs), ``"bilinear"`` or ``"nearest"``.
        scale: train pipeline: area range of the RandomResizedCrop.
        hflip: train pipeline: probability of a horizontal flip.
        extra: train pipeline: more random ops after the flip, each ``(3, S, S) float -> same``, e.g.
            ``torchvision.transforms.v2.RandAugment()`` (torchvision's v2 ops take float images).
        crop: ``"random"`` (default: RandomResizedCrop in training, resize + centre crop at eval) or
            ``"none"`` (VQA: both pipelines resize the whole image to ``input_size × input_size``; the
            train one then applies only ``hflip`` and ``extra``, so pass ``hflip=0`` for no flip).

    Returns:
        A callable ``(3, H, W) float [0, 1] -> (3, input_size, input_size) float [0, 1]``; in the eval
        pipeline an image already of the target size is returned unchanged (identity).

    Raises:
        ValueError: ``input_size`` not a positive int, ``crop_pct`` not in (0, 1], unknown
            ``interpolation``, ``crop`` not in ``CROPS``.
    """
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    if not isinstance(crop_pct, (int, float)) or not 0.0 < float(crop_pct) <= 1.0:
        raise ValueError(f"crop_pct must be a float in (0, 1], got {crop_pct!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if (not isinstance(scale, (list, tuple)) or len(scale) != 2
            or not 0.0 < float(scale[0]) <= float(scale[1]) <= 1.0):
        raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
    if not isinstance(hflip, (int, float)) or not 0.0 <= float(hflip) <= 1.0:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if not isinstance(extra, (list, tuple)) or not all(callable(op) for op in extra):
        raise ValueError(f"extra must be a list of callables (image -> image), got {extra!r}")
    return ImageTransform(input_size, random=bool(train and augment), crop_pct=float(crop_pct),
                          interpolation=interpolation, scale=scale, hflip=hflip, extra=tuple(extra), crop=crop)
