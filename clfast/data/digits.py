"""scikit-learn's 1,797 real handwritten digits (8×8, 16 grey levels), as 32×32 RGB.

Real data that ships with a dependency (``scikit-learn``): the small real-image benchmark that runs
offline. Images are upsampled bilinearly (8×8 → 32×32), scaled to [0, 1] (white strokes on black)
and repeated over three channels. The split is fixed without a random generator: within each class,
in the order scikit-learn stores the samples, every fifth sample (4, 9, 14, …) is a test sample,
giving 1,442 train and 355 test images.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .base import InMemoryImages
from .registry import register_dataset

TEST_EVERY = 5


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits_split_indices(targets: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split``: per class, the k-th sample is test iff k % 5 == 4."""
    rank = np.zeros(len(targets), dtype=np.int64)
    for c in np.unique(targets):
        idx = np.nonzero(targets == c)[0]
        rank[idx] = np.arange(len(idx))
    is_test = rank % TEST_EVERY == TEST_EVERY - 1
    return np.nonzero(is_test if split == "test" else ~is_test)[0]


class Digits(InMemoryImages):
    """Items ``(image (3, 32, 32) float in [0, 1], label)``; classes "0".."9"."""

    def __init__(self, split: str = "train", transform: Optional[Callable] = None, size: int = 32):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an int >= 8, got {size!r}")
        self.name = "digits"
        self.split = split
        self.transform = transform
        self.classes = [str(d) for d in range(10)]
        images, targets = _load_digits()
        keep = digits_split_indices(targets, split)
        self.indices = keep              # positions in sklearn's load_digits() order
        x = torch.from_numpy(images[keep] / 16.0)[:, None]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
        self._images = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        self.data = self._images.permute(0, 2, 3, 1).numpy()
        self.targets = [int(t) for t in targets[keep]]

    def __repr__(self) -> str:
        return f"Digits(split={self.split!r}, n={len(self)})"


@register_dataset("digits", kind="classification", num_classes=10, default_tasks=5,
                  description="scikit-learn's 1,797 real handwritten digits at 32×32, 5 tasks × 2")
def digits(split: str = "train", root=None, transform=None, *, size: int = 32) -> Digits:
    return Digits(split, transform, size)
