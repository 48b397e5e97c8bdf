"""One training step of a method in each benchmarked configuration, and the backbone's floors; shared by
``bench_train.py`` and the tests (tests/benchmarks/).

Configurations of a step (the same method object, optimizer and batch):

- ``peer``: the method computed the way its official code does (:mod:`benchmarks.peers`), fp32;
- ``reference``: the engine's step (``Trainer._step``, its autocast) with every op on its reference backend
  (``CLFAST_BACKEND=reference``);
- ``clfast``: the engine's step with the defaults (dispatch picks each op's backend; bf16 autocast where the run
  has it).

Floors (no method, the same backbone shape and batch, under the engine's autocast): ``floor``, the frozen ViT's
forward and backward through every block (the tokens entering block 0 need a gradient, as a prompt at block 0
makes them), a linear head and Adam on it; ``floor_head``, the frozen forward without autograd and the head's
forward, backward and Adam step. No prompt method's step can cost less than ``floor`` when it prompts block 0, nor
any method's less than ``floor_head``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks import peers
from clfast.engine import Trainer, load_config
from clfast.engine.optim import build_optimizer
from clfast.ops import use_backend

CONFIGS = ("peer", "reference", "clfast")
FLOORS = ("floor", "floor_head")


@dataclass(frozen=True)
class Variant:
    """What a benchmarked method runs: the registered ``method``, the ``stage`` whose step is timed (None: its
    first), config ``overrides``; at ViT-B/16 shapes only, ``full_overrides`` (the paper's settings where the
    fast preset narrows them for the tiny backbone); with ``quick`` only, ``quick_overrides`` (fewer prompts where
    the peer's cost grows with them, so that the quick run stays short)."""

    method: str
    stage: Optional[str] = None
    overrides: tuple[str, ...] = ()
    full_overrides: tuple[str, ...] = ()
    quick_overrides: tuple[str, ...] = ()


VARIANTS = {
    "linear": Variant("linear"),
    "l2p": Variant("l2p"),
    "dualprompt": Variant("dualprompt"),
    "coda_prompt": Variant("coda_prompt"),
    "gpls": Variant("gpls"),
    # every task gets K = 5 prompts (no phrase encoder in the loop): 10 prompts in use at task 2; the paper's
    # blocks 0-6 at ViT-B (the fast preset prompts the tiny ViT's 6 blocks); --quick: 2 prompts in blocks 0-1 (the
    # loop of the peer and of the reference backend costs 2H·f convolutions per block, each on B copies)
    "convprompt": Variant("convprompt", overrides=("method_args.language_guidance=false",),
                          full_overrides=("method_args.layers=[0,1,2,3,4,5,6]",),
                          quick_overrides=("method_args.layers=[0,1]", "method_args.prompts_per_task=1")),
    # level 2: CLIP query of the augmented batch, per-block class selection, the ViT with residual value prompts
    "star_prompt": Variant("star_prompt", stage="stage2"),
    # level 1: the text encoder (the official code recomputes every seen class's key each step)
    "star_prompt_stage1": Variant("star_prompt_stage1", stage="stage1"),
}

BACKBONE = {False: ("backbone=vit_base_patch16_224", "pretrained=false"), True: ()}


@dataclass
class StepSetup:
    """A method set up for task 2 as the trainer would (``begin_task`` with a statistics pass over two batches, the
    timed stage begun), with its optimizer and one augmented batch."""

    trainer: Trainer
    ctx: object
    batch: dict
    opt: torch.optim.Optimizer
    stage: object
    module: torch.nn.Module = field(repr=False, default=None)

    @property
    def method(self):
        return self.trainer.method


def setup(name: str, *, quick: bool, batch_size: int, out: str, overrides: tuple[str, ...] = (),
          task: int = 1) -> StepSetup:
    """Build variant ``name`` of :data:`VARIANTS` on the ``synth-shapes`` data with augmentation on, at
    ``vit_base_patch16_224`` shapes with random weights (``quick``: the shipped ``vit_tiny_synth``)."""
    if name not in VARIANTS:
        raise ValueError(f"steps.setup: unknown variant {name!r}; known: {sorted(VARIANTS)}")
    v = VARIANTS[name]
    per_class = -(-2 * batch_size // 10)           # two batches of a task (10 classes): the data the setup reads
    cfg = load_config(v.method, "synth-shapes", "fast",
                      ["quiet=true", "augment=true", f"batch_size={batch_size}",
                       f"dataset_args.n_per_class={per_class}",
                       *BACKBONE[quick], *v.overrides,
                       *(v.quick_overrides if quick else v.full_overrides), *overrides])
    t = Trainer(cfg, out=out)
    data = t.train_data(task)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    batches = [b for b, _ in zip(loader, range(2))]
    ctx = t.context(task).replace(split="train", cacheable=False, batch_size=batch_size,
                                  task_loader=lambda augment=False: batches)
    t.method.begin_task(ctx)
    t.method.train()
    stages = t.method.stages(ctx)
    stage = next(s for s in stages if s.name == v.stage) if v.stage else stages[0]
    ctx = ctx.replace(stage=stage.name)
    t.method.begin_stage(stage, ctx)
    opt = build_optimizer(t.method.param_groups(stage), cfg.optimizer, batch_size)
    batch = {k: x.to(t.device) if isinstance(x, torch.Tensor) else x for k, x in batches[0].items()}
    return StepSetup(t, ctx, batch, opt, stage, t._wrap(stage))


def step_fn(s: StepSetup, config: str) -> Callable[[], float]:
    """A callable running one training step of ``s`` in ``config`` (one of :data:`CONFIGS`); returns the loss.
    No gradient clipping in any configuration (the engine's clip is one norm over the parameters: the same cost
    whichever way the gradients came)."""
    if config == "peer":
        return lambda: peers.step(s.method, s.opt, s.batch, s.ctx)
    if config not in ("reference", "clfast"):
        raise ValueError(f"steps.step_fn: config must be one of {CONFIGS}, got {config!r}")

    def run() -> float:
        with use_backend("reference") if config == "reference" else contextlib.nullcontext():
            return s.trainer._step(s.module, s.opt, s.batch, s.ctx, None)["loss"]
    return run


def floor_fn(kind: str, *, quick: bool, batch_size: int, classes: int = 10,
             amp_dtype: Optional[torch.dtype] = torch.bfloat16) -> Callable[[], float]:
    """One step of floor ``kind`` (``floor`` or ``floor_head``, see the module docstring) on a fresh ViT of the
    benchmark's shape (random weights), under autocast to ``amp_dtype`` (None: fp32)."""
    from clfast.backbones.vit import create_vit

    if kind not in FLOORS:
        raise ValueError(f"steps.floor_fn: kind must be one of {FLOORS}, got {kind!r}")
    name = "vit_tiny_synth" if quick else "vit_base_patch16_224"
    backbone = create_vit(name, pretrained=quick)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = backbone.vit.to(dev).eval().requires_grad_(False)
    head = torch.nn.Linear(vit.embed_dim, classes).to(dev)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    size = backbone.data_config["input_size"][1:]
    x = backbone.normalize(torch.rand(batch_size, 3, *size, generator=g)).to(dev)
    y = torch.randint(0, classes, (batch_size,), generator=g).to(dev)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if kind == "floor":
                tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x))).detach().requires_grad_(True)
                feat = vit.norm(vit.blocks(tokens))[:, 0]
            else:
                with torch.no_grad():
                    feat = vit.forward_features(x)[:, 0]
            loss = F.cross_entropy(head(feat).float(), y)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def snapshot(s: StepSetup) -> tuple[dict, dict]:
    """Copies of the method's and the optimizer's state, for :func:`restore`."""
    return copy.deepcopy(s.method.state_dict()), copy.deepcopy(s.opt.state_dict())


def restore(s: StepSetup, state: tuple[dict, dict]) -> None:
    s.method.load_state_dict(state[0])
    s.opt.load_state_dict(state[1])
