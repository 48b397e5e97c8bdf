"""Optimizers and learning-rate schedules from :class:`OptimConfig` / :class:`ScheduleConfig`.

The schedule is a pure function of the position in the stage (``lr_factor``), so a checkpoint only
needs the position to restore it — there is no scheduler object whose state could drift.
"""

from __future__ import annotations

import math

import torch

from ..methods.base import OptimConfig, ScheduleConfig

__all__ = ["build_optimizer", "lr_factor", "set_lr"]


def build_optimizer(groups: list[dict], cfg: OptimConfig, batch_size: int) -> torch.optim.Optimizer:
    """An optimizer over ``groups`` (dicts with ``params`` and optionally ``lr`` or ``lr_scale``).

    The base lr is ``cfg.lr``, times ``batch_size / cfg.lr_ref_batch`` when that is set; a group's
    ``lr_scale`` multiplies it (e.g. ConvPrompt's LayerNorms at 0.005×). Each group remembers its
    base lr in ``initial_lr`` for the schedule.
    """
    base = cfg.lr * (batch_size / cfg.lr_ref_batch if cfg.lr_ref_batch else 1.0)
    clean = []
    for g in groups:
        g = dict(g)
        params = [p for p in g.pop("params") if p.requires_grad]
        if not params:
            continue
        scale = g.pop("lr_scale", 1.0)
        lr = g.pop("lr", base * scale)
        clean.append({"params": params, "lr": lr, "initial_lr": lr, **g})
    if not clean:
        raise ValueError("the method has no trainable parameters for this stage (param_groups returned "
                         "no parameter with requires_grad=True)")
    if cfg.name == "adam":
        return torch.optim.Adam(clean, lr=base, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                amsgrad=cfg.amsgrad)
    if cfg.name == "adamw":
        return torch.optim.AdamW(clean, lr=base, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 amsgrad=cfg.amsgrad)
    return torch.optim.SGD(clean, lr=base, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, pos: float, total: float, base_lr: float) -> float:
    """Multiplier of the base lr at position ``pos`` of ``total`` (epochs or steps, per ``cfg.per``)."""
    total = max(float(total), 1e-12)
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
    if cfg.name == "constant":
        return 1.0
    if cfg.every > 1:  # stairs: the value of the last multiple of `every`
        pos = math.floor(pos / cfg.every) * cfg.every
    warm = cfg.warmup * total if 0 < cfg.warmup < 1 else cfg.warmup
    if cfg.name.startswith("warmup_") and pos < warm:
        if cfg.warmup_start is None:
            return (pos + 1) / (warm + 1)
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * pos / warm
    if cfg.name == "warmup_constant":
        return 1.0
    if cfg.name == "cosine":
        t = min(pos / total, 1.0)
    else:
        t = min(max(pos - warm, 0.0) / max(total - warm, 1e-12), 1.0)
    if cfg.name in ("cosine", "warmup_cosine"):
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return floor + (1 - floor) * (1 - t)   # warmup_linear


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * factor
