"""Run configuration: a dataclass filled from a YAML preset, then ``key=value`` overrides.

Presets live in ``clfast/configs/<method>/<preset>.yaml`` — one per (method, dataset) with the paper's
settings (``cifar100``, ``imagenet_r``) plus ``fast`` for the data that ships with clfast. A preset
holds any :class:`RunConfig` field; ``method_args`` holds the method's own settings (its ``Config``
dataclass). Overrides use dotted keys: ``epochs=3``, ``optimizer.lr=0.01``,
``method_args.pool_size=20``; values parse as YAML scalars (``false`` → False, ``1e-3`` → float,
``[0,1]`` → list), and every key and value is validated with an error naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from ..data.scenario import DEFAULT_CLASS_ORDER_SEED
from ..methods.base import OptimConfig, ScheduleConfig, build_config, check_fields, method_class

__all__ = ["RunConfig", "load_config", "parse_override", "apply_overrides", "preset_path", "list_presets",
           "CONFIG_DIR", "DEFAULT_METHOD", "read_preset", "resolve_amp"]

DEFAULT_METHOD = "dualprompt"   # `clfast demo` and a RunConfig that names none
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
AMP = ("auto", "bf16", "fp16", "none")
SCENARIOS = ("class-incremental", "task-incremental", "domain-incremental")


def resolve_amp(device) -> tuple[str, str]:
    """What ``amp: auto`` means on ``device``: ``("bf16", why)`` where bf16 matmuls run natively (a CUDA device
    with bf16; a CPU with AVX512-BF16 or AMX tiles), else ``("none", why)``: without them PyTorch's CPU bf16 matmul
    falls back to a scalar path several times slower than fp32 (7x for a ViT-B MLP matmul on an AVX2 EPYC)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16", "the GPU computes bf16") if ok else ("none", "the GPU has no bf16")
    if dev.type == "cpu":
        cpu = torch.cpu
        has = [n for n, f in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
               if getattr(cpu, f, lambda: False)()]
        if has:
            return "bf16", f"the CPU computes bf16 natively ({', '.join(has)})"
        return "none", ("the CPU has neither AVX512-BF16 nor AMX: bf16 matmuls would be emulated, several times "
                        "slower than fp32")
    return "none", f"no bf16 autocast chosen for device type {dev.type!r}"


@dataclass
class RunConfig:
    """Everything a run needs; ``config.yaml`` in the run directory is this, resolved."""

    method: str = DEFAULT_METHOD
    dataset: str = "synth-shapes"
    data_root: Optional[str] = None
    dataset_args: dict = field(default_factory=dict)
    preset: Optional[str] = None
    # scenario
    scenario: str = "class-incremental"
    num_tasks: Optional[int] = None
    first_task_classes: Optional[int] = None
    class_order_seed: int = DEFAULT_CLASS_ORDER_SEED
    shuffle_classes: bool = True
    # backbone
    backbone: str = "vit_tiny_synth"
    pretrained: Any = True   # or False / a weight tag / a spelling of "random" the backbone loader reads
    checkpoint_path: Optional[str] = None
    # training
    epochs: float = 1.0
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    reset_optimizer: bool = True
    grad_clip: Optional[float] = None
    augment: bool = True
    amp: str = "auto"   # bf16 where the device computes it natively, else none (resolve_amp; fixed at the start)
    compile: bool = False
    grad_checkpointing: bool = False  # recompute backbone blocks in the backward (less activation memory)
    compile_options: dict = field(default_factory=dict)   # torch.compile kwargs, e.g. {mode: max-autotune}
    method_args: dict = field(default_factory=dict)
    init_from: Optional[str] = None   # start from another run's method state: a checkpoint file or run dir
    # run
    seed: int = 0
    val_fraction: float = 0.0   # held out of each task's training data (per class) for validation
    val_seed: int = 0           # the held-out split's own seed (fixed across `seed`s)
    validate_every: Optional[float] = None   # epochs between validations in task-data stages (keeps the best)
    device: str = "auto"
    num_workers: int = 0
    threads: Optional[int] = None
    verify_data: bool = False       # re-hash every image against its split manifest's sha256 (sizes: always)
    skip_bad_samples: bool = False  # leave out images that do not decode (counted in the log and record.json)
    dist_timeout_s: float = 600.0   # multi-process: a collective that waits longer for another rank fails
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    stop_after_steps: Optional[int] = None   # act as if interrupted (Ctrl-C) after this many steps
    checkpoint_every_steps: Optional[int] = None  # also checkpoint every N steps (resumable after a crash)
    log_every: int = 20
    log_to: list = field(default_factory=list)   # mirrors of metrics.jsonl: tensorboard, wandb
    wandb_project: str = "clfast"
    quiet: bool = False
    name: Optional[str] = None

    def __post_init__(self):
        check_fields(self)
        if isinstance(self.optimizer, dict):
            self.optimizer = build_config(OptimConfig, self.optimizer, "optimizer")
        if isinstance(self.schedule, dict):
            self.schedule = build_config(ScheduleConfig, self.schedule, "schedule")
        if self.amp not in AMP:
            raise ValueError(f"amp must be one of {AMP}, got {self.amp!r}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        for key in ("batch_size", "eval_batch_size", "log_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        for key in ("limit_train_batches", "limit_eval_batches", "stop_after_steps", "checkpoint_every_steps",
                    "num_tasks"):
            v = getattr(self, key)
            if v is not None and int(v) < 1:
                raise ValueError(f"{key} must be a positive integer or null, got {v!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.validate_every is not None and not self.validate_every > 0:
            raise ValueError(f"validate_every must be > 0 (epochs) or null, got {self.validate_every!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if isinstance(self.dist_timeout_s, bool) or not isinstance(self.dist_timeout_s, (int, float)) \
                or not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s must be a number of seconds > 0, got {self.dist_timeout_s!r}")
        for key in ("method_args", "dataset_args", "compile_options"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"{key} must be a mapping, got {getattr(self, key)!r}")
        from .loggers import check_sinks

        self.log_to = list(check_sinks(self.log_to))

    def method_config(self):
        """The method's own ``Config`` dataclass, validated (unknown keys raise with close matches)."""
        cls = method_class(self.method).resolve(dict(self.method_args))
        return build_config(cls.Config, dict(self.method_args), f"method_args of {self.method!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optimizer"]["betas"] = list(d["optimizer"]["betas"])
        return d


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(key: str, names: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown {where} key {key!r}.{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """``"optimizer.lr=0.01"`` → ``("optimizer.lr", 0.01)`` (the value parsed as a YAML scalar)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"override {key}: cannot parse value {raw!r} ({e})") from None
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and value.strip() not in ("e", ".") else value
        except ValueError:
            pass
    return key, value


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Apply dotted ``(key, value)`` overrides to a plain config dict (validated against RunConfig)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    top = _field_names(RunConfig)
    nested = {"optimizer": _field_names(OptimConfig), "schedule": _field_names(ScheduleConfig)}
    for key, value in overrides:
        head, _, rest = key.partition(".")
        if head not in top:
            raise _unknown_key(head, top, "config")
        if not rest:
            data[head] = value
            continue
        if head in nested:
            if rest not in nested[head]:
                raise _unknown_key(rest, nested[head], head)
        elif head not in ("method_args", "dataset_args", "compile_options"):
            raise ValueError(f"config key {head!r} has no sub-keys (got {key!r})")
        sub = data.get(head)
        sub = dict(sub) if isinstance(sub, dict) else {}
        sub[rest] = value
        data[head] = sub
    return data


def list_presets(method: str) -> list[str]:
    d = os.path.join(CONFIG_DIR, method)
    if not os.path.isdir(d):
        return []
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml"))


def preset_path(method: str, preset: str) -> str:
    """The YAML file of ``preset`` for ``method`` (a name from :func:`list_presets`, or a file path)."""
    if preset.endswith((".yaml", ".yml")) or os.sep in preset:
        if not os.path.isfile(preset):
            raise FileNotFoundError(f"preset file {preset!r} not found")
        return preset
    path = os.path.join(CONFIG_DIR, method, f"{preset}.yaml")
    if not os.path.isfile(path):
        names = list_presets(method)
        close = difflib.get_close_matches(preset, names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"no preset {preset!r} for method {method!r}.{hint} Available: {', '.join(names) or 'none'}")
    return path


def read_preset(method: str, preset: str, _chain: tuple = ()) -> dict:
    """A preset's settings, with ``base: <other preset>`` resolved: the preset holds only what differs
    from its base (nested mappings such as ``method_args`` merge key by key)."""
    if preset in _chain:
        raise ValueError(f"preset {preset!r} of {method!r}: 'base' presets form a cycle "
                         f"({' -> '.join(_chain + (preset,))})")
    with open(preset_path(method, preset), encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"preset {preset!r} of {method!r} must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"preset {preset!r} of {method!r}: base must be a preset name, got {base!r}")
    return _merge(read_preset(method, base, _chain + (preset,)), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def default_preset(method: str, dataset: str) -> str:
    """The dataset's own preset when one exists (``cifar100``, ``imagenet_r``, ``digits``), else ``fast``."""
    key = dataset.replace("-", "_")
    return key if key in list_presets(method) else "fast"


def load_config(method: str, dataset: str, preset: Optional[str] = None,
                overrides: Optional[list] = None, **fields) -> RunConfig:
    """Preset (default: the dataset's, else ``fast``) → explicit ``fields`` → ``overrides``.

    A method whose class answers ``presets_from`` (``joint``: its ``method_args.base``, which must then
    come from ``fields`` or ``overrides``) starts from that method's presets.
    """
    cls = method_class(method)  # unknown method: error with close matches, before any preset lookup
    parsed = [parse_override(o) if isinstance(o, str) else tuple(o) for o in (overrides or [])]
    given = apply_overrides({"method_args": dict(fields.get("method_args") or {})}, parsed)["method_args"]
    source = cls.resolve(given if isinstance(given, dict) else {}).presets_from or method
    preset = preset or default_preset(source, dataset)
    data = read_preset(source, preset)
    data.update({k: v for k, v in fields.items() if v is not None})
    data["method"], data["dataset"], data["preset"] = method, dataset, preset
    data = apply_overrides(data, parsed)
    top = _field_names(RunConfig)
    for k in data:
        if k not in top:
            raise _unknown_key(k, top, f"preset {preset!r}")
    try:
        cfg = RunConfig(**data)
    except TypeError as e:
        raise ValueError(f"bad config value: {e}") from None
    cfg.method_config()  # now, not mid-run
    return cfg


def config_from_dict(data: dict) -> RunConfig:
    """Rebuild a :class:`RunConfig` from ``to_dict()`` output (``config.yaml`` of a run)."""
    return RunConfig(**data)
