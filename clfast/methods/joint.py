"""``joint``: the upper bound of every continual-learning table — a method trained on all tasks at once.

``--method joint method_args.base=l2p`` runs ``l2p`` (any registered method; ``linear`` by default) with
its own presets and settings, on the joint view of the scenario (:class:`clfast.data.JointScenario`): one
training task that holds every task's training data and every class, after which each task's test split
is evaluated. The run fills the same files as a continual one: ``acc_matrix.csv`` with one column (task
evaluated × "after the joint task"), ``summary.json`` with ``A_N`` (the mean over tasks) and the
sample-weighted accuracy (``F_N = BWT = 0``: nothing was trained after anything else).

The budget is the continual run's: every image is seen ``epochs`` times, in batches of ``batch_size``,
with the same optimizer; a schedule spans the single task. The base method is built with
``num_tasks = 1``, so whatever it keys by task has one task: DualPrompt one E-prompt and key, CODA-Prompt
all its components trained together, the head every class from the start, GPLS one task key.
``base=finetune`` is the upper bound of the L2P and DualPrompt papers (the whole backbone trained on the
i.i.d. union of the tasks); ``base=linear`` is that of a frozen backbone.

As mammoth's ``joint`` model, it trains on the union of the tasks' training data with the continual
run's optimizer and epochs; mammoth collects the tasks and trains when the last one ends (the columns
before it hold an untrained model), clfast trains once and writes only the column that means something.

The joint class of a base is that base's class with the engine's ``trains_jointly`` switched on, its
``Config`` extended by ``base``, and ``joint_base`` in ``record.json``: state-dict keys, hooks and losses
are the base method's own, so nothing of the method is re-implemented here.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from .base import Method, method_class, register_method

__all__ = ["Joint", "JointConfig", "joint_class"]


@dataclass
class JointConfig:
    """What a joint run's ``method_args`` hold besides the base method's own settings."""

    base: str = "linear"    # the method trained jointly


def base_method(settings: dict) -> type[Method]:
    """The class named by ``settings["base"]`` (default ``linear``); ValueError naming ``method_args.base``."""
    name = settings.get("base", JointConfig.base)
    if not isinstance(name, str):
        raise ValueError(f"method_args.base must name a method (e.g. 'linear', 'l2p'), got {name!r}")
    if name == "joint":
        raise ValueError("method_args.base must name the method to train jointly (e.g. 'linear', 'l2p', "
                         "'finetune'), not 'joint' itself")
    try:
        cls = method_class(name)
    except ValueError as e:
        raise ValueError(f"method_args.base: {e}") from None
    return cls.resolve(settings)


@functools.lru_cache(maxsize=None)
def joint_class(base: type[Method]) -> type[Method]:
    """``base`` trained jointly: its subclass with ``trains_jointly``, a ``Config`` that also takes ``base``
    (default ``linear``, so a run's settings hash as they read), and ``joint_base`` in the run record.
    One class per base, so that ``isinstance`` and resumes see the same class every time."""
    if base.trains_jointly:
        raise ValueError(f"method_args.base: {base.name!r} already trains jointly")
    config = dataclasses.make_dataclass(
        f"Joint{base.Config.__name__}", [("base", "str", dataclasses.field(default=JointConfig.base))],
        bases=(base.Config,))

    def record(self) -> dict:
        return {**base.record(self), "joint_base": base.name}

    cls = type(f"Joint[{base.name}]", (base,), {
        "Config": config, "trains_jointly": True, "presets_from": base.name, "record": record,
        "__module__": __name__, "__doc__": f"``{base.name}`` trained on every task's data at once (see "
                                          f":mod:`clfast.methods.joint`)."})
    cls.name = "joint"
    return cls


@register_method("joint")
class Joint(Method):
    """The registry's ``joint``: :meth:`resolve` gives the joint class of ``method_args.base``, which is
    what :func:`clfast.methods.create_method` builds (this class itself is never instantiated)."""

    Config = JointConfig
    trains_jointly = True

    @classmethod
    def resolve(cls, settings: dict) -> type[Method]:
        return joint_class(base_method(dict(settings)))

    def __init__(self, *args, **kwargs):
        raise TypeError("build 'joint' with create_method('joint', ..., base=<method>, ...), which resolves "
                        "method_args.base to the base method's joint class")
