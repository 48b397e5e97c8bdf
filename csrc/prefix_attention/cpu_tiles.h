// The element-wise tile kernels of prefix_attention on the CPU, run between the GEMMs of
// prefix_attention_cpu.cpp: the forward's online-softmax rows, the backward's P / dS tile, the fp32 -> T
// write-backs and the backward's Di = rowsum(dout * out). Math: prefix_attention.h.
//
// Each kernel has an AVX2 form (scalar in builds without AVX2) and, for fp32 and bf16, an AVX-512 form
// (cpu_features.h); the entry points at the end of this file pick one per call (ISA_SWITCH). The forms are
// kept apart on purpose rather than written once over the vector width: the AVX-512 forms compute exp as 2^x
// with polynomials fitted to the output precision, apply the scale in another order, convert to bf16 with
// vcvtneps2bf16 (which flushes denormals), handle tails with masks instead of scalar loops, group softmax
// rows and write outputs with streaming stores. A shared body would change one form's numbers, and GCC
// gives a function template one target for all its instantiations (an AVX-512 instantiation of a
// default-target template cannot inline AVX-512 intrinsics).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/brgemm.h"
#include "common/cpu_features.h"
#include "common/index_math.h"
#include "common/prefetch.h"
#include "common/simd_avx2.h"
#include "common/simd_avx512.h"
#include "common/static_switch.h"
#include "prefix_attention/prefix_attention.h"

namespace clfast::prefix_attention {
// Internal linkage, as when this code sat inside prefix_attention_cpu.cpp (its only includer): GCC then
// specialises and inlines these calls as it did there.
namespace {

using cpu::kVnni;
using cpu::RowPrefetch;
#if CLFAST_HAS_AVX2
using cpu::exp8;
using cpu::hsum8;
using cpu::load8;
using cpu::store8;
using cpu::store8_pair;
using cpu::transpose8x8;
#endif
#if CLFAST_HAS_AVX512
using cpu::cvt32_bf16;
using cpu::exp2_16;
using cpu::interleave_halves_idx;
using cpu::kLog2e;
using cpu::store16;
#endif

constexpr int64_t kMaxBlockQ = 256;  // queries per block (multiple of 16)
constexpr int64_t kMaxBlockK = 256;  // keys per tile (even)
constexpr float kInf = std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------
// AVX2 forms.

// dst[j] = T(src[j] * mul) for j < n.
template <typename T>
void store_row(cpu::isa::Avx2, const float* src, int64_t n, float mul, T* dst) {
  int64_t c = 0;
#if CLFAST_HAS_AVX2
  const __m256 vm = _mm256_set1_ps(mul);
  for (; c + 8 <= n; c += 8) {
    store8<T>(dst + c, _mm256_mul_ps(_mm256_loadu_ps(src + c), vm));
  }
#endif
  for (; c < n; ++c) {
    dst[c] = T(src[c] * mul);
  }
}

// out[i * d + c] = T(src[c * ld + i] * (scale ? scale[i] : 1)) for i < n, c < d.
template <typename T>
void store_transposed(cpu::isa::Avx2, const float* src, int64_t ld, int64_t n, int64_t d, const float* scale,
                      T* out) {
  int64_t i = 0;
#if CLFAST_HAS_AVX2
  for (; i + 8 <= n; i += 8) {
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) {
      __m256 v[8];
      for (int k = 0; k < 8; ++k) {
        v[k] = _mm256_loadu_ps(src + (c + k) * ld + i);
      }
      transpose8x8(v);
      for (int k = 0; k < 8; ++k) {
        const __m256 x = scale != nullptr ? _mm256_mul_ps(v[k], _mm256_set1_ps(scale[i + k])) : v[k];
        store8<T>(out + (i + k) * d + c, x);
      }
    }
    for (; c < d; ++c) {
      for (int k = 0; k < 8; ++k) {
        out[(i + k) * d + c] = T(src[c * ld + i + k] * (scale != nullptr ? scale[i + k] : 1.f));
      }
    }
  }
#endif
  for (; i < n; ++i) {
    const float f = scale != nullptr ? scale[i] : 1.f;
    for (int64_t c = 0; c < d; ++c) {
      out[i * d + c] = T(src[c * ld + i] * f);
    }
  }
}

// sum_c a[c] * b[c] in fp32.
template <typename T>
float dot_row(cpu::isa::Avx2, const T* a, const T* b, int64_t d) {
  int64_t c = 0;
  float sum = 0.f;
#if CLFAST_HAS_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; c + 8 <= d; c += 8) {
    acc = _mm256_fmadd_ps(load8<T>(a + c), load8<T>(b + c), acc);
  }
  sum = hsum8(acc);
#endif
  for (; c < d; ++c) {
    sum += static_cast<float>(a[c]) * static_cast<float>(b[c]);
  }
  return sum;
}

// See grad_tile at the end of this file.
template <typename C>
void grad_tile(cpu::isa::Avx2, float* S, float* dP, int64_t ldq, int64_t kn, int64_t ncol, float scale,
               const float* lse, const float* di, C* Pa, C* dSa, C* dSv, RowPrefetch& pf, int64_t pf_step) {
  constexpr bool vnni = kVnni<C>;
#if CLFAST_HAS_AVX2
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t j = 0; j < kn; j += 2) {
    pf.issue(pf_step);
    const bool two = j + 1 < kn;
    float* s0 = S + j * ldq;
    float* d0 = dP + j * ldq;
    for (int64_t i = 0; i < ncol; i += 8) {
      const __m256 L = _mm256_loadu_ps(lse + i), D = _mm256_loadu_ps(di + i);
      const __m256 pa = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s0 + i), vs, L));
      const __m256 ga = _mm256_mul_ps(_mm256_mul_ps(pa, vs), _mm256_sub_ps(_mm256_loadu_ps(d0 + i), D));
      __m256 pb = zero, gb = zero;
      if (two) {
        pb = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s0 + ldq + i), vs, L));
        gb = _mm256_mul_ps(_mm256_mul_ps(pb, vs), _mm256_sub_ps(_mm256_loadu_ps(d0 + ldq + i), D));
      }
      if constexpr (vnni) {
        store8<C>(Pa + j * ldq + i, pa);
        store8<C>(dSa + j * ldq + i, ga);
        if (two) {
          store8<C>(Pa + (j + 1) * ldq + i, pb);
          store8<C>(dSa + (j + 1) * ldq + i, gb);
        }
        store8_pair<C>(dSv + (j / 2) * ldq * 2 + i * 2, ga, gb);
      } else {
        _mm256_storeu_ps(s0 + i, pa);
        _mm256_storeu_ps(d0 + i, ga);
        if (two) {
          _mm256_storeu_ps(s0 + ldq + i, pb);
          _mm256_storeu_ps(d0 + ldq + i, gb);
        }
      }
    }
  }
#else
  for (int64_t j = 0; j < round_up(kn, 2); ++j) {
    pf.issue(pf_step);
    for (int64_t i = 0; i < ncol; ++i) {
      float p = 0.f, g = 0.f;
      if (j < kn) {
        p = softmax_prob(S[j * ldq + i], scale, lse[i]);
        g = score_grad(p, dP[j * ldq + i], di[i], scale);
      }
      if constexpr (vnni) {
        if (j < kn) {
          Pa[j * ldq + i] = C(p);
          dSa[j * ldq + i] = C(g);
        }
        dSv[(j / 2) * ldq * 2 + i * 2 + (j % 2)] = C(g);
      } else if (j < kn) {
        S[j * ldq + i] = p;
        dP[j * ldq + i] = g;
      }
    }
  }
#endif
}

// See softmax_rows at the end of this file.
template <typename C>
void softmax_rows(cpu::isa::Avx2, float* S, int64_t lds, int64_t nq, int64_t kn, float scale, float* m,
                  float* l, float* alpha, C* P, bool first, RowPrefetch& pf, int64_t pf_step) {
  constexpr bool vnni = kVnni<C>;
  for (int64_t i = 0; i < nq; ++i) {
    pf.issue(pf_step);
    float* s = S + i * lds;
    int64_t j = 0;
    float mx = -kInf;
#if CLFAST_HAS_AVX2
    const __m256 vs = _mm256_set1_ps(scale);
    __m256 vmx = _mm256_set1_ps(-kInf);
    for (; j + 8 <= kn; j += 8) {
      vmx = _mm256_max_ps(vmx, _mm256_mul_ps(_mm256_loadu_ps(s + j), vs));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmx);
    for (int u = 0; u < 8; ++u) {
      mx = std::max(mx, lanes[u]);
    }
#endif
    for (; j < kn; ++j) {
      mx = std::max(mx, s[j] * scale);
    }
    float a = 0.f;
    if (!first) {
      mx = std::max(mx, m[i]);
      a = online_rescale(m[i], mx);
    }
    m[i] = mx;
    alpha[i] = a;
    float sum = 0.f;
    j = 0;
#if CLFAST_HAS_AVX2
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (; j + 8 <= kn; j += 8) {
      const __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vs, vm));
      vsum = _mm256_add_ps(vsum, e);
      if constexpr (vnni) {
        store8<C>(P + i * lds + j, e);
      } else {
        _mm256_storeu_ps(s + j, e);
      }
    }
    sum = hsum8(vsum);
#endif
    for (; j < kn; ++j) {
      const float e = softmax_prob(s[j], scale, mx);
      sum += e;
      if constexpr (vnni) {
        P[i * lds + j] = C(e);
      } else {
        s[j] = e;
      }
    }
    if constexpr (vnni) {
      if (kn % 2 == 1) {
        P[i * lds + kn] = C(0.f);
      }
    }
    l[i] = first ? sum : l[i] * a + sum;
  }
}

// ------------------------------------------------------------------------------------------
// AVX-512 forms (fp32 and bf16).

#if CLFAST_HAS_AVX512
CLFAST_AVX512_DIAG_PUSH
template <typename C>
CLFAST_AVX512_TARGET void grad_tile(cpu::isa::Avx512, float* S, float* dP, int64_t ldq, int64_t kn, int64_t ncol,
                                    float scale, const float* lse, const float* di, C* Pa, C* dSa, C* dSv,
                                    RowPrefetch& pf, int64_t pf_step) {
  constexpr bool vnni = kVnni<C>;
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512 vs2 = _mm512_set1_ps(scale * kLog2e);
  const __m512 zero = _mm512_setzero_ps();
  const __m512i inter = interleave_halves_idx();
  // P = 2^(S*scale*log2e - lse*log2e), dS = P * (dP*scale - Di*scale)
  alignas(64) float lse2[kMaxBlockQ], dis[kMaxBlockQ];
  for (int64_t i = 0; i < ncol; i += 16) {
    _mm512_store_ps(lse2 + i, _mm512_mul_ps(_mm512_loadu_ps(lse + i), _mm512_set1_ps(kLog2e)));
    _mm512_store_ps(dis + i, _mm512_mul_ps(_mm512_loadu_ps(di + i), vs));
  }
  for (int64_t j = 0; j < kn; j += 2) {
    pf.issue(pf_step);
    const bool two = j + 1 < kn;
    float* s0 = S + j * ldq;
    float* d0 = dP + j * ldq;
    for (int64_t i = 0; i < ncol; i += 16) {
      const __m512 L = _mm512_load_ps(lse2 + i), D = _mm512_load_ps(dis + i);
      const __m512 pa = exp2_16<!vnni>(_mm512_fmsub_ps(_mm512_loadu_ps(s0 + i), vs2, L));
      const __m512 ga = _mm512_mul_ps(pa, _mm512_fmsub_ps(_mm512_loadu_ps(d0 + i), vs, D));
      __m512 pb = zero, gb = zero;
      if (two) {
        pb = exp2_16<!vnni>(_mm512_fmsub_ps(_mm512_loadu_ps(s0 + ldq + i), vs2, L));
        gb = _mm512_mul_ps(pb, _mm512_fmsub_ps(_mm512_loadu_ps(d0 + ldq + i), vs, D));
      }
      if constexpr (vnni) {
        const __m512i p2 = cvt32_bf16(pa, pb);
        const __m512i g2 = cvt32_bf16(ga, gb);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(Pa + j * ldq + i), _mm512_castsi512_si256(p2));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dSa + j * ldq + i), _mm512_castsi512_si256(g2));
        if (two) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(Pa + (j + 1) * ldq + i),
                              _mm512_extracti64x4_epi64(p2, 1));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dSa + (j + 1) * ldq + i),
                              _mm512_extracti64x4_epi64(g2, 1));
        }
        _mm512_storeu_si512(dSv + (j / 2) * ldq * 2 + i * 2, _mm512_permutexvar_epi16(inter, g2));
      } else {
        _mm512_storeu_ps(s0 + i, pa);
        _mm512_storeu_ps(d0 + i, ga);
        if (two) {
          _mm512_storeu_ps(s0 + ldq + i, pb);
          _mm512_storeu_ps(d0 + ldq + i, gb);
        }
      }
    }
  }
}


template <bool kMax>
CLFAST_AVX512_TARGET inline __m512 extreme16(__m512 a, __m512 b) {
  return kMax ? _mm512_max_ps(a, b) : _mm512_min_ps(a, b);
}

// R rows at once (independent dependency chains): the row maxima first, then the exponentials.
// kPos: scale >= 0, so max_j scale*S[j] = scale * max_j S[j] (else scale * min_j S[j]).
template <typename C, int R, bool kPos>
CLFAST_AVX512_TARGET inline void softmax_group_avx512(float* S, int64_t lds, int64_t kn,
                                                         float scale, float* m, float* l,
                                                         float* alpha, C* P, bool first) {
  constexpr bool vnni = kVnni<C>;
  const __m512 vs2 = _mm512_set1_ps(scale * kLog2e);
  const int64_t full = kn / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (kn - full)) - 1);
  const __m512 fill = _mm512_set1_ps(kPos ? -kInf : kInf);
  __m512 e[R];
  for (int r = 0; r < R; ++r) {
    e[r] = fill;
  }
  for (int64_t j = 0; j < full; j += 16) {
    for (int r = 0; r < R; ++r) {
      e[r] = extreme16<kPos>(e[r], _mm512_loadu_ps(S + r * lds + j));
    }
  }
  if (tail) {
    for (int r = 0; r < R; ++r) {
      e[r] = extreme16<kPos>(e[r], _mm512_mask_loadu_ps(fill, tail, S + r * lds + full));
    }
  }
  __m512 mx2[R], sum[R];
  for (int r = 0; r < R; ++r) {
    float mx = (kPos ? _mm512_reduce_max_ps(e[r]) : _mm512_reduce_min_ps(e[r])) * scale;
    float a = 0.f;
    if (!first) {
      mx = std::max(mx, m[r]);
      a = online_rescale(m[r], mx);
    }
    m[r] = mx;
    alpha[r] = a;
    mx2[r] = _mm512_set1_ps(mx * kLog2e);
    sum[r] = _mm512_setzero_ps();
  }
  int64_t j0 = 0;
  if constexpr (vnni) {
    // two vectors per conversion (vcvtne2ps2bf16 converts 32 values at the cost of 16)
    for (; j0 + 32 <= full; j0 += 32) {
      for (int r = 0; r < R; ++r) {
        const __m512 x0 = exp2_16<false>(_mm512_fmsub_ps(_mm512_loadu_ps(S + r * lds + j0), vs2, mx2[r]));
        const __m512 x1 = exp2_16<false>(_mm512_fmsub_ps(_mm512_loadu_ps(S + r * lds + j0 + 16), vs2, mx2[r]));
        sum[r] = _mm512_add_ps(sum[r], _mm512_add_ps(x0, x1));
        _mm512_storeu_si512(P + r * lds + j0, cvt32_bf16(x0, x1));
      }
    }
  }
  for (int64_t j = j0; j < full; j += 16) {
    for (int r = 0; r < R; ++r) {
      const __m512 x = exp2_16<!vnni>(_mm512_fmsub_ps(_mm512_loadu_ps(S + r * lds + j), vs2, mx2[r]));
      sum[r] = _mm512_add_ps(sum[r], x);
      if constexpr (vnni) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(P + r * lds + j),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
      } else {
        _mm512_storeu_ps(S + r * lds + j, x);
      }
    }
  }
  if (tail) {
    // 16-bit: also writes the zero pad column kn when kn is odd
    const __mmask16 k2 = static_cast<__mmask16>((1u << (round_up(kn, 2) - full)) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_maskz_mov_ps(
          tail, exp2_16<!vnni>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, S + r * lds + full), vs2, mx2[r])));
      sum[r] = _mm512_add_ps(sum[r], x);
      if constexpr (vnni) {
        _mm256_mask_storeu_epi16(P + r * lds + full, k2, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
      } else {
        _mm512_mask_storeu_ps(S + r * lds + full, tail, x);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float ssum = _mm512_reduce_add_ps(sum[r]);
    l[r] = first ? ssum : l[r] * alpha[r] + ssum;
  }
}

template <typename C>
CLFAST_AVX512_TARGET void softmax_rows(cpu::isa::Avx512, float* S, int64_t lds, int64_t nq, int64_t kn, float scale,
                                       float* m, float* l, float* alpha, C* P, bool first, RowPrefetch& pf,
                                       int64_t pf_step) {
  constexpr int R = 4;
  C* p0 = kVnni<C> ? P : nullptr;
  auto group = [&](int64_t i, auto rows) {
    constexpr int n = decltype(rows)::value;
    C* pr = p0 != nullptr ? p0 + i * lds : nullptr;
    BOOL_SWITCH(scale >= 0.f, kPos, [&] {
      softmax_group_avx512<C, n, kPos>(S + i * lds, lds, kn, scale, m + i, l + i, alpha + i, pr, first);
    });
  };
  int64_t i = 0;
  for (; i + R <= nq; i += R) {
    pf.issue(pf_step * R);
    group(i, std::integral_constant<int, R>{});
  }
  for (; i < nq; ++i) {
    pf.issue(pf_step);
    group(i, std::integral_constant<int, 1>{});
  }
}

template <typename T>
CLFAST_AVX512_TARGET void store_row(cpu::isa::Avx512, const float* src, int64_t n, float mul, T* dst) {
  const __m512 vm = _mm512_set1_ps(mul);
  int64_t c = 0;
  // Whole aligned cache lines go out as streaming stores: outputs are written once and are far
  // larger than the caches, so this saves the read-for-ownership traffic.
  if (reinterpret_cast<uintptr_t>(dst) % 64 == 0 && (n * sizeof(T)) % 64 == 0) {
    constexpr int64_t kPerLine = 64 / sizeof(T);
    for (; c < n; c += kPerLine) {
      if constexpr (std::is_same_v<T, float>) {
        _mm512_stream_ps(dst + c, _mm512_mul_ps(_mm512_loadu_ps(src + c), vm));
      } else {
        const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(src + c), vm);
        const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(src + c + 16), vm);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + c), cvt32_bf16(a, b));
      }
    }
    return;
  }
  for (; c + 16 <= n; c += 16) {
    store16<T>(dst + c, _mm512_mul_ps(_mm512_loadu_ps(src + c), vm));
  }
  if (c < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, src + c), vm);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(dst + c, k, v);
    } else {
      _mm256_mask_storeu_epi16(dst + c, k, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    }
  }
}


// Loads the 8 x 8 block src[c..c+8][i..i+8] (leading dimension ld) transposed: v[k] = column i+k.
CLFAST_AVX512_TARGET inline void load_transposed8(const float* src, int64_t ld, int64_t c,
                                                     int64_t i, __m256 v[8]) {
  for (int k = 0; k < 8; ++k) {
    v[k] = _mm256_loadu_ps(src + (c + k) * ld + i);
  }
  transpose8x8(v);
}

template <typename T>
CLFAST_AVX512_TARGET void store_transposed(cpu::isa::Avx512, const float* src, int64_t ld, int64_t n, int64_t d,
                                           const float* scale, T* out) {
  // Blocks of 8 rows x one cache line of columns, transposed in registers, converted and written
  // with streaming stores when the rows are whole aligned cache lines.
  constexpr int64_t kPerLine = 64 / sizeof(T);
  const bool stream = reinterpret_cast<uintptr_t>(out) % 64 == 0 && (d * sizeof(T)) % 64 == 0;
  int64_t i = 0;
  if (stream) {
    for (; i + 8 <= n; i += 8) {
      for (int64_t c = 0; c < d; c += kPerLine) {
        __m256 v[kPerLine / 8][8];
        for (int64_t part = 0; part < kPerLine / 8; ++part) {
          load_transposed8(src, ld, c + 8 * part, i, v[part]);
        }
        for (int k = 0; k < 8; ++k) {
          const __m512 f = _mm512_set1_ps(scale != nullptr ? scale[i + k] : 1.f);
          const __m512 a = _mm512_mul_ps(
              _mm512_insertf32x8(_mm512_castps256_ps512(v[0][k]), v[1][k], 1), f);
          T* o = out + (i + k) * d + c;
          if constexpr (std::is_same_v<T, float>) {
            _mm512_stream_ps(o, a);
          } else {
            const __m512 b = _mm512_mul_ps(
                _mm512_insertf32x8(_mm512_castps256_ps512(v[2][k]), v[3][k], 1), f);
            _mm512_stream_si512(reinterpret_cast<__m512i*>(o), cvt32_bf16(a, b));
          }
        }
      }
    }
  }
  for (; i + 8 <= n; i += 8) {
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) {
      __m256 v[8];
      load_transposed8(src, ld, c, i, v);
      for (int k = 0; k < 8; ++k) {
        const __m256 x = scale != nullptr ? _mm256_mul_ps(v[k], _mm256_set1_ps(scale[i + k])) : v[k];
        if constexpr (std::is_same_v<T, float>) {
          _mm256_storeu_ps(out + (i + k) * d + c, x);
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (i + k) * d + c),
                           reinterpret_cast<__m128i>(_mm256_cvtneps_pbh(x)));
        }
      }
    }
    for (; c < d; ++c) {
      for (int k = 0; k < 8; ++k) {
        out[(i + k) * d + c] = T(src[c * ld + i + k] * (scale != nullptr ? scale[i + k] : 1.f));
      }
    }
  }
  for (; i < n; ++i) {
    const float f = scale != nullptr ? scale[i] : 1.f;
    for (int64_t c = 0; c < d; ++c) {
      out[i * d + c] = T(src[c * ld + i] * f);
    }
  }
}

// sum_c a[c] * b[c] for bf16 rows with d % 32 == 0 (vdpbf16ps: exact products, fp32 sums).
CLFAST_AVX512_TARGET inline float dot_row(cpu::isa::Avx512, const c10::BFloat16* a, const c10::BFloat16* b,
                                          int64_t d) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) {
    acc0 = _mm512_dpbf16_ps(acc0, reinterpret_cast<__m512bh>(_mm512_loadu_si512(a + c)),
                            reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + c)));
    acc1 = _mm512_dpbf16_ps(acc1, reinterpret_cast<__m512bh>(_mm512_loadu_si512(a + c + 32)),
                            reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + c + 32)));
  }
  for (; c < d; c += 32) {
    acc0 = _mm512_dpbf16_ps(acc0, reinterpret_cast<__m512bh>(_mm512_loadu_si512(a + c)),
                            reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + c)));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
CLFAST_AVX512_DIAG_POP
#endif  // CLFAST_HAS_AVX512

// ------------------------------------------------------------------------------------------
// Entry points: the AVX-512 form where it exists and the CPU runs it, else the AVX2 form.

// AVX-512 forms exist for fp32 and bf16 operands.
template <typename C>
constexpr bool kHasAvx512Form = std::is_same_v<C, float> || std::is_same_v<C, c10::BFloat16>;

// Orders the streaming stores of this thread before the end of its parallel chunk.
inline void store_fence() {
#if CLFAST_HAS_AVX512
  if (cpu::use_avx512()) {
    _mm_sfence();
  }
#endif
}

// dst[j] = T(src[j] * mul) for j < n.
template <typename T>
void store_row(const float* src, int64_t n, T* dst, float mul = 1.f) {
  ISA_SWITCH(kHasAvx512Form<T>, Isa, [&] { store_row<T>(Isa{}, src, n, mul, dst); });
}

// out[i * d + c] = T(src[c * ld + i] * (scale ? scale[i] : 1)) for i < n, c < d.
template <typename T>
void store_transposed(const float* src, int64_t ld, int64_t n, int64_t d, const float* scale, T* out) {
  ISA_SWITCH(kHasAvx512Form<T>, Isa, [&] { store_transposed<T>(Isa{}, src, ld, n, d, scale, out); });
}

// sum_c a[c] * b[c] in fp32 (the AVX-512 form takes bf16 rows of whole 32-value blocks).
template <typename T>
float dot_row(const T* a, const T* b, int64_t d) {
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  if (kBf16 && d % 32 == 0) {
    return ISA_SWITCH(kBf16, Isa, [&] { return dot_row(Isa{}, a, b, d); });
  }
  return dot_row(cpu::isa::Avx2{}, a, b, d);
}

// Forward, row layout: S [nq][lds] holds the raw scores of one key tile (kn keys). Per query row
// i, updates the running max m[i] (scaled domain) and sum l[i], writes alpha[i] = rescale factor
// of the previous state, and writes P = exp(scale*S - m) in place into S (fp32) or into the
// row-major 16-bit P (with a zero at column kn when kn is odd, the GEMM's reduction pad).
template <typename C>
void softmax_rows(float* S, int64_t lds, int64_t nq, int64_t kn, float scale, float* m, float* l,
                  float* alpha, C* P, bool first, RowPrefetch& pf, int64_t pf_step) {
  ISA_SWITCH(kHasAvx512Form<C>, Isa,
             [&] { softmax_rows<C>(Isa{}, S, lds, nq, kn, scale, m, l, alpha, P, first, pf, pf_step); });
}

// Backward: P = exp(scale*S - lse), dS = scale * P * (dP - Di) for one key tile in the
// transposed layout [kn][ldq] (ldq a multiple of 16; every column holds finite values, so the
// vector loops run up to the next multiple of 16 past ncol). fp32: P and dS are written in place
// into S and dP. 16-bit: P and dS as row-major A operands (Pa, dSa) and dS again as a VNNI B
// operand (dSv, [(kn+1)/2][ldq][2], zero pad row).
template <typename C>
void grad_tile(float* S, float* dP, int64_t ldq, int64_t kn, int64_t ncol, float scale,
               const float* lse, const float* di, C* Pa, C* dSa, C* dSv, RowPrefetch& pf, int64_t pf_step) {
  ISA_SWITCH(kHasAvx512Form<C>, Isa,
             [&] { grad_tile<C>(Isa{}, S, dP, ldq, kn, ncol, scale, lse, di, Pa, dSa, dSv, pf, pf_step); });
}

}  // namespace
}  // namespace clfast::prefix_attention
