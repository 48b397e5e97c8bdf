"""One training step of a method in each benchmarked configuration, and the backbone's floors; shared by
``bench_train.py`` and the tests (tests/benchmarks/).

Configurations of a step (the same method object, optimizer and batch):

- ``peer``: the method computed the way its official code does (:mod:`benchmarks.peers`), fp32;
- ``peer_amp``: the same under the engine's autocast (``torch.autocast`` wrapped around the official step by hand,
  as its code does not): the peer at the ``clfast`` column's precision, where that is not fp32
  (:func:`configs`);
- ``reference``: the engine's step (``Trainer._step``, its autocast) with every op on its reference backend
  (``CLFAST_BACKEND=reference``);
- ``clfast``: the engine's step with the defaults (dispatch picks each op's backend; bf16 autocast where the run
  has it).

Floors (no method, the same backbone shape and batch, under the engine's autocast): ``floor``, the frozen ViT's
forward and backward through every block (the tokens entering block 0 need a gradient, as a prompt at block 0
makes them), a linear head and Adam on it; ``floor_head``, the frozen forward without autograd and the head's
forward, backward and Adam step. No prompt method's step can cost less than ``floor`` when it prompts block 0, nor
any method's less than ``floor_head``. The floor a variant's step must pay (:func:`must_pay_fn`, its
:attr:`Variant.pays`): its frozen query pass of the batch, where it has one, then the floor of its shallowest
prompted block.
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
from clfast.engine.trainer import eager_hooks
from clfast.ops import use_backend

CONFIGS = ("peer", "reference", "clfast")
AMP_CONFIGS = ("peer_amp",)        # only where the engine's autocast is on (amp=auto: bf16 where computed natively)
FLOORS = ("floor", "floor_head")
PAYS = ("query", *FLOORS)


@dataclass(frozen=True)
class Variant:
    """What a benchmarked method runs: the registered ``method``, the ``stage`` whose step is timed (None: its
    first), the ``task`` it is set up for (0-based; the data has 10 tasks of 10 classes), ``cacheable``: whether the
    step's context allows the per-image query cache (only for a stage that trains without augmentation in the
    official code too; the peer never caches), ``floors``: whether the backbone's floors apply (False: the step
    runs no ViT, as STAR-Prompt's stage 1; derived from ``pays``), ``pays``: the parts of the floor its step must
    pay (:func:`must_pay_fn`): ``"query"``, the method's own frozen query pass of the batch (its ``clip_query``
    or ``query``); ``"floor"``, the backbone's forward and backward through every block (the method prompts block
    0: a test checks it); ``"floor_head"``, its frozen forward and a head's backward; empty where no backbone runs;
    config ``overrides``; at ViT-B/16 shapes only, ``full_overrides``
    (the paper's settings where the fast preset narrows them for the tiny backbone); with ``quick`` only,
    ``quick_overrides`` (fewer prompts where the peer's cost grows with them, so that the quick run stays short)."""

    method: str
    stage: Optional[str] = None
    task: int = 1
    cacheable: bool = False
    pays: tuple[str, ...] = ("query", "floor")
    overrides: tuple[str, ...] = ()
    full_overrides: tuple[str, ...] = ()
    quick_overrides: tuple[str, ...] = ()
    vlm: bool = False          # a VQA method on the clfast VLM (synth-vqa; a vlm_finetune checkpoint to load)

    def __post_init__(self):
        bad = [p for p in self.pays if p not in PAYS]
        if bad:
            raise ValueError(f"steps.Variant({self.method!r}): pays must be parts of {PAYS}, got {bad}")

    @property
    def floors(self) -> bool:
        """Whether the backbone's floors apply (the step runs the benchmark's backbone)."""
        return bool(self.pays)


STAR_CLIP = ("method_args.clip_model=ViT-L-14", "method_args.clip_pretrained=none")

VARIANTS = {
    "linear": Variant("linear", pays=("floor_head",)),      # the frozen forward is its feature; no query pass
    "l2p": Variant("l2p"),
    "dualprompt": Variant("dualprompt"),
    "coda_prompt": Variant("coda_prompt"),
    "gpls": Variant("gpls"),
    # every task gets K = 5 prompts (no phrase encoder in the loop): 10 prompts in use at task 2; the paper's
    # blocks 0-6 at ViT-B (the fast preset prompts the tiny ViT's 6 blocks); --quick: 2 prompts in blocks 0-1 (the
    # loop of the peer and of the reference backend costs 2H·f convolutions per block, each on B copies)
    # its query reads the [CLS] entering each prompted block in the prompted pass itself: no separate query pass
    "convprompt": Variant("convprompt", pays=("floor",), overrides=("method_args.language_guidance=false",),
                          full_overrides=("method_args.layers=[0,1,2,3,4,5,6]",),
                          quick_overrides=("method_args.layers=[0,1]", "method_args.prompts_per_task=1")),
    # level 2: CLIP query of the augmented batch, per-block class selection, the ViT with residual value prompts; at
    # ViT-B/16 shapes the paper's CLIP (ViT-L-14, random weights: its image tower is the query pass); --quick: the
    # fast preset's clip_tiny_synth
    "star_prompt": Variant("star_prompt", stage="stage2", full_overrides=STAR_CLIP),
    # level 1: CLIP's image query and its text encoder over the classes (the official code recomputes every seen
    # class's key each step, clfast the current task's only), at task 2 (10 past classes) and at the last task (90)
    "star_prompt_stage1": Variant("star_prompt_stage1", stage="stage1", pays=(), full_overrides=STAR_CLIP),
    "star_prompt_stage1_last": Variant("star_prompt_stage1", stage="stage1", task=9, pays=(),
                                       full_overrides=STAR_CLIP),
    # stage 1 trains on CLIP's deterministic preprocess in both codes (no augmentation): clfast's per-image cache of
    # the CLIP query serves every epoch after the first; the step of those epochs (the batch's query cached)
    "star_prompt_stage1_last_cached": Variant("star_prompt_stage1", stage="stage1", task=9, cacheable=True,
                                              pays=(), full_overrides=STAR_CLIP),
    # the paper preset's VLM (ViT-B-16 towers at 384 px: 577 image tokens, fusion 6 x 768 x 12) with random weights;
    # --quick: the fast preset's (clip_tiny_synth at 64 px, fusion 2 x 192 x 3)
    # its pool is chosen from the towers' features of the same pass (no query pass); prompts in every fusion layer
    "clumo": Variant("clumo", vlm=True, pays=("floor",)),
}

BACKBONE = {False: ("backbone=vit_base_patch16_224", "pretrained=false"), True: ()}
VLM_BACKBONE = {False: ("method_args.clip_model=ViT-B-16", "method_args.clip_pretrained=false",
                        "method_args.image_size=384"), True: ()}


@dataclass
class StepSetup:
    """A method set up for its variant's task (task 2 by default) as the trainer would (``begin_task`` with a
    statistics pass over two batches, the timed stage begun), with its optimizer and one augmented batch."""

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
          task: Optional[int] = None) -> StepSetup:
    """Build variant ``name`` of :data:`VARIANTS` on the ``synth-shapes`` data with augmentation on, at
    ``vit_base_patch16_224`` shapes with random weights (``quick``: the shipped ``vit_tiny_synth``); a VQA variant
    on ``synth-vqa`` (the whole image, unflipped: its only transform) with the paper preset's VLM at random weights
    (``quick``: the fast preset's), loading a one-step :func:`vlm_checkpoint`; for ``task`` (0-based; None: the
    variant's)."""
    if name not in VARIANTS:
        raise ValueError(f"steps.setup: unknown variant {name!r}; known: {sorted(VARIANTS)}")
    v = VARIANTS[name]
    task = v.task if task is None else task
    if v.vlm:
        base = ["quiet=true", f"batch_size={batch_size}", *VLM_BACKBONE[quick]]
        dataset, data_args = "synth-vqa", [*base, f"dataset_args.n_per_task={2 * batch_size}",
                                           f"method_args.vlm_checkpoint={vlm_checkpoint(out, base)}"]
    else:
        per_class = -(-2 * batch_size // 10)       # two batches of a task (10 classes): the data the setup reads
        dataset, data_args = "synth-shapes", ["quiet=true", "augment=true", f"batch_size={batch_size}",
                                              f"dataset_args.n_per_class={per_class}", *BACKBONE[quick]]
    cfg = load_config(v.method, dataset, "fast",
                      [*data_args, *v.overrides, *(v.quick_overrides if quick else v.full_overrides), *overrides])
    t = Trainer(cfg, out=out)
    data = t.train_data(task)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    batches = [b for b, _ in zip(loader, range(2))]
    ctx = t.context(task).replace(split="train", cacheable=v.cacheable, batch_size=batch_size,
                                  task_loader=lambda augment=False: batches)
    with eager_hooks():                  # as the trainer runs the hooks (compile=true compiles the steps only)
        if v.vlm and task > 0:
            # CluMo's end of the previous task: the frozen copy of the head that the distillation reads
            t.method.end_task(t.context(task - 1).replace(split="stats"), batches)
        t.method.begin_task(ctx)
        t.method.train()
        stages = t.method.stages(ctx)
        stage = next(s for s in stages if s.name == v.stage) if v.stage else stages[0]
        ctx = ctx.replace(stage=stage.name)
        t.method.begin_stage(stage, ctx)
    opt = build_optimizer(t.method.param_groups(stage), cfg.optimizer, batch_size)
    batch = {k: x.to(t.device) if isinstance(x, torch.Tensor) else x for k, x in batches[0].items()}
    return StepSetup(t, ctx, batch, opt, stage, t._wrap(stage))


def vlm_checkpoint(out: str, overrides: list[str]) -> str:
    """A ``vlm_finetune`` run of one step on ``synth-vqa-pretrain`` with the VLM of ``overrides`` (under ``out``):
    the checkpoint a VQA method must load (its fusion encoder and head are only initialised, as any random weights
    the benchmark times)."""
    import os

    warm = os.path.join(out, "vlm_warm")
    if not os.path.isdir(os.path.join(warm, "checkpoints")):
        cfg = load_config("vlm_finetune", "synth-vqa-pretrain", "fast",
                          [*overrides, "epochs=1", "limit_train_batches=1", "limit_eval_batches=1",
                           "dataset_args.n=16"])
        Trainer(cfg, out=warm).fit()
    return warm


def configs(amp_dtype: Optional[torch.dtype]) -> tuple[str, ...]:
    """The configurations a run times: :data:`CONFIGS`, and where the engine's autocast is on (``amp_dtype``, e.g.
    bf16 on a CPU with AVX512-BF16 or AMX) :data:`AMP_CONFIGS` too: the peer at equal precision beside the peer as
    its official code runs (fp32)."""
    return (*CONFIGS, *AMP_CONFIGS) if amp_dtype is not None else CONFIGS


def step_fn(s: StepSetup, config: str) -> Callable[[], float]:
    """A callable running one training step of ``s`` in ``config`` (one of :data:`CONFIGS` and
    :data:`AMP_CONFIGS`); returns the loss. No gradient clipping in any configuration (the engine's clip is one norm
    over the parameters: the same cost whichever way the gradients came)."""
    if config == "peer":
        return lambda: peers.step(s.method, s.opt, s.batch, s.ctx)
    if config == "peer_amp":
        if s.trainer.amp_dtype is None:
            raise ValueError("steps.step_fn: config 'peer_amp' needs the engine's autocast on (amp bf16 or fp16); "
                             "this setup runs fp32, where the peer's own precision is 'peer'")
        return lambda: peers.step(s.method, s.opt, s.batch, s.ctx, amp_dtype=s.trainer.amp_dtype)
    if config not in ("reference", "clfast"):
        raise ValueError(f"steps.step_fn: config must be one of {CONFIGS + AMP_CONFIGS}, got {config!r}")

    def run() -> float:
        with use_backend("reference") if config == "reference" else contextlib.nullcontext():
            return s.trainer._step(s.module, s.opt, s.batch, s.ctx, None)["loss"]
    return run


def floor_fn(kind: str, *, quick: bool, batch_size: int, classes: int = 10,
             amp_dtype: Optional[torch.dtype] = torch.bfloat16, vlm: bool = False) -> Callable[[], float]:
    """One step of floor ``kind`` (``floor`` or ``floor_head``, see the module docstring) on a fresh ViT of the
    benchmark's shape (random weights), under autocast to ``amp_dtype`` (None: fp32); ``vlm``: on the VLM of the
    VQA variants (:func:`vlm_floor_fn`)."""
    from clfast.backbones.vit import create_vit

    if kind not in FLOORS:
        raise ValueError(f"steps.floor_fn: kind must be one of {FLOORS}, got {kind!r}")
    if vlm:
        return vlm_floor_fn(kind, quick=quick, batch_size=batch_size, classes=classes, amp_dtype=amp_dtype)
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


def must_pay_fn(s: StepSetup, name: str, *, quick: bool, batch_size: int,
                amp_dtype: Optional[torch.dtype] = None) -> Optional[Callable[[], float]]:
    """The floor variant ``name``'s step must pay (its :attr:`Variant.pays`), as one callable: the method's own
    frozen query pass of ``s``'s batch under the step's autocast (STAR-Prompt's ``clip_query``, else ``query``),
    then one step of each floor part on a fresh backbone of the benchmark's shape (:func:`floor_fn`, under
    ``amp_dtype``). None where the variant pays none (its step runs no backbone). Returns the floor's loss."""
    if name not in VARIANTS:
        raise ValueError(f"steps.must_pay_fn: unknown variant {name!r}; known: {sorted(VARIANTS)}")
    v = VARIANTS[name]
    if not v.pays:
        return None
    parts = [floor_fn(kind, quick=quick, batch_size=batch_size, vlm=v.vlm, amp_dtype=amp_dtype)
             for kind in v.pays if kind != "query"]
    query = None
    if "query" in v.pays:
        query = getattr(s.method, "clip_query", None) or getattr(s.method, "query", None)
        if not callable(query) or isinstance(query, torch.nn.Module):
            raise ValueError(f"steps.must_pay_fn: variant {name!r} pays a query pass, but "
                             f"{type(s.method).__name__} has neither a clip_query nor a query method")

    def step() -> float:
        if query is not None:
            with torch.no_grad(), s.ctx.autocast():
                query(s.batch, s.ctx)
        loss = 0.0
        for part in parts:
            loss = part()
        return loss
    return step


def vlm_floor_fn(kind: str, *, quick: bool, batch_size: int, classes: int = 10,
                 amp_dtype: Optional[torch.dtype] = torch.bfloat16) -> Callable[[], float]:
    """The VQA variants' floors on a fresh VLM of their shape (random weights): ``floor``, the frozen towers'
    forward without autograd, then the frozen fusion encoder's forward and backward through every layer (its image
    memory needs a gradient, as a prompt prefixed in every layer makes it), an answer head and Adam on it;
    ``floor_head``: towers and fusion without autograd, the head's forward, backward and Adam step. A question of 9
    words, padded to the tokenizer's context."""
    from clfast.backbones.vlm import create_vlm

    if quick:
        model = create_vlm("clip_tiny_synth", image_size=64, num_answers=classes)
    else:
        model = create_vlm("ViT-B-16", pretrained=False, image_size=384, num_answers=classes)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev).eval().requires_grad_(False)
    head = model.head.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, *model.towers.image_size, generator=g).to(dev)
    tokens = torch.as_tensor(model.tokenizer(["what colour is the small shape left of the circle"] * batch_size),
                             dtype=torch.long).to(dev)
    y = torch.randint(0, classes, (batch_size,), generator=g).to(dev)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            with torch.no_grad():
                enc = model.encode(x, tokens)
            if kind == "floor":
                enc = enc._replace(image=enc.image.detach().requires_grad_(True))
                h = model.fuse(enc)
            else:
                with torch.no_grad():
                    h = model.fuse(enc)
            loss = F.cross_entropy(head(h).float(), y)
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
