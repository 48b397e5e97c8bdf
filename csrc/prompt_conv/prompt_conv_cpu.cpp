// CPU kernels of prompt_conv (ConvPrompt's prompt generation), forward and backward, registered by
// bindings.cpp.
//
//   out[b,h] = Σ_f pw[b,f] · (E_h ⋆ W_hf + bias_hf)        ⋆: valid single-channel cross-correlation
//
// The op is linear in pw and E is shared by the batch, so it needs only min(F, B) convolutions per head, not
// the B·F that the official code runs. Two plans (Python picks one from a cost model and passes mix_first):
//
//   per-prompt (F small vs B): C_hf = E_h ⋆ W_hf + bias_hf once per (h,f), then one GEMM out = pw · C.
//     Backward: dC = pwᵀ·dout, dpw = dout·Cᵀ (C saved by the forward), dbias = Σ dC,
//               dW_hf = E_h ⋆ dC_hf, dE_h = Σ_f dC_hf ∗ W_hf (full convolution).
//   mix-first (B small vs F): K_bh = Σ_f pw[b,f] W_hf (one small GEMM), then out[b,h] = E_h ⋆ K_bh + pw·biasᵀ.
//     Backward: dK_bh = E_h ⋆ dout_bh, dE_h = Σ_b dout_bh ∗ K_bh, dW = pwᵀ·dK, dpw = dK·Wᵀ + S·bias,
//               dbias = Sᵀ·pw with S[b,h] = Σ dout_bh.
//
// Both plans run the same three direct-convolution kernels, vectorised 8 floats wide (GCC vector extensions,
// AVX2/FMA with the build flags), register-blocked so each load feeds several FMAs, parallel over
// (head, kernel block, row, column block). Inputs are copied once into zero-padded fp32 scratch so that no
// vector load needs a bounds check. The small GEMMs go to ATen. 16-bit inputs compute in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "common/check.h"
#include "common/index_math.h"
#include "common/static_switch.h"
#include "common/tensor_util.h"
#include "ops.h"
#include "prompt_conv/prompt_conv.h"

namespace clfast::prompt_conv {
namespace {

using at::Tensor;

constexpr int kV = 8;  // floats per vector
typedef float vec __attribute__((vector_size(kV * sizeof(float))));

inline vec vload(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}

inline vec vsplat(float s) { return vec{s, s, s, s, s, s, s, s}; }

// Keeps a loaded vector in a register: without it GCC folds the load into every FMA that uses it, which
// turns one load per vector into one per FMA and makes the tiles load-bound.
inline vec pinned_load(const float* p) {
  vec v = vload(p);
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+x"(v));
#endif
  return v;
}

inline void vstore(float* p, const vec& v, int n) {
  if (n >= kV) {
    std::memcpy(p, &v, sizeof(vec));
  } else {
    float t[kV];
    std::memcpy(t, &v, sizeof(vec));
    for (int i = 0; i < n; ++i) p[i] = t[i];
  }
}

inline float hsum(const vec& v) {
  float t[kV];
  std::memcpy(t, &v, sizeof(vec));
  return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}

// ---------------------------------------------------------------------------------------------------
// Tiles. Register budget (16 vector registers): NB·JB accumulators + NB splats + 1 load.
// ---------------------------------------------------------------------------------------------------

// Forward: out_n[i, j0 : j0+8·JB] = bias_n + Σ_{u,v} x[i+u, j+v] · k_n[u,v], for NB kernels sharing x.
// x points at (row i, col j0) of a zero-padded image; k at kernel n=0; out at (kernel 0, row i, col j0).
template <int NB, int JB>
void fwd_tile(const float* x, int64_t ldx, const float* k, int64_t k_stride, int64_t kh, int64_t kw,
              const float* bias, int64_t b_stride, float* out, int64_t o_stride, int ncols) {
  vec acc[NB][JB];
  for (int n = 0; n < NB; ++n)
    for (int q = 0; q < JB; ++q) acc[n][q] = vsplat(bias[n * b_stride]);
  for (int64_t u = 0; u < kh; ++u) {
    const float* xr = x + u * ldx;
    const float* kr = k + u * kw;
    for (int64_t v = 0; v < kw; ++v) {
      vec w[NB];
      for (int n = 0; n < NB; ++n) w[n] = vsplat(kr[n * k_stride + v]);
      for (int q = 0; q < JB; ++q) {
        const vec e = pinned_load(xr + v + q * kV);
        for (int n = 0; n < NB; ++n) acc[n][q] += e * w[n];
      }
    }
  }
  for (int n = 0; n < NB; ++n)
    for (int q = 0; q < JB; ++q) vstore(out + n * o_stride + q * kV, acc[n][q], ncols - q * kV);
}

// Weight gradient: dk_n[u, v0+c] = Σ_{i,j} x[i+u, j+v0+c] · g_n[i, j] for c < VB, NB gradient images sharing x.
// x points at (row u, col v0); g at image n=0 (zero beyond its valid columns); out at dk_0[u, v0].
template <int NB, int VB>
void grad_tile(const float* x, int64_t ldx, const float* g, int64_t g_stride, int64_t ldg, int64_t rows,
               int64_t nvec, float* out, int64_t o_stride) {
  vec acc[NB][VB];
  for (int n = 0; n < NB; ++n)
    for (int c = 0; c < VB; ++c) acc[n][c] = vec{};
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + i * ldx;
    const float* gr = g + i * ldg;
    for (int64_t q = 0; q < nvec; ++q) {
      vec gv[NB];
      for (int n = 0; n < NB; ++n) gv[n] = vload(gr + n * g_stride + q * kV);
      for (int c = 0; c < VB; ++c) {
        const vec e = pinned_load(xr + q * kV + c);
        for (int n = 0; n < NB; ++n) acc[n][c] += e * gv[n];
      }
    }
  }
  for (int n = 0; n < NB; ++n)
    for (int c = 0; c < VB; ++c) out[n * o_stride + c] = hsum(acc[n][c]);
}

// Input gradient (full convolution summed over N kernels), two output rows r, r+1 at a time:
//   out[r, c0 : c0+8·JB] = Σ_n Σ_{u,v} gp_n[r+u−(kh−1), c+v] · k_n[kh−1−u, kw−1−v],
// with gp the gradient images left-padded by kw−1 zero columns; rows outside [0, rows) are skipped, not
// stored. A gradient row feeds both output rows (with kernel rows one apart), so each load serves two FMAs
// and the 2·JB accumulator chains hide the FMA latency. gp points at image 0, col c0; out at row r, col c0.
template <int JB>
void sum_tile(const float* gp, int64_t g_stride, int64_t ldg, int64_t rows, const float* k, int64_t k_stride,
              int64_t N, int64_t kh, int64_t kw, int64_t r, int64_t nrows, float* out, int64_t ldo, int ncols) {
  vec acc0[JB], acc1[JB];
  for (int q = 0; q < JB; ++q) acc0[q] = acc1[q] = vec{};
  const int64_t g_lo = std::max<int64_t>(0, r - (kh - 1)), g_hi = std::min<int64_t>(rows, r + nrows);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t gi = g_lo; gi < g_hi; ++gi) {
      const float* gr = gp + n * g_stride + gi * ldg;
      const int64_t u0 = gi - r + kh - 1;  // kernel row (flipped) for output row r; u0 − 1 for row r+1
      const bool row0 = u0 < kh, row1 = nrows > 1 && u0 >= 1;
      const float* k0 = k + n * k_stride + (kh - 1 - u0) * kw + (kw - 1);  // k0[-v] = flipped tap (u0, v)
      const float* k1 = k0 + kw;
      if (row0 && row1) {
        for (int64_t v = 0; v < kw; ++v) {
          const vec w0 = vsplat(k0[-v]), w1 = vsplat(k1[-v]);
          for (int q = 0; q < JB; ++q) {
            const vec e = pinned_load(gr + v + q * kV);
            acc0[q] += e * w0;
            acc1[q] += e * w1;
          }
        }
      } else if (row0) {
        for (int64_t v = 0; v < kw; ++v) {
          const vec w0 = vsplat(k0[-v]);
          for (int q = 0; q < JB; ++q) acc0[q] += vload(gr + v + q * kV) * w0;
        }
      } else if (row1) {
        for (int64_t v = 0; v < kw; ++v) {
          const vec w1 = vsplat(k1[-v]);
          for (int q = 0; q < JB; ++q) acc1[q] += vload(gr + v + q * kV) * w1;
        }
      }
    }
  }
  for (int q = 0; q < JB; ++q) vstore(out + q * kV, acc0[q], ncols - q * kV);
  if (nrows > 1)
    for (int q = 0; q < JB; ++q) vstore(out + ldo + q * kV, acc1[q], ncols - q * kV);
}

constexpr int kFwdNB = 3, kFwdJB = 4;    // 12 accumulators
constexpr int kGradNB = 3, kGradVB = 4;  // 12 accumulators
constexpr int kSumJB = 6;                // 2 rows: up to 12 accumulators

// The tile instance for the block sizes of one task (each in [1, its maximum]), called through a pointer.
using FwdFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*,
                       int64_t, int);
using GradFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
using SumFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, float*, int64_t, int);

FwdFn fwd_fn(int nb, int jb) {
  FwdFn fn = nullptr;
  int_switch<kFwdNB>(nb, [&](auto n) {
    int_switch<kFwdJB>(jb, [&](auto j) { fn = fwd_tile<decltype(n)::value, decltype(j)::value>; });
  });
  return fn;
}

GradFn grad_fn(int nb, int vb) {
  GradFn fn = nullptr;
  int_switch<kGradNB>(nb, [&](auto n) {
    int_switch<kGradVB>(vb, [&](auto v) { fn = grad_tile<decltype(n)::value, decltype(v)::value>; });
  });
  return fn;
}

SumFn sum_fn(int jb) {
  SumFn fn = nullptr;
  int_switch<kSumJB>(jb, [&](auto j) { fn = sum_tile<decltype(j)::value>; });
  return fn;
}

// ---------------------------------------------------------------------------------------------------
// Drivers: the three convolutions over all heads. "Image (h, n)" lives at base + h·head_stride + n·stride.
// ---------------------------------------------------------------------------------------------------

struct Geometry {
  int64_t H, Lin, Din, kh, kw, Lo, Do;
  int64_t ldx;  // row stride of the padded embeddings: room for 8-wide loads past the last output column
  int64_t ldg;  // row stride of the padded gradient images
};

Geometry geometry(const Tensor& E, const Tensor& W) {
  Geometry g{};
  g.H = E.size(0), g.Lin = E.size(1), g.Din = E.size(2), g.kh = W.size(2), g.kw = W.size(3);
  g.Lo = valid_size(g.Lin, g.kh), g.Do = valid_size(g.Din, g.kw);
  g.ldx = round_up(g.Do, kV) + g.kw - 1;
  g.ldg = round_up(g.Din, kV) + g.kw - 1;
  return g;
}

// n images (rows × cols, contiguous) copied into zeroed rows of ld floats, starting at column `left`.
Tensor pad_images(const Tensor& src, int64_t n, int64_t rows, int64_t cols, int64_t ld, int64_t left) {
  Tensor dst = at::empty({n, rows, ld}, src.options());
  const float* s = src.data_ptr<float>();
  float* d = dst.data_ptr<float>();
  at::parallel_for(0, n * rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = d + r * ld;
      std::fill(row, row + left, 0.0f);
      std::memcpy(row + left, s + r * cols, cols * sizeof(float));
      std::fill(row + left + cols, row + ld, 0.0f);
    }
  });
  return dst;
}

// out(h, n) = bias(h, n) + X_h ⋆ K(h, n) for n < N; out rows of ldo floats.
void conv_forward(const Geometry& g, const float* X, const float* K, int64_t k_head, int64_t k_stride,
                  const float* bias, int64_t b_head, int64_t b_stride, float* out, int64_t o_head, int64_t o_stride,
                  int64_t ldo, int64_t N) {
  const int64_t nblk = ceil_div(N, kFwdNB), cblk = ceil_div(ceil_div(g.Do, kV), kFwdJB);
  const int64_t tasks = g.H * nblk * g.Lo * cblk;
  const int64_t x_head = g.Lin * g.ldx, kk = g.kh * g.kw;
  at::parallel_for(0, tasks, std::max<int64_t>(1, 4096 / (kk * kFwdNB)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t rest = t;
      const int64_t c = rest % cblk;
      rest /= cblk;
      const int64_t i = rest % g.Lo;
      rest /= g.Lo;
      const int64_t n0 = (rest % nblk) * kFwdNB, h = rest / nblk;
      const int64_t j0 = c * kFwdJB * kV;
      const int ncols = static_cast<int>(std::min<int64_t>(kFwdJB * kV, g.Do - j0));
      const int nb = static_cast<int>(std::min<int64_t>(kFwdNB, N - n0));
      fwd_fn(nb, static_cast<int>(ceil_div(ncols, kV)))(
          X + h * x_head + i * g.ldx + j0, g.ldx, K + h * k_head + n0 * k_stride, k_stride, g.kh, g.kw,
          bias + h * b_head + n0 * b_stride, b_stride, out + h * o_head + n0 * o_stride + i * ldo + j0, o_stride,
          ncols);
    }
  });
}

// dK(h, n)[u, v] = Σ X_h[i+u, j+v] · G(h, n)[i, j] for n < N; G padded (ldg, valid columns from kw−1).
void conv_weight_grad(const Geometry& g, const float* X, const float* G, int64_t g_head, int64_t g_stride, float* dK,
                      int64_t k_head, int64_t k_stride, int64_t N) {
  const int64_t nblk = ceil_div(N, kGradNB), vblk = ceil_div(g.kw, kGradVB);
  const int64_t tasks = g.H * nblk * g.kh * vblk;
  const int64_t x_head = g.Lin * g.ldx, nvec = ceil_div(g.Do, kV);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t rest = t;
      const int64_t v0 = (rest % vblk) * kGradVB;
      rest /= vblk;
      const int64_t u = rest % g.kh;
      rest /= g.kh;
      const int64_t n0 = (rest % nblk) * kGradNB, h = rest / nblk;
      const int nb = static_cast<int>(std::min<int64_t>(kGradNB, N - n0));
      const int vb = static_cast<int>(std::min<int64_t>(kGradVB, g.kw - v0));
      grad_fn(nb, vb)(X + h * x_head + u * g.ldx + v0, g.ldx, G + h * g_head + n0 * g_stride + (g.kw - 1), g_stride,
                      g.ldg, g.Lo, nvec, dK + h * k_head + n0 * k_stride + u * g.kw + v0, k_stride);
    }
  });
}

// dE_h = Σ_n G(h, n) ∗ K(h, n) (full convolution), written to dE (H, Lin, Din) contiguous.
void conv_input_grad(const Geometry& g, const float* G, int64_t g_head, int64_t g_stride, const float* K,
                     int64_t k_head, int64_t k_stride, int64_t N, float* dE) {
  const int64_t nvec = ceil_div(g.Din, kV);
  const int64_t cblk = ceil_div(nvec, kSumJB);
  const int64_t jb = ceil_div(nvec, cblk);  // even column blocks: 10 vectors run as 5 + 5, not 6 + 4
  const int64_t rblk = ceil_div(g.Lin, 2);
  const int64_t tasks = g.H * rblk * cblk;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % cblk, r = (t / cblk) % rblk * 2, h = t / (cblk * rblk);
      const int64_t c0 = c * jb * kV;
      const int ncols = static_cast<int>(std::min<int64_t>(jb * kV, g.Din - c0));
      sum_fn(static_cast<int>(ceil_div(ncols, kV)))(G + h * g_head + c0, g_stride, g.ldg, g.Lo, K + h * k_head, k_stride,
                                                N, g.kh, g.kw, r, std::min<int64_t>(2, g.Lin - r),
                                                dE + (h * g.Lin + r) * g.Din + c0, g.Din, ncols);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------------

void check_inputs(const Tensor& E, const Tensor& W, const Tensor& b, const Tensor& pw) {
  for (auto [t, name] : {std::pair{&E, "embeddings"}, {&W, "weight"}, {&b, "bias"}, {&pw, "prompt_weights"}}) {
    check_cpu(*t, name);
    check_kernel_dtype(*t, name);
    check_same_dtype(*t, name, E, "embeddings");
  }
  TORCH_CHECK(E.dim() == 3, "embeddings must have shape (H,Lin,Din), got ", E.sizes());
  TORCH_CHECK(W.dim() == 4 && W.size(0) == E.size(0), "weight must have shape (H,F,kh,kw) with H = ", E.size(0),
              ", got ", W.sizes());
  TORCH_CHECK(W.size(1) >= 1 && W.size(2) >= 1 && W.size(3) >= 1, "weight must have F, kh, kw >= 1, got ", W.sizes());
  TORCH_CHECK(W.size(2) <= E.size(1) && W.size(3) <= E.size(2), "weight's kernel (kh,kw) = (", W.size(2), ",",
              W.size(3), ") must fit in the embeddings (Lin,Din) = (", E.size(1), ",", E.size(2), ")");
  TORCH_CHECK(b.dim() == 2 && b.size(0) == W.size(0) && b.size(1) == W.size(1), "bias must have shape (H,F) = (",
              W.size(0), ",", W.size(1), "), got ", b.sizes());
  TORCH_CHECK(pw.dim() == 2 && pw.size(1) == W.size(1), "prompt_weights must have shape (B,F) with F = ", W.size(1),
              ", got ", pw.sizes());
}

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

std::tuple<Tensor, Tensor> prompt_conv_fwd_cpu(const Tensor& embeddings, const Tensor& weight, const Tensor& bias,
                                           const Tensor& prompt_weights, bool mix_first) {
  check_inputs(embeddings, weight, bias, prompt_weights);
  const Geometry g = geometry(embeddings, weight);
  const int64_t B = prompt_weights.size(0), F = weight.size(1), kk = g.kh * g.kw, P = g.Lo * g.Do;
  const Tensor E = f32(embeddings), W = f32(weight), b = f32(bias), pw = f32(prompt_weights);
  const Tensor X = pad_images(E, g.H, g.Lin, g.Din, g.ldx, 0);
  if (!mix_first) {
    Tensor C = at::empty({F, g.H, g.Lo, g.Do}, E.options());  // conv + bias, once per (h, f), saved
    conv_forward(g, X.data_ptr<float>(), W.data_ptr<float>(), F * kk, kk, b.data_ptr<float>(), F, 1,
                 C.data_ptr<float>(), P, g.H * P, g.Do, F);
    Tensor out = at::mm(pw, C.view({F, g.H * P})).view({B, g.H, g.Lo, g.Do});
    return {out.to(embeddings.scalar_type()), C};
  }
  const Tensor K = at::matmul(pw, W.view({g.H, F, kk}));  // (H, B, kk): per-sample kernels
  const Tensor bm = at::mm(pw, b.t()).contiguous();        // (B, H): per-sample biases
  Tensor out = at::empty({B, g.H, g.Lo, g.Do}, E.options());
  conv_forward(g, X.data_ptr<float>(), K.data_ptr<float>(), B * kk, kk, bm.data_ptr<float>(), 1, g.H,
               out.data_ptr<float>(), P, g.H * P, g.Do, B);
  return {out.to(embeddings.scalar_type()), at::empty({0}, E.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> prompt_conv_bwd_cpu(const Tensor& grad, const Tensor& embeddings,
                                                               const Tensor& weight, const Tensor& bias,
                                                               const Tensor& prompt_weights, const Tensor& saved,
                                                               bool mix_first) {
  check_inputs(embeddings, weight, bias, prompt_weights);
  const Geometry g = geometry(embeddings, weight);
  const int64_t B = prompt_weights.size(0), F = weight.size(1), kk = g.kh * g.kw, P = g.Lo * g.Do;
  const int64_t H = g.H, Lout = g.Lo, Dout = g.Do;
  CHECK_SHAPE(grad, B, H, Lout, Dout);
  const Tensor E = f32(embeddings), W = f32(weight), b = f32(bias), pw = f32(prompt_weights);
  const Tensor dout = f32(grad);
  const Tensor X = pad_images(E, g.H, g.Lin, g.Din, g.ldx, 0);
  const int64_t img = g.Lo * g.ldg;
  Tensor dE = at::empty({g.H, g.Lin, g.Din}, E.options());
  Tensor dW, db, dpw;
  if (!mix_first) {
    TORCH_CHECK(saved.sizes() == at::IntArrayRef({F, g.H, g.Lo, g.Do}) && saved.scalar_type() == at::kFloat,
                "saved must be the forward's per-prompt convolutions (F,H,Lout,Dout) float32, got ", saved.sizes());
    const Tensor D2 = dout.view({B, g.H * P});
    const Tensor dC = at::mm(pw.t(), D2);  // (F, H·P)
    dpw = at::mm(D2, saved.contiguous().view({F, g.H * P}).t());
    db = dC.view({F, g.H, P}).sum(2).t();
    const Tensor G = pad_images(dC, F * g.H, g.Lo, g.Do, g.ldg, g.kw - 1);  // image (f, h) at (f·H + h)·img
    dW = at::empty({g.H, F, g.kh, g.kw}, E.options());
    conv_weight_grad(g, X.data_ptr<float>(), G.data_ptr<float>(), img, g.H * img, dW.data_ptr<float>(), F * kk, kk, F);
    conv_input_grad(g, G.data_ptr<float>(), img, g.H * img, W.data_ptr<float>(), F * kk, kk, F, dE.data_ptr<float>());
  } else {
    const Tensor G = pad_images(dout, B * g.H, g.Lo, g.Do, g.ldg, g.kw - 1);  // image (b, h) at (b·H + h)·img
    const Tensor S = dout.view({B, g.H, P}).sum(2);                           // (B, H)
    const Tensor K = at::matmul(pw, W.view({g.H, F, kk}));                    // (H, B, kk)
    Tensor dK = at::empty({g.H, B, kk}, E.options());
    conv_weight_grad(g, X.data_ptr<float>(), G.data_ptr<float>(), img, g.H * img, dK.data_ptr<float>(), B * kk, kk, B);
    conv_input_grad(g, G.data_ptr<float>(), img, g.H * img, K.data_ptr<float>(), B * kk, kk, B, dE.data_ptr<float>());
    dW = at::matmul(pw.t(), dK).view({g.H, F, g.kh, g.kw});  // (H, F, kk)
    dpw = at::mm(dK.permute({1, 0, 2}).reshape({B, g.H * kk}),
                 W.view({g.H, F, kk}).permute({1, 0, 2}).reshape({F, g.H * kk}).t())
              .addmm_(S, b);
    db = at::mm(S.t(), pw);
  }
  return {owned(dE, embeddings.scalar_type()), owned(dW, weight.scalar_type()), owned(db, bias.scalar_type()),
          owned(dpw, prompt_weights.scalar_type())};
}

}  // namespace clfast::prompt_conv
