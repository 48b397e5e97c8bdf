"""Cross-field checks of a run's settings, made before anything is built: before the run directory is
written, any data is read or the backbone's weights load.

Each setting is checked on its own where it is parsed (:class:`clfast.engine.config.RunConfig`, the
method's ``Config``); what is checked here are settings that only make sense together, and with the
number of processes: the batch against the ranks, the number of tasks against the dataset's classes,
and the method's settings against the number of tasks and the backbone's depth
(:meth:`clfast.methods.MethodConfig.check_against`). Each failure is a ValueError naming the settings
and what was expected. What can only be known from the data on disk (the classes of a folder dataset,
unreadable files) is checked when the data is read, still before the backbone loads.
"""

from __future__ import annotations

from typing import Optional

from ..data.registry import dataset_info
from ..methods.base import method_class
from .config import RunConfig

__all__ = ["check_run"]

_SPLIT_KINDS = ("class-incremental", "task-incremental")


def check_run(cfg: RunConfig, world: int, *, scenario=None, method: bool = True) -> None:
    """Raise ValueError if the settings of ``cfg`` do not fit together or with ``world`` processes.

    Args:
        cfg: the resolved run configuration.
        world: the number of processes (torchrun's ``WORLD_SIZE``).
        scenario: a scenario given to the trainer instead of the one ``cfg`` names (its tasks count).
        method: check the method's settings (False when a built method is given).
    """
    _check_batch(cfg, world)
    num_tasks = _scenario_tasks(cfg) if scenario is None else scenario.num_tasks
    if method:
        cls = method_class(cfg.method).resolve(dict(cfg.method_args))
        mcfg = cfg.method_config()
        mcfg.check_against(num_tasks=1 if cls.trains_jointly else num_tasks, num_layers=cls.backbone_depth(cfg))


def _check_batch(cfg: RunConfig, world: int) -> None:
    b = int(cfg.batch_size)
    if b < world:
        raise ValueError(f"batch_size={b} is smaller than the number of processes ({world}): every process trains "
                         f"on an equal share of each batch; set batch_size to a multiple of {world}")
    if b % world:
        raise ValueError(f"batch_size={b} must be divisible by the number of processes ({world}): every process "
                         f"trains on an equal share of each batch; e.g. batch_size={b - b % world} or "
                         f"{b - b % world + world}")


def _scenario_tasks(cfg: RunConfig) -> Optional[int]:
    """The number of tasks the scenario will have, where the settings alone say (None otherwise);
    ValueError when it exceeds the classes of a dataset whose classes are known before reading it."""
    info = dataset_info(cfg.dataset)
    if info.kind == "vqa" or cfg.scenario not in _SPLIT_KINDS:
        return cfg.num_tasks   # None: one task per domain / question family, known from the data
    tasks = cfg.num_tasks if cfg.num_tasks is not None else info.default_tasks
    # shipped datasets always have the registry's classes; a folder on disk may hold fewer or more
    if not info.needs_root and tasks > info.num_classes:
        raise ValueError(f"num_tasks={tasks} is more than the {info.num_classes} classes of dataset {cfg.dataset!r}: "
                         f"a {cfg.scenario} task needs at least one class of its own (num_tasks must be at most "
                         f"{info.num_classes})")
    return tasks
