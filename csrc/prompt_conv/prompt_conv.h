// Shared geometry of prompt_conv: valid single-channel 2-D cross-correlation of each head's embedding
// E_h (Lin × Din) with kernels (kh × kw), output (Lin − kh + 1) × (Din − kw + 1).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/index_math.h"

namespace clfast::prompt_conv {

C10_HOST_DEVICE inline int64_t valid_size(int64_t in, int64_t k) { return in - k + 1; }

// One output of a valid cross-correlation: Σ_u Σ_v x[(i+u)·ldx + j+v] · w[u·kw + v]. The reference for the
// vectorised tiles (and what a CUDA thread would compute).
template <typename T>
C10_HOST_DEVICE inline T corr_at(const T* x, int64_t ldx, const T* w, int64_t kh, int64_t kw, int64_t i, int64_t j) {
  T acc = 0;
  for (int64_t u = 0; u < kh; ++u)
    for (int64_t v = 0; v < kw; ++v) acc += x[(i + u) * ldx + j + v] * w[u * kw + v];
  return acc;
}

}  // namespace clfast::prompt_conv
