"""What the loop reads: each task's training, validation and test data with its transform, and loaders.

:class:`RunData` owns the run's transforms (the train transform with and without augmentation, the
eval one), the held-out validation split (``val_fraction``: a seeded per-class share of each task's
training data, fixed across ``seed``s) and the loaders: training loaders over an :class:`EpochSampler`,
evaluation and statistics loaders sharded over ranks without duplicates.

Randomness never comes from the global generators here: an augmented item draws from a stream of its
own (:class:`Transformed`), and every loader carries its own generator, so neither loading nor
augmentation moves the generators that the method's randomness and the checkpoints use.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from ..utils.seeding import derive_seed
from .progress import progress
from .reproducibility import cpu_rng_seeded
from .sampling import ShardSampler

__all__ = ["RunData", "Transformed", "ProgressLoader"]

TRANSFORM_ARGS = ("scale", "hflip", "extra", "crop_pct", "crop")


class RunData:
    """The run's data views.

    Args:
        cfg: the run's :class:`RunConfig` (``augment``, ``val_fraction``, ``val_seed``, ``seed``,
            ``num_workers``, ``eval_batch_size``).
        scenario: the :class:`clfast.data.Scenario`.
        data_config: the backbone's timm ``data_config`` (input size, interpolation, crop_pct).
        transform_args: the method's ``transform_args()`` (crop scale, flip, extra random ops,
            ``crop_pct``, the eval resize ratio, instead of the backbone's, and ``crop``: ``"none"`` resizes
            the whole image in both pipelines, with no crop, for VQA; see :func:`build_transforms`).
        owner: a name for errors about ``transform_args`` (the method's class).
        rank, world: this process and the number of processes.
        pin_memory: pin batches (CUDA runs).
        quiet: no progress bars.
    """

    def __init__(self, cfg, scenario, data_config: dict, transform_args: dict, owner: str, *, rank: int = 0,
                 world: int = 1, pin_memory: bool = False, quiet: bool = False):
        from ..data.transforms import INTERPOLATIONS, build_transforms

        self.cfg, self.scenario, self.rank, self.world = cfg, scenario, rank, world
        self.pin_memory, self.quiet = pin_memory, quiet
        size = int(data_config["input_size"][-1])
        interp = data_config.get("interpolation", "bicubic")
        interp = interp if interp in INTERPOLATIONS else "bicubic"
        crop = float(data_config.get("crop_pct", 0.875) or 0.875)
        extra = dict(transform_args)
        unknown = set(extra) - set(TRANSFORM_ARGS)
        if unknown:
            raise ValueError(f"{owner}.transform_args(): unknown keys {sorted(unknown)} "
                             f"(expected {', '.join(TRANSFORM_ARGS)})")
        if extra.get("crop_pct") is not None:   # e.g. ConvPrompt's resize 256 / centre crop 224
            crop = extra["crop_pct"]
        extra.pop("crop_pct", None)
        crop_mode = extra.get("crop", "random")
        # the train transform with and without augmentation (a Stage may override the run's `augment`)
        self.train_tfs = {flag: build_transforms(size, train=True, augment=flag, crop_pct=crop,
                                                 interpolation=interp, **extra) for flag in (True, False)}
        self.train_tf = self.train_tfs[bool(cfg.augment)]
        self.eval_tf = build_transforms(size, train=False, crop_pct=crop, interpolation=interp, crop=crop_mode)
        self._val_split: dict[int, tuple[list[int], list[int]]] = {}

    def train_transform(self, augment: Optional[bool] = None):
        """The run's train transform, or the one with/without augmentation."""
        return self.train_tf if augment is None else self.train_tfs[bool(augment)]

    def class_descriptors(self, source: Optional[str], owner: str = "the method") -> tuple[tuple[str, ...], ...]:
        """The attribute phrases of every label (remapped order) from a descriptor file (the method's
        ``descriptor_source()``): its keys are checked against the dataset's class names in class-index order.
        () for ``source`` None, or ``"auto"`` when no file ships for the run's dataset."""
        if source is None:
            return ()
        from ..data.class_descriptors import SHIPPED, load_descriptors

        if source == "auto":
            if self.cfg.dataset not in SHIPPED:
                return ()
            source = self.cfg.dataset
        classes = getattr(self.scenario.train_dataset, "classes", None)
        if self.scenario.kind == "vqa" or classes is None:
            raise ValueError(f"{owner}: class descriptors need a classification dataset; {self.cfg.dataset!r} "
                             f"has no class names")
        names = [str(c) for c in classes]
        found = load_descriptors(source, classes=names)
        return tuple(tuple(found[names[c]]) for c in self.scenario.class_order)

    # datasets ---------------------------------------------------------------------------------------
    def val_positions(self, task: int) -> tuple[list[int], list[int]]:
        """(train, val) positions in the task's training set: per class, a seeded ``val_fraction``
        share (at least one item of every class with two or more) is held out."""
        if task not in self._val_split:
            labels = torch.as_tensor(self.scenario.train_set(task).targets)
            g = torch.Generator().manual_seed(derive_seed("val", self.cfg.val_seed, task))
            val: list[int] = []
            for c in torch.unique(labels).tolist():
                pos = torch.nonzero(labels == c).flatten()
                pos = pos[torch.randperm(len(pos), generator=g)]
                k = int(round(self.cfg.val_fraction * len(pos)))
                k = min(max(k, 1), len(pos) - 1) if len(pos) > 1 else 0
                val += pos[:k].tolist()
            keep = sorted(set(range(len(labels))) - set(val))
            self._val_split[task] = (keep, sorted(val))
        return self._val_split[task]

    def train_part(self, task: int):
        """Task ``task``'s training items (untransformed), without the held-out ones."""
        ds = self.scenario.train_set(task)
        if not self.cfg.val_fraction:
            return ds
        return torch.utils.data.Subset(ds, self.val_positions(task)[0])

    def train_data(self, task: int, augment: Optional[bool] = None, seed: int = 0) -> "Transformed":
        """Task ``task``'s training data with the run's train transform (or with/without augmentation);
        an augmenting transform draws item ``i``'s randomness from ``derive_seed(seed, i)``."""
        return Transformed(self.train_part(task), self.train_transform(augment), seed=seed)

    def val_data(self, task: int) -> "Transformed":
        """Task ``task``'s held-out validation items (eval transform); requires ``val_fraction`` > 0."""
        if not self.cfg.val_fraction:
            raise ValueError("val_data: the run has no validation split (set val_fraction > 0)")
        held_out = torch.utils.data.Subset(self.scenario.train_set(task), self.val_positions(task)[1])
        return Transformed(held_out, self.eval_tf)

    def test_data(self, task: int) -> "Transformed":
        return Transformed(self.scenario.test_set(task), self.eval_tf)

    # loaders ----------------------------------------------------------------------------------------
    def loader(self, dataset, sampler, batch_size: int) -> DataLoader:
        # The loader's own generator: creating an iterator draws a worker base seed from it, which would
        # otherwise come from the global generator that the method's randomness (and checkpoints) use.
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.cfg.num_workers,
                          pin_memory=self.pin_memory, drop_last=False, persistent_workers=False,
                          generator=torch.Generator().manual_seed(0))

    def sharded_loader(self, dataset, batch_size: Optional[int] = None) -> DataLoader:
        """``dataset`` sharded over ranks without duplicates (evaluation, statistics)."""
        return self.loader(dataset, ShardSampler(len(dataset), self.rank, self.world),
                           batch_size or self.cfg.eval_batch_size)

    def val_loader(self, task: int) -> "ProgressLoader":
        return ProgressLoader(self.sharded_loader(self.val_data(task)), f"validation, task {task + 1}",
                              enabled=not self.quiet)

    def stats_loader(self, task: int, augment: bool = False) -> "ProgressLoader":
        """The task's training data, sharded over ranks without duplicates: with the deterministic eval
        transform, or with ``augment=True`` the augmenting train transform (e.g. statistics of
        augmented features). Each pass over it (a method may make several, e.g. EM iterations) shows
        a progress bar and, when augmenting, draws new augmentations (the same again after a resume).
        """
        # augmented items carry no "index": what a per-image cache would store is not stable
        ds = Transformed(self.train_part(task), self.train_tfs[True] if augment else self.eval_tf,
                         keep_index=not augment)
        return ProgressLoader(self.sharded_loader(ds), f"statistics, task {task + 1}", enabled=not self.quiet,
                              seed=derive_seed(self.cfg.seed, "stats", task) if augment else None)


class ProgressLoader:
    """A DataLoader whose every iteration shows its own progress bar (statistics passes).

    With ``seed``, pass ``p`` over an augmenting dataset draws its augmentations from
    ``derive_seed(seed, p)``: passes differ from each other and repeat exactly in a resumed run.
    """

    def __init__(self, loader: DataLoader, desc: str, enabled: bool, seed: Optional[int] = None):
        self.loader, self.desc, self.enabled, self.seed = loader, desc, enabled, seed
        self.passes = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.seed is not None:
            self.loader.dataset.seed = derive_seed(self.seed, self.passes)
        self.passes += 1
        return iter(progress(self.loader, total=len(self.loader), desc=self.desc, enabled=self.enabled))

    @property
    def dataset(self):
        return self.loader.dataset


class Transformed(torch.utils.data.Dataset):
    """A scenario subset with an image transform applied per item (in the loader's workers).

    A random (augmenting) transform of item ``i`` draws from torch's CPU generator re-seeded with
    ``derive_seed(seed, i)`` for that one call, and the generator's state is put back afterwards. So an
    item's augmentation depends only on (``seed``, ``i``): not on which batches came before, how many
    workers or ranks load the data, or whether the run was resumed in between; and augmentation never
    moves the global generator that the method's own randomness (and the checkpoints) use. Extra ops
    must draw from torch's generator (torchvision's do), not Python's ``random``.
    """

    def __init__(self, data, transform, keep_index: bool = True, seed: Optional[int] = 0):
        self.data, self.transform, self.keep_index, self.seed = data, transform, keep_index, seed
        self.random = transform is not None and not getattr(transform, "deterministic", False)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.data[i]
        if self.transform is not None or not self.keep_index:
            item = dict(item)
        if self.random:
            with cpu_rng_seeded(derive_seed(self.seed, int(i))):
                item["image"] = self.transform(item["image"])
        elif self.transform is not None:
            item["image"] = self.transform(item["image"])
        if not self.keep_index:
            item.pop("index", None)
        return item


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (non-blocking); other values as they are."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
