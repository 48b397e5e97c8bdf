"""Shared by the checkpoint-integrity, disk-fault and kill tests: a tiny run whose training draws from the
global random generator, the uninterrupted reference of it, and ways to damage a checkpoint on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clfast.engine import RunConfig, Trainer
from clfast.methods import register_method
from clfast.methods.linear import Linear


@register_method("_test_dropout_linear")
class DropoutLinear(Linear):
    """``linear`` with dropout on its features while training: every step draws a mask from the global
    generator, so a resumed run that did not restore the saved generator states trains on other masks."""

    def features(self, batch, ctx):
        return F.dropout(self.query(batch, ctx), p=0.5, training=self.training)


def toy_cfg(extra=()) -> RunConfig:
    """2 tasks of digits, 4 steps of 16 images each (frozen features cached), adam: a second of training."""
    kw = dict(method="_test_dropout_linear", dataset="digits", num_tasks=2, epochs=1, batch_size=16,
              eval_batch_size=64, limit_train_batches=4, limit_eval_batches=1, quiet=True, threads=1,
              amp="none", augment=False, optimizer={"name": "adam", "lr": 0.01})
    for e in extra:
        k, v = e.split("=")
        kw[k] = int(v)
    return RunConfig(**kw)


_REFERENCE: dict[str, str] = {}   # one uninterrupted run per test session, shared by the modules


@pytest.fixture(scope="module")
def toy_full(tmp_path_factory):
    """The uninterrupted run of :func:`toy_cfg` (import this fixture into a test module to use it)."""
    if "toy" not in _REFERENCE:
        run = tmp_path_factory.mktemp("toy") / "full"
        Trainer(toy_cfg(), out=str(run)).fit()
        _REFERENCE["toy"] = str(run)
    return Path(_REFERENCE["toy"])


def flip_tensor_bit(path, key: str | None = None) -> None:
    """Flip one bit in the middle of a tensor's bytes inside checkpoint ``path``: the file still loads with
    ``torch.load``, one value changed (what a disk or copy error does silently). ``key``: an entry of the
    checkpoint's ``method_state`` (default: its largest tensor)."""
    state = torch.load(path, weights_only=True)["method_state"]
    key = key or max(state, key=lambda k: state[k].numel())
    raw = state[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    data = bytearray(open(path, "rb").read())
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, f"{key}'s bytes not found once in {path}"
    data[at + len(raw) // 2] ^= 0x10
    with open(path, "r+b") as f:
        f.write(bytes(data))


def truncate(path, fraction: float = 0.5) -> None:
    """Cut ``path`` to ``fraction`` of its size (a copy or write that stopped part-way)."""
    os.truncate(path, int(os.path.getsize(path) * fraction))


def partial_files(run) -> list[str]:
    """Temporary files left in a run directory or its checkpoints/."""
    out = []
    for d in (str(run), os.path.join(str(run), "checkpoints")):
        out += [n for n in os.listdir(d) if n.endswith(".tmp")]
    return out
