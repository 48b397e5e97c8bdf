// Small GEMMs on the CPU through oneDNN's micro-kernels (at::native::cpublas::brgemm):
//
//   C[M x N] (+)= A[M x K] * B[K x N], all row-major, fp32 C (accumulation in fp32).
//
// For 16-bit operands (bf16, fp16) B is packed in VNNI layout, B[k/2][n][k%2] with ldb counted in columns,
// and K must be even (pad the reduction with zeros). Whether brgemm computes a type's products correctly
// here is probed once per type (brgemm_usable); fp32 GEMMs fall back to at::mm without it, and callers
// compute 16-bit inputs in fp32 when their type fails the probe. Call gemm_release<C>() once a thread is
// done with its GEMMs. Every call with work is one section of Phase::kGemm (common/phases.h), its work M*N*K.
//
// Environment (read once): CLFAST_CPU_DISABLE_BRGEMM=1 forces the fallbacks (for tests).
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"
#include "common/phases.h"

namespace clfast::cpu {

// Whether brgemm takes C-typed operands in VNNI pairs (the 16-bit types).
template <typename C>
constexpr bool kVnni = !std::is_same_v<C, float>;

inline bool brgemm_disabled() {
  static const bool disabled = env_flag("CLFAST_CPU_DISABLE_BRGEMM");
  return disabled;
}

// Runs one small C-typed product with odd leading dimensions through brgemm and compares it with the exact
// result (small integers: every sum is exact in fp32).
template <typename C>
bool probe_brgemm() {
  constexpr bool vnni = kVnni<C>;
  const int64_t M = 3, N = 20, K = 6, lda = 7, ldb = 23, ldc = 21;
  std::vector<C> a(M * lda, C(0.f)), b(K * ldb, C(0.f));
  std::vector<float> c(M * ldc, -1.f), ref(M * N, 0.f);
  auto aval = [](int64_t m, int64_t k) { return float((m * 3 + k) % 5) - 2.f; };
  auto bval = [](int64_t k, int64_t n) { return float((k * 7 + n) % 9) - 4.f; };
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      a[m * lda + k] = C(aval(m, k));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) {
      b[vnni ? (k / 2) * ldb * 2 + n * 2 + (k % 2) : k * ldb + n] = C(bval(k, n));
      for (int64_t m = 0; m < M; ++m) {
        ref[m * N + n] += aval(m, k) * bval(k, n);
      }
    }
  }
  try {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, false, a.data(), b.data(), c.data(), vnni);
    at::native::cpublas::brgemm_release(vnni);
  } catch (const std::exception&) {
    return false;
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      if (c[m * ldc + n] != ref[m * N + n]) {
        return false;
      }
    }
  }
  return true;
}

// Whether cpublas::brgemm computes C-typed products correctly here; probed once per type.
template <typename C>
bool brgemm_usable() {
  static const bool usable = !brgemm_disabled() && probe_brgemm<C>();
  return usable;
}

inline void gemm_fallback(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                          int64_t ldb, float* Cm, int64_t ldc, bool accumulate) {
  const auto opt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opt);
  at::Tensor b = at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(Cm, {M, N}, {ldc, 1}, opt);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    c.copy_(at::mm(a, b));
  }
}

// C (+)= A B (see the top of this file); K <= 0 gives C = 0 (or leaves it when accumulating).
template <typename C>
inline void gemm(int64_t M, int64_t N, int64_t K, const C* A, int64_t lda, const C* B, int64_t ldb,
                 float* Cm, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) {
    return;
  }
  if (K <= 0) {
    if (!accumulate) {
      for (int64_t m = 0; m < M; ++m) {
        std::fill_n(Cm + m * ldc, N, 0.f);
      }
    }
    return;
  }
  const PhaseTimer timer(Phase::kGemm, M * N * K);
  if constexpr (std::is_same_v<C, float>) {
    if (!brgemm_usable<float>()) {
      gemm_fallback(M, N, K, A, lda, B, ldb, Cm, ldc, accumulate);
      return;
    }
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, Cm, kVnni<C>);
}

template <typename C>
inline void gemm_release() {
  if (std::is_same_v<C, float> ? brgemm_usable<float>() : true) {
    at::native::cpublas::brgemm_release(kVnni<C>);
  }
}

}  // namespace clfast::cpu
