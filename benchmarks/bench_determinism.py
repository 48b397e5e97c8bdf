"""What the engine's deterministic CPU mode costs: one training step of each baseline, side by side.

    python -m pytest benchmarks/bench_determinism.py --benchmark-enable --benchmark-only \
        --benchmark-columns=median,iqr,rounds --benchmark-group-by=group

The engine runs CPU training under ``torch.use_deterministic_algorithms(True, warn_only=True)``
(:func:`clfast.engine.trainer.deterministic_cpu`) so that runs with the same seed and thread count
are bitwise equal. Each group times a full step (forward, backward, optimizer) of one method on the
shipped ``vit_tiny_synth`` at the fast presets' batch of 64 with augmentation on, with the mode on and
off; the ratio of the two medians is the cost.
"""

from __future__ import annotations

import pytest
import torch

from clfast.engine import Trainer, load_config
from clfast.engine.optim import build_optimizer
from clfast.engine.reproducibility import deterministic_cpu

METHODS = ["linear", "l2p", "dualprompt", "coda_prompt"]


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    built = {}
    for m in METHODS:
        cfg = load_config(m, "digits", "fast", ["quiet=true", "augment=true"])
        t = Trainer(cfg, out=str(tmp_path_factory.mktemp(m)))
        ctx = t.context(1).replace(split="train", cacheable=False, batch_size=cfg.batch_size)
        t.method.begin_task(ctx)
        t.method.train()
        stage = t.method.stages(ctx)[0]
        batch = next(iter(torch.utils.data.DataLoader(t.train_data(1), batch_size=cfg.batch_size)))
        opt = build_optimizer(t.method.param_groups(stage), cfg.optimizer, cfg.batch_size)
        built[m] = (t, ctx, batch, opt)
    return built


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, trainers, method, deterministic):
    t, ctx, batch, opt = trainers[method]
    module = t._wrap(None)

    def step():
        with deterministic_cpu(deterministic):
            t._step(module, opt, batch, ctx, None)

    benchmark.group = f"train step {method} vit_tiny_synth B64 bf16"
    benchmark.extra_info.update(method=method, deterministic=deterministic, threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=15, warmup_rounds=3, iterations=1)
