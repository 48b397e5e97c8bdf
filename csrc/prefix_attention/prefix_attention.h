// Shared math of clfast::prefix_attention.
//
// out = softmax(scale * q [prefix_k ; k]^T, masked keys excluded) [prefix_v ; v]
// lse = log sum_j exp(scale * q.k_j) over the attended keys (natural log, fp32)
//
// Backward (FlashAttention-2, Dao 2023, Alg. 2), with P recomputed from lse:
//   P = exp(scale*S - lse),  Di = rowsum(dout * out),  dS = P * (dout v^T - Di)
//   dq = scale dS [pk;k],  d[pk;k] = scale dS^T q,  d[pv;v] = P^T dout
//
// The scalar helpers are C10_HOST_DEVICE so that a CUDA kernel can share them with the CPU one.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "common/index_math.h"

namespace clfast {
namespace prefix_attention {

// Block size that splits n into the fewest blocks of at most max_block, as even as possible,
// rounded up to `multiple` (so max_block should itself be a multiple of `multiple`).
C10_HOST_DEVICE inline int64_t balanced_block(int64_t n, int64_t max_block, int64_t multiple) {
  if (n <= 0) {
    return multiple;
  }
  const int64_t blocks = ceil_div(n, max_block);
  return round_up(ceil_div(n, blocks), multiple);
}

// Online softmax: factor that rescales a running sum when the running max moves m_old -> m_new.
C10_HOST_DEVICE inline float online_rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : expf(m_old - m_new);
}

// log-sum-exp from the running max and the running sum; -inf for a row with no attended key.
C10_HOST_DEVICE inline float finalize_lse(float m, float l) {
  return l > 0.f ? m + logf(l) : -INFINITY;
}

// Attention probability of a raw score s, recomputed from the row's lse.
C10_HOST_DEVICE inline float softmax_prob(float s, float scale, float lse) {
  return expf(fmaf(s, scale, -lse));
}

// Gradient w.r.t. the raw score, with the softmax scale folded in: scale * P * (dP - Di).
C10_HOST_DEVICE inline float score_grad(float p, float dp, float di, float scale) {
  return scale * p * (dp - di);
}

}  // namespace prefix_attention
}  // namespace clfast
