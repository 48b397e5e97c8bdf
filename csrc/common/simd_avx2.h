// AVX2 helpers on 8 floats (__m256): loads and stores that convert to and from bfloat16 / float16, a fast
// exp, in-register transposes and a fixed-order horizontal sum. Only where CLFAST_HAS_AVX2 (cpu_features.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "common/cpu_features.h"

#if CLFAST_HAS_AVX2
namespace clfast::cpu {

// exp(x) for x <= 88; flushes to 0 below the smallest normal float (so exp(-inf) == 0); NaN stays NaN (the
// clamps below would turn it into exp(88): min/max return their second operand when one is NaN).
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_or_ps(nan, _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e))));
}

// 8 floats -> 8 bf16 (round to nearest even) in the low 128 bits.
inline __m128i cvt8_bf16(__m256 v) {
  __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  x = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  x = _mm256_srli_epi32(x, 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

// 8 floats -> 8 values of the 16-bit type C (bf16 or fp16), round to nearest even.
template <typename C>
inline __m128i cvt8_16bit(__m256 v) {
  if constexpr (std::is_same_v<C, c10::BFloat16>) {
    return cvt8_bf16(v);
  } else {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  }
}

// 8 values of T (float, bf16 or fp16) as 8 floats.
template <typename T>
inline __m256 load8(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(src);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
}

// 8 floats stored as C (float, or bf16 / fp16 rounded to nearest even).
template <typename C>
inline void store8(C* dst, __m256 v) {
  if constexpr (std::is_same_v<C, float>) {
    _mm256_storeu_ps(dst, v);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), cvt8_16bit<C>(v));
  }
}

// VNNI pair store: dst[2i] = a[i], dst[2i+1] = b[i], i < 8 (16-bit types only).
template <typename C>
inline void store8_pair(C* dst, __m256 a, __m256 b) {
  const __m128i x = cvt8_16bit<C>(a), y = cvt8_16bit<C>(b);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi16(x, y));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8), _mm_unpackhi_epi16(x, y));
}

// In-register transposes: r[k] = row k on entry, column k on exit.
inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
    r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
  }
}

inline void transpose8x8_epi16(__m128i a[8]) {
  __m128i b[8], c[8];
  for (int k = 0; k < 8; k += 2) {
    b[k] = _mm_unpacklo_epi16(a[k], a[k + 1]);
    b[k + 1] = _mm_unpackhi_epi16(a[k], a[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    c[k] = _mm_unpacklo_epi32(b[k], b[k + 2]);
    c[k + 1] = _mm_unpackhi_epi32(b[k], b[k + 2]);
    c[k + 2] = _mm_unpacklo_epi32(b[k + 1], b[k + 3]);
    c[k + 3] = _mm_unpackhi_epi32(b[k + 1], b[k + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    a[2 * k] = _mm_unpacklo_epi64(c[k], c[k + 4]);
    a[2 * k + 1] = _mm_unpackhi_epi64(c[k], c[k + 4]);
  }
}

// Sum of the 8 lanes in a fixed order: ((0+1) + (2+3)) + ((4+5) + (6+7)).
inline float hsum8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

}  // namespace clfast::cpu
#endif  // CLFAST_HAS_AVX2
