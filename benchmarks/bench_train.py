"""Train-step throughput per method: clfast's defaults against the same step with every op on its readable
PyTorch reference (``CLFAST_BACKEND=reference``), side by side in one run.

    clfast bench train [--quick] [-k gpls] [--write]

One group per method; each times a full training step (forward, backward, optimizer step, and whatever the
method does per step: the frozen query pass, the KL of its prior, ...) at ``vit_base_patch16_224`` shapes with
random weights, batch 16 (``--quick``: the shipped ``vit_tiny_synth``, batch 64), augmentation on, so no
per-image cache helps, under the engine's own step (``Trainer._step``: bf16 autocast where the hardware has
it); for STAR-Prompt its stage-2 step (the ViT and the CLIP tower of its preset). Configurations: ``clfast`` (dispatch picks each op's backend) and ``reference`` (every op forced to its
reference backend). The method is set up as the trainer would for task 2 (``begin_task`` with a statistics
pass over two batches: the timed step is the same whatever data the prior came from). The performance issue
adds the official codes' way (``peer``) as a third column.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from clfast.engine import Trainer, load_config
from clfast.engine.optim import build_optimizer
from clfast.ops import use_backend

METHODS = ["linear", "l2p", "dualprompt", "coda_prompt", "gpls", "star_prompt"]
# the stage whose step is timed, where it is not the first (STAR-Prompt: level 2, the ViT and CLIP step; its
# stage 1 trains only the text context on cached CLIP features)
TIMED_STAGE = {"star_prompt": "stage2"}
CONFIGS = ["reference", "clfast"]
BATCH = {False: 16, True: 64}
BACKBONE = {False: ["backbone=vit_base_patch16_224", "pretrained=false"], True: []}
ROUNDS = {False: dict(rounds=3, warmup_rounds=1), True: dict(rounds=10, warmup_rounds=2)}


@pytest.fixture(scope="module")
def setups():
    """method -> what _setup built (once per module: the configurations share it)."""
    return {}


def _setup(method: str, quick: bool, out: str):
    batch = BATCH[quick]
    cfg = load_config(method, "synth-shapes", "fast",
                      ["quiet=true", "augment=true", f"batch_size={batch}", *BACKBONE[quick]])
    t = Trainer(cfg, out=out)
    task = 1
    data = t.train_data(task)
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    batches = [b for b, _ in zip(loader, range(2))]
    ctx = t.context(task).replace(split="train", cacheable=False, batch_size=batch, task_loader=lambda augment=False: batches)
    t.method.begin_task(ctx)
    t.method.train()
    stages = {s.name: s for s in t.method.stages(ctx)}
    stage = stages[TIMED_STAGE[method]] if method in TIMED_STAGE else t.method.stages(ctx)[0]
    if method in TIMED_STAGE:
        ctx = ctx.replace(stage=stage.name)
        t.method.begin_stage(stage, ctx)
    opt = build_optimizer(t.method.param_groups(stage), cfg.optimizer, batch)
    return t, ctx, batches[0], opt, stage, cfg


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, setups, quick, tmp_path_factory, method, config):
    if method not in setups:
        setups[method] = _setup(method, quick, str(tmp_path_factory.mktemp(method)))
    t, ctx, batch, opt, stage, cfg = setups[method]
    module = t._wrap(stage)
    def forced():
        return use_backend("reference") if config == "reference" else contextlib.nullcontext()

    def step():
        with forced():
            t._step(module, opt, batch, ctx, None)

    B = batch["image"].shape[0]
    benchmark.group = f"train_step {method} {cfg.backbone} B{B}"
    benchmark.extra_info.update(op="train_step", impl=config, method=method, backbone=cfg.backbone, images=B,
                                amp=str(t.amp_dtype), threads=torch.get_num_threads(), device=str(t.device))
    benchmark.pedantic(step, iterations=1, **ROUNDS[quick])
