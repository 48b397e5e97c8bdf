// CPU kernels of clfast::prefix_attention (forward and backward), registered as
// _clfast_C::prefix_attention_fwd / prefix_attention_bwd. Math: see prefix_attention.h.
//
// Work is split over (b, h) and blocks of queries; every product is a plain row-major GEMM.
//   forward (row layout)         S = q K^T,  row-wise online softmax,  out (+)= P V
//   backward (transposed layout) S^T = K q^T,  dP^T = V dout^T,  dV += P^T dout,  dK += dS^T q,
//                                dq^T += K^T dS^T
// In the backward the per-query lse and Di run along the contiguous axis of the keys x queries
// tiles, so P and dS are pure element-wise vector code.
// The key sequence is the virtual concatenation [prefix ; attended keys]: masked keys are dropped
// while packing (they cost nothing and get zero gradients), and [prefix ; k] never exists as a
// tensor. Keys are processed in tiles of at most kMaxBlockK with an online softmax; the prefix
// leads the first tile.
//
// GEMMs are oneDNN micro-kernels through at::native::cpublas::brgemm (fp32 accumulation and
// output). bf16/fp16 B operands are packed in VNNI layout (pairs along the reduction dimension,
// which is padded to an even length with zeros); where the machine has no bf16/fp16 brgemm
// (probed once), those dtypes are computed in fp32. Without a working fp32 brgemm, GEMMs fall
// back to at::mm. Element-wise kernels: AVX-512 (+BF16) chosen at run time, AVX2, or scalar.
//
// Environment (read once): CLFAST_CPU_DISABLE_BRGEMM=1, CLFAST_CPU_DISABLE_AVX512=1 force the
// fallbacks (for tests).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CLFAST_PA_AVX2 1
#else
#define CLFAST_PA_AVX2 0
#endif

#include "prefix_attention/prefix_attention.h"

namespace clfast {
namespace prefix_attention {
namespace {

constexpr int64_t kMaxBlockQ = 256;  // queries per block (multiple of 16)
constexpr int64_t kMaxBlockK = 256;  // keys per tile (even)
constexpr float kInf = std::numeric_limits<float>::infinity();
// lse of padding queries in the backward: exp(scale*S - kPadLse) == 0 for any finite score.
constexpr float kPadLse = 1e30f;

// ------------------------------------------------------------------------------------------
// GEMM: C[M x N] (+)= A[M x K] * B[K x N], all row-major, fp32 C.
// For bf16/fp16 (vnni) B is packed as B[k/2][n][k%2] with ldb counted in columns.

bool brgemm_disabled() {
  static const bool disabled = [] {
    const char* env = std::getenv("CLFAST_CPU_DISABLE_BRGEMM");
    return env != nullptr && env[0] == '1';
  }();
  return disabled;
}

template <typename C>
bool probe_brgemm() {
  constexpr bool vnni = !std::is_same_v<C, float>;
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

void gemm_fallback(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
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
  if constexpr (std::is_same_v<C, float>) {
    if (!brgemm_usable<float>()) {
      gemm_fallback(M, N, K, A, lda, B, ldb, Cm, ldc, accumulate);
      return;
    }
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, Cm,
                              !std::is_same_v<C, float>);
}

template <typename C>
inline void gemm_release() {
  if (std::is_same_v<C, float> ? brgemm_usable<float>() : true) {
    at::native::cpublas::brgemm_release(!std::is_same_v<C, float>);
  }
}

// ------------------------------------------------------------------------------------------
// CPU features. The element-wise kernels have an AVX-512 version (AVX512-BF16 conversions),
// compiled with a target attribute on top of the AVX2 baseline and chosen at run time; builds
// without AVX2 use scalar code.

#if CLFAST_PA_AVX2 && defined(__GNUC__) && defined(__x86_64__)
#define CLFAST_PA_AVX512 1
#define CLFAST_PA_AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#else
#define CLFAST_PA_AVX512 0
#endif

// GCC 12 reports the _mm512_undefined_*() placeholders inside its own AVX-512 intrinsics (lane
// shuffles, reductions, scalef) as uninitialized: false positives, silenced around that code.
#if defined(__GNUC__) && !defined(__clang__)
#define CLFAST_PA_DIAG_PUSH                                  \
  _Pragma("GCC diagnostic push")                            \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define CLFAST_PA_DIAG_POP _Pragma("GCC diagnostic pop")
#else
#define CLFAST_PA_DIAG_PUSH
#define CLFAST_PA_DIAG_POP
#endif

bool use_avx512() {
#if CLFAST_PA_AVX512
  static const bool use = [] {
    const char* env = std::getenv("CLFAST_CPU_DISABLE_AVX512");
    if (env != nullptr && env[0] == '1') {
      return false;
    }
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return use;
#else
  return false;
#endif
}

template <typename C>
constexpr bool kVnni = !std::is_same_v<C, float>;

// ------------------------------------------------------------------------------------------
// AVX2 helpers.

#if CLFAST_PA_AVX2
// exp(x) for x <= 88; flushes to 0 below the smallest normal float (so exp(-inf) == 0).
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
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
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// 8 floats -> 8 bf16 (round to nearest even) in the low 128 bits.
inline __m128i cvt8_bf16(__m256 v) {
  __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  x = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  x = _mm256_srli_epi32(x, 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

template <typename C>
inline __m128i cvt8_16bit(__m256 v) {
  if constexpr (std::is_same_v<C, at::BFloat16>) {
    return cvt8_bf16(v);
  } else {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  }
}

template <typename T>
inline __m256 load8(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(src);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
}

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
#endif

// ------------------------------------------------------------------------------------------
// Transposes and conversions used by the packing and write-back code.

// dst[c * ld + r] = src(r)[c] for r < R, c < Cn, for 4-byte (E = uint32_t) or 2-byte (uint16_t)
// elements; src(r) returns a pointer to row r.
template <typename E, typename RowFn>
void transpose_rows(const RowFn& src, int64_t R, int64_t Cn, E* dst, int64_t ld) {
  static_assert(sizeof(E) == 4 || sizeof(E) == 2, "4- or 2-byte elements");
  int64_t r = 0;
#if CLFAST_PA_AVX2
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

// dst[j] = T(src[j] * mul) for j < n.
template <typename T>
void store_row_base(const float* src, int64_t n, float mul, T* dst) {
  int64_t c = 0;
#if CLFAST_PA_AVX2
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
void store_transposed_base(const float* src, int64_t ld, int64_t n, int64_t d, const float* scale,
                           T* out) {
  int64_t i = 0;
#if CLFAST_PA_AVX2
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
float dot_row(const T* a, const T* b, int64_t d) {
  int64_t c = 0;
  float sum = 0.f;
#if CLFAST_PA_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; c + 8 <= d; c += 8) {
    acc = _mm256_fmadd_ps(load8<T>(a + c), load8<T>(b + c), acc);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
#endif
  for (; c < d; ++c) {
    sum += static_cast<float>(a[c]) * static_cast<float>(b[c]);
  }
  return sum;
}

// Software prefetch of the rows that the next work item will pack, issued a few lines at a time
// from the element-wise loops of the current item so that the memory latency overlaps compute.
class RowPrefetch {
 public:
  void add(const void* base, int64_t stride_bytes, int64_t rows, int64_t row_bytes) {
    if (n_ < kMaxStreams && rows > 0 && row_bytes > 0) {
      streams_[n_++] = {static_cast<const char*>(base), stride_bytes, rows, ceil_div(row_bytes, 64)};
      left_ += rows * streams_[n_ - 1].lines;
    }
  }
  int64_t lines_left() const {
    return left_;
  }
  // Prefetches the next `count` cache lines (into L2).
  void issue(int64_t count) {
    for (; count > 0 && cur_ < n_; --count) {
      const Stream& st = streams_[cur_];
#if defined(__GNUC__)
      __builtin_prefetch(st.base + row_ * st.stride + line_ * 64, 0, 2);
#endif
      --left_;
      if (++line_ == st.lines) {
        line_ = 0;
        if (++row_ == st.rows) {
          row_ = 0;
          ++cur_;
        }
      }
    }
  }

 private:
  struct Stream {
    const char* base;
    int64_t stride, rows, lines;
  };
  static constexpr int kMaxStreams = 8;
  Stream streams_[kMaxStreams];
  int n_ = 0, cur_ = 0;
  int64_t row_ = 0, line_ = 0, left_ = 0;
};

// ------------------------------------------------------------------------------------------
// Element-wise tile kernels.
//
// grad_tile (backward): P = exp(scale*S - lse), dS = scale * P * (dP - Di) for one key tile in the
// transposed layout [kn][ldq] (ldq a multiple of 16; every column holds finite values, so the
// vector loops run up to the next multiple of 16 past ncol). fp32: P and dS are written in place
// into S and dP. 16-bit: P and dS as row-major A operands (Pa, dSa) and dS again as a VNNI B
// operand (dSv, [(kn+1)/2][ldq][2], zero pad row).

template <typename C>
void grad_tile_base(float* S, float* dP, int64_t ldq, int64_t kn, int64_t ncol, float scale,
                    const float* lse, const float* di, C* Pa, C* dSa, C* dSv, RowPrefetch& pf, int64_t pf_step) {
  constexpr bool vnni = kVnni<C>;
#if CLFAST_PA_AVX2
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

// Forward, row layout: S [nq][lds] holds the raw scores of one key tile (kn keys). Per query row
// i, updates the running max m[i] (scaled domain) and sum l[i], writes alpha[i] = rescale factor
// of the previous state, and writes P = exp(scale*S - m) in place into S (fp32) or into the
// row-major 16-bit P (with a zero at column kn when kn is odd, the GEMM's reduction pad).
template <typename C>
void softmax_rows_base(float* S, int64_t lds, int64_t nq, int64_t kn, float scale, float* m,
                       float* l, float* alpha, C* P, bool first, RowPrefetch& pf, int64_t pf_step) {
  constexpr bool vnni = kVnni<C>;
  for (int64_t i = 0; i < nq; ++i) {
    pf.issue(pf_step);
    float* s = S + i * lds;
    int64_t j = 0;
    float mx = -kInf;
#if CLFAST_PA_AVX2
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
#if CLFAST_PA_AVX2
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
    _mm256_store_ps(lanes, vsum);
    sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
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

#if CLFAST_PA_AVX512
CLFAST_PA_DIAG_PUSH
constexpr float kLog2e = 1.44269504088896341f;

// 2^x for finite x <= 127 (x below -150 gives 0): 2^round(x) * p(x - round(x)), p a
// near-minimax polynomial on [-1/2, 1/2] fitted for this kernel: degree 5 (relative error
// 1.7e-7) for fp32 operands, degree 3 (1.0e-4, far below the 3.9e-3 of a bf16 rounding) when the
// result is rounded to 16 bits.
// Softmax arguments are <= 0 and finite (padding uses kPadLse, not inf), so there is no clamp.
template <bool kPrecise>
CLFAST_PA_AVX512_TARGET inline __m512 exp2_16(__m512 x) {
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
CLFAST_PA_AVX512_TARGET inline __m512i cvt32_bf16(__m512 a, __m512 b) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
}

// Index that interleaves the two halves of a 32 x 16-bit vector: out[2k] = in[k], out[2k+1] = in[16+k].
CLFAST_PA_AVX512_TARGET inline __m512i interleave_halves_idx() {
  alignas(64) static const uint16_t idx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(idx);
}

template <typename C>
CLFAST_PA_AVX512_TARGET void grad_tile_avx512(float* S, float* dP, int64_t ldq, int64_t kn,
                                              int64_t ncol, float scale, const float* lse,
                                              const float* di, C* Pa, C* dSa, C* dSv, RowPrefetch& pf, int64_t pf_step) {
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
CLFAST_PA_AVX512_TARGET inline __m512 extreme16(__m512 a, __m512 b) {
  return kMax ? _mm512_max_ps(a, b) : _mm512_min_ps(a, b);
}

// R rows at once (independent dependency chains): the row maxima first, then the exponentials.
// kPos: scale >= 0, so max_j scale*S[j] = scale * max_j S[j] (else scale * min_j S[j]).
template <typename C, int R, bool kPos>
CLFAST_PA_AVX512_TARGET inline void softmax_group_avx512(float* S, int64_t lds, int64_t kn,
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
CLFAST_PA_AVX512_TARGET void softmax_rows_avx512(float* S, int64_t lds, int64_t nq, int64_t kn,
                                                 float scale, float* m, float* l, float* alpha,
                                                 C* P, bool first, RowPrefetch& pf, int64_t pf_step) {
  constexpr int R = 4;
  C* p0 = kVnni<C> ? P : nullptr;
  auto group = [&](int64_t i, auto rows) {
    constexpr int n = decltype(rows)::value;
    C* pr = p0 != nullptr ? p0 + i * lds : nullptr;
    if (scale >= 0.f) {
      softmax_group_avx512<C, n, true>(S + i * lds, lds, kn, scale, m + i, l + i, alpha + i, pr, first);
    } else {
      softmax_group_avx512<C, n, false>(S + i * lds, lds, kn, scale, m + i, l + i, alpha + i, pr, first);
    }
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

// fp32 -> T row conversion and transposed write-back (see store_row / store_transposed).
template <typename T>
CLFAST_PA_AVX512_TARGET inline void store16(T* dst, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(dst, v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

template <typename T>
CLFAST_PA_AVX512_TARGET void store_row_avx512(const float* src, int64_t n, float mul, T* dst) {
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
CLFAST_PA_AVX512_TARGET inline void load_transposed8(const float* src, int64_t ld, int64_t c,
                                                     int64_t i, __m256 v[8]) {
  for (int k = 0; k < 8; ++k) {
    v[k] = _mm256_loadu_ps(src + (c + k) * ld + i);
  }
  transpose8x8(v);
}

template <typename T>
CLFAST_PA_AVX512_TARGET void store_transposed_avx512(const float* src, int64_t ld, int64_t n,
                                                     int64_t d, const float* scale, T* out) {
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
CLFAST_PA_AVX512_TARGET inline float dot_row_bf16_avx512(const at::BFloat16* a, const at::BFloat16* b,
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
CLFAST_PA_DIAG_POP
#endif

// AVX-512 versions exist for fp32 and bf16 operands.
template <typename C>
constexpr bool kHasAvx512Tile = std::is_same_v<C, float> || std::is_same_v<C, at::BFloat16>;

// Orders the streaming stores of this thread before the end of its parallel chunk.
inline void store_fence() {
#if CLFAST_PA_AVX512
  if (use_avx512()) {
    _mm_sfence();
  }
#endif
}

template <typename T>
void store_row(const float* src, int64_t n, T* dst, float mul = 1.f) {
#if CLFAST_PA_AVX512
  if constexpr (kHasAvx512Tile<T>) {
    if (use_avx512()) {
      store_row_avx512<T>(src, n, mul, dst);
      return;
    }
  }
#endif
  store_row_base<T>(src, n, mul, dst);
}

template <typename T>
void store_transposed(const float* src, int64_t ld, int64_t n, int64_t d, const float* scale, T* out) {
#if CLFAST_PA_AVX512
  if constexpr (kHasAvx512Tile<T>) {
    if (use_avx512()) {
      store_transposed_avx512<T>(src, ld, n, d, scale, out);
      return;
    }
  }
#endif
  store_transposed_base<T>(src, ld, n, d, scale, out);
}

template <typename T>
float dot_row_fast(const T* a, const T* b, int64_t d) {
#if CLFAST_PA_AVX512
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (d % 32 == 0 && use_avx512()) {
      return dot_row_bf16_avx512(a, b, d);
    }
  }
#endif
  return dot_row<T>(a, b, d);
}

template <typename C>
void softmax_rows(float* S, int64_t lds, int64_t nq, int64_t kn, float scale, float* m, float* l,
                  float* alpha, C* P, bool first, RowPrefetch& pf, int64_t pf_step) {
#if CLFAST_PA_AVX512
  if constexpr (kHasAvx512Tile<C>) {
    if (use_avx512()) {
      softmax_rows_avx512<C>(S, lds, nq, kn, scale, m, l, alpha, P, first, pf, pf_step);
      return;
    }
  }
#endif
  softmax_rows_base<C>(S, lds, nq, kn, scale, m, l, alpha, P, first, pf, pf_step);
}

template <typename C>
void grad_tile(float* S, float* dP, int64_t ldq, int64_t kn, int64_t ncol, float scale,
               const float* lse, const float* di, C* Pa, C* dSa, C* dSv, RowPrefetch& pf, int64_t pf_step) {
#if CLFAST_PA_AVX512
  if constexpr (kHasAvx512Tile<C>) {
    if (use_avx512()) {
      grad_tile_avx512<C>(S, dP, ldq, kn, ncol, scale, lse, di, Pa, dSa, dSv, pf, pf_step);
      return;
    }
  }
#endif
  grad_tile_base<C>(S, dP, ldq, kn, ncol, scale, lse, di, Pa, dSa, dSv, pf, pf_step);
}

// ------------------------------------------------------------------------------------------
// Input views and packing.

// Rows of a (B,H,N,d) or shared (H,N,d) tensor whose last dimension is contiguous.
template <typename T>
struct RowView {
  const T* data = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;
  const T* rows(int64_t b, int64_t h) const {
    return data + b * sb + h * sh;
  }
};

template <typename T>
RowView<T> row_view(const at::Tensor& t) {
  RowView<T> v;
  v.data = t.data_ptr<T>();
  if (t.dim() == 4) {
    v.sb = t.stride(0);
    v.sh = t.stride(1);
    v.sn = t.stride(2);
  } else {  // shared prefix (H,P,d): same rows for every sample
    v.sh = t.stride(0);
    v.sn = t.stride(1);
  }
  return v;
}

// Key j of the virtual sequence [prefix ; attended keys] of one (b,h).
template <typename T>
struct KeyRows {
  using value_type = T;
  const T* pre = nullptr;
  int64_t pre_sn = 0;
  const T* seq = nullptr;
  int64_t seq_sn = 0;
  const int64_t* idx = nullptr;  // attended positions, or nullptr when every key is attended
  int64_t P = 0;
  const T* row(int64_t j) const {
    if (j < P) {
      return pre + j * pre_sn;
    }
    const int64_t n = j - P;
    return seq + (idx != nullptr ? idx[n] : n) * seq_sn;
  }
  const T* operator()(int64_t j) const {
    return row(j);
  }
};

// Rows at a fixed stride.
template <typename T>
struct StridedRows {
  using value_type = T;
  const T* base;
  int64_t sn;
  const T* operator()(int64_t i) const {
    return base + i * sn;
  }
};

template <typename T>
void prefetch_keys(RowPrefetch& pf, const KeyRows<T>& src, int64_t L, int64_t d) {
  if (src.P > 0) {
    pf.add(src.pre, src.pre_sn * sizeof(T), std::min(src.P, L), d * sizeof(T));
  }
  if (src.idx == nullptr && L > src.P) {  // masked (gathered) keys are left to the hardware
    pf.add(src.seq, src.seq_sn * sizeof(T), L - src.P, d * sizeof(T));
  }
}

template <typename C>
using Bits = std::conditional_t<sizeof(C) == 4, uint32_t, uint16_t>;

#if CLFAST_PA_AVX512
CLFAST_PA_DIAG_PUSH
// In-register transpose of a 16 x 16 matrix of 32-bit words: r[k] = row k on entry, column k on exit.
CLFAST_PA_AVX512_TARGET inline void transpose16x16_epi32(__m512i r[16]) {
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
// 32-bit words are the VNNI feature pairs of 16-bit rows. Needs round_up(ncol, 16) <= ld.
template <typename RowFn>
CLFAST_PA_AVX512_TARGET void transpose_words_avx512(const RowFn& src, int64_t n, int64_t ncol,
                                                    int64_t words, uint32_t* dst, int64_t ld) {
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

// VNNI pairs of 16-bit rows: dst[i/2][c][i%2] = src(i)[c] for i < nrow (zero rows for i >= n).
template <typename C, typename RowFn>
CLFAST_PA_AVX512_TARGET void interleave_rows_avx512(const RowFn& src, int64_t n, int64_t nrow, int64_t d,
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
CLFAST_PA_DIAG_POP
#endif

// A operand with keys as rows: dst[j][c] for j < L, c < dp (zero for c >= d).
template <typename C, typename RowFn>
void pack_rows(const RowFn& src, int64_t L, int64_t d, int64_t dp, C* dst) {
  using T = typename RowFn::value_type;
  for (int64_t j = 0; j < L; ++j) {
    const T* s = src(j);
    C* o = dst + j * dp;
    if constexpr (std::is_same_v<T, C>) {
      std::memcpy(o, s, d * sizeof(C));
    } else {
      for (int64_t c = 0; c < d; ++c) {
        o[c] = C(static_cast<float>(s[c]));
      }
    }
    for (int64_t c = d; c < dp; ++c) {
      o[c] = C(0.f);
    }
  }
}

// A operand with keys as columns: dst[c][j] for c < d, j < L; column L zeroed when L is odd
// (the 16-bit GEMMs reduce over an even number of keys).
template <typename C, typename T>
void pack_cols(const KeyRows<T>& src, int64_t L, int64_t d, int64_t ld, C* dst) {
  if constexpr (std::is_same_v<T, C>) {
    transpose_rows(src, L, d, reinterpret_cast<Bits<C>*>(dst), ld);
  } else {
    for (int64_t j = 0; j < L; ++j) {
      const T* s = src.row(j);
      for (int64_t c = 0; c < d; ++c) {
        dst[c * ld + j] = C(static_cast<float>(s[c]));
      }
    }
  }
  if (L % 2 == 1 && L < ld) {
    for (int64_t c = 0; c < d; ++c) {
      dst[c * ld + L] = C(0.f);
    }
  }
}

// B operand [dp x ncol] whose reduction dimension is the feature: element (c, i) = src(i)[c].
// Columns i in [n, ncol) and features c in [d, dp) are zero.
template <typename C, typename RowFn>
void pack_b_features(const RowFn& src, int64_t n, int64_t ncol, int64_t d, int64_t dp, int64_t ld,
                     C* dst) {
  using T = typename RowFn::value_type;
  constexpr bool vnni = kVnni<C>;
  if constexpr (std::is_same_v<T, C>) {
    if (!vnni || d % 2 == 0) {
      // fp32: a plain transpose; 16-bit VNNI: a transpose of 32-bit feature pairs.
      const int64_t words = vnni ? d / 2 : d;
#if CLFAST_PA_AVX512
      if (use_avx512() && round_up(ncol, 16) <= ld) {
        transpose_words_avx512(src, n, ncol, words, reinterpret_cast<uint32_t*>(dst), ld);
        return;
      }
#endif
      transpose_rows(src, n, words, reinterpret_cast<uint32_t*>(dst), ld);
      for (int64_t w = 0; w < words; ++w) {
        std::memset(reinterpret_cast<uint32_t*>(dst) + w * ld + n, 0, (ncol - n) * sizeof(uint32_t));
      }
      return;
    }
  }
  for (int64_t i = 0; i < ncol; ++i) {
    const T* s = i < n ? src(i) : nullptr;
    for (int64_t c = 0; c < dp; ++c) {
      const C x = (i < n && c < d) ? C(static_cast<float>(s[c])) : C(0.f);
      dst[vnni ? (c / 2) * ld * 2 + i * 2 + (c % 2) : c * ld + i] = x;
    }
  }
}

// B operand [nrow x d] whose reduction dimension is the row index: element (i, c) = src(i)[c];
// rows i in [n, nrow) are zero.
template <typename C, typename RowFn>
void pack_b_rows(const RowFn& src, int64_t n, int64_t nrow, int64_t d, C* dst) {
  using T = typename RowFn::value_type;
  constexpr bool vnni = kVnni<C>;
  if constexpr (std::is_same_v<T, C>) {
    if constexpr (!vnni) {
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(dst + i * d, src(i), d * sizeof(C));
      }
      std::memset(dst + n * d, 0, (nrow - n) * d * sizeof(C));
      return;
    } else {
#if CLFAST_PA_AVX512
      if (use_avx512()) {
        interleave_rows_avx512<C>(src, n, nrow, d, dst);
        return;
      }
#endif
#if CLFAST_PA_AVX2
      // Interleave pairs of rows: dst[i/2][c][i%2].
      static const C zeros[8] = {};
      for (int64_t i = 0; i < nrow; i += 2) {
        const C* a = src(i);
        const C* b = i + 1 < n ? src(i + 1) : nullptr;
        C* o = dst + i * d;
        int64_t c = 0;
        for (; c + 8 <= d; c += 8) {
          const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + c));
          const __m128i y = b != nullptr ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + c))
                                         : _mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * c), _mm_unpacklo_epi16(x, y));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * c + 8), _mm_unpackhi_epi16(x, y));
        }
        for (; c < d; ++c) {
          o[2 * c] = a[c];
          o[2 * c + 1] = b != nullptr ? b[c] : C(0.f);
        }
      }
      return;
#endif
    }
  }
  for (int64_t i = 0; i < nrow; ++i) {
    const T* s = i < n ? src(i) : nullptr;
    for (int64_t c = 0; c < d; ++c) {
      const C x = i < n ? C(static_cast<float>(s[c])) : C(0.f);
      dst[vnni ? (i / 2) * d * 2 + c * 2 + (i % 2) : i * d + c] = x;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Argument checking.

struct Problem {
  int64_t B = 0, H = 0, Nq = 0, Nk = 0, P = 0, d = 0;
  bool has_prefix = false, shared_prefix = false, has_mask = false;
  at::Tensor q, k, v, pk, pv, mask;
  // Attended sequence positions per sample (empty when there is no mask) and their counts.
  std::vector<int64_t> idx, count;
  int64_t max_keys = 0;  // max over samples of P + attended keys
};

// Makes the last dimension contiguous (other strides are handled by the kernels).
at::Tensor inner_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

void check_float_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), "prefix_attention: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "prefix_attention: ", name,
              " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& prefix_k,
                     const std::optional<at::Tensor>& prefix_v,
                     const std::optional<at::Tensor>& kv_mask, double scale) {
  TORCH_CHECK(q.dim() == 4, "prefix_attention: q must have shape (B,H,Nq,d), got ", q.sizes());
  TORCH_CHECK(q.device().is_cpu(), "prefix_attention: q must be a CPU tensor, got ", q.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "prefix_attention: q must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(std::isfinite(scale), "prefix_attention: scale must be finite, got ", scale);
  Problem p;
  p.B = q.size(0);
  p.H = q.size(1);
  p.Nq = q.size(2);
  p.d = q.size(3);
  TORCH_CHECK(p.d > 0, "prefix_attention: q must have a head dimension d > 0, got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == p.B && k.size(1) == p.H && k.size(3) == p.d,
              "prefix_attention: k must have shape (B,H,Nk,d) = (", p.B, ",", p.H, ",Nk,", p.d,
              "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "prefix_attention: v must have the shape of k ", k.sizes(),
              ", got ", v.sizes());
  check_float_tensor(k, "k", q);
  check_float_tensor(v, "v", q);
  p.Nk = k.size(2);
  TORCH_CHECK(prefix_k.has_value() == prefix_v.has_value(),
              "prefix_attention: prefix_k and prefix_v must be given together");
  if (prefix_k.has_value()) {
    const at::Tensor& a = *prefix_k;
    const at::Tensor& b = *prefix_v;
    const bool per_sample = a.dim() == 4 && a.size(0) == p.B && a.size(1) == p.H && a.size(3) == p.d;
    const bool shared = a.dim() == 3 && a.size(0) == p.H && a.size(2) == p.d;
    TORCH_CHECK(per_sample || shared, "prefix_attention: prefix_k must have shape (B,H,P,d) = (",
                p.B, ",", p.H, ",P,", p.d, ") or (H,P,d) = (", p.H, ",P,", p.d, "), got ",
                a.sizes());
    TORCH_CHECK(b.sizes() == a.sizes(), "prefix_attention: prefix_v must have the shape of prefix_k ",
                a.sizes(), ", got ", b.sizes());
    check_float_tensor(a, "prefix_k", q);
    check_float_tensor(b, "prefix_v", q);
    p.has_prefix = true;
    p.shared_prefix = shared;
    p.P = a.size(-2);
    p.pk = inner_contiguous(a);
    p.pv = inner_contiguous(b);
  }
  p.q = inner_contiguous(q);
  p.k = inner_contiguous(k);
  p.v = inner_contiguous(v);
  if (kv_mask.has_value()) {
    const at::Tensor& m = *kv_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "prefix_attention: kv_mask must be a bool tensor, got ",
                m.scalar_type());
    TORCH_CHECK(m.device().is_cpu(), "prefix_attention: kv_mask must be a CPU tensor, got ",
                m.device());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == p.B && m.size(1) == p.Nk,
                "prefix_attention: kv_mask must have shape (B,Nk) = (", p.B, ",", p.Nk, "), got ",
                m.sizes());
    p.has_mask = true;
    p.mask = m.contiguous();
    const bool* mp = p.mask.data_ptr<bool>();
    p.idx.resize(p.B * p.Nk);
    p.count.assign(p.B, 0);
    for (int64_t b = 0; b < p.B; ++b) {
      int64_t n = 0;
      for (int64_t j = 0; j < p.Nk; ++j) {
        if (mp[b * p.Nk + j]) {
          p.idx[b * p.Nk + n++] = j;
        }
      }
      p.count[b] = n;
    }
  } else {
    p.count.assign(p.B, p.Nk);
  }
  p.max_keys = p.P;
  for (int64_t b = 0; b < p.B; ++b) {
    p.max_keys = std::max(p.max_keys, p.P + p.count[b]);
  }
  return p;
}

template <typename T>
KeyRows<T> key_rows(const Problem& p, const RowView<T>& pre, const RowView<T>& seq, int64_t b,
                    int64_t h) {
  KeyRows<T> r;
  if (p.has_prefix) {
    r.pre = pre.rows(b, h);
    r.pre_sn = pre.sn;
  }
  r.seq = seq.rows(b, h);
  r.seq_sn = seq.sn;
  r.idx = p.has_mask ? p.idx.data() + b * p.Nk : nullptr;
  r.P = p.P;
  return r;
}

// Per-thread scratch memory, kept from call to call: no allocation, page faults or zeroing per
// call (every kernel writes what it reads; see the backward for the one padding it zeroes).
// A buffer is reallocated when too small, or when far larger than needed (a big call's memory
// is not kept forever).
constexpr int kScratchSlots = 8;

void* scratch_bytes(int slot, int64_t bytes) {
  struct Buffer {
    void* data = nullptr;
    int64_t capacity = 0;
    ~Buffer() {
      std::free(data);
    }
  };
  thread_local Buffer buffers[kScratchSlots];
  Buffer& b = buffers[slot];
  bytes = round_up(std::max<int64_t>(bytes, 1), 64);
  if (b.capacity < bytes || b.capacity > 4 * bytes + (int64_t{1} << 22)) {
    std::free(b.data);
    b.data = std::aligned_alloc(64, bytes);
    b.capacity = b.data != nullptr ? bytes : 0;
    TORCH_CHECK(b.data != nullptr, "prefix_attention: out of memory (", bytes, " bytes of scratch)");
  }
  return b.data;
}

template <typename C>
C* scratch(int slot, int64_t n) {
  return static_cast<C*>(scratch_bytes(slot, n * static_cast<int64_t>(sizeof(C))));
}

// ------------------------------------------------------------------------------------------
// Forward.

template <typename T, typename C>
void forward_impl(const Problem& p, float scale, at::Tensor& out, at::Tensor& lse) {
  // Row layout: S = q K^T (queries x keys), out (+)= P V.
  constexpr bool vnni = kVnni<C>;
  const int64_t B = p.B, H = p.H, Nq = p.Nq, d = p.d, P = p.P;
  const int64_t dp = vnni ? round_up(d, 2) : d;
  const int64_t BQ = balanced_block(Nq, kMaxBlockQ, 16);
  const int64_t nqb = ceil_div(Nq, BQ);
  const int64_t Lmax = p.max_keys;
  const int64_t ldk = round_up(std::max<int64_t>(Lmax, 1), 16);
  const int64_t BK = balanced_block(Lmax, kMaxBlockK, 2);
  const int64_t lds = round_up(BK, 16);
  // q is used in place as the A operand when it already has the operand's type and layout.
  constexpr bool kSameType = std::is_same_v<T, C>;
  const bool q_direct = kSameType && dp == d && p.q.stride(2) >= d;

  const RowView<T> qv = row_view<T>(p.q), kv = row_view<T>(p.k), vv = row_view<T>(p.v);
  RowView<T> pkv, pvv;
  if (p.has_prefix) {
    pkv = row_view<T>(p.pk);
    pvv = row_view<T>(p.pv);
  }
  T* out_p = out.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();

  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    C* Kt = scratch<C>(0, dp * ldk + round_up(Lmax, 2) * d);  // K^T: B operand [dp x keys]
    C* Vb = Kt + dp * ldk;                                     // V: B operand [keys x d]
    C* Qa = q_direct ? nullptr : scratch<C>(1, BQ * dp);
    C* Pm = vnni ? scratch<C>(2, BQ * lds) : nullptr;
    float* S = scratch<float>(3, BQ * lds + BQ * d + 3 * BQ);
    float* O = S + BQ * lds;
    float* m = O + BQ * d;
    float* l = m + BQ;
    float* alpha = l + BQ;
    int64_t packed_bh = -1;

    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nqb, qb = item % nqb;
      const int64_t b = bh / H, h = bh % H;
      const int64_t q0 = qb * BQ, nq = std::min(BQ, Nq - q0);
      const int64_t L = P + p.count[b];
      T* out_rows = out_p + (bh * Nq + q0) * d;
      float* lse_rows = lse_p + bh * Nq + q0;
      if (L == 0) {  // nothing to attend to
        std::fill_n(out_rows, nq * d, T(0.f));
        std::fill_n(lse_rows, nq, -kInf);
        continue;
      }
      if (packed_bh != bh) {
        pack_b_features<C>(key_rows(p, pkv, kv, b, h), L, L, d, dp, ldk, Kt);
        pack_b_rows<C>(key_rows(p, pvv, vv, b, h), L, round_up(L, 2), d, Vb);
        packed_bh = bh;
      }
      RowPrefetch pf;
      if (item + 1 < end) {
        const int64_t nbh = (item + 1) / nqb, nq0 = ((item + 1) % nqb) * BQ;
        const int64_t nb = nbh / H, nh = nbh % H;
        const int64_t nL = P + p.count[nb];
        if (nbh != bh) {
          prefetch_keys(pf, key_rows(p, pkv, kv, nb, nh), nL, d);
          prefetch_keys(pf, key_rows(p, pvv, vv, nb, nh), nL, d);
        }
        pf.add(qv.rows(nb, nh) + nq0 * qv.sn, qv.sn * sizeof(T), std::min(BQ, Nq - nq0), d * sizeof(T));
      }
      const StridedRows<T> q_src{qv.rows(b, h) + q0 * qv.sn, qv.sn};
      const C* A = nullptr;
      int64_t lda = dp;
      if constexpr (kSameType) {
        if (q_direct) {
          A = q_src.base;
          lda = qv.sn;
        }
      }
      if (A == nullptr) {
        pack_rows<C>(q_src, nq, d, dp, Qa);
        A = Qa;
      }

      const int64_t ntiles = ceil_div(L, BK);
      const int64_t pf_step = ceil_div(pf.lines_left(), ntiles * nq);
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t k0 = t * BK, kn = std::min(BK, L - k0);
        const bool first = t == 0;
        gemm<C>(nq, kn, dp, A, lda, Kt + (vnni ? 2 * k0 : k0), ldk, S, lds, false);
        softmax_rows<C>(S, lds, nq, kn, scale, m, l, alpha, Pm, first, pf, pf_step);
        if (!first) {
          for (int64_t i = 0; i < nq; ++i) {
            float* o = O + i * d;
            for (int64_t c = 0; c < d; ++c) {
              o[c] *= alpha[i];
            }
          }
        }
        const int64_t kk = vnni ? round_up(kn, 2) : kn;
        gemm<C>(nq, d, kk, vnni ? Pm : reinterpret_cast<C*>(S), lds, Vb + k0 * d, d, O, d, !first);
      }
      for (int64_t i = 0; i < nq; ++i) {
        lse_rows[i] = finalize_lse(m[i], l[i]);
        store_row<T>(O + i * d, d, out_rows + i * d, l[i] > 0.f ? 1.f / l[i] : 0.f);
      }
    }
    gemm_release<C>();
    store_fence();
  });
}

// ------------------------------------------------------------------------------------------
// Backward.

template <typename T, typename C>
void backward_impl(const Problem& p, const at::Tensor& dout_in, const at::Tensor& out_in,
                   const at::Tensor& lse_in, float scale, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, at::Tensor& dpk, at::Tensor& dpv) {
  constexpr bool vnni = !std::is_same_v<C, float>;
  const int64_t B = p.B, H = p.H, Nq = p.Nq, Nk = p.Nk, d = p.d, P = p.P;
  const int64_t dp = vnni ? round_up(d, 2) : d;
  const int64_t BQ = balanced_block(Nq, kMaxBlockQ, 16);
  const int64_t ldq = BQ;
  const int64_t nqb = ceil_div(Nq, BQ);
  const int64_t Lmax = p.max_keys;
  const int64_t ldk = round_up(std::max<int64_t>(Lmax, 1), 16);
  const int64_t BK = balanced_block(Lmax, kMaxBlockK, 2);
  const int64_t BH = B * H;
  // Split query blocks into G groups per (b,h) when there are fewer (b,h) than threads; the groups'
  // key/value gradients are then reduced after the parallel loop.
  const int64_t threads = at::get_num_threads();
  const int64_t G = BH >= threads ? 1 : std::min(nqb, ceil_div(threads, std::max<int64_t>(BH, 1)));

  const RowView<T> qv = row_view<T>(p.q), kv = row_view<T>(p.k), vv = row_view<T>(p.v);
  const RowView<T> gv = row_view<T>(dout_in), ov = row_view<T>(out_in);
  RowView<T> pkv, pvv;
  if (p.has_prefix) {
    pkv = row_view<T>(p.pk);
    pvv = row_view<T>(p.pv);
  }
  const float* lse_p = lse_in.data_ptr<float>();
  T* dq_p = dq.data_ptr<T>();
  T* dk_p = dk.data_ptr<T>();
  T* dv_p = dv.data_ptr<T>();
  // A shared prefix collects per-sample fp32 gradients that are summed over the batch afterwards.
  at::Tensor dpre_acc;
  if (p.has_prefix && p.shared_prefix) {
    dpre_acc = at::empty({2, B, H, P, d}, at::TensorOptions().dtype(at::kFloat));
  }
  at::Tensor partial;
  if (G > 1) {
    partial = at::empty({BH, G, 2, std::max<int64_t>(Lmax, 1), d}, at::TensorOptions().dtype(at::kFloat));
  }

  // Writes the key/value gradients of one (b,h) from fp32 accumulators [L][d].
  auto emit = [&](int64_t b, int64_t h, const float* gk, const float* gv_acc) {
    const int64_t L = P + p.count[b];
    const int64_t bh = b * H + h;
    for (int64_t j = 0; j < L; ++j) {
      const float* rk = gk + j * d;
      const float* rv = gv_acc + j * d;
      if (j < P) {
        if (p.shared_prefix) {
          float* ok = dpre_acc.data_ptr<float>() + ((bh * P) + j) * d;
          float* ov_ = ok + BH * P * d;
          std::copy_n(rk, d, ok);
          std::copy_n(rv, d, ov_);
        } else {
          store_row<T>(rk, d, dpk.data_ptr<T>() + (bh * P + j) * d);
          store_row<T>(rv, d, dpv.data_ptr<T>() + (bh * P + j) * d);
        }
      } else {
        const int64_t n = p.has_mask ? p.idx[b * Nk + (j - P)] : j - P;
        store_row<T>(rk, d, dk_p + (bh * Nk + n) * d);
        store_row<T>(rv, d, dv_p + (bh * Nk + n) * d);
      }
    }
  };

  // Without a mask, keys/values of the input type are used in place as the A operands of S^T and
  // dP^T (two GEMMs per tile when a tile spans the prefix and the sequence).
  const bool keys_direct = std::is_same_v<T, C> && dp == d && !p.has_mask;
  auto gemm_keys = [&](const KeyRows<T>& src, const C* packed, int64_t k0, int64_t kn, int64_t ncol,
                       const C* Bm, float* Cm) {
    if constexpr (std::is_same_v<T, C>) {
      if (keys_direct) {
        const int64_t k1 = k0 + kn;
        if (k0 < P) {
          const int64_t e = std::min(k1, P);
          gemm<C>(e - k0, ncol, dp, src.pre + k0 * src.pre_sn, src.pre_sn, Bm, ldq, Cm, ldq, false);
        }
        if (k1 > P) {
          const int64_t s0 = std::max(k0, P);
          gemm<C>(k1 - s0, ncol, dp, src.seq + (s0 - P) * src.seq_sn, src.seq_sn, Bm, ldq,
                  Cm + (s0 - k0) * ldq, ldq, false);
        }
        return;
      }
    }
    gemm<C>(kn, ncol, dp, packed + k0 * dp, dp, Bm, ldq, Cm, ldq, false);
  };
  at::parallel_for(0, BH * G, 1, [&](int64_t begin, int64_t end) {
    C* Ka = keys_direct ? nullptr : scratch<C>(0, 2 * Lmax * dp);
    C* Va = keys_direct ? nullptr : Ka + Lmax * dp;
    C* Kt = scratch<C>(1, d * ldk);
    C* Qt = scratch<C>(2, 2 * dp * ldq + 2 * BQ * d);
    C* dOt = Qt + dp * ldq;
    C* Qr = dOt + dp * ldq;
    C* dOr = Qr + BQ * d;
    float* S = scratch<float>(3, 2 * BK * ldq);
    float* dP = S + BK * ldq;
    // The GEMMs write the first nqk <= ldq columns of S and dP; the element-wise code reads whole
    // vectors, up to ldq: the rest must hold finite values.
    {
      const int64_t last_nq = Nq - (nqb - 1) * BQ;  // the smallest query block
      const int64_t c0 = vnni ? round_up(last_nq, 2) : last_nq;
      for (int64_t j = 0; j < 2 * BK; ++j) {
        std::fill(S + j * ldq + c0, S + (j + 1) * ldq, 0.f);
      }
    }
    C* Pa = vnni ? scratch<C>(4, 3 * BK * ldq) : nullptr;
    C* dSa = vnni ? Pa + BK * ldq : nullptr;
    C* dSv = vnni ? dSa + BK * ldq : nullptr;
    float* dQt = scratch<float>(5, d * ldq + 2 * ldq);
    float* lse_b = dQt + d * ldq;
    float* di = lse_b + ldq;
    float* acc = G > 1 ? nullptr : scratch<float>(6, 2 * Lmax * d);

    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / G, g = item % G;
      const int64_t b = bh / H, h = bh % H;
      const int64_t L = P + p.count[b];
      const int64_t qb_begin = g * nqb / G, qb_end = (g + 1) * nqb / G;
      float* dK_acc = G > 1 ? partial.data_ptr<float>() + (bh * G + g) * 2 * std::max<int64_t>(Lmax, 1) * d
                            : acc;
      float* dV_acc = dK_acc + (G > 1 ? std::max<int64_t>(Lmax, 1) : Lmax) * d;
      if (L == 0) {  // nothing attended: zero gradients (dk, dv were zero-initialised)
        for (int64_t qb = qb_begin; qb < qb_end; ++qb) {
          const int64_t q0 = qb * BQ, nq = std::min(BQ, Nq - q0);
          std::fill_n(dq_p + (bh * Nq + q0) * d, nq * d, T(0.f));
        }
        continue;
      }
      const KeyRows<T> keys = key_rows(p, pkv, kv, b, h);
      const KeyRows<T> vals = key_rows(p, pvv, vv, b, h);
      if (!keys_direct) {
        pack_rows<C>(keys, L, d, dp, Ka);
        pack_rows<C>(vals, L, d, dp, Va);
      }
      pack_cols<C>(keys, L, d, ldk, Kt);
      const int64_t ntiles = ceil_div(L, BK);
      RowPrefetch pf;
      if (item + 1 < end) {
        const int64_t nbh = (item + 1) / G, ng = (item + 1) % G;
        const int64_t nb = nbh / H, nh = nbh % H;
        const int64_t nL = P + p.count[nb];
        const int64_t nq0 = (ng * nqb / G) * BQ, nnq = std::min(BQ, Nq - nq0);
        if (nbh != bh) {
          prefetch_keys(pf, key_rows(p, pkv, kv, nb, nh), nL, d);
          prefetch_keys(pf, key_rows(p, pvv, vv, nb, nh), nL, d);
        }
        pf.add(qv.rows(nb, nh) + nq0 * qv.sn, qv.sn * sizeof(T), nnq, d * sizeof(T));
        pf.add(gv.rows(nb, nh) + nq0 * gv.sn, gv.sn * sizeof(T), nnq, d * sizeof(T));
        pf.add(ov.rows(nb, nh) + nq0 * ov.sn, ov.sn * sizeof(T), nnq, d * sizeof(T));
      }
      const int64_t pf_step = ceil_div(pf.lines_left(), ceil_div(L, 2) * (qb_end - qb_begin));

      for (int64_t qb = qb_begin; qb < qb_end; ++qb) {
        const int64_t q0 = qb * BQ, nq = std::min(BQ, Nq - q0);
        const int64_t nqk = vnni ? round_up(nq, 2) : nq;  // queries incl. the zero pad (16-bit)
        const bool first_q = qb == qb_begin;
        const T* q_rows = qv.rows(b, h) + q0 * qv.sn;
        const T* g_rows = gv.rows(b, h) + q0 * gv.sn;
        const T* o_rows = ov.rows(b, h) + q0 * ov.sn;
        const StridedRows<T> q_src{q_rows, qv.sn}, g_src{g_rows, gv.sn};
        pack_b_features<C>(q_src, nq, nqk, d, dp, ldq, Qt);
        pack_b_features<C>(g_src, nq, nqk, d, dp, ldq, dOt);
        pack_b_rows<C>(q_src, nq, nqk, d, Qr);
        pack_b_rows<C>(g_src, nq, nqk, d, dOr);
        const float* lse_rows = lse_p + bh * Nq + q0;
        for (int64_t i = 0; i < ldq; ++i) {
          if (i < nq) {
            lse_b[i] = lse_rows[i];
            di[i] = dot_row_fast<T>(g_rows + i * gv.sn, o_rows + i * ov.sn, d);
          } else {  // padding queries: P = 0, dS = 0
            lse_b[i] = kPadLse;
            di[i] = 0.f;
          }
        }

        for (int64_t t = 0; t < ntiles; ++t) {
          const int64_t k0 = t * BK, kn = std::min(BK, L - k0);
          const int64_t knk = vnni ? round_up(kn, 2) : kn;
          gemm_keys(keys, Ka, k0, kn, nqk, Qt, S);
          gemm_keys(vals, Va, k0, kn, nqk, dOt, dP);
          grad_tile<C>(S, dP, ldq, kn, nqk, scale, lse_b, di, Pa, dSa, dSv, pf, pf_step);
          const C* Pm = vnni ? Pa : reinterpret_cast<const C*>(S);
          const C* dSm = vnni ? dSa : reinterpret_cast<const C*>(dP);
          const C* dSb = vnni ? dSv : reinterpret_cast<const C*>(dP);
          gemm<C>(kn, d, nqk, Pm, ldq, dOr, d, dV_acc + k0 * d, d, !first_q);
          gemm<C>(kn, d, nqk, dSm, ldq, Qr, d, dK_acc + k0 * d, d, !first_q);
          gemm<C>(d, nqk, knk, Kt + k0, ldk, dSb, ldq, dQt, ldq, t > 0);
        }
        store_transposed<T>(dQt, ldq, nq, d, nullptr, dq_p + (bh * Nq + q0) * d);
      }
      if (G == 1) {
        emit(b, h, dK_acc, dV_acc);
      }
    }
    gemm_release<C>();
    store_fence();
  });

  if (G > 1) {
    const int64_t Ls = std::max<int64_t>(Lmax, 1);
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const int64_t L = P + p.count[b];
        float* base = partial.data_ptr<float>() + bh * G * 2 * Ls * d;
        for (int64_t g = 1; g < G; ++g) {
          const float* src = base + g * 2 * Ls * d;
          for (int64_t j = 0; j < L * d; ++j) {
            base[j] += src[j];
            base[Ls * d + j] += src[Ls * d + j];
          }
        }
        if (L > 0) {
          emit(b, h, base, base + Ls * d);
        }
      }
      store_fence();
    });
  }
  if (p.has_prefix && p.shared_prefix) {
    // rows of samples with L == 0 never exist: L >= P > 0 whenever there is a prefix
    at::Tensor summed = dpre_acc.sum(1);  // (2, H, P, d)
    dpk.copy_(summed[0]);
    dpv.copy_(summed[1]);
  }
}

// ------------------------------------------------------------------------------------------
// Ops.

template <typename F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  // f(T{}, C{}) with T the input dtype and C the GEMM operand dtype. The one-time probes run
  // here, outside the parallel regions.
  brgemm_usable<float>();
  use_avx512();
  switch (dt) {
    case at::kFloat:
      f(float{}, float{});
      break;
    case at::kBFloat16:
      if (brgemm_usable<at::BFloat16>()) {
        f(at::BFloat16{}, at::BFloat16{});
      } else {
        f(at::BFloat16{}, float{});
      }
      break;
    case at::kHalf:
      if (brgemm_usable<at::Half>()) {
        f(at::Half{}, at::Half{});
      } else {
        f(at::Half{}, float{});
      }
      break;
    default:
      TORCH_CHECK(false, "prefix_attention: unsupported dtype ", dt);
  }
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
    const std::optional<at::Tensor>& kv_mask, double scale) {
  const Problem p = make_problem(q, k, v, prefix_k, prefix_v, kv_mask, scale);
  at::Tensor out = at::empty({p.B, p.H, p.Nq, p.d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({p.B, p.H, p.Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    return {out, lse};
  }
  dispatch_dtype(q.scalar_type(), [&](auto t, auto c) {
    forward_impl<decltype(t), decltype(c)>(p, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
    const std::optional<at::Tensor>& kv_mask, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  const Problem p = make_problem(q, k, v, prefix_k, prefix_v, kv_mask, scale);
  TORCH_CHECK(dout.sizes() == q.sizes(), "prefix_attention: dout must have the shape of q ",
              q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "prefix_attention: out must have the shape of q ",
              q.sizes(), ", got ", out.sizes());
  check_float_tensor(dout, "dout", q);
  check_float_tensor(out, "out", q);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.H && lse.size(2) == p.Nq,
              "prefix_attention: lse must have shape (B,H,Nq) = (", p.B, ",", p.H, ",", p.Nq,
              "), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "prefix_attention: lse must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.device().is_cpu(), "prefix_attention: lse must be a CPU tensor, got ", lse.device());

  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty({p.B, p.H, p.Nq, p.d}, opts);
  // Masked keys get zero gradients; without a mask every key row is written.
  at::Tensor dk = p.has_mask || p.Nq == 0 ? at::zeros({p.B, p.H, p.Nk, p.d}, opts)
                                          : at::empty({p.B, p.H, p.Nk, p.d}, opts);
  at::Tensor dv = p.has_mask || p.Nq == 0 ? at::zeros({p.B, p.H, p.Nk, p.d}, opts)
                                          : at::empty({p.B, p.H, p.Nk, p.d}, opts);
  at::Tensor dpk, dpv;
  if (p.has_prefix) {
    dpk = p.Nq == 0 ? at::zeros(p.pk.sizes(), opts) : at::empty(p.pk.sizes(), opts);
    dpv = p.Nq == 0 ? at::zeros(p.pv.sizes(), opts) : at::empty(p.pv.sizes(), opts);
  } else {
    dpk = at::empty({0}, q.options());
    dpv = at::empty({0}, q.options());
  }
  if (p.B * p.H == 0 || p.Nq == 0) {
    return {dq, dk, dv, dpk, dpv};
  }
  const at::Tensor g = inner_contiguous(dout);
  const at::Tensor o = inner_contiguous(out);
  const at::Tensor l = lse.contiguous();
  dispatch_dtype(q.scalar_type(), [&](auto t, auto c) {
    backward_impl<decltype(t), decltype(c)>(p, g, o, l, static_cast<float>(scale), dq, dk, dv, dpk,
                                            dpv);
  });
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace
}  // namespace prefix_attention
}  // namespace clfast

TORCH_LIBRARY_FRAGMENT(_clfast_C, m) {
  m.def(
      "prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
      "Tensor? kv_mask, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "prefix_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, "
      "Tensor? prefix_v, Tensor? kv_mask, Tensor out, Tensor lse, float scale) -> "
      "(Tensor dq, Tensor dk, Tensor dv, Tensor dprefix_k, Tensor dprefix_v)");
}

TORCH_LIBRARY_IMPL(_clfast_C, CPU, m) {
  m.impl("prefix_attention_fwd", &clfast::prefix_attention::prefix_attention_fwd);
  m.impl("prefix_attention_bwd", &clfast::prefix_attention::prefix_attention_bwd);
}
