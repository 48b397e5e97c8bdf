// Row-to-column transposes and row interleaves of small matrices: how the CPU kernels pack rows into GEMM
// operands. A row source is a callable: src(i) points at row i.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu_features.h"
#include "common/simd_avx2.h"
#include "common/simd_avx512.h"

namespace clfast::cpu {

// dst[c * ld + r] = src(r)[c] for r < R, c < Cn, for 4-byte (E = uint32_t) or 2-byte (uint16_t)
// elements; src(r) returns a pointer to row r.
template <typename E, typename RowFn>
void transpose_rows(const RowFn& src, int64_t R, int64_t Cn, E* dst, int64_t ld) {
  static_assert(sizeof(E) == 4 || sizeof(E) == 2, "4- or 2-byte elements");
  int64_t r = 0;
#if CLFAST_HAS_AVX2
  for (; r + 8 <= R; r += 8) {
    const E* rows[8];
    for (int k = 0; k < 8; ++k) {
      rows[k] = reinterpret_cast<const E*>(src(r + k));
    }
    int64_t c = 0;
    for (; c + 8 <= Cn; c += 8) {
      if constexpr (sizeof(E) == 4) {
        __m256 v[8];
        for (int k = 0; k < 8; ++k) {
          v[k] = _mm256_loadu_ps(reinterpret_cast<const float*>(rows[k] + c));
        }
        transpose8x8(v);
        for (int k = 0; k < 8; ++k) {
          _mm256_storeu_ps(reinterpret_cast<float*>(dst + (c + k) * ld + r), v[k]);
        }
      } else {
        __m128i v[8];
        for (int k = 0; k < 8; ++k) {
          v[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[k] + c));
        }
        transpose8x8_epi16(v);
        for (int k = 0; k < 8; ++k) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (c + k) * ld + r), v[k]);
        }
      }
    }
    for (; c < Cn; ++c) {
      for (int k = 0; k < 8; ++k) {
        std::memcpy(dst + c * ld + r + k, rows[k] + c, sizeof(E));
      }
    }
  }
#endif
  for (; r < R; ++r) {
    const E* s = reinterpret_cast<const E*>(src(r));
    for (int64_t c = 0; c < Cn; ++c) {
      std::memcpy(dst + c * ld + r, s + c, sizeof(E));
    }
  }
}

// dst[w * ld + i] = word w of src(i) for w < words and i < ncol, zero for i >= n: 32-bit words, e.g. fp32
// values or the VNNI feature pairs of 16-bit rows.
template <typename RowFn>
void transpose_words(isa::Avx2, const RowFn& src, int64_t n, int64_t ncol, int64_t words, uint32_t* dst,
                     int64_t ld) {
  transpose_rows(src, n, words, dst, ld);
  for (int64_t w = 0; w < words; ++w) {
    std::memset(dst + w * ld + n, 0, (ncol - n) * sizeof(uint32_t));
  }
}

// VNNI pairs of 16-bit rows: dst[i/2][c][i%2] = src(i)[c] for i < nrow (zero rows for i >= n; nrow even).
template <typename C, typename RowFn>
void interleave_rows(isa::Avx2, const RowFn& src, int64_t n, int64_t nrow, int64_t d, C* dst) {
  static_assert(sizeof(C) == 2, "16-bit elements");
  for (int64_t i = 0; i < nrow; i += 2) {
    const C* a = src(i);
    const C* b = i + 1 < n ? src(i + 1) : nullptr;
    C* o = dst + i * d;
    int64_t c = 0;
#if CLFAST_HAS_AVX2
    static const C zeros[8] = {};
    for (; c + 8 <= d; c += 8) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + c));
      const __m128i y = b != nullptr ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + c))
                                     : _mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * c), _mm_unpacklo_epi16(x, y));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * c + 8), _mm_unpackhi_epi16(x, y));
    }
#endif
    for (; c < d; ++c) {
      o[2 * c] = a[c];
      o[2 * c + 1] = b != nullptr ? b[c] : C(0.f);
    }
  }
}

#if CLFAST_HAS_AVX512
CLFAST_AVX512_DIAG_PUSH
// AVX-512: also zeroes columns [ncol, round_up(ncol, 16)), so it needs round_up(ncol, 16) <= ld.
template <typename RowFn>
CLFAST_AVX512_TARGET void transpose_words(isa::Avx512, const RowFn& src, int64_t n, int64_t ncol, int64_t words,
                                          uint32_t* dst, int64_t ld) {
  for (int64_t i0 = 0; i0 < ncol; i0 += 16) {
    const uint32_t* rows[16];
    for (int k = 0; k < 16; ++k) {
      rows[k] = i0 + k < n ? reinterpret_cast<const uint32_t*>(src(i0 + k)) : nullptr;
    }
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      const int64_t nw = std::min<int64_t>(16, words - w0);
      const __mmask16 m = static_cast<__mmask16>((1u << nw) - 1);
      __m512i r[16];
      for (int k = 0; k < 16; ++k) {
        r[k] = rows[k] != nullptr ? _mm512_maskz_loadu_epi32(m, rows[k] + w0) : _mm512_setzero_si512();
      }
      transpose16x16_epi32(r);
      for (int k = 0; k < nw; ++k) {
        _mm512_storeu_si512(dst + (w0 + k) * ld + i0, r[k]);
      }
    }
  }
}

// AVX-512: the same, 32 values per step with masked tails.
template <typename C, typename RowFn>
CLFAST_AVX512_TARGET void interleave_rows(isa::Avx512, const RowFn& src, int64_t n, int64_t nrow, int64_t d,
                                          C* dst) {
  alignas(64) static const uint16_t lo_idx[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                  37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                  11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_idx);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t i = 0; i < nrow; i += 2) {
    const C* a = i < n ? src(i) : nullptr;
    const C* b = i + 1 < n ? src(i + 1) : nullptr;
    C* o = dst + i * d;
    for (int64_t c = 0; c < d; c += 32) {
      const __mmask32 m = d - c >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (d - c)) - 1);
      const __m512i x = a != nullptr ? _mm512_maskz_loadu_epi16(m, a + c) : _mm512_setzero_si512();
      const __m512i y = b != nullptr ? _mm512_maskz_loadu_epi16(m, b + c) : _mm512_setzero_si512();
      const __m512i p0 = _mm512_permutex2var_epi16(x, lo, y);
      const __m512i p1 = _mm512_permutex2var_epi16(x, hi, y);
      if (d - c >= 32) {
        _mm512_storeu_si512(o + 2 * c, p0);
        _mm512_storeu_si512(o + 2 * c + 32, p1);
      } else {
        const int64_t left = 2 * (d - c);  // 16-bit values still to write
        const __mmask32 m0 = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << left) - 1);
        _mm512_mask_storeu_epi16(o + 2 * c, m0, p0);
        if (left > 32) {
          _mm512_mask_storeu_epi16(o + 2 * c + 32, static_cast<__mmask32>((1u << (left - 32)) - 1), p1);
        }
      }
    }
  }
}
CLFAST_AVX512_DIAG_POP
#endif  // CLFAST_HAS_AVX512

}  // namespace clfast::cpu
