"""Continual-learning methods: the hook API (:mod:`clfast.methods.base`) and the registered methods.

``create_method(name, backbone, num_classes, num_tasks, **cfg)`` builds one; ``list_methods()`` names
them. Baselines: ``linear`` (frozen backbone + growing head), ``l2p``, ``dualprompt``, ``coda_prompt``.
"""

from .base import (FrozenRows, Method, MethodConfig, OptimConfig, ScheduleConfig, Stage, StepOutput, TaskContext,
                   build_config, create_method, freeze_rows, list_methods, masked_logits, method_class,
                   register_method)
from .common import FrozenQueryMethod, QueryCache
from . import linear as linear  # noqa: F401  (registers the methods)
from . import l2p as l2p  # noqa: F401
from . import dualprompt as dualprompt  # noqa: F401
from . import coda_prompt as coda_prompt  # noqa: F401

__all__ = [
    "Method", "MethodConfig", "OptimConfig", "ScheduleConfig", "Stage", "StepOutput", "TaskContext",
    "build_config", "create_method", "freeze_rows", "list_methods", "masked_logits", "method_class",
    "register_method", "FrozenQueryMethod", "QueryCache", "FrozenRows",
]
