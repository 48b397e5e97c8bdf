"""Dataset registry: ``@register_dataset`` on a builder, ``create_dataset(name, ...)`` to build one.

Every registered dataset is a ``torch.utils.data.Dataset`` with the same interface:

- ``__getitem__(i)`` → ``(image, label)`` for classification, image a float tensor ``(3, H, W)`` in
  [0, 1] unless ``transform`` changes it; a dict (``image``, ``question``, ``answer``, ``label``,
  ``task``) for VQA;
- ``targets``: the int label of every item (so scenarios split by class without decoding images);
- ``classes``: the class names (VQA: the closed answer vocabulary), index = label;
- ``name``: the registered name.

A builder has the signature ``builder(split, root, transform, **kwargs)``; readers of data on disk
raise ``FileNotFoundError`` naming the expected layout under ``root``. Readers also register their
``layout`` (a short description of the files under ``root``) and a ``probe(root) -> list[str]`` that
names what is missing without reading the data (``clfast datasets`` shows both).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Optional

SPLITS = ("train", "test")
KINDS = ("classification", "vqa")


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about a dataset before building it."""

    name: str
    builder: Callable
    kind: str               # "classification" | "vqa"
    num_classes: int        # classes, or answers for VQA
    default_tasks: int      # tasks of the default continual scenario
    description: str
    needs_root: bool        # True for readers of data on local disk
    layout: str = ""        # expected files under root (readers of data on disk)
    probe: Optional[Callable[[str], list]] = None   # probe(root) -> missing paths, [] when all found
    verifiable: bool = False  # the builder takes verify=True: re-hash every file against recorded sha256s


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(name: str, *, kind: str, num_classes: int, default_tasks: int,
                     description: str = "", needs_root: bool = False, layout: str = "",
                     probe: Optional[Callable[[str], list]] = None, verifiable: bool = False):
    """Decorator registering ``builder(split, root, transform, **kwargs) -> Dataset`` as ``name``.

    Args:
        layout: for readers of data on disk, the expected files under ``root`` (a few lines).
        probe: for readers of data on disk, ``probe(root) -> list[str]``: the expected paths that
            are missing under ``root`` (empty when the data is there); must not decode the data.
        verifiable: the builder takes ``verify: bool`` and then re-hashes every file against the
            sha256s it recorded (``create_dataset(..., verify=True)``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if probe is not None and not callable(probe):
        raise TypeError(f"probe must be callable or None, got {type(probe).__name__}")

    def deco(builder: Callable) -> Callable:
        if name in _DATASETS and _DATASETS[name].builder is not builder:
            raise ValueError(f"dataset {name!r} is already registered by "
                             f"{_DATASETS[name].builder.__module__}.{_DATASETS[name].builder.__name__}")
        _DATASETS[name] = DatasetInfo(name, builder, kind, int(num_classes), int(default_tasks),
                                      description, needs_root, layout, probe, bool(verifiable))
        return builder

    return deco


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_DATASETS)


def _unknown(name) -> ValueError:
    close = difflib.get_close_matches(str(name), list(_DATASETS), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown dataset {name!r}{hint} Available: {', '.join(list_datasets())}")


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``; ValueError with close matches if unknown.

    ``"a+b+..."`` names a sequence of classification datasets (:mod:`clfast.data.sequence`): one task
    per part by default.
    """
    from .sequence import SEPARATOR

    if isinstance(name, str) and SEPARATOR in name and name not in _DATASETS:
        parts = name.split(SEPARATOR)
        infos = [dataset_info(p) for p in parts]
        vqa = [i.name for i in infos if i.kind != "classification"]
        if vqa:
            raise ValueError(f"dataset {name!r}: a sequence joins classification datasets only, not {vqa}")
        return DatasetInfo(name=name, builder=_sequence_builder(parts), kind="classification",
                           num_classes=sum(i.num_classes for i in infos), default_tasks=len(parts),
                           description="the sequence " + " → ".join(parts), needs_root=any(i.needs_root for i in infos),
                           verifiable=any(i.verifiable for i in infos))
    if name not in _DATASETS:
        raise _unknown(name)
    return _DATASETS[name]


def _sequence_builder(parts: list[str]) -> Callable:
    def build(split, root, transform, **kwargs):
        from .sequence import DatasetSequence

        # {part name: {...}} goes to that part only; other keys to every part
        shared = {k: v for k, v in kwargs.items() if k not in parts}
        own = {p: dict(kwargs.get(p) or {}) for p in parts}
        verify = bool(shared.pop("verify", False))
        return DatasetSequence([create_dataset(p, split, root, transform, verify=verify, **shared, **own[p])
                                for p in parts], parts)

    return build


def create_dataset(name: str, split: str = "train", root: Optional[str] = None,
                   transform: Optional[Callable] = None, *, verify: bool = False, **kwargs):
    """Build a registered dataset.

    Args:
        name: a name from ``list_datasets()``, e.g. ``"synth-shapes"``, ``"digits"``.
        split: ``"train"`` or ``"test"``.
        root: folder holding the data, for readers of data on disk; generated and packaged
            datasets ignore it.
        transform: callable applied to each image tensor ``(3, H, W)`` float in [0, 1].
        verify: re-hash every file against the sha256s the dataset recorded (its split manifest), for
            datasets registered ``verifiable``; others have no recorded hashes and ignore it (the
            cheap checks, every file present and of its recorded size, run on every build).
        **kwargs: dataset-specific options (e.g. ``seed``, ``n_per_class`` for the synth data).

    Raises:
        ValueError: unknown ``name`` (with close matches) or ``split``.
        TypeError: ``transform`` not callable.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a dataset name (str), got {type(name).__name__}")
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
    if info.needs_root and root is None:
        raise ValueError(f"dataset {name!r} reads data from disk: pass root=<folder>")
    if verify and info.verifiable:
        kwargs["verify"] = True
    return info.builder(split, root, transform, **kwargs)
