// Shared math of the retrieve kernels: the ranking order, the running top-k list and the score of one
// (query, key) pair from its dot product. C10_HOST_DEVICE so that a CUDA kernel can run the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace clfast::retrieve {

enum class Metric : int { kCosine = 0, kIP = 1, kL2 = 2 };

// F.normalize's eps: a row's norm is clamped to at least this before dividing.
constexpr float kNormEps = 1e-12f;
// Index of an empty slot of a top-k list: loses every tie against a real key.
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

// (s, i) ranks before (t, j): the higher score first, then the lower index. NaN never ranks before
// anything (callers map NaN scores to -inf, so a NaN key still fills a slot, last).
C10_HOST_DEVICE inline bool ranks_before(float s, int64_t i, float t, int64_t j) {
  return s > t || (s == t && i < j);
}

// Insert (s, i) into vals/idx (length k, sorted by ranks_before, empty slots = (-inf, kNoIndex)); the last
// entry drops out. Returns whether (s, i) made the list.
C10_HOST_DEVICE inline bool topk_insert(float* vals, int64_t* idx, int k, float s, int64_t i) {
  if (!ranks_before(s, i, vals[k - 1], idx[k - 1])) return false;
  int p = k - 1;
  while (p > 0 && ranks_before(s, i, vals[p - 1], idx[p - 1])) {
    vals[p] = vals[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  vals[p] = s;
  idx[p] = i;
  return true;
}

// The score of a key from dot = <q, key> (the raw query and key), split into a per-query factor q_aux and a
// per-key factor k_aux so that the inner loop is one multiply or two subtractions:
//   cosine: dot * q_aux * k_aux,  q_aux = 1 / max(|q|, eps), k_aux = 1 / max(|key|, eps)
//           (= <q / max(|q|, eps), key / max(|key|, eps)>, F.normalize's definition)
//   ip:     dot
//   l2:     2 dot - k_aux - q_aux, q_aux = |q|^2, k_aux = |key|^2       (= -|q - key|^2)
// A NaN score becomes -inf (it ranks last).
C10_HOST_DEVICE inline float row_aux(Metric m, float sq_norm) {
  if (m == Metric::kCosine) return 1.0f / fmaxf(sqrtf(sq_norm), kNormEps);
  return m == Metric::kL2 ? sq_norm : 0.0f;
}

template <Metric M>
C10_HOST_DEVICE inline float finish_score(float dot, float k_aux, float q_aux) {
  float s;
  if constexpr (M == Metric::kCosine) {
    s = dot * q_aux * k_aux;
  } else if constexpr (M == Metric::kIP) {
    s = dot;
  } else {
    s = 2.0f * dot - k_aux - q_aux;
  }
  return s != s ? -INFINITY : s;
}

}  // namespace clfast::retrieve
