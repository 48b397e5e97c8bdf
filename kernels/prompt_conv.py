"""Triton kernels of prompt_conv (ConvPrompt's prompt generation), forward and backward.

Math (valid single-channel cross-correlations; p = (i, j) an output position, t = (u, v) a kernel tap)::

    C[f,h,p]  = bias[h,f] + Σ_t E[h, i+u, j+v] · W[h,f,t]          once per (h, f): an implicit GEMM
    out       = pw · C                                              (B,F)·(F, H·Lout·Dout), torch
    dC        = pwᵀ · dout,  dpw = dout · Cᵀ,  dbias = Σ_p dC          torch GEMMs and a sum
    dW[h,f,t] = Σ_p dC[f,h,p] · E[h, i+u, j+v]                      implicit GEMM over positions
    dE[h,r,c] = Σ_f Σ_t dC[f,h, r−u, c−v] · W[h,f,t]               gather (valid (r−u, c−v) only)

``_conv_fwd_kernel`` and ``_conv_dw_kernel`` gather the im2col tile of E on the fly and feed ``tl.dot``; the
input gradient ``_conv_dx_kernel`` gathers dC per tap (one output column: a reduction, not a dot). No atomics:
deterministic. The launchers compute in fp32 (inputs upcast; the convolutions are saved for the backward in
fp32) and use torch for the GEMMs over the batch, and ``torch.library.wrap_triton`` for the kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ._common import FP32_DOT_PRECISION, INTERPRETED, aot_case


@triton.jit
def _conv_fwd_kernel(
        e_ptr, w_ptr, b_ptr, c_ptr,
        H, F, DO, P, KW, KK,
        stride_eh, stride_el, stride_ed, stride_wh, stride_wf, stride_wu, stride_wv, stride_bh, stride_bf,
        BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """C[f, h, p] for BLOCK_P positions × BLOCK_F prompts of head h. Grid (cdiv(P, BLOCK_P), cdiv(F, BLOCK_F), H).
    C is contiguous (F, H, P) fp32; P = Lout·Dout, KK = kh·kw."""
    pid_p = tl.program_id(0)
    pid_f = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    p_valid = offs_p < P
    f_valid = offs_f < F
    i = offs_p // DO
    j = offs_p % DO
    e_base = e_ptr + h * stride_eh
    w_base = w_ptr + h * stride_wh
    acc = tl.zeros([BLOCK_P, BLOCK_F], dtype=tl.float32)
    for t0 in range(0, KK, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_valid = offs_t < KK
        u = offs_t // KW
        v = offs_t % KW
        x = tl.load(e_base + (i[:, None] + u[None, :]) * stride_el + (j[:, None] + v[None, :]) * stride_ed,
                    mask=p_valid[:, None] & t_valid[None, :], other=0.0)
        w = tl.load(w_base + offs_f[None, :] * stride_wf + u[:, None] * stride_wu + v[:, None] * stride_wv,
                    mask=t_valid[:, None] & f_valid[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    bias = tl.load(b_ptr + h * stride_bh + offs_f * stride_bf, mask=f_valid, other=0.0)
    acc += bias[None, :]
    out = c_ptr + (offs_f[None, :].to(tl.int64) * H + h) * P + offs_p[:, None]
    tl.store(out, acc, mask=p_valid[:, None] & f_valid[None, :])


@triton.jit
def _conv_dw_kernel(
        e_ptr, g_ptr, dw_ptr,
        H, F, DO, P, KW, KK,
        stride_eh, stride_el, stride_ed,
        BLOCK_F: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr):
    """dW[h, f, t] = Σ_p G[f, h, p] · E[h, i+u, j+v] for BLOCK_F prompts × BLOCK_T taps of head h.
    Grid (cdiv(KK, BLOCK_T), cdiv(F, BLOCK_F), H). G contiguous (F, H, P); dW contiguous (H, F, KK) fp32."""
    pid_t = tl.program_id(0)
    pid_f = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    t_valid = offs_t < KK
    f_valid = offs_f < F
    u = offs_t // KW
    v = offs_t % KW
    e_base = e_ptr + h * stride_eh
    acc = tl.zeros([BLOCK_F, BLOCK_T], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_valid = offs_p < P
        i = offs_p // DO
        j = offs_p % DO
        g = tl.load(g_ptr + (offs_f[:, None].to(tl.int64) * H + h) * P + offs_p[None, :],
                    mask=f_valid[:, None] & p_valid[None, :], other=0.0)
        x = tl.load(e_base + (i[:, None] + u[None, :]) * stride_el + (j[:, None] + v[None, :]) * stride_ed,
                    mask=p_valid[:, None] & t_valid[None, :], other=0.0)
        acc = tl.dot(g, x, acc, input_precision=PRECISION)
    out = dw_ptr + (h * F + offs_f[:, None]) * KK + offs_t[None, :]
    tl.store(out, acc, mask=f_valid[:, None] & t_valid[None, :])


@triton.jit
def _conv_dx_kernel(
        g_ptr, w_ptr, de_ptr,
        H, F, LO, DO, DIN, Q, KW, KK,
        stride_wh, stride_wf, stride_wu, stride_wv,
        BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr):
    """dE[h, r, c] = Σ_f Σ_t G[f, h, r−u, c−v] · W[h, f, u, v] over valid (r−u, c−v), for BLOCK_Q input positions
    q = (r, c) of head h. Grid (cdiv(Q, BLOCK_Q), H). G contiguous (F, H, LO·DO); dE contiguous (H, Q) fp32."""
    pid_q = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = offs_q < Q
    r = offs_q // DIN
    c = offs_q % DIN
    P = LO * DO
    acc = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for f in range(0, F):
        g_base = g_ptr + (f * H + h) * P
        w_base = w_ptr + h * stride_wh + f * stride_wf
        for t0 in range(0, KK, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_valid = offs_t < KK
            u = offs_t // KW
            v = offs_t % KW
            i = r[:, None] - u[None, :]
            j = c[:, None] - v[None, :]
            ok = q_valid[:, None] & t_valid[None, :] & (i >= 0) & (i < LO) & (j >= 0) & (j < DO)
            g = tl.load(g_base + i * DO + j, mask=ok, other=0.0)
            w = tl.load(w_base + u * stride_wu + v * stride_wv, mask=t_valid, other=0.0)
            acc += tl.sum(g * w[None, :], 1)
    tl.store(de_ptr + h * Q + offs_q, acc, mask=q_valid)


# ---------------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------------


class Config(NamedTuple):
    block_a: int  # positions (fwd, dw) or input positions (dx)
    block_b: int  # prompts (fwd, dw) or taps (dx)
    block_t: int  # taps (fwd, dw)
    num_warps: int
    num_stages: int


_GPU_CONFIGS = {"fwd": Config(128, 16, 32, 4, 3), "dw": Config(64, 16, 64, 4, 3), "dx": Config(128, 32, 0, 4, 2)}
# 16 is tl.dot's minimum; interpreted (CPU) runs use the smallest tiles so test shapes cross tile edges.
_INTERPRETER_CONFIGS = {"fwd": Config(16, 16, 16, 1, 1), "dw": Config(16, 16, 16, 1, 1), "dx": Config(16, 16, 0, 1, 1)}
_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETED else _GPU_CONFIGS


def _block_f(F: int) -> int:
    return 16 if INTERPRETED else min(64, max(16, triton.next_power_of_2(F)))


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _conv(E: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """The per-(h, f) convolutions with bias, (F, H, Lout, Dout) fp32 contiguous."""
    H, Lin, Din = E.shape
    F, kh, kw = W.shape[1:]
    Lo, Do = Lin - kh + 1, Din - kw + 1
    C = torch.empty((F, H, Lo, Do), dtype=torch.float32, device=E.device)
    cfg, bf = _CONFIGS["fwd"], _block_f(F)
    grid = (triton.cdiv(Lo * Do, cfg.block_a), triton.cdiv(F, bf), H)
    wrap_triton(_conv_fwd_kernel)[grid](
        E, W, b, C, H, F, Do, Lo * Do, kw, kh * kw, *E.stride(), *W.stride(), *b.stride(),
        BLOCK_P=cfg.block_a, BLOCK_F=bf, BLOCK_T=cfg.block_t, PRECISION=FP32_DOT_PRECISION,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return C


def prompt_conv_fwd(embeddings: Tensor, weight: Tensor, bias: Tensor,
                    prompt_weights: Tensor) -> tuple[Tensor, Tensor]:
    """(prompts (B, H, Lout, Dout) in the inputs' dtype, C (F, H, Lout, Dout) fp32 saved for the backward).

    Args: embeddings (H, Lin, Din), weight (H, F, kh, kw), bias (H, F), prompt_weights (B, F); any strides.
    """
    E, W, b, pw = (t.to(torch.float32) for t in (embeddings, weight, bias, prompt_weights))
    C = _conv(E, W, b)
    F, H, Lo, Do = C.shape
    out = (pw @ C.view(F, H * Lo * Do)).view(pw.shape[0], H, Lo, Do)
    return out.to(embeddings.dtype), C


def prompt_conv_bwd(grad: Tensor, embeddings: Tensor, weight: Tensor, bias: Tensor, prompt_weights: Tensor,
                    saved: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dembeddings, dweight, dbias, dprompt_weights), each in its input's dtype and shape; ``saved`` is the
    forward's C."""
    E, W, pw = (t.to(torch.float32) for t in (embeddings, weight, prompt_weights))
    H, Lin, Din = E.shape
    F, kh, kw = W.shape[1:]
    Lo, Do = Lin - kh + 1, Din - kw + 1
    B = pw.shape[0]
    d2 = grad.to(torch.float32).reshape(B, H * Lo * Do)
    dC = (pw.t() @ d2).contiguous()  # (F, H·P)
    dpw = d2 @ saved.reshape(F, H * Lo * Do).t()
    db = dC.view(F, H, Lo * Do).sum(2).t()
    dW = torch.empty((H, F, kh, kw), dtype=torch.float32, device=E.device)
    dE = torch.empty((H, Lin, Din), dtype=torch.float32, device=E.device)
    cfg, bf = _CONFIGS["dw"], _block_f(F)
    wrap_triton(_conv_dw_kernel)[(triton.cdiv(kh * kw, cfg.block_t), triton.cdiv(F, bf), H)](
        E, dC, dW, H, F, Do, Lo * Do, kw, kh * kw, *E.stride(),
        BLOCK_F=bf, BLOCK_T=cfg.block_t, BLOCK_P=cfg.block_a, PRECISION=FP32_DOT_PRECISION,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cfg = _CONFIGS["dx"]
    wrap_triton(_conv_dx_kernel)[(triton.cdiv(Lin * Din, cfg.block_a), H)](
        dC, W, dE, H, F, Lo, Do, Din, Lin * Din, kw, kh * kw, *W.stride(),
        BLOCK_Q=cfg.block_a, BLOCK_T=cfg.block_b, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (dE.to(embeddings.dtype), dW.to(weight.dtype), db.to(bias.dtype, copy=True),
            dpw.to(prompt_weights.dtype))


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (tests/kernels/test_triton_aot.py)
# ---------------------------------------------------------------------------------------------------


def aot_cases() -> list:
    """Each kernel with the GPU tile configs the launchers use (BLOCK_F 16 and 64: few and many prompts)."""
    cases = []
    for bf in (16, 64):
        cfg = _GPU_CONFIGS["fwd"]
        consts = dict(BLOCK_P=cfg.block_a, BLOCK_F=bf, BLOCK_T=cfg.block_t, PRECISION=FP32_DOT_PRECISION)
        cases.append(aot_case(_conv_fwd_kernel, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
        cfg = _GPU_CONFIGS["dw"]
        consts = dict(BLOCK_F=bf, BLOCK_T=cfg.block_t, BLOCK_P=cfg.block_a, PRECISION=FP32_DOT_PRECISION)
        cases.append(aot_case(_conv_dw_kernel, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
    cfg = _GPU_CONFIGS["dx"]
    consts = dict(BLOCK_Q=cfg.block_a, BLOCK_T=cfg.block_b)
    cases.append(aot_case(_conv_dx_kernel, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
    return cases


AOT_CASES = aot_cases
