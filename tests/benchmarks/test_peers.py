"""The method peers of benchmarks/peers/ compute the same methods as clfast, and the benchmark's ``reference`` and
``clfast`` configurations train alike.

1. Per method (and STAR-Prompt's two timed stages): on the same weights and batch, at fp32, the peer's loss and
   the gradient of every trainable parameter equal those of clfast's ``training_step`` with every op on its
   reference backend, to float32 tolerance. The peer runs none of clfast's ops or its ``PromptedAttention``: its
   own ViT forward (naive attention, concatenated prompts), the official codes' selection and prompt
   construction. Where the official code computes a different loss (a quirk clfast fixed), the peer follows
   clfast's decision for the numbers and the official code for the cost, so the numbers must agree here: L2P's
   prompt tokens get no position embedding; DualPrompt's pull term is 1 − cos (the code's −cos, same gradient);
   CODA-Prompt's orthogonality penalty is the mean over layers (the code sums them); GPLS draws clfast's noise ξ,
   uses its softplus σ and adds its differentiable KL, while the code's SVD ELBO is computed and thrown away
   (``.item()``, as there).
2. The issue's same-losses test: the first 3 training steps (the engine's step, the same batch, from the same
   state) give the same losses with ``CLFAST_BACKEND=reference`` as with the defaults, within bf16 tolerance
   (the engine's bf16 autocast on the CPU); the defaults also stay within it of the reference backends at fp32.

On the shipped ``vit_tiny_synth`` with 4 images (8 for the same-losses test), one thread.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import peers, steps
from clfast.ops import use_backend

# small settings where a method's peer is slow at the fast preset (ConvPrompt's loop: 2H·f convolutions per block,
# each on B copies): two prompted blocks, 2 prompts per task (4 in use at task 2)
SMALL = {"convprompt": ("method_args.layers=[0,1]", "method_args.prompts_per_task=2")}
# every variant at its fast preset, plus the settings the presets leave out: L2P's paper head (the mean of the
# prompt tokens' outputs, several prompts per image, uniform init) and GPLS's released-code options
CASES = [(name, ()) for name in steps.VARIANTS] + [
    ("l2p", ("method_args.head=prompt", "method_args.top_k=3", "method_args.init=uniform")),
    ("gpls", ("method_args.sigma_param=linear", "method_args.sample_noise=false", "method_args.elbo_weight=0")),
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(name: str, tmp_path, batch_size: int, *extra: str) -> steps.StepSetup:
    return steps.setup(name, quick=True, batch_size=batch_size, out=str(tmp_path / name),
                       overrides=(*SMALL.get(name, ()), *extra))


def loss_and_grads(fn, params: dict, seed: int = 7):
    torch.manual_seed(seed)        # GPLS draws its noise ξ from the global generator: the same draws for both
    loss = fn()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.detach(), {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), grads)}


@pytest.mark.parametrize("name, extra", CASES, ids=[n + ("-" + e[0].split(".")[1].split("=")[0] if e else "")
                                                     for n, e in CASES])
def test_peer_loss_and_gradients_equal_the_reference_backend(name, extra, tmp_path):
    s = make(name, tmp_path, 4, "amp=none", *extra)
    m = s.method
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert params, f"{name}: nothing trains in the timed stage"

    def clfast_loss():
        with use_backend("reference"):
            return m.training_step(s.batch, s.ctx).loss

    flags = [p.requires_grad for p in m.parameters()]
    ref, ref_g = loss_and_grads(clfast_loss, params)
    peer, peer_g = loss_and_grads(lambda: peers.loss_fn(m)(m, s.batch, s.ctx), params)
    assert torch.isfinite(ref) and ref.dtype == peer.dtype == torch.float32
    assert torch.allclose(peer, ref, rtol=1e-5, atol=1e-6), f"{name}: peer loss {peer.item()} != {ref.item()}"
    moved = [n for n, g in ref_g.items() if g.abs().max() > 0]
    assert moved, f"{name}: no trainable parameter gets a gradient"
    for n in params:
        r, p = ref_g[n], peer_g[n]
        scale = max(float(r.abs().max()), 1e-8)
        err = float((p - r).abs().max()) / scale
        assert err < 2e-5, f"{name}: gradient of {n} differs from the reference's by {err:.2e} of its max"
    # CODA-Prompt's peer computes the gradients of the unfrozen ViT too (the official cost), yet leaves it frozen
    assert [p.requires_grad for p in m.parameters()] == flags, f"{name}: the peer changed what trains"


@pytest.mark.parametrize("name", ["clumo", "star_prompt", "star_prompt_stage1_last"])
def test_peer_runs_the_clip_towers_attention_as_the_official_code(name, tmp_path, monkeypatch):
    """The open_clip towers' attention in the peers is the official codes' (ALBEF's written out for CluMo,
    OpenAI CLIP's for STAR-Prompt), not clfast's fused op (which the towers run otherwise), and the towers get
    their own modules back after the step."""
    from clfast.ops import attention

    s = make(name, tmp_path, 2, "amp=none")
    m = s.method
    towers = m.vlm.towers if name == "clumo" else m.clip

    def forbidden(*args, **kwargs):
        raise AssertionError("the peer ran clfast's fused attention")

    monkeypatch.setattr(attention, "prefix_attention", forbidden)
    monkeypatch.setattr(attention.FusedMultiheadAttention, "forward", forbidden)
    assert torch.isfinite(peers.loss_fn(m)(m, s.batch, s.ctx))
    mha = [x for x in towers.modules() if isinstance(x, torch.nn.MultiheadAttention)]
    assert mha and all(type(x) is attention.FusedMultiheadAttention for x in mha)


def test_peer_step_trains_and_drops_gradients_outside_the_optimizer(tmp_path):
    """peers.step: a real optimizer step on the method's parameters (they move), the CODA-Prompt ViT's gradients,
    which the peer computes as the official code does, dropped afterwards."""
    s = make("coda_prompt", tmp_path, 4)
    m = s.method
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    loss = peers.step(m, s.opt, s.batch, s.ctx)
    assert isinstance(loss, float) and loss == loss
    assert any(not torch.equal(before[n], p) for n, p in m.named_parameters() if n in before)
    assert all(p.grad is None for p in m.backbone.vit.parameters())


def test_unknown_method_has_no_peer():
    class Other:
        name = "finetune"
    with pytest.raises(ValueError, match="no peer for method 'finetune'"):
        peers.loss_fn(Other())


@pytest.mark.parametrize("name", list(steps.VARIANTS))
def test_reference_and_default_backends_give_the_same_first_losses(name, tmp_path):
    """3 engine steps from the same state: ``reference`` (every op on its reference backend) and ``clfast`` (the
    defaults), both under the engine's autocast (bf16 here), agree within bf16 tolerance (2·2⁻⁸ relative); and so
    do the defaults with the reference backends at fp32 (autocast off, in the step and in the method's own passes)."""
    s = make(name, tmp_path, 8, "amp=bf16")      # the default (amp=auto) is fp32 on a CPU without native bf16
    assert s.trainer.amp_dtype == torch.bfloat16
    start = steps.snapshot(s)
    losses = {}

    def run3(config: str) -> torch.Tensor:
        steps.restore(s, start)
        torch.manual_seed(11)
        run = steps.step_fn(s, config)
        return torch.tensor([run() for _ in range(3)])

    losses["reference"], losses["clfast"] = run3("reference"), run3("clfast")
    amp, ctx = s.trainer.amp_dtype, s.ctx
    s.trainer.amp_dtype, s.ctx = None, ctx.replace(amp_dtype=None)
    try:
        losses["fp32"] = run3("reference")
    finally:
        s.trainer.amp_dtype, s.ctx = amp, ctx
    ref, got = losses["reference"], losses["clfast"]
    assert torch.isfinite(ref).all()
    assert not torch.equal(ref[0], ref[2]), f"{name}: the steps did not train (loss unchanged)"
    tol = 2 * 2.0 ** -8
    for base in ("reference", "fp32"):
        assert torch.allclose(got, losses[base], rtol=tol, atol=tol * 0.1), \
            f"{name}: {base} {losses[base].tolist()} vs clfast {got.tolist()}"


@pytest.mark.parametrize("name", ["star_prompt_stage1_last", "star_prompt_stage1_last_cached"])
def test_star_stage1_at_the_last_task_peer_recomputes_every_key_and_the_cache_serves_the_query(name, tmp_path,
                                                                                               monkeypatch):
    """The stage-1 variants at the last task: 90 past classes, whose keys the peer runs through the text encoder every
    step and clfast does not; with ``cacheable`` (stage 1 is not augmented) clfast's step after the first reads the
    batch's CLIP query from its cache, while the peer computes it every step, as the official code does."""
    s = make(name, tmp_path, 4)
    m = s.method
    assert tuple(s.ctx.class_range) == (90, 100) and s.ctx.seen_classes == 100
    assert s.ctx.cacheable == name.endswith("_cached")
    images, classes = [], []
    encode_image, encode_text = m.clip.encode_image, m._text_encoder.forward
    monkeypatch.setattr(m.clip, "encode_image", lambda x, *a, **k: images.append(len(x)) or encode_image(x, *a, **k))
    monkeypatch.setattr(m._text_encoder, "forward", lambda ctx, cls: classes.append(len(cls)) or encode_text(ctx, cls))
    run = steps.step_fn(s, "clfast")
    run()
    images.clear(), classes.clear()
    run()
    assert sum(classes) == 10, f"clfast's step encoded {classes} classes, not the current task's 10"
    assert images == ([] if s.ctx.cacheable else [4]), f"clfast's second step encoded images {images}"
    images.clear(), classes.clear()
    steps.step_fn(s, "peer")()
    assert sum(classes) == 100 and images == [4], f"the peer encoded {classes} classes and images {images}"
