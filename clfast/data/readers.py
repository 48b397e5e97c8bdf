"""Readers of the standard continual-learning benchmarks from local disk (no downloads).

Each reader is registered with ``needs_root=True`` and yields ``(image, label)``: image a float
tensor ``(3, H, W)`` in [0, 1] at the file's native size (``transform``, e.g. from
:func:`clfast.data.transforms.build_transforms`, is applied to that tensor), label an int. Each
exposes ``targets``, ``classes``, ``name`` and ``split``. When files are missing the reader raises
``FileNotFoundError`` showing the expected layout under ``root`` and where to get the data.

- ``cifar100``: torchvision's python pickles, read directly.
- ``imagenet_r``, ``eurosat``: one folder per class; the 80/20 train/test split comes from a
  *split manifest* (CSV: path, label, split, sha256, size) generated once from a seed and then only
  read, so every run of every method uses the same split and the run record can hash it. Every read
  checks that each listed file exists with its recorded size (``verify=True`` re-hashes them too).
  Files are never moved or copied.
- ``cub200``: the official ``train_test_split.txt``.
- ``domainnet``: the official ``<domain>_{train,test}.txt`` lists; per-item ``domains`` for
  domain-incremental scenarios.

:func:`describe_datasets` lists every registered dataset, its expected layout and whether it is
found under a root (the ``clfast datasets`` command).

A file that cannot be decoded raises :class:`ImageReadError` naming it (also from a ``DataLoader``
worker, where the message carries the path into the main process); :func:`find_unreadable` lists the
items of a dataset that cannot be read, for runs that leave them out (``skip_bad_samples``).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..utils.files import atomic_write_text, sha256_file
from .base import InMemoryImages
from .registry import dataset_info, list_datasets, register_dataset

__all__ = [
    "ImageFiles", "Cifar100", "DomainNet", "SplitManifest", "ImageReadError", "load_image", "find_unreadable",
    "split_manifest",
    "generate_split_manifest", "generate_random_split_manifest", "read_split_manifest", "describe_datasets", "DOMAINNET_DOMAINS",
    "DEFAULT_SPLIT_SEED",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_SPLIT_SEED = 1993
MANIFEST_COLUMNS = ("path", "label", "split", "sha256", "size")
# manifests written before the size column (v1) are read as they are, without the size check
MANIFEST_COLUMNS_V1 = MANIFEST_COLUMNS[:4]
_MANIFEST_TAG = "# clfast split manifest v2:"
_MANIFEST_TAG_PREFIX = re.compile(r"# clfast split manifest v[12]:")


# --------------------------------------------------------------------------------------------------
# Shared helpers


class ImageReadError(OSError):
    """An image file that is missing, unreadable or does not decode; the message names the file.

    Takes one message argument, so that a ``DataLoader`` worker can re-raise it in the main process
    with the same type (the worker's traceback, and so the path, is appended to the message).
    ``reason`` (set where it is raised, not after a worker's re-raise) is the message without the advice.
    """

    reason: str = ""


def load_image(path: str) -> torch.Tensor:
    """Decode an image file to a float tensor ``(3, H, W)`` in [0, 1] (grey and RGBA become RGB).

    Uses Pillow (installed with torchvision); torchvision's own decoders are deprecated since 0.29.

    Raises:
        ImageReadError: the file is missing, unreadable, not an image, or truncated.
    """
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading image files needs Pillow: pip install pillow") from e
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises OSError (truncated, unidentified), ValueError and SyntaxError (broken headers)
        reason = f"cannot read image {path}: {type(e).__name__}: {e}"
        err = ImageReadError(f"{reason}. Replace or remove the file (a run with skip_bad_samples=true leaves "
                             f"unreadable images out, and counts them)")
        err.reason = reason
        raise err from e
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)


def find_unreadable(dataset, workers: int = 4) -> list[tuple[int, str]]:
    """The items of ``dataset`` that raise :class:`ImageReadError`: ``[(index, message), ...]`` by index.

    Reads every item once (decoding every image: the cost of one pass over the data, spread over
    ``workers`` threads, as Pillow decodes without holding the GIL). Any other exception propagates.
    """
    from concurrent.futures import ThreadPoolExecutor

    def check(i: int):
        try:
            dataset[i]
        except ImageReadError as e:
            return i, e.reason or str(e)
        return None

    n = len(dataset)
    if workers <= 1 or n < 64:
        found = [check(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            found = list(pool.map(check, range(n), chunksize=64))
    return [f for f in found if f is not None]


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _check_root(root) -> str:
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root must be a folder path, got {root!r}")
    return os.fspath(root)


def _missing_error(name: str, root: str, missing: Sequence[str], layout: str,
                   source: str) -> FileNotFoundError:
    shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
    return FileNotFoundError(
        f"dataset {name!r}: not found under root={root!r}; missing: {shown}.\n"
        f"Expected layout:\n{layout}\nGet the data: {source}")


# the helpers the other readers of data on disk (vqa_readers) share
check_root, check_split, missing_data_error = _check_root, _check_split, _missing_error


def _list_class_folders(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if not d.startswith(".")
                  and os.path.isdir(os.path.join(folder, d)))


def _list_images(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
                  and not f.startswith("."))


class ImageFiles(Dataset):
    """Images decoded from files on demand; items ``(image (3, H, W) float [0, 1], label)``.

    Attributes:
        files: absolute path of every item.
        targets: int label of every item.
        classes: class names, index = label.
    """

    def __init__(self, name: str, split: str, files: Sequence[str], targets: Sequence[int],
                 classes: Sequence[str], transform: Optional[Callable] = None):
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        if len(files) != len(targets):
            raise ValueError(f"files and targets must have the same length, got {len(files)} and "
                             f"{len(targets)}")
        self.name = name
        self.split = _check_split(split)
        self.files = list(files)
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform
        bad = [(f, t) for f, t in zip(self.files, self.targets) if not 0 <= t < len(self.classes)]
        if bad:
            raise ValueError(f"dataset {name!r} ({split}): {len(bad)} image(s) have a label outside the "
                             f"{len(self.classes)} classes [0, {len(self.classes)}): "
                             + ", ".join(f"{f} (label {t})" for f, t in bad[:5]))
        missing = [f for f in self.files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"dataset {name!r} ({split}): {len(missing)} listed image file(s) are missing: "
                                    f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = load_image(self.files[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
                f"classes={len(self.classes)}, n={len(self)})")


# --------------------------------------------------------------------------------------------------
# Split manifests (ImageNet-R, EuroSAT): the 80/20 split as a file, generated once


@dataclass(frozen=True)
class SplitManifest:
    """A train/test split of a class-folder dataset.

    Attributes:
        path: the manifest CSV.
        data_dir: the folder the ``paths`` are relative to.
        seed: the seed it was generated from (None for a manifest made elsewhere).
        paths, labels, splits, hashes: one entry per image, sorted by path.
        sha256: hash of the manifest file itself.
    """

    path: str
    data_dir: str
    seed: Optional[int]
    train_fraction: Optional[float]
    paths: tuple
    labels: tuple
    splits: tuple
    hashes: tuple
    sha256: str
    verified: bool = False   # every file was re-hashed against the manifest when it was read

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]

    def info(self) -> dict:
        """``{path, sha256, seed, train_fraction, n_train, n_test, verified}`` for the run record."""
        n_train = sum(s == "train" for s in self.splits)
        return {"path": os.path.abspath(self.path), "sha256": self.sha256, "seed": self.seed,
                "train_fraction": self.train_fraction, "n_train": n_train,
                "n_test": len(self.splits) - n_train, "verified": self.verified}


def generate_split_manifest(data_dir: str, path: str, seed: int = DEFAULT_SPLIT_SEED,
                            train_fraction: float = 0.8) -> None:
    """Write the split manifest of ``data_dir/<class>/<image>`` to ``path`` (atomically).

    Classes are the sorted sub-folders (label = position); within each class, the sorted files are
    permuted by ``np.random.default_rng([seed, label])`` and the first ``round(train_fraction · n)``
    are train (at least one train and one test image when a class has two or more). Every file is
    hashed (sha256) and its size in bytes recorded. The output depends only on the files and the arguments.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    classes = _list_class_folders(data_dir)
    buf = io.StringIO()
    buf.write(f"{_MANIFEST_TAG} seed={int(seed)} train_fraction={train_fraction!r}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for label, cls in enumerate(classes):
        files = _list_images(os.path.join(data_dir, cls))
        n = len(files)
        n_train = int(np.floor(train_fraction * n + 0.5))
        if n >= 2:
            n_train = min(max(n_train, 1), n - 1)
        is_train = np.zeros(n, dtype=bool)
        is_train[np.random.default_rng([int(seed), label]).permutation(n)[:n_train]] = True
        for f, tr in zip(files, is_train):
            full = os.path.join(data_dir, cls, f)
            writer.writerow((f"{cls}/{f}", label, "train" if tr else "test", sha256_file(full),
                             os.path.getsize(full)))
    atomic_write_text(path, buf.getvalue())


def generate_random_split_manifest(data_dir: str, path: str, seed: int = DEFAULT_SPLIT_SEED,
                                   train_fraction: float = 0.8) -> None:
    """Write the split that ``torch.utils.data.random_split`` gives over an ``ImageFolder`` of ``data_dir`` as a
    manifest (the released ConvPrompt/DualPrompt-PyTorch ImageNet-R split, which those codes make by moving
    files): images listed as ``ImageFolder`` lists them (sorted class folders, sorted files), the first
    ``int(train_fraction · n)`` of ``torch.randperm(n)`` from a generator seeded ``seed`` are train, the rest test.
    That the released code's global generator has drawn nothing else after ``torch.manual_seed(seed)`` when it
    splits is inferred, not checked. Read it with ``manifest_path=`` (e.g. ``dataset_args.manifest_path``).
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    items = [(f"{cls}/{f}", label) for label, cls in enumerate(_list_class_folders(data_dir))
             for f in _list_images(os.path.join(data_dir, cls))]
    n_train = int(train_fraction * len(items))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(int(seed))).tolist()
    train = set(order[:n_train])
    buf = io.StringIO()
    buf.write(f"{_MANIFEST_TAG} seed={int(seed)} train_fraction={train_fraction!r} scheme=random_split\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for i, (rel, label) in enumerate(items):
        full = os.path.join(data_dir, rel)
        writer.writerow((rel, label, "train" if i in train else "test", sha256_file(full), os.path.getsize(full)))
    atomic_write_text(path, buf.getvalue())


def read_split_manifest(path: str, data_dir: str, *, seed: Optional[int] = None,
                        verify: bool = False) -> SplitManifest:
    """Read and validate a split manifest.

    Every listed file must exist under ``data_dir`` with its recorded size (one ``stat`` per file; a
    manifest written before sizes were recorded, with the header ``path,label,split,sha256``, is only
    checked for existence). ``verify`` re-hashes every file, which also catches a change that kept the size.

    Args:
        path: the CSV (optional first line ``# clfast split manifest v2: seed=… train_fraction=…``,
            then the header ``path,label,split,sha256,size``).
        data_dir: folder the manifest's paths are relative to.
        seed: when given, the seed the manifest must have been generated with.
        verify: re-hash every file and compare with the manifest.

    Raises:
        ValueError: malformed manifest, seed mismatch, files whose size changed, or (``verify``) files
            whose sha256 changed; each names the manifest and the files.
        FileNotFoundError: a listed file is missing under ``data_dir``.
    """
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    lines = text.splitlines()
    file_seed, file_fraction = None, None
    tag = _MANIFEST_TAG_PREFIX.match(lines[0]) if lines else None
    if tag:
        fields = dict(kv.split("=", 1) for kv in lines[0][tag.end():].split())
        file_seed = int(fields["seed"]) if "seed" in fields else None
        file_fraction = float(fields["train_fraction"]) if "train_fraction" in fields else None
        lines = lines[1:]
    if seed is not None and file_seed is not None and int(seed) != file_seed:
        raise ValueError(f"split manifest {path} was generated with seed={file_seed}, but seed={seed} "
                         f"was requested; pass seed={file_seed}, or another manifest_path for a new split")
    rows = list(csv.reader(lines))
    if not rows or tuple(rows[0]) not in (MANIFEST_COLUMNS, MANIFEST_COLUMNS_V1):
        raise ValueError(f"split manifest {path}: header must be {','.join(MANIFEST_COLUMNS)} (or, written "
                         f"before sizes were recorded, {','.join(MANIFEST_COLUMNS_V1)}), "
                         f"got {','.join(rows[0]) if rows else '(empty file)'}")
    ncol = len(rows[0])
    paths, labels, splits, hashes, sizes = [], [], [], [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != ncol or row[2] not in ("train", "test") or not row[1].isdigit() or \
                not re.fullmatch(r"[0-9a-f]{64}", row[3]) or (ncol == 5 and not row[4].isdigit()):
            raise ValueError(f"split manifest {path}, row {n}: expected '{','.join(rows[0])}' with "
                             f"an int label, split train|test, a sha256 hex digest"
                             f"{' and a size in bytes' if ncol == 5 else ''}, got {row}")
        paths.append(row[0])
        labels.append(int(row[1]))
        splits.append(row[2])
        hashes.append(row[3])
        sizes.append(int(row[4]) if ncol == 5 else None)
    missing, resized = [], []
    for p, size in zip(paths, sizes):
        try:
            st = os.stat(os.path.join(data_dir, p))
        except OSError:
            missing.append(p)
            continue
        if size is not None and st.st_size != size:
            resized.append(f"{p} ({size} -> {st.st_size} bytes)")
    if missing:
        raise FileNotFoundError(
            f"split manifest {path} lists {len(missing)} file(s) missing under {data_dir}: "
            f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}. Restore the files; the "
            f"manifest is never regenerated over a changed dataset (delete it to make a new split)")
    if resized:
        raise ValueError(
            f"split manifest {path}: {len(resized)} file(s) under {data_dir} changed size since the manifest "
            f"was written: {', '.join(resized[:5])}{' …' if len(resized) > 5 else ''}. Restore the original "
            f"files, or delete the manifest to make a new split over the data as it is now")
    if verify:
        changed = [p for p, h in zip(paths, hashes) if sha256_file(os.path.join(data_dir, p)) != h]
        if changed:
            raise ValueError(f"split manifest {path}: {len(changed)} file(s) under {data_dir} differ from their "
                             f"recorded sha256: {', '.join(changed[:5])}{' …' if len(changed) > 5 else ''}. "
                             f"Restore the original files, or delete the manifest to make a new split")
    return SplitManifest(path, data_dir, file_seed, file_fraction, tuple(paths), tuple(labels),
                         tuple(splits), tuple(hashes), hashlib.sha256(raw).hexdigest(), verified=bool(verify))


def split_manifest(data_dir: str, path: Optional[str] = None, *, seed: Optional[int] = None,
                   train_fraction: float = 0.8, verify: bool = False) -> SplitManifest:
    """The split manifest at ``path``: read if it exists, otherwise generated once and then read.

    Args:
        data_dir: the class-folder dataset.
        path: manifest file; default ``data_dir/clfast_split_seed{seed}.csv``.
        seed: default ``DEFAULT_SPLIT_SEED`` (1993); for an existing manifest, None accepts
            whatever seed it was generated with.
        train_fraction: per-class train fraction, used only when generating.
        verify: re-hash the files of an existing manifest.
    """
    if path is None:
        path = os.path.join(data_dir, f"clfast_split_seed{DEFAULT_SPLIT_SEED if seed is None else seed}.csv")
    if not os.path.exists(path):
        generate_split_manifest(data_dir, path, DEFAULT_SPLIT_SEED if seed is None else int(seed),
                                train_fraction)
    return read_split_manifest(path, data_dir, seed=seed, verify=verify)


class ManifestImageFolder(ImageFiles):
    """A class-folder dataset split by a :class:`SplitManifest`; ``manifest_info()`` for the record."""

    def __init__(self, name: str, split: str, manifest: SplitManifest, classes: Sequence[str],
                 transform: Optional[Callable] = None):
        idx = manifest.indices(_check_split(split))
        super().__init__(name, split, [os.path.join(manifest.data_dir, manifest.paths[i]) for i in idx],
                         [manifest.labels[i] for i in idx], classes, transform)
        self.manifest = manifest

    def manifest_info(self) -> dict:
        return self.manifest.info()


def _manifest_classes(manifest: SplitManifest) -> list[str]:
    """Class folder of each label, checking that each label has exactly one folder."""
    folder_of: dict[int, str] = {}
    for p, y in zip(manifest.paths, manifest.labels):
        d = p.split("/", 1)[0]
        if folder_of.setdefault(y, d) != d:
            raise ValueError(f"split manifest {manifest.path}: label {y} names two folders, "
                             f"{folder_of[y]!r} and {d!r}")
    n = max(folder_of, default=-1) + 1
    if sorted(folder_of) != list(range(n)):
        raise ValueError(f"split manifest {manifest.path}: labels must be 0..{n - 1} without gaps, "
                         f"got {sorted(folder_of)}")
    return [folder_of[y] for y in range(n)]


# --------------------------------------------------------------------------------------------------
# CIFAR-100


CIFAR100_LAYOUT = """\
<root>/cifar-100-python/
    train          pickle: data (50000, 3072) uint8, fine_labels
    test           pickle: data (10000, 3072) uint8, fine_labels
    meta           pickle: fine_label_names"""
CIFAR100_SOURCE = ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract into <root>; "
                   "the same files torchvision's CIFAR100(download=True) writes)")


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts of lists, strings and numpy arrays, nothing executable."""

    _ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                ("_codecs", "encode"): codecs.encode}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return np.empty(0).__reduce__()[0]
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return np.empty(0).__reduce_ex__(5)[0]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return np.int64(0).__reduce__()[0]
        raise pickle.UnpicklingError(f"CIFAR pickle refers to {module}.{name}, which is not a numpy "
                                     f"array constructor; refusing to load it")


def _load_cifar_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        d = _NumpyUnpickler(f, encoding="latin1").load()
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar100_missing(root: str) -> list[str]:
    return [f"cifar-100-python/{n}" for n in ("train", "test", "meta")
            if not os.path.isfile(os.path.join(root, "cifar-100-python", n))]


class Cifar100(InMemoryImages):
    """CIFAR-100 from torchvision's python pickles; items ``(image (3, 32, 32) float [0, 1], label)``.

    ``data`` holds the uint8 images ``(N, 32, 32, 3)`` (torchvision's convention).
    """

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable] = None):
        root = _check_root(root)
        self.split = _check_split(split)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        missing = _cifar100_missing(root)
        if missing:
            raise _missing_error("cifar100", root, missing, CIFAR100_LAYOUT, CIFAR100_SOURCE)
        folder = os.path.join(root, "cifar-100-python")
        entry = _load_cifar_pickle(os.path.join(folder, split))
        meta = _load_cifar_pickle(os.path.join(folder, "meta"))
        for key, d, f in (("data", entry, split), ("fine_labels", entry, split),
                          ("fine_label_names", meta, "meta")):
            if key not in d:
                raise ValueError(f"{os.path.join(folder, f)}: expected key {key!r}, got {sorted(d)}")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{os.path.join(folder, split)}: data must have shape (N, 3072), "
                             f"got {data.shape}")
        self.name = "cifar100"
        self.transform = transform
        self.classes = [str(c) for c in meta["fine_label_names"]]
        self.targets = [int(t) for t in entry["fine_labels"]]
        if len(self.targets) != len(data):
            raise ValueError(f"{os.path.join(folder, split)}: {len(data)} images but "
                             f"{len(self.targets)} fine_labels")
        bad = [(i, t) for i, t in enumerate(self.targets) if not 0 <= t < len(self.classes)]
        if bad:
            raise ValueError(f"{os.path.join(folder, split)}: {len(bad)} fine_labels outside the "
                             f"{len(self.classes)} classes of meta [0, {len(self.classes)}): "
                             + ", ".join(f"item {i} has label {t}" for i, t in bad[:5]))
        self._images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        self.data = self._images.permute(0, 2, 3, 1).numpy()

    def __repr__(self) -> str:
        return f"Cifar100(split={self.split!r}, n={len(self)})"


@register_dataset("cifar100", kind="classification", num_classes=100, default_tasks=10,
                  description="CIFAR-100 (torchvision python format), 10 tasks × 10 classes",
                  needs_root=True, layout=CIFAR100_LAYOUT, probe=_cifar100_missing)
def cifar100(split: str = "train", root=None, transform=None) -> Cifar100:
    return Cifar100(root, split, transform)


# --------------------------------------------------------------------------------------------------
# ImageNet-R and EuroSAT: class folders + split manifest


IMAGENET_R_LAYOUT = """\
<root>/imagenet-r/
    n01443537/*.jpg     200 folders named by WordNet id
    ...
    README.txt          optional: lines "<wnid> <name>" give readable class names
    clfast_split_seed1993.csv   the split manifest, written on first use unless manifest_path= is given"""
IMAGENET_R_SOURCE = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar (extract into <root>)"

EUROSAT_LAYOUT = """\
<root>/EuroSAT_RGB/
    AnnualCrop/*.jpg    10 class folders, 27,000 64×64 RGB images in all
    ...
    SeaLake/*.jpg
    clfast_split_seed1993.csv   the split manifest, written on first use unless manifest_path= is given"""
EUROSAT_SOURCE = ("https://zenodo.org/records/7711810 (EuroSAT_RGB.zip, extract into <root>; "
                  "see https://github.com/phelber/EuroSAT)")


def _class_folder_missing(root: str, folder: str) -> list[str]:
    d = os.path.join(root, folder)
    if not os.path.isdir(d):
        return [f"{folder}/"]
    if not _list_class_folders(d):
        return [f"{folder}/<class>/"]
    return []


def _readable_names(data_dir: str, folders: Sequence[str]) -> list[str]:
    """Names from ``README.txt`` lines ``<wnid> <name>`` when every folder is listed, else folders."""
    readme = os.path.join(data_dir, "README.txt")
    if not os.path.isfile(readme):
        return list(folders)
    names = {}
    with open(readme, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^\s*(n\d{8})\s+(.+?)\s*$", line)
            if m:
                names[m.group(1)] = m.group(2)
    return [names[d] for d in folders] if all(d in names for d in folders) else list(folders)


def _manifest_dataset(name: str, folder: str, layout: str, source: str, split: str, root,
                      transform, seed, manifest_path, verify, train_fraction,
                      readable: bool) -> ManifestImageFolder:
    root = _check_root(root)
    _check_split(split)
    missing = _class_folder_missing(root, folder)
    if missing:
        raise _missing_error(name, root, missing, layout, source)
    data_dir = os.path.join(root, folder)
    manifest = split_manifest(data_dir, manifest_path, seed=seed, train_fraction=train_fraction,
                              verify=verify)
    folders = _manifest_classes(manifest)
    ds = ManifestImageFolder(name, split, manifest,
                             _readable_names(data_dir, folders) if readable else folders, transform)
    ds.class_dirs = folders
    return ds


@register_dataset("imagenet_r", kind="classification", num_classes=200, default_tasks=10,
                  description="ImageNet-R, 200 classes, 80/20 split from a seeded manifest, 10 tasks",
                  needs_root=True, layout=IMAGENET_R_LAYOUT, verifiable=True,
                  probe=lambda root: _class_folder_missing(root, "imagenet-r"))
def imagenet_r(split: str = "train", root=None, transform=None, *, seed: Optional[int] = None,
               manifest_path: Optional[str] = None, verify: bool = False,
               train_fraction: float = 0.8) -> ManifestImageFolder:
    """ImageNet-R; the split is read from (or, the first time, written to) ``manifest_path``.

    Args:
        seed: split seed, default 1993; with an existing ``manifest_path``, None takes its seed.
        manifest_path: default ``<root>/imagenet-r/clfast_split_seed{seed}.csv``; pass a path in a
            run folder to keep the split with the run.
        verify: re-hash every image against the manifest.
        train_fraction: per-class train fraction when generating.
    """
    return _manifest_dataset("imagenet_r", "imagenet-r", IMAGENET_R_LAYOUT, IMAGENET_R_SOURCE, split,
                             root, transform, seed, manifest_path, verify, train_fraction, True)


@register_dataset("eurosat", kind="classification", num_classes=10, default_tasks=5,
                  description="EuroSAT-RGB, 10 land-cover classes, 80/20 split from a seeded manifest",
                  needs_root=True, layout=EUROSAT_LAYOUT, verifiable=True,
                  probe=lambda root: _class_folder_missing(root, "EuroSAT_RGB"))
def eurosat(split: str = "train", root=None, transform=None, *, seed: Optional[int] = None,
            manifest_path: Optional[str] = None, verify: bool = False,
            train_fraction: float = 0.8) -> ManifestImageFolder:
    """EuroSAT-RGB; same split-manifest options as :func:`imagenet_r`."""
    return _manifest_dataset("eurosat", "EuroSAT_RGB", EUROSAT_LAYOUT, EUROSAT_SOURCE, split, root,
                             transform, seed, manifest_path, verify, train_fraction, False)


# --------------------------------------------------------------------------------------------------
# CUB-200-2011


CUB_LAYOUT = """\
<root>/CUB_200_2011/
    images.txt               "<image id> <relative path>"
    image_class_labels.txt   "<image id> <class id, 1-based>"
    train_test_split.txt     "<image id> <1 = train, 0 = test>"
    classes.txt              "<class id> <NNN.Class_name>"
    images/001.Black_footed_Albatross/*.jpg ..."""
CUB_SOURCE = "https://data.caltech.edu/records/65de6-vjr79 (CUB_200_2011.tgz, extract into <root>)"
_CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images")


def _cub_missing(root: str) -> list[str]:
    base = os.path.join(root, "CUB_200_2011")
    return [f"CUB_200_2011/{f}" for f in _CUB_FILES if not os.path.exists(os.path.join(base, f))]


def _read_id_table(path: str) -> dict[int, str]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(f"{path}, line {n}: expected '<id> <value>', got {line.rstrip()!r}")
            out[int(parts[0])] = parts[1].strip()
    return out


@register_dataset("cub200", kind="classification", num_classes=200, default_tasks=10,
                  description="CUB-200-2011 birds, official train/test split, 10 tasks × 20 classes",
                  needs_root=True, layout=CUB_LAYOUT, probe=_cub_missing)
def cub200(split: str = "train", root=None, transform=None) -> ImageFiles:
    root = _check_root(root)
    _check_split(split)
    missing = _cub_missing(root)
    if missing:
        raise _missing_error("cub200", root, missing, CUB_LAYOUT, CUB_SOURCE)
    base = os.path.join(root, "CUB_200_2011")
    images = _read_id_table(os.path.join(base, "images.txt"))
    labels = _read_id_table(os.path.join(base, "image_class_labels.txt"))
    is_train = _read_id_table(os.path.join(base, "train_test_split.txt"))
    class_table = _read_id_table(os.path.join(base, "classes.txt"))
    if set(images) != set(labels) or set(images) != set(is_train):
        raise ValueError(f"{base}: images.txt, image_class_labels.txt and train_test_split.txt must "
                         f"list the same image ids")
    n_cls = len(class_table)
    if sorted(class_table) != list(range(1, n_cls + 1)):
        raise ValueError(f"{base}/classes.txt: class ids must be 1..{n_cls}")
    want = "1" if split == "train" else "0"
    ids = [i for i in sorted(images) if is_train[i] == want]
    targets = [int(labels[i]) - 1 for i in ids]
    if any(not 0 <= t < n_cls for t in targets):
        raise ValueError(f"{base}/image_class_labels.txt: class ids must be in 1..{n_cls}")
    files = [os.path.join(base, "images", images[i]) for i in ids]
    # "001.Black_footed_Albatross" -> "Black footed Albatross"
    classes = [re.sub(r"^\d+\.", "", class_table[c]).replace("_", " ") for c in range(1, n_cls + 1)]
    ds = ImageFiles("cub200", split, files, targets, classes, transform)
    ds.class_dirs = [class_table[c] for c in range(1, n_cls + 1)]
    ds.image_ids = ids
    return ds


# --------------------------------------------------------------------------------------------------
# DomainNet


DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_LAYOUT = """\
<root>/domainnet/
    clipart/<class>/*.jpg  infograph/  painting/  quickdraw/  real/  sketch/   (345 classes each)
    clipart_train.txt  clipart_test.txt  ...  sketch_test.txt   lines "<domain>/<class>/<file> <label>\""""
DOMAINNET_SOURCE = ("http://ai.bu.edu/M3SDA/ (the images and the train/test lists of each domain; "
                    "extract into <root>/domainnet)")


def _domainnet_missing(root: str, domains: Sequence[str] = DOMAINNET_DOMAINS) -> list[str]:
    base = os.path.join(root, "domainnet")
    out = []
    for d in domains:
        for rel in (f"{d}/", f"{d}_train.txt", f"{d}_test.txt"):
            if not os.path.exists(os.path.join(base, rel)):
                out.append(f"domainnet/{rel}")
    return out


def _read_list(path: str) -> list[tuple[str, int]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}, line {n}: expected '<relative path> <label>', "
                                 f"got {line.rstrip()!r}")
            out.append((parts[0], int(parts[1])))
    return out


class DomainNet(ImageFiles):
    """DomainNet over the chosen domains; ``domains`` (per item, index into ``domain_names``).

    The class list is taken from the lists of all chosen domains and both splits, so train and test
    agree; names are the class folders with ``_`` read as a space.
    """

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable] = None,
                 domains: Union[str, Sequence[str], None] = None):
        root = _check_root(root)
        _check_split(split)
        if domains is None:
            domains = DOMAINNET_DOMAINS
        elif isinstance(domains, str):
            domains = (domains,)
        domains = tuple(domains)
        bad = [d for d in domains if d not in DOMAINNET_DOMAINS]
        if bad or not domains or len(set(domains)) != len(domains):
            raise ValueError(f"domains must be distinct names from {DOMAINNET_DOMAINS}, got {domains!r}")
        missing = _domainnet_missing(root, domains)
        if missing:
            raise _missing_error("domainnet", root, missing, DOMAINNET_LAYOUT, DOMAINNET_SOURCE)
        base = os.path.join(root, "domainnet")
        lists = {(d, s): _read_list(os.path.join(base, f"{d}_{s}.txt"))
                 for d in domains for s in ("train", "test")}
        folder_of: dict[int, str] = {}
        for (d, s), rows in lists.items():
            for rel, y in rows:
                parts = rel.split("/")
                if len(parts) < 3:
                    raise ValueError(f"{base}/{d}_{s}.txt: paths must be '<domain>/<class>/<file>', "
                                     f"got {rel!r}")
                if folder_of.setdefault(y, parts[1]) != parts[1]:
                    raise ValueError(f"{base}/{d}_{s}.txt: label {y} names two classes, "
                                     f"{folder_of[y]!r} and {parts[1]!r}")
        n_cls = max(folder_of, default=-1) + 1
        if sorted(folder_of) != list(range(n_cls)):
            absent = sorted(set(range(n_cls)) - set(folder_of))
            raise ValueError(f"{base}: labels must be 0..{n_cls - 1}; labels {absent[:10]} never occur "
                             f"in the lists of domains {domains}")
        files, targets, dom = [], [], []
        for k, d in enumerate(domains):
            for rel, y in lists[(d, split)]:
                files.append(os.path.join(base, rel))
                targets.append(y)
                dom.append(k)
        self.class_dirs = [folder_of[y] for y in range(n_cls)]
        super().__init__("domainnet", split, files, targets,
                         [c.replace("_", " ") for c in self.class_dirs], transform)
        self.domain_names = list(domains)
        self.domains = np.asarray(dom, dtype=np.int64)


@register_dataset("domainnet", kind="classification", num_classes=345, default_tasks=15,
                  description="DomainNet, 6 domains × 345 classes; class-incremental 15 × 23 or "
                              "domain-incremental over domains",
                  needs_root=True, layout=DOMAINNET_LAYOUT, probe=_domainnet_missing)
def domainnet(split: str = "train", root=None, transform=None, *,
              domains: Union[str, Sequence[str], None] = None) -> DomainNet:
    """DomainNet; ``domains`` (a name or list, default all six in the canonical order) chooses them."""
    return DomainNet(root, split, transform, domains)


# --------------------------------------------------------------------------------------------------
# What is registered, and what is found under a root


SHIPPED_LAYOUT = "ships with clfast: no files needed"


def describe_datasets(root: Optional[str] = None) -> list[dict]:
    """Every registered dataset, with its layout and whether its files are under ``root``.

    Args:
        root: the data folder to look in; None only describes.

    Returns:
        One dict per dataset, sorted by name: ``name``, ``kind``, ``num_classes``, ``default_tasks``,
        ``description``, ``ships`` (True when it needs no files), ``needs_root``, ``layout``,
        ``found`` (True/False; None when ``root`` is None and the dataset needs files; True for
        shipped datasets) and ``missing`` (the expected paths not found; empty when found or not
        checked). Nothing is decoded and no manifest is written.
    """
    out = []
    for name in list_datasets():
        info = dataset_info(name)
        found, missing = True, []
        if info.needs_root:
            if root is None:
                found = None
            elif info.probe is not None:
                missing = list(info.probe(os.fspath(root)))
                found = not missing
            else:
                found = None
        out.append({"name": name, "kind": info.kind, "num_classes": info.num_classes,
                    "default_tasks": info.default_tasks, "description": info.description,
                    "ships": not info.needs_root, "needs_root": info.needs_root,
                    "layout": info.layout or (SHIPPED_LAYOUT if not info.needs_root else ""),
                    "found": found, "missing": missing})
    return out
