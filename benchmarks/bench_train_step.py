"""Training-step throughput of a method at ViT-B/16 shapes (random weights): clfast's ops against the reference
backends (``CLFAST_BACKEND=reference``, for ConvPrompt the released code's way) and the backbone's own cost.

    python -m pytest benchmarks/bench_train_step.py --benchmark-enable --benchmark-only \\
        --benchmark-json benchmarks/results/train_step.json [--quick]
    python benchmarks/report.py benchmarks/results/train_step.json --write

One group per case (method, prompts in use F, batch, dtype); a step is the engine's: zero_grad, the method's
``training_step``, backward, Adam step, restoring the frozen rows. Implementations:

- ``cpu``: clfast as it runs by default (the fused ``prompt_conv``, ``prefix_attention``, ... backends);
- ``reference``: every op forced to its plain-PyTorch reference, as ``CLFAST_BACKEND=reference`` does. For
  ConvPrompt that is the released code's computation: ``prompt_conv``'s reference is its loop (one single-channel
  convolution per (layer, K/V, head, prompt) on B copies of the embedding) and the attention runs on the
  concatenated prefix. A step takes about 23 s at F=5 and 67 s at F=18 (B=16, 2 CPU threads), so it runs one round
  without warm-up (and not at all with ``--quick``);
- ``floor``: the bare timm ViT-B/16, frozen, forward and backward through every block to the input, with a linear
  head (nothing of the method): ConvPrompt's prompts enter at block 0, so no step of it can cost less.

Ratios within a group are the figures; absolute times move with the machine and its load.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from clfast.backbones.vit import create_vit
from clfast.engine.optim import build_optimizer
from clfast.methods import OptimConfig, Stage, TaskContext, create_method
from clfast.ops import use_backend

BATCH, CLASSES, TASKS = 16, 200, 10
PROMPTS = (5, 18)
IMPLS = ("cpu", "reference", "floor")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_vit("vit_base_patch16_224", pretrained=False)


def pytest_generate_tests(metafunc):
    if "ts_case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--quick")
        cases = [(f, impl) for f in ((5,) if quick else PROMPTS) for impl in IMPLS
                 if not (quick and impl == "reference")]
        metafunc.parametrize("ts_case", cases, ids=[f"F{f}-{impl}" for f, impl in cases])


def convprompt_step(vit, prompts: int, impl: str):
    """A callable running one ConvPrompt training step with ``prompts`` prompts in use."""
    m = create_method("convprompt", copy.deepcopy(vit), CLASSES, TASKS, prompts_per_task=prompts,
                      language_guidance=False).train()
    ranges = tuple((20 * t, 20 * t + 20) for t in range(TASKS))
    ctx = TaskContext(task=0, num_tasks=TASKS, class_range=ranges[0], seen_classes=20, num_classes=CLASSES,
                      task_ranges=ranges, batch_size=BATCH)
    m.begin_task(ctx)
    opt = build_optimizer(m.param_groups(Stage()), OptimConfig(lr=0.005, lr_ref_batch=256), BATCH)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(BATCH, 3, 224, 224, generator=g), "label": torch.randint(0, 20, (BATCH,), generator=g)}
    def step():
        with contextlib.nullcontext() if impl == "cpu" else use_backend("reference"):
            opt.zero_grad(set_to_none=True)
            m.training_step(batch, ctx).loss.backward()
            opt.step()
            m.after_optimizer_step()
    return step


def floor_step(vit):
    """The bare timm ViT-B/16, frozen, with a linear head; the input needs a gradient, so the backward runs through
    every block (activation gradients only), as a prompt at block 0 makes it."""
    model = copy.deepcopy(vit.vit).eval().requires_grad_(False)
    head = torch.nn.Linear(model.embed_dim, 20)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 3, 224, 224, generator=g, requires_grad=True)
    y = torch.randint(0, 20, (BATCH,), generator=g)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(model.forward_features(x)[:, 0]), y)
        loss.backward()
        opt.step()
    return step


def test_train_step(benchmark, vit, ts_case):
    prompts, impl = ts_case
    step = floor_step(vit) if impl == "floor" else convprompt_step(vit, prompts, impl)
    benchmark.group = f"train_step convprompt vit_base_patch16_224 B{BATCH} F{prompts} fp32"
    benchmark.extra_info.update(op="train_step", impl=impl, method="convprompt", images=BATCH, prompts=prompts,
                                dtype="fp32", threads=torch.get_num_threads(),
                                device="cuda" if torch.cuda.is_available() else "cpu")
    rounds = dict(rounds=1, warmup_rounds=0) if impl == "reference" else dict(rounds=3, warmup_rounds=1)
    benchmark.pedantic(step, iterations=1, **rounds)
