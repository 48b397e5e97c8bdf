"""prompt_conv: ConvPrompt's prompt generation, per-sample mixtures of per-(head, prompt) convolutions.

    prompts[b,h] = Σ_f prompt_weights[b,f] · (valid_conv2d(E_h, W_hf) + bias_hf)

with shared embeddings ``E`` ``(H, Lin, Din)``, kernels ``W`` ``(H, F, kh, kw)``, biases ``(H, F)`` and per-sample
weights ``(B, F)`` → ``(B, H, Lin−kh+1, Din−kw+1)``. ConvPrompt's released code runs one single-channel ``Conv2d``
per (layer, K/V, head, prompt) on B repeated copies of the embedding; the op is linear in the weights and ``E``
is shared, so min(F, B) convolutions per head suffice: either each (h, f) convolution once followed by one
GEMM over the batch (per-prompt plan), or the kernels mixed per sample first (mix-first plan).

Layers, as for every clfast op: :func:`reference` (the official per-prompt loop, the spec) → backends (``torch``:
one grouped ``conv2d`` with ``groups=H`` + einsum, the bar to beat; ``cpu``: C++ in csrc/prompt_conv; ``triton``:
kernels/prompt_conv.py) → the registered ops ``clfast::prompt_conv`` (C++, a custom_op) and
``clfast::prompt_conv_triton`` (a triton_op), each with its backward op, fake and autograd → the public
:func:`prompt_conv` and the module :class:`PromptConv`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clfast import _triton
from clfast.ops import _backends, _dispatch
from clfast.ops._backends import FLOAT, define_op
from clfast.ops._checks import shape_str
from clfast.ops._dispatch import register_backend

__all__ = ["prompt_conv", "reference", "PromptConv"]

OP = "prompt_conv"


class Inputs(NamedTuple):
    """What backends look at to decide whether they can run a call."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    prompts: int
    in_len: int
    in_dim: int
    kernel_h: int
    kernel_w: int

    @property
    def out_len(self) -> int:
        return self.in_len - self.kernel_h + 1

    @property
    def out_dim(self) -> int:
        return self.in_dim - self.kernel_w + 1


# ---------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------


def reference(embeddings: Tensor, weight: Tensor, bias: Tensor, prompt_weights: Tensor) -> Tensor:
    """ConvPrompt's official computation: for every (head, prompt), a single-channel ``conv2d`` over the head's
    embedding repeated B times, scaled by the prompt's per-sample weight and summed. H·F convolutions of B
    copies; the definition every backend is tested against, and the ``prompt_conv_impl: loop`` path."""
    H, Lin, Din = embeddings.shape
    B, num_prompts = prompt_weights.shape
    heads = []
    for h in range(H):
        x = embeddings[h][None, None].repeat(B, 1, 1, 1)  # (B, 1, Lin, Din): the official batch repeat
        acc = None
        for f in range(num_prompts):
            c = F.conv2d(x, weight[h, f][None, None], bias[h, f][None])[:, 0]  # (B, Lout, Dout)
            term = prompt_weights[:, f, None, None] * c
            acc = term if acc is None else acc + term
        heads.append(acc)
    return torch.stack(heads, dim=1)


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------

# 17×17 kernels sum 289 products per output, then F more: tolerances follow PyTorch's own error at these sizes.
_LOWP_ATOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


class _Tolerances:
    ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, **_LOWP_ATOL}
    GRAD_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, **_LOWP_ATOL}


@register_backend
class ReferenceBackend(_Tolerances, _backends.Reference):
    OP = OP
    run = staticmethod(reference)


def _torch_prompt_conv(embeddings: Tensor, weight: Tensor, bias: Tensor, prompt_weights: Tensor) -> Tensor:
    H, num_prompts, kh, kw = weight.shape
    conv = F.conv2d(embeddings[None], weight.reshape(H * num_prompts, 1, kh, kw), bias.reshape(-1), groups=H)
    conv = conv.view(H, num_prompts, conv.shape[-2], conv.shape[-1])
    return torch.einsum("bf,hfld->bhld", prompt_weights, conv)


@register_backend
class TorchBackend(_Tolerances, _backends.Torch):
    """One grouped ``conv2d`` (groups=H, F output channels per group) for all (h, f), then an einsum over
    prompts: the best stock-PyTorch composition (DESIGN §6 of the ConvPrompt spec)."""

    OP = OP
    run = staticmethod(_torch_prompt_conv)


class _Fused:
    """Runs the registered op ``registered`` (set below, with the op). Its ``forward`` returns ``(out, saved)``:
    with the per-prompt plan ``saved`` holds the per-(h, f) convolutions (F, H, Lout, Dout) float32 for the
    backward; with the mix-first plan it is empty."""

    registered = None

    @classmethod
    def mix_first(cls, inputs: Inputs) -> bool:
        return False

    @classmethod
    def run(cls, embeddings, weight, bias, prompt_weights, inputs: Inputs):
        return cls.registered(embeddings, weight, bias, prompt_weights, cls.mix_first(inputs))[0]


@register_backend
class CpuBackend(_Fused, _backends.Cpp):
    """C++ (csrc/prompt_conv): register-blocked 8-wide direct convolutions (forward, weight and input
    gradients), min(F, B) per head, and ATen GEMMs for the mixing over prompts."""

    OP, KERNEL = OP, "prompt_conv_fwd"
    ATOL = {torch.float32: 2e-5, **_LOWP_ATOL}
    GRAD_ATOL = {torch.float32: 2e-5, **_LOWP_ATOL}

    @classmethod
    def mix_first(cls, inputs: Inputs) -> bool:
        """Whether mixing kernels per sample (B convolutions per head) is cheaper than convolving each prompt
        (F per head) and mixing outputs with GEMMs. Costs in multiply-adds over forward and backward (three
        convolutions either way, three F·B GEMMs over the outputs for the per-prompt plan), GEMM work
        discounted by how much faster MKL runs than the direct convolutions."""
        B, Fn = inputs.batch, inputs.prompts
        taps = inputs.kernel_h * inputs.kernel_w
        per_prompt = Fn * taps + _GEMM_DISCOUNT * B * Fn
        mixed = B * taps
        return mixed < per_prompt

    @staticmethod
    def forward(embeddings, weight, bias, prompt_weights, mix_first):
        return torch.ops._clfast_C.prompt_conv_fwd(embeddings, weight, bias, prompt_weights, mix_first)

    @staticmethod
    def backward(grad, embeddings, weight, bias, prompt_weights, saved, mix_first):
        de, dw, db, dpw = torch.ops._clfast_C.prompt_conv_bwd(grad, embeddings, weight, bias, prompt_weights, saved,
                                                               mix_first)
        # the per-prompt plan sums dbias as an (F, H) transpose: make it the contiguous (H, F) the fake promises
        return de, dw, db.contiguous(), dpw


# A GEMM multiply-add costs about this fraction of a direct-convolution one on the CPU (measured, 2 threads).
_GEMM_DISCOUNT = 0.5


@register_backend
class TritonBackend(_Fused, _backends.Triton):
    """Triton (kernels/prompt_conv.py): implicit-GEMM convolutions once per (h, f) with tl.dot, the mixing over
    prompts as GEMMs; the backward's weight gradient is an implicit GEMM too, the input gradient a gather. On GPUs
    the per-prompt plan's batch GEMMs are cheap: it is the only plan implemented."""

    OP = OP
    ATOL = {torch.float32: 2e-3 if _triton.CUDA else 2e-5, **_LOWP_ATOL}
    GRAD_ATOL = {torch.float32: 5e-3 if _triton.CUDA else 2e-5, **_LOWP_ATOL}


_backends.set_priorities(OP)


# ---------------------------------------------------------------------------------------------------
# The registered ops: clfast::prompt_conv (C++) and clfast::prompt_conv_triton, each with its backward op, fake
# implementations and autograd
# ---------------------------------------------------------------------------------------------------

_SCHEMA = "(Tensor embeddings, Tensor weight, Tensor bias, Tensor prompt_weights, bool mix_first) -> (Tensor, Tensor)"
_BACKWARD_SCHEMA = ("(Tensor grad, Tensor embeddings, Tensor weight, Tensor bias, Tensor prompt_weights, "
                    "Tensor saved, bool mix_first) -> (Tensor, Tensor, Tensor, Tensor)")


def _fake(embeddings, weight, bias, prompt_weights, mix_first):
    """(prompts (B,H,Lout,Dout) in the inputs' dtype, saved: the per-(h, f) convolutions (F,H,Lout,Dout) float32
    with the per-prompt plan, empty with the mix-first plan)."""
    H, Lin, Din = embeddings.shape
    Fn, kh, kw = weight.shape[1:]
    B = prompt_weights.shape[0]
    Lo, Do = Lin - kh + 1, Din - kw + 1
    out = embeddings.new_empty((B, H, Lo, Do))
    saved = embeddings.new_empty((0,) if mix_first else (Fn, H, Lo, Do), dtype=torch.float32)
    return out, saved


def _backward_fake(grad, embeddings, weight, bias, prompt_weights, saved, mix_first):
    """(dembeddings, dweight, dbias, dprompt_weights), each in its input's dtype and shape."""
    return (embeddings.new_empty(embeddings.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape),
            prompt_weights.new_empty(prompt_weights.shape))


def _setup_context(ctx, inputs, output):
    embeddings, weight, bias, prompt_weights, mix_first = inputs
    ctx.save_for_backward(embeddings, weight, bias, prompt_weights, output[1])
    ctx.mix_first = mix_first


def _register(name: str, forward, backward, *, triton: bool = False):
    """``clfast::<name>`` computed by ``forward``, and ``clfast::<name>_backward`` by ``backward``, tied by
    autograd. Returns the forward op."""
    op = define_op(name, _SCHEMA, forward, _fake, triton=triton)
    backward_op = define_op(f"{name}_backward", _BACKWARD_SCHEMA, backward, _backward_fake, triton=triton)

    def _backward(ctx, grad, _dsaved):
        embeddings, weight, bias, prompt_weights, saved = ctx.saved_tensors
        grads = backward_op(grad.contiguous(), embeddings, weight, bias, prompt_weights, saved, ctx.mix_first)
        return (*grads, None)

    op.register_autograd(_backward, setup_context=_setup_context)
    return getattr(torch.ops.clfast, name)


def _triton_forward(embeddings, weight, bias, prompt_weights, mix_first):
    if mix_first:
        raise ValueError("clfast::prompt_conv_triton: the triton backend runs the per-prompt plan only "
                         "(mix_first=False)")
    return _triton_prompt_conv_fwd(embeddings, weight, bias, prompt_weights)


def _triton_backward(grad, embeddings, weight, bias, prompt_weights, saved, mix_first):
    return _triton_prompt_conv_bwd(grad, embeddings, weight, bias, prompt_weights, saved)


CpuBackend.registered = _register(OP, CpuBackend.forward, CpuBackend.backward)
if _backends.TRITON_OPS:
    from clfast.kernels.prompt_conv import prompt_conv_bwd as _triton_prompt_conv_bwd
    from clfast.kernels.prompt_conv import prompt_conv_fwd as _triton_prompt_conv_fwd

    TritonBackend.registered = _register(f"{OP}_triton", _triton_forward, _triton_backward, triton=True)


# ---------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------


def _validate(embeddings, weight, bias, prompt_weights) -> Inputs:
    named = (("embeddings", embeddings), ("weight", weight), ("bias", bias), ("prompt_weights", prompt_weights))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"prompt_conv: {name} must be a torch.Tensor, got {type(t).__name__}")
    if embeddings.dtype not in FLOAT:
        raise TypeError(f"prompt_conv: embeddings must be float32, bfloat16, float16 or float64, got "
                        f"{embeddings.dtype}")
    if embeddings.dim() != 3:
        raise ValueError(f"prompt_conv: embeddings must have shape (H,Lin,Din), got {shape_str(embeddings)}")
    H, Lin, Din = embeddings.shape
    if H < 1:
        raise ValueError(f"prompt_conv: embeddings must have shape (H,Lin,Din) with H >= 1, got {shape_str(embeddings)}")
    if weight.dim() != 4 or weight.shape[0] != H:
        raise ValueError(f"prompt_conv: weight must have shape (H,F,kh,kw) with H = {H}, got {shape_str(weight)}")
    Fn, kh, kw = weight.shape[1:]
    if Fn < 1 or kh < 1 or kw < 1:
        raise ValueError(f"prompt_conv: weight must have shape (H,F,kh,kw) with F, kh, kw >= 1, got {shape_str(weight)}")
    if kh > Lin or kw > Din:
        raise ValueError(f"prompt_conv: weight's kernel (kh,kw) = ({kh},{kw}) must fit in the embeddings "
                         f"(Lin,Din) = ({Lin},{Din})")
    if tuple(bias.shape) != (H, Fn):
        raise ValueError(f"prompt_conv: bias must have shape (H,F) = ({H},{Fn}), got {shape_str(bias)}")
    if prompt_weights.dim() != 2 or prompt_weights.shape[1] != Fn:
        raise ValueError(f"prompt_conv: prompt_weights must have shape (B,F) with F = {Fn}, got "
                         f"{shape_str(prompt_weights)}")
    for name, t in named[1:]:
        if t.dtype != embeddings.dtype:
            raise TypeError(f"prompt_conv: {name} must have the dtype of embeddings ({embeddings.dtype}), got {t.dtype}")
        if t.device != embeddings.device:
            raise ValueError(f"prompt_conv: {name} must be on the device of embeddings ({embeddings.device}), got "
                             f"{t.device}")
    return Inputs(embeddings.device, embeddings.dtype, prompt_weights.shape[0], H, Fn, Lin, Din, kh, kw)


def prompt_conv(embeddings: Tensor, weight: Tensor, bias: Tensor, prompt_weights: Tensor) -> Tensor:
    """ConvPrompt's prompts: per-sample weighted sums of per-(head, prompt) valid convolutions.

    Args:
        embeddings: ``(H, Lin, Din)`` shared embeddings (in ConvPrompt, one layer's K and V streams stack to
            H = 2·12 heads of 36×80); float32, bfloat16, float16 or float64.
        weight: ``(H, F, kh, kw)`` single-channel kernels, one per (head, prompt); same dtype and device.
        bias: ``(H, F)`` kernel biases.
        prompt_weights: ``(B, F)`` per-sample prompt weights (ConvPrompt: raw cosines, may be negative).

    Returns:
        ``(B, H, Lin−kh+1, Din−kw+1)`` in the inputs' dtype:
        ``out[b,h] = Σ_f prompt_weights[b,f] · (valid_conv2d(E_h, W_hf) + bias_hf)``.
        Differentiable w.r.t. all four inputs.

    Equivalent PyTorch::

        C = F.conv2d(embeddings[None], weight.reshape(H * F, 1, kh, kw), bias.reshape(-1), groups=H)
        out = torch.einsum("bf,hfld->bhld", prompt_weights, C.view(H, F, Lout, Dout))

    Each (h, f) convolution is computed at most once per call, never once per sample.
    """
    inputs = _validate(embeddings, weight, bias, prompt_weights)
    backend = _dispatch.select(OP, inputs)
    if getattr(backend, "FUSED", False):
        return backend.run(embeddings, weight, bias, prompt_weights, inputs)
    return backend.run(embeddings, weight, bias, prompt_weights)


# ---------------------------------------------------------------------------------------------------
# nn.Module
# ---------------------------------------------------------------------------------------------------


class PromptConv(torch.nn.Module):
    """Holds one prompted layer's embeddings and per-prompt kernels; ``forward(prompt_weights)`` generates the
    prompts with :func:`prompt_conv`.

    Args:
        heads: H, the number of (stream, head) groups convolved (ConvPrompt: 2 streams × 12 heads = 24).
        prompts: F, the number of prompt kernels per head, allocated at once: a method whose prompts arrive
            over time (ConvPrompt adds ⌈(1−s_t)·K⌉ per task) allocates the most it can use and passes weights
            for the first ``f`` only; freezing the finished ones is the method's business (``freeze_rows`` on
            dim 1 of ``weight`` and ``bias``). Parameters never change shape, so resume, DDP and optimizer
            state keep working.
        in_len, in_dim: the embedding size (ConvPrompt: 36 × 80 = (20 + 16) × (64 + 16)).
        kernel_size: ``k`` or ``(kh, kw)`` (ConvPrompt: 17).

    Initialisation follows ConvPrompt: embeddings U(−1, 1); kernels and biases as PyTorch's ``Conv2d`` default,
    U(±1/sqrt(kh·kw)).
    """

    def __init__(self, heads: int, prompts: int, in_len: int, in_dim: int, kernel_size=17, *,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        kw_ = dict(device=device, dtype=dtype)
        self.kernel_size = (kh, kw)
        self.embeddings = torch.nn.Parameter(torch.empty(heads, in_len, in_dim, **kw_))
        self.weight = torch.nn.Parameter(torch.empty(heads, prompts, kh, kw, **kw_))
        self.bias = torch.nn.Parameter(torch.empty(heads, prompts, **kw_))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.kernel_size[0] * self.kernel_size[1])
        with torch.no_grad():
            self.embeddings.uniform_(-1.0, 1.0)
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)

    @property
    def prompts(self) -> int:
        return self.weight.shape[1]

    def forward(self, prompt_weights: Tensor) -> Tensor:
        """``(B, f)`` weights of the first ``f <= prompts`` kernels → ``(B, H, Lout, Dout)`` prompts."""
        if prompt_weights.dim() != 2 or not 1 <= prompt_weights.shape[1] <= self.prompts:
            raise ValueError(f"PromptConv: prompt_weights must have shape (B,f) with 1 <= f <= {self.prompts}, got "
                             f"{shape_str(prompt_weights)}")
        f = prompt_weights.shape[1]
        return prompt_conv(self.embeddings, self.weight[:, :f], self.bias[:, :f], prompt_weights)

    def extra_repr(self) -> str:
        H, Lin, Din = self.embeddings.shape
        return f"heads={H}, prompts={self.prompts}, in=({Lin},{Din}), kernel_size={self.kernel_size}"
