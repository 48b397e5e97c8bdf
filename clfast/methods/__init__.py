"""Continual-learning methods: the hook API (:mod:`clfast.methods.base`) and the registered methods.

``create_method(name, backbone, num_classes, num_tasks, **cfg)`` builds one; ``list_methods()`` names
them. Baselines: ``linear`` (frozen backbone + growing head), ``l2p``, ``dualprompt``, ``coda_prompt``;
the bounds of every table: ``finetune`` (the backbone trained too, nothing against forgetting) and
``joint`` (any method, ``base=``, trained on every task's data as one task). For VQA: ``vlm_finetune`` (the
VLM's fusion encoder and head trained, towers frozen: the warm-up of CluMo/ATLAS, and with ``task_heads`` the
frozen-VLM per-task-head baseline) and ``clumo`` (cluster-keyed prompts in the fusion cross-attention of a
loaded VLM; the parts in :mod:`clfast.methods.cluster_prompts` and :mod:`clfast.methods.vqa_losses`).
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
