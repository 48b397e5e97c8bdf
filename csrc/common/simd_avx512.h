// AVX-512 helpers on 16 floats (__m512), compiled with CLFAST_AVX512_TARGET for the kernels' AVX-512 forms
// (run them only where cpu::use_avx512()): a fast 2^x, bf16 conversions, a 16 x 16 transpose.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "common/cpu_features.h"

#if CLFAST_HAS_AVX512
namespace clfast::cpu {
CLFAST_AVX512_DIAG_PUSH

constexpr float kLog2e = 1.44269504088896341f;

// 2^x for finite x <= 127 (x below -150 gives 0): 2^round(x) * p(x - round(x)), p a near-minimax polynomial
// on [-1/2, 1/2]: degree 5 (relative error 1.7e-7) when kPrecise, for results kept in fp32; degree 3 (1.0e-4,
// far below the 3.9e-3 of a bf16 rounding) for results rounded to 16 bits. No clamp: callers pass finite
// arguments (the softmax kernels pad with a finite lse, never inf).
template <bool kPrecise>
CLFAST_AVX512_TARGET inline __m512 exp2_16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p;
  if constexpr (kPrecise) {
    p = _mm512_fmadd_ps(_mm512_set1_ps(1.326472731e-03f), r, _mm512_set1_ps(9.671512991e-03f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550733581e-02f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.402224243e-01f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931470037e-01f));
  } else {
    p = _mm512_fmadd_ps(_mm512_set1_ps(5.500871258e-02f), r, _mm512_set1_ps(2.422106820e-01f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.932829201e-01f));
  }
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Two rows of 16 floats -> 32 bf16: low half a, high half b.
CLFAST_AVX512_TARGET inline __m512i cvt32_bf16(__m512 a, __m512 b) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
}

// Index that interleaves the two halves of a 32 x 16-bit vector: out[2k] = in[k], out[2k+1] = in[16+k].
CLFAST_AVX512_TARGET inline __m512i interleave_halves_idx() {
  alignas(64) static const uint16_t idx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(idx);
}

// 16 floats stored as T: float, or bf16 rounded to nearest even.
template <typename T>
CLFAST_AVX512_TARGET inline void store16(T* dst, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(dst, v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

// In-register transpose of a 16 x 16 matrix of 32-bit words: r[k] = row k on entry, column k on exit.
CLFAST_AVX512_TARGET inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int k = 0; k < 16; k += 2) {
    t[k] = _mm512_unpacklo_epi32(r[k], r[k + 1]);
    t[k + 1] = _mm512_unpackhi_epi32(r[k], r[k + 1]);
  }
  for (int k = 0; k < 16; k += 4) {
    r[k] = _mm512_unpacklo_epi64(t[k], t[k + 2]);
    r[k + 1] = _mm512_unpackhi_epi64(t[k], t[k + 2]);
    r[k + 2] = _mm512_unpacklo_epi64(t[k + 1], t[k + 3]);
    r[k + 3] = _mm512_unpackhi_epi64(t[k + 1], t[k + 3]);
  }
  // Now 128-bit lane L of r[4g + m] holds rows 4g..4g+3 of column 4L + m; two rounds of 128-bit
  // lane shuffles gather column c = 4L + m from lane L of r[m], r[4 + m], r[8 + m], r[12 + m].
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_i32x4(r[k], r[k + 4], 0x88);
    t[k + 4] = _mm512_shuffle_i32x4(r[k], r[k + 4], 0xdd);
    t[k + 8] = _mm512_shuffle_i32x4(r[k + 8], r[k + 12], 0x88);
    t[k + 12] = _mm512_shuffle_i32x4(r[k + 8], r[k + 12], 0xdd);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xdd);
    r[k + 4] = _mm512_shuffle_i32x4(t[k + 4], t[k + 12], 0x88);
    r[k + 12] = _mm512_shuffle_i32x4(t[k + 4], t[k + 12], 0xdd);
  }
}

// dst[w * ld + i] = word w of src(i) for w < words, i < round_up(ncol, 16) (zero for i >= n); the

CLFAST_AVX512_DIAG_POP
}  // namespace clfast::cpu
#endif  // CLFAST_HAS_AVX512
