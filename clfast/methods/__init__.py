"""Continual-learning methods: the hook API (:mod:`clfast.methods.base`) and the registered methods.

``create_method(name, backbone, num_classes, num_tasks, **cfg)`` builds one; ``list_methods()`` names
them. Baselines: ``linear`` (frozen backbone + growing head), ``l2p``, ``dualprompt``, ``coda_prompt``.
"""

from .base import (EvalProtocol, FrozenRows, Method, MethodConfig, OptimConfig, ScheduleConfig, Stage, StepOutput, TaskContext,
                   build_config, create_method, freeze_rows, list_methods, masked_logits, method_class,
                   register_method)
from .common import FrozenQueryMethod, QueryCache

__all__ = [
    "Method", "MethodConfig", "OptimConfig", "ScheduleConfig", "Stage", "StepOutput", "TaskContext",
    "build_config", "create_method", "freeze_rows", "list_methods", "masked_logits", "method_class",
    "register_method", "FrozenQueryMethod", "QueryCache", "FrozenRows", "EvalProtocol",
]
