"""Train-step throughput and peak memory per method, in three configurations side by side, with the backbone's
floors in the same run.

    clfast bench train [--quick] [-k gpls] [--write] [--amp none]     (also in ``clfast bench all``, ``make bench``)

One group per method (:data:`benchmarks.steps.VARIANTS`: ``linear``, ``l2p``, ``dualprompt``, ``coda_prompt``,
``gpls``, ``convprompt`` with 10 prompts in use, STAR-Prompt's stage-2 step and its stage-1 step with the paper's
CLIP ViT-L-14 (stage 1 at task 2, at the last task, and at the last task with the CLIP query cached: stage 1 is not
augmented), ``clumo`` on the paper preset's VLM: ViT-B-16 towers at 384 px, fusion 6 x 768 x 12), each timing a
full training step (forward, backward, optimizer step, and whatever the method does per step: the frozen query
pass, the KL of its prior, ...) at ``vit_base_patch16_224`` shapes with random weights, batch 16 (``--quick``: the
shipped ``vit_tiny_synth`` and ``clip_tiny_synth``), augmentation on, so no per-image cache helps (except in the
``_cached`` variant). The method is set up as the trainer would for task 2 (the ``_last`` variants: task 10;
``begin_task`` with a statistics pass over two batches). Configurations
(:mod:`benchmarks.steps`):

- ``peer``: the way the method's official code computes it (:mod:`benchmarks.peers`: naive attention with
  concatenation, the frozen query forward every step, ConvPrompt's per-prompt ``Conv2d`` loop, GPLS's inserted
  tokens and per-layer SVDs with ``.item()``, CODA-Prompt's unfrozen ViT, STAR-Prompt's explicit selection and its
  per-step recomputation of every seen class's key in stage 1), fp32;
- ``reference``: the engine's step (``Trainer._step``: bf16 autocast where the hardware has it) with every op on its
  reference backend (``CLFAST_BACKEND=reference``);
- ``clfast``: the engine's step with the defaults;
- ``peer_amp``, where the engine's autocast is on (bf16 on a CPU with AVX512-BF16 or AMX, or a GPU): ``peer`` with
  that autocast wrapped around its step by hand, the official code at the ``clfast`` column's precision.

The floors (group ``train_step floors``): the bare ViT's forward and backward through every block (``floor``), and
its frozen forward with only a head's backward (``floor_head``), in the run's precision (``--amp``, default the
engine's ``amp=auto``: bf16 autocast where the CPU or GPU computes bf16 natively, fp32 elsewhere); for the VLM the
frozen towers, then
the fusion encoder's backward through every layer or none (:func:`benchmarks.steps.vlm_floor_fn`), three rounds after
a warm-up each. Each configuration's own case times one step after a warm-up step, then one more step under
:func:`benchmarks.harness.peak_memory`, recorded in the figure's ``extra_info`` (``peak_mem_mb``,
``peak_mem_kind``). Then ``test_train_step_paired`` runs the method's configurations in paired rounds (one step of
each per round, the order reversed every other round; ``paired_s`` in its ``extra_info``): on a machine whose speed
drifts by 10-25 % over a run, rounds taken one configuration after another cannot resolve the differences that
matter, the rounds' ratios can. Each round also runs the floor the method's step must pay
(:func:`benchmarks.steps.must_pay_fn`: its frozen query pass, where it has one, then the backbone's forward and
backward as deep as its shallowest prompted block; ``impl`` ``floor`` in the table, its peak memory in
``floor_peak_mem_mb``), so the ``× floor`` column is a ratio of the same rounds too. The configurations share the
method object, its optimizer and the batch; each step trains them on. report.py renders the per-method table
(precision; s/step and the speed-ups vs peer and peer_amp from the paired rounds, with the rounds' range;
images/s, peak memory, × the method's floor with its rounds' range).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import steps
from benchmarks.harness import PairedRounds, device, peak_memory
from clfast.engine.config import resolve_amp


# the engine's amp for the run (``clfast bench train --amp``): auto (its default: bf16 where the hardware computes
# it), bf16 or none (fp32); the peer always runs fp32
AMP = os.environ.get("CLFAST_BENCH_AMP", "auto")
if AMP not in ("auto", "bf16", "none"):
    raise ValueError(f"bench_train: CLFAST_BENCH_AMP must be auto, bf16 or none, got {AMP!r}")


def _amp_dtype():
    """The run's precision as the clfast column runs it (:data:`AMP`): bf16 or None (fp32)."""
    amp = resolve_amp(device())[0] if AMP == "auto" else AMP
    return torch.bfloat16 if amp == "bf16" else None


def _amp_name(dtype) -> str:
    """A precision as the figures' ``amp`` field names it: ``bfloat16``, ``float16`` or ``fp32``."""
    return str(dtype).replace("torch.", "") if dtype is not None else "fp32"


METHODS = list(steps.VARIANTS)
CONFIGS = list(steps.configs(_amp_dtype()))         # + peer_amp where amp=auto is bf16 here
BATCH = {False: 16, True: 16}
# rounds after warm-up: ViT-B/16 steps take seconds (the peers' tens of seconds), so few. A configuration's own case
# times one round after its warm-up (its figure where no paired rounds ran); the table's times are the paired rounds'.
ROUNDS = {False: dict(rounds=1, warmup_rounds=1), True: dict(rounds=1, warmup_rounds=1)}
FLOOR_ROUNDS = {False: dict(rounds=3, warmup_rounds=1), True: dict(rounds=3, warmup_rounds=1)}
PAIRED_ROUNDS = {False: 3, True: 3}


@pytest.fixture(scope="module")
def setups():
    """variant -> its StepSetup (once per module: the configurations share it)."""
    return {}


def _setup(setups, method: str, quick: bool, tmp_path_factory) -> steps.StepSetup:
    if method not in setups:
        setups[method] = steps.setup(method, quick=quick, batch_size=BATCH[quick],
                                     out=str(tmp_path_factory.mktemp(method)), overrides=(f"amp={AMP}",))
        if setups[method].trainer.amp_dtype != _amp_dtype():     # CONFIGS (peer_amp or not) were chosen for it
            raise RuntimeError(f"bench_train: {method}'s trainer runs amp {setups[method].trainer.amp_dtype}, the "
                               f"run's CONFIGS were chosen for {_amp_dtype()} (CLFAST_BENCH_AMP={AMP})")
    return setups[method]


def _names(s: steps.StepSetup, method: str, quick: bool) -> tuple[str, str]:
    """(backbone label, floors key) of a variant's rows."""
    B = BATCH[quick]
    v = steps.VARIANTS[method]
    name = _backbone(quick, v.vlm)
    floors = f"{name} B{B}" if v.floors else ""
    if hasattr(s.method.cfg, "clip_model") and not v.vlm:   # STAR-Prompt: its CLIP named (alone where no ViT runs)
        clip = f"clip:{s.method.cfg.clip_model}"          # one word: plots.py parses "<method> <backbone> B<n>"
        name = f"{name}+{clip}" if v.floors else clip
    return name, floors


def _backbone(quick: bool, vlm: bool = False) -> str:
    if vlm:
        return "vlm_clip_tiny_synth@64" if quick else "vlm_ViT-B-16@384"
    return "vit_tiny_synth" if quick else "vit_base_patch16_224"


def _time(benchmark, fn, rounds: dict, **info) -> None:
    benchmark.extra_info.update(op="train_step", threads=torch.get_num_threads(), device=device(), **info)
    benchmark.pedantic(fn, iterations=1, **rounds)
    benchmark.extra_info.update(peak_memory(fn))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, setups, quick, tmp_path_factory, method, config):
    B = BATCH[quick]
    s = _setup(setups, method, quick, tmp_path_factory)
    amp = "fp32" if config == "peer" else _amp_name(s.trainer.amp_dtype)
    name, floors = _names(s, method, quick)
    benchmark.group = f"train_step {method} {name} B{B}"
    _time(benchmark, steps.step_fn(s, config), ROUNDS[quick], impl=config, method=method, backbone=name,
          images=B, amp=amp, floors=floors)


@pytest.mark.parametrize("method", METHODS)
def test_train_step_paired(benchmark, setups, quick, tmp_path_factory, method):
    """Every configuration of ``method`` in paired rounds (after their own cases warmed them up): the table's seconds
    per step and speed-ups (the median of the rounds' ratios, and their range) come from these."""
    B = BATCH[quick]
    s = _setup(setups, method, quick, tmp_path_factory)
    name, floors = _names(s, method, quick)
    fns = {c: steps.step_fn(s, c) for c in CONFIGS}
    floor = steps.must_pay_fn(s, method, quick=quick, batch_size=B, amp_dtype=s.trainer.amp_dtype)
    if floor is not None:           # the floor this method's step must pay, in the same rounds
        floor()                     # its warm-up (the configurations had theirs in their own cases)
        fns["floor"] = floor
    run = PairedRounds(fns)
    benchmark.group = f"train_step {method} {name} B{B}"
    benchmark.extra_info.update(op="train_step", impl="paired", method=method, backbone=name, images=B,
                                amp=_amp_name(s.trainer.amp_dtype), floors=floors,
                                pays="+".join(steps.VARIANTS[method].pays),
                                threads=torch.get_num_threads(), device=device())
    benchmark.pedantic(run, iterations=1, rounds=PAIRED_ROUNDS[quick], warmup_rounds=0)
    benchmark.extra_info["paired_s"] = run.seconds
    if floor is not None:
        benchmark.extra_info.update({f"floor_{k}": v for k, v in peak_memory(floor).items()})
    # the variant's last case (pytest runs every test_train_step before these): free its models, or a full run holds
    # all of them at once (15 GB resident by STAR-Prompt's CLIP ViT-L/14 variants on a 24 GB machine)
    setups.pop(method, None)


@pytest.mark.parametrize("vlm", [False, True], ids=["vit", "vlm"])
@pytest.mark.parametrize("floor", steps.FLOORS)
def test_floor(benchmark, quick, floor, vlm):
    B = BATCH[quick]
    name = _backbone(quick, vlm)
    benchmark.group = f"train_step floors {name} B{B}"
    dtype = _amp_dtype()
    fn = steps.floor_fn(floor, quick=quick, batch_size=B, vlm=vlm, amp_dtype=dtype)
    _time(benchmark, fn, FLOOR_ROUNDS[quick], impl=floor, method="floors", backbone=name, images=B,
          amp=_amp_name(dtype), floors=f"{name} B{B}")
