// retrieve on the CPU: the top-k keys of each query by cosine / inner product / negative squared L2,
// without the (B, M) score matrix. Registered by bindings.cpp as retrieve_topk(query (B,D), keys (M,D), k,
// metric) -> (scores (B,k) float32, indices (B,k) int64), each row by (score desc, index asc).
//
// Scan. The keys are cut into tiles. A work item is (key tile, block of queries): the raw dot products of
// the block with the tile go to a per-thread float32 buffer, are finished into scores (cosine: x 1/|q| x
// 1/|key|, the key norms taken from the tile while it is in cache; l2: 2 dot - |key|^2 - |q|^2) and offered
// to that thread's running top-kc list of each row (a sorted array; a chunk of 16 scores whose maximum is
// below the list's last entry is skipped after one vectorised compare, so almost every score costs just
// that). Threads take contiguous ranges of work items (at::parallel_for), so one query over a huge pool is
// scanned by every thread; memory is O(threads x (B kc + rows x tile)), never O(B M).
//
// The dot products of a tile come from one of three paths:
//   kDot     B <= 8 (unit column stride): AVX2 dot products from the key rows as stored, bf16/fp16
//            converted on load; the scan is bound by reading the keys.
//   kBf16Dp  bf16 query and keys where the AVX-512 forms run (cpu::use_avx512(), with AVX512-BF16): the tile
//            is packed in VNNI pairs and multiplied by vdpbf16ps (exact products, float32 sums), about twice
//            the float32 FMA rate.
//   kGemm    otherwise: at::mm on the float32 tile (in place for unit-stride float32 rows, else converted
//            tile by tile), i.e. the BLAS torch was built with.
//
// Re-rank. The scan keeps kc = k + kTieSlack candidates per row; the threads' lists are merged and the
// candidates re-ranked by pair_score, a fixed-order sum over the (query, key) pair alone. A GEMM may round
// two copies of one key differently (edge tiles take other code paths); the re-rank makes exact ties come
// out by index on every path and at any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/check.h"
#include "common/cpu_features.h"
#include "common/parallel.h"
#include "common/simd_avx2.h"
#include "common/static_switch.h"
#include "ops.h"
#include "retrieve/retrieve.h"

namespace clfast::retrieve {
namespace {

constexpr int64_t kRowBlock = 256;            // queries per GEMM
constexpr int64_t kTieSlack = 8;              // candidates kept beyond k for the exact re-rank
constexpr int64_t kTileBytes = 1536 * 1024;   // float32 bytes of one GEMM key tile (stays in L3 between passes)
constexpr const char* kOp = "retrieve_topk: ";  // the prefix of every error message

Metric parse_metric(c10::string_view name) {
  if (name == "cosine") return Metric::kCosine;
  if (name == "ip") return Metric::kIP;
  if (name == "l2") return Metric::kL2;
  TORCH_CHECK(false, "retrieve_topk: metric must be 'cosine', 'ip' or 'l2', got '", std::string(name), "'");
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// Squared norms of rows [j0, j0 + n) of x (strides s0, s1), in float32. 16 independent lanes let the
// compiler vectorise the unit-stride case without reassociating one sum.
template <typename T>
void row_sq_norms(const T* x, int64_t j0, int64_t n, int64_t D, int64_t s0, int64_t s1, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    const T* p = x + (j0 + r) * s0;
    float lane[16] = {0};
    float s = 0.f;
    if (s1 == 1) {
      int64_t d = 0;
      for (; d + 16 <= D; d += 16) {
        for (int l = 0; l < 16; ++l) {
          const float v = to_float(p[d + l]);
          lane[l] += v * v;
        }
      }
      for (; d < D; ++d) s += to_float(p[d]) * to_float(p[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) s += to_float(p[d * s1]) * to_float(p[d * s1]);
    }
    for (int l = 0; l < 16; ++l) s += lane[l];
    out[r] = s;
  }
}

// Rows [j0, j0 + n) of keys into a contiguous (n, D) float32 buffer.
template <typename T>
void rows_to_float(const T* keys, int64_t j0, int64_t n, int64_t D, int64_t s0, int64_t s1, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    const T* src = keys + (j0 + r) * s0;
    float* dst = out + r * D;
    if (s1 == 1) {
      for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d * s1]);
    }
  }
}

// GCC/Clang vector of 8 floats (one ymm with -mavx2): explicit, because two interleaved lane arrays
// defeat the auto-vectoriser.
typedef float v8f __attribute__((vector_size(32)));

template <typename T>
inline v8f load8(const T* p) {
  float buf[8];
  for (int l = 0; l < 8; ++l) buf[l] = to_float(p[l]);
  v8f v;
  std::memcpy(&v, buf, sizeof(v));
  return v;
}

inline float hsum(v8f v) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// The exact score of one (query, key) pair, from the float32 query row and the key row as stored:
// fixed-order sums (two 8-lane vectors, the tail, then the lanes), so that the score depends on the pair
// only, never on where the key sits in a tile. The GEMM's scores may differ from it in the last bits (and
// may differ between two copies of one key): candidates are re-ranked by it.
template <Metric MT, typename T>
float pair_score(const float* q, float q_aux, const T* key, int64_t D, int64_t s1) {
  v8f a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};  // cosine/ip: <q,k> and |k|^2;  l2: |q-k|^2
  float a = 0.f, b = 0.f;
  int64_t d = 0;
  if (s1 == 1) {
    for (; d + 16 <= D; d += 16) {
      const v8f k0 = load8(key + d), k1 = load8(key + d + 8);
      const v8f q0 = load8(q + d), q1 = load8(q + d + 8);
      if constexpr (MT == Metric::kL2) {
        const v8f e0 = q0 - k0, e1 = q1 - k1;
        a0 += e0 * e0;
        a1 += e1 * e1;
      } else {
        a0 += q0 * k0;
        a1 += q1 * k1;
        b0 += k0 * k0;
        b1 += k1 * k1;
      }
    }
  }
  for (; d < D; ++d) {
    const float kv = to_float(key[d * s1]);
    if constexpr (MT == Metric::kL2) {
      a += (q[d] - kv) * (q[d] - kv);
    } else {
      a += q[d] * kv;
      b += kv * kv;
    }
  }
  a += hsum(a0) + hsum(a1);
  b += hsum(b0) + hsum(b1);
  float s;
  if constexpr (MT == Metric::kCosine) {
    s = a * q_aux * row_aux(Metric::kCosine, b);
  } else if constexpr (MT == Metric::kIP) {
    s = a;
  } else {
    s = -a;
  }
  return s;  // NaN stays NaN: the caller ranks it last and returns it as it is
}

template <typename T>
float pair_score(Metric m, const float* q, float q_aux, const T* key, int64_t D, int64_t s1) {
  switch (m) {
    case Metric::kCosine: return pair_score<Metric::kCosine, T>(q, q_aux, key, D, s1);
    case Metric::kIP: return pair_score<Metric::kIP, T>(q, q_aux, key, D, s1);
    default: return pair_score<Metric::kL2, T>(q, q_aux, key, D, s1);
  }
}

// ---------------------------------------------------------------------------------------------------
// Few queries (B <= kDotMaxRows): dot products straight from the key rows as stored, AVX2 + FMA.
//
// With a handful of query rows a GEMM library spends its time packing, and the scan is bound by reading
// the keys: each key row is read once, converted from bf16/fp16 on the fly, and multiplied by up to 6
// query rows held in L1, two keys at a time (12 accumulators). Each (query, key) sum has one fixed order.
// ---------------------------------------------------------------------------------------------------

constexpr int64_t kDotMaxRows = 8;  // measured crossover with MKL sgemm on the 2-core EPYC
constexpr int kDotRows = 6;

#if CLFAST_HAS_AVX2
using cpu::hsum8;

// out[r * ld + c] = <q_r, key_c> for R query rows (row stride D) and the keys k0, k1 (c = 0, 1)
template <int R, typename T>
void dot_rows_2keys(const float* q, const T* k0, const T* k1, int64_t D, float* out, int64_t ld) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 x0 = cpu::load8(k0 + d), x1 = cpu::load8(k1 + d);
    for (int r = 0; r < R; ++r) {
      const __m256 qv = _mm256_loadu_ps(q + r * D + d);
      a0[r] = _mm256_fmadd_ps(qv, x0, a0[r]);
      a1[r] = _mm256_fmadd_ps(qv, x1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float t0 = hsum8(a0[r]), t1 = hsum8(a1[r]);
    for (int64_t e = d; e < D; ++e) {
      t0 += q[r * D + e] * to_float(k0[e]);
      t1 += q[r * D + e] * to_float(k1[e]);
    }
    out[r * ld] = t0;
    out[r * ld + 1] = t1;
  }
}

// out (nr x nt, row stride ld) = q rows [0, nr) . key rows [j0, j0 + nt) (row stride s0, unit column stride)
template <typename T>
void dot_tile(const float* q, int64_t nr, const T* keys, int64_t j0, int64_t nt, int64_t s0, int64_t D,
              float* out, int64_t ld) {
  for (int64_t j = 0; j < nt; j += 2) {
    const T* k0 = keys + (j0 + j) * s0;
    const T* k1 = j + 1 < nt ? k0 + s0 : k0;  // an odd last key is paired with itself
    float pair_out[kDotRows * 2];
    for (int64_t r = 0; r < nr; r += kDotRows) {
      const int64_t n = std::min<int64_t>(kDotRows, nr - r);
      int_switch<kDotRows>(static_cast<int>(n), [&](auto rows) {
        dot_rows_2keys<decltype(rows)::value>(q + r * D, k0, k1, D, pair_out, 2);
      });
      for (int64_t i = 0; i < n; ++i) {
        out[(r + i) * ld + j] = pair_out[i * 2];
        if (j + 1 < nt) out[(r + i) * ld + j + 1] = pair_out[i * 2 + 1];
      }
    }
  }
}

// Squared norms of key rows [j0, j0 + n) (unit column stride), AVX2
template <typename T>
void dot_sq_norms(const T* keys, int64_t j0, int64_t n, int64_t s0, int64_t D, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const T* p = keys + (j0 + j) * s0;
    __m256 a = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256 x = cpu::load8(p + d);
      a = _mm256_fmadd_ps(x, x, a);
    }
    float t = hsum8(a);
    for (; d < D; ++d) t += to_float(p[d]) * to_float(p[d]);
    out[j] = t;
  }
}
#endif  // CLFAST_HAS_AVX2

// ---------------------------------------------------------------------------------------------------
// bfloat16 x bfloat16 -> float32 tiles with AVX512-BF16 (vdpbf16ps), chosen at run time.
//
// The key tile is packed in VNNI order: for each pair of dimensions p = (2i, 2i+1) and key j, the two
// bf16 values sit side by side, keys padded to a multiple of 32 with zeros:
//     packed[(i * n_pad + j) * 2 + {0,1}] = key[j][2i + {0,1}]
// One step of the microkernel broadcasts a query's pair (32 bits) and multiplies it by 32 keys' pairs
// (two zmm), accumulating R x 32 float32 scores in 2R registers. Products of bf16 are exact in float32.
// ---------------------------------------------------------------------------------------------------

#if CLFAST_HAS_AVX512
constexpr int64_t kBf16Keys = 32;  // keys per microkernel column block
constexpr int kBf16Rows = 8;       // queries per microkernel row block

// Pack rows [j0, j0 + n) of bf16 keys into VNNI order (see above); n_pad = n rounded up to 32,
// d_pairs = ceil(D / 2). Pads with zeros. Pairs outer, keys inner: the writes are sequential and the reads
// touch n rows' current cache lines.
void pack_bf16_tile(const c10::BFloat16* keys, int64_t j0, int64_t n, int64_t D, int64_t s0, int64_t s1,
                    int64_t n_pad, int64_t d_pairs, uint16_t* out) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(keys) + j0 * s0;
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  const bool pairs_contiguous = s1 == 1;
  for (int64_t i = 0; i < d_pairs; ++i) {
    const int64_t d = 2 * i;
    uint32_t* o = dst + i * n_pad;
    if (pairs_contiguous && d + 1 < D) {
      for (int64_t j = 0; j < n; ++j) std::memcpy(o + j, src + j * s0 + d, sizeof(uint32_t));
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t lo = src[j * s0 + d * s1];
        const uint32_t hi = d + 1 < D ? src[j * s0 + (d + 1) * s1] : 0u;
        o[j] = lo | (hi << 16);
      }
    }
    for (int64_t j = n; j < n_pad; ++j) o[j] = 0u;
  }
}

// Squared norms of the n_pad keys of a packed tile: <pair, pair> summed over the pairs, 32 keys at a time.
CLFAST_AVX512_TARGET void bf16_packed_sq_norms(
    const uint16_t* packed, int64_t n_pad, int64_t d_pairs, float* out) {
  for (int64_t j = 0; j < n_pad; j += 32) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t i = 0; i < d_pairs; ++i) {
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(packed + (i * n_pad + j) * 2);
      const __m512bh k1 = (__m512bh)_mm512_loadu_si512(packed + (i * n_pad + j) * 2 + 32);
      a0 = _mm512_dpbf16_ps(a0, k0, k0);
      a1 = _mm512_dpbf16_ps(a1, k1, k1);
    }
    _mm512_storeu_ps(out + j, a0);
    _mm512_storeu_ps(out + j + 16, a1);
  }
}

template <int R>
CLFAST_AVX512_TARGET void bf16_micro(
    const uint32_t* q, int64_t q_ld, const uint16_t* packed, int64_t n_pad, int64_t d_pairs, float* out,
    int64_t out_ld) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d_pairs; ++i) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(packed + i * n_pad * 2);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(packed + i * n_pad * 2 + 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * q_ld + i]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, k1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(out + r * out_ld, acc[r][0]);
    _mm512_storeu_ps(out + r * out_ld + 16, acc[r][1]);
  }
}

// out (nr x n_pad, row stride out_ld) = q (nr rows of d_pairs 32-bit pairs, stride q_ld) . packed tile
void bf16_tile_gemm(const uint32_t* q, int64_t q_ld, int64_t nr, const uint16_t* packed, int64_t n_pad,
                    int64_t d_pairs, float* out, int64_t out_ld) {
  for (int64_t j = 0; j < n_pad; j += kBf16Keys) {
    const uint16_t* kp = packed + j * 2;
    int64_t r = 0;
    for (; r + kBf16Rows <= nr; r += kBf16Rows) {
      bf16_micro<kBf16Rows>(q + r * q_ld, q_ld, kp, n_pad, d_pairs, out + r * out_ld + j, out_ld);
    }
    int_switch<kBf16Rows - 1>(static_cast<int>(nr - r), [&](auto rows) {  // the last nr - r < 8 rows
      bf16_micro<decltype(rows)::value>(q + r * q_ld, q_ld, kp, n_pad, d_pairs, out + r * out_ld + j, out_ld);
    });
  }
}
#else
constexpr int64_t kBf16Keys = 32;
void pack_bf16_tile(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    uint16_t*) {}
void bf16_packed_sq_norms(const uint16_t*, int64_t, int64_t, float*) {}
void bf16_tile_gemm(const uint32_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t) {}
#endif

// How the scores of a tile are computed.
enum class Path { kGemm, kBf16Dp, kDot };

struct Plan {
  int64_t B, M, D, k;
  int64_t tile, n_tiles, row_block, n_row_blocks;
  Path path;
};

Plan make_plan(int64_t B, int64_t M, int64_t D, int64_t k, Path path) {
  Plan p{B, M, D, k, 0, 0, 0, 0, path};
  // kDot reads each tile twice when norms are needed: small tiles stay in L2 between the passes
  const int64_t bytes = path == Path::kDot ? 256 * 1024 : kTileBytes;
  const int64_t t = std::max<int64_t>(32, bytes / (4 * std::max<int64_t>(D, 1)) / 32 * 32);
  p.tile = std::min(t, M);
  p.n_tiles = (M + p.tile - 1) / p.tile;
  p.row_block = path == Path::kDot ? B : std::min(B, kRowBlock);
  p.n_row_blocks = (B + p.row_block - 1) / p.row_block;
  return p;
}

// What one scan needs besides the keys: the query in the GEMM's format and each row's q_aux.
struct Query {
  at::Tensor f32;                 // (B, D) float32, for the float32 GEMM
  std::vector<uint32_t> bf16;     // (B, d_pairs) bf16 pairs, for the AVX512-BF16 tiles
  int64_t d_pairs = 0;
  std::vector<float> aux;         // (B,) see finish_score
};

// Finish one row of raw dot products and offer them to the row's running top-k list. A score can only make
// the list if it is >= the list's last score: each chunk of 16 is finished and its maximum compared first
// (16 independent lanes: vectorised), and only chunks that pass are inserted one by one.
template <Metric MT>
void update_row(float* row, int64_t nt, const float* k_aux, float q_aux, int64_t j0, float* vals, int64_t* idx,
                int k) {
  float last = vals[k - 1];
  for (int64_t c = 0; c < nt; c += 16) {
    const int64_t n = std::min<int64_t>(16, nt - c);
    float* x = row + c;
    float hi = -INFINITY;
    if (n == 16) {
      float lane[16];
      for (int l = 0; l < 16; ++l) {
        x[l] = finish_score<MT>(x[l], k_aux[c + l], q_aux);
        lane[l] = x[l];
      }
      for (int l = 0; l < 16; ++l) hi = std::max(hi, lane[l]);
    } else {
      for (int64_t l = 0; l < n; ++l) {
        x[l] = finish_score<MT>(x[l], k_aux[c + l], q_aux);
        hi = std::max(hi, x[l]);
      }
    }
    if (hi < last) continue;
    for (int64_t l = 0; l < n; ++l) {
      if (x[l] >= last && topk_insert(vals, idx, k, x[l], j0 + c + l)) last = vals[k - 1];
    }
  }
}

void update_rows(Metric metric, float* s, int64_t s_ld, int64_t nr, int64_t nt, const float* k_aux,
                 const float* q_aux, int64_t j0, float* vals, int64_t* idx, int k) {
  for (int64_t r = 0; r < nr; ++r) {
    float* row = s + r * s_ld;
    float* v = vals + r * k;
    int64_t* i = idx + r * k;
    switch (metric) {
      case Metric::kCosine: update_row<Metric::kCosine>(row, nt, k_aux, q_aux[r], j0, v, i, k); break;
      case Metric::kIP: update_row<Metric::kIP>(row, nt, k_aux, q_aux[r], j0, v, i, k); break;
      default: update_row<Metric::kL2>(row, nt, k_aux, q_aux[r], j0, v, i, k); break;
    }
  }
}

template <typename T>
void scan(const Query& q, const at::Tensor& keys, Metric metric, const Plan& p, std::vector<float>& all_vals,
          std::vector<int64_t>& all_idx) {
  const int64_t B = p.B, M = p.M, D = p.D, k = p.k;
  const T* kp = keys.data_ptr<T>();
  const int64_t s0 = keys.stride(0), s1 = keys.stride(1);
  const bool dp = p.path == Path::kBf16Dp, dot = p.path == Path::kDot;
  // float32 rows that are unit-stride (and do not overlap) go to the GEMM in place
  const bool in_place = std::is_same_v<T, float> && s1 == 1 && s0 >= D;
  const bool need_norms = metric != Metric::kIP;
  const int64_t n_pad = (p.tile + kBf16Keys - 1) / kBf16Keys * kBf16Keys;
  const int64_t n_items = p.n_tiles * p.n_row_blocks;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);

  // an item is one (key tile, query row block): row_block × tile scores of D multiply-adds
  at::parallel_for(0, n_items, work_grain(p.row_block * p.tile * D), [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;
    const int64_t tid = at::get_thread_num();
    float* vals = all_vals.data() + tid * B * k;
    int64_t* idx = all_idx.data() + tid * B * k;
    std::vector<float> kbuf(in_place || dp || dot ? 0 : p.tile * D);
    std::vector<uint16_t> packed(dp ? n_pad * q.d_pairs * 2 : 0);
    std::vector<float> sbuf(p.row_block * n_pad);
    std::vector<float> k_aux(n_pad, 0.f);  // per key: see finish_score
    int64_t loaded = -1;  // the tile now in kbuf / packed / k_aux
    const float* tile_ptr = nullptr;
    int64_t tile_ld = D;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / p.n_row_blocks, rb = item % p.n_row_blocks;
      const int64_t j0 = t * p.tile, nt = std::min(p.tile, M - j0);
      const int64_t r0 = rb * p.row_block, nr = std::min(p.row_block, B - r0);
      const int64_t nt_pad = (nt + kBf16Keys - 1) / kBf16Keys * kBf16Keys;
      if (t != loaded) {
        if (dp) {
          if constexpr (std::is_same_v<T, c10::BFloat16>) {
            pack_bf16_tile(kp, j0, nt, D, s0, s1, nt_pad, q.d_pairs, packed.data());
          }
        } else if (in_place) {
          tile_ptr = reinterpret_cast<const float*>(kp) + j0 * s0;
          tile_ld = s0;
        } else if (!dot) {
          rows_to_float<T>(kp, j0, nt, D, s0, s1, kbuf.data());
          tile_ptr = kbuf.data();
          tile_ld = D;
        }
        if (need_norms) {
          if (dp) {
            bf16_packed_sq_norms(packed.data(), nt_pad, q.d_pairs, k_aux.data());
          } else if (dot) {
#if CLFAST_HAS_AVX2
            dot_sq_norms<T>(kp, j0, nt, s0, D, k_aux.data());
#endif
          } else {
            row_sq_norms<float>(tile_ptr, 0, nt, D, tile_ld, 1, k_aux.data());
          }
          for (int64_t j = 0; j < nt; ++j) k_aux[j] = row_aux(metric, k_aux[j]);
        }
        loaded = t;
      }
      int64_t s_ld = nt;
      if (dp) {
        s_ld = nt_pad;
        bf16_tile_gemm(q.bf16.data() + r0 * q.d_pairs, q.d_pairs, nr, packed.data(), nt_pad, q.d_pairs,
                       sbuf.data(), s_ld);
      } else if (dot) {
#if CLFAST_HAS_AVX2
        dot_tile<T>(q.f32.data_ptr<float>() + r0 * D, nr, kp, j0, nt, s0, D, sbuf.data(), s_ld);
#endif
      } else {
        at::Tensor tile = at::from_blob(const_cast<float*>(tile_ptr), {nt, D}, {tile_ld, 1}, f32);
        at::Tensor s = at::from_blob(sbuf.data(), {nr, nt}, f32);
        at::mm_out(s, q.f32.narrow(0, r0, nr), tile.t());
      }
      update_rows(metric, sbuf.data(), s_ld, nr, nt, k_aux.data(), q.aux.data() + r0, j0, vals + r0 * k,
                  idx + r0 * k, static_cast<int>(k));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> retrieve_topk_cpu(const at::Tensor& query, const at::Tensor& keys, int64_t k,
                                                     c10::string_view metric_name) {
  const Metric metric = parse_metric(metric_name);
  TORCH_CHECK(query.dim() == 2, "retrieve_topk: query must have shape (B,D), got ", query.sizes());
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == query.size(1),
              "retrieve_topk: keys must have shape (M,D) = (M,", query.size(1), ") to match query, got ",
              keys.sizes());
  check_cpu(query, "query", kOp);
  check_cpu(keys, "keys", kOp);
  check_kernel_dtype(keys, "keys", kOp);
  const auto kd = keys.scalar_type(), qd = query.scalar_type();
  TORCH_CHECK(qd == kd || qd == at::kFloat, "retrieve_topk: query must be float32 or the keys' dtype ", kd,
              ", got ", qd);
  const int64_t B = query.size(0), M = keys.size(0), D = keys.size(1);
  TORCH_CHECK(k >= 1 && k <= M, "retrieve_topk: k must be in [1, M] = [1, ", M, "], got ", k);
  TORCH_CHECK(k <= 1024, "retrieve_topk: k must be at most 1024, got ", k);

  at::Tensor out_vals = at::empty({B, k}, query.options().dtype(at::kFloat));
  at::Tensor out_idx = at::empty({B, k}, query.options().dtype(at::kLong));
  if (B == 0) return {out_vals, out_idx};

  // A few queries: dot products from the rows as stored. More: bf16 x bf16 on vdpbf16ps where the CPU has
  // it, everything else a float32 GEMM.
  Path path = Path::kGemm;
  if (CLFAST_HAS_AVX2 && B <= kDotMaxRows && keys.stride(1) == 1) {
    path = Path::kDot;
  } else if (kd == at::kBFloat16 && qd == at::kBFloat16 && cpu::use_avx512()) {
    path = Path::kBf16Dp;
  }
  const bool use_bf16_dp = path == Path::kBf16Dp;
  Query q;
  {
    c10::InferenceMode guard;
    q.f32 = query.to(at::kFloat).contiguous();
    std::vector<float> q_sq(B);
    row_sq_norms<float>(q.f32.data_ptr<float>(), 0, B, D, D, 1, q_sq.data());
    q.aux.resize(B);
    for (int64_t b = 0; b < B; ++b) q.aux[b] = row_aux(metric, q_sq[b]);
    if (use_bf16_dp) {
      q.d_pairs = (D + 1) / 2;
      q.bf16.assign(B * q.d_pairs, 0u);
      const at::Tensor qc = query.contiguous();
      const c10::BFloat16* src = qc.data_ptr<c10::BFloat16>();
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(reinterpret_cast<uint16_t*>(q.bf16.data() + b * q.d_pairs), src + b * D, D * sizeof(uint16_t));
      }
    }
  }

  // the scan keeps kc >= k candidates per row; the exact re-rank below picks the k
  const int64_t kc = std::min(M, k + kTieSlack);
  const Plan plan = make_plan(B, M, D, kc, path);
  const int64_t n_threads = at::get_num_threads();
  std::vector<float> all_vals(n_threads * B * kc, -INFINITY);
  std::vector<int64_t> all_idx(n_threads * B * kc, kNoIndex);
  FLOAT_SWITCH(kd, T, [&] { scan<T>(q, keys, metric, plan, all_vals, all_idx); });

  // per row: merge the threads' candidate lists, then re-rank the candidates by exact pair scores
  float* ov = out_vals.data_ptr<float>();
  int64_t* oi = out_idx.data_ptr<int64_t>();
  const float* qp = q.f32.data_ptr<float>();
  const int64_t s0 = keys.stride(0), s1 = keys.stride(1);
  FLOAT_SWITCH(kd, T, [&] {
    const T* kp = keys.data_ptr<T>();
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> cv(kc), ev(k);
      std::vector<int64_t> ci(kc), ei(k);
      for (int64_t b = begin; b < end; ++b) {
        std::copy_n(all_vals.data() + b * kc, kc, cv.data());
        std::copy_n(all_idx.data() + b * kc, kc, ci.data());
        for (int64_t t = 1; t < n_threads; ++t) {
          const float* tv = all_vals.data() + (t * B + b) * kc;
          const int64_t* ti = all_idx.data() + (t * B + b) * kc;
          for (int64_t j = 0; j < kc && ti[j] != kNoIndex; ++j) {
            if (!topk_insert(cv.data(), ci.data(), static_cast<int>(kc), tv[j], ti[j])) break;  // the rest rank lower
          }
        }
        std::fill(ev.begin(), ev.end(), -INFINITY);
        std::fill(ei.begin(), ei.end(), kNoIndex);
        for (int64_t j = 0; j < kc; ++j) {
          const float e = pair_score<T>(metric, qp + b * D, q.aux[b], kp + ci[j] * s0, D, s1);
          topk_insert(ev.data(), ei.data(), static_cast<int>(k), e != e ? -INFINITY : e, ci[j]);
        }
        // a NaN score ranked as -inf; it is returned as NaN, as the reference returns it
        for (int64_t j = 0; j < k; ++j) {
          if (ev[j] == -INFINITY) ev[j] = pair_score<T>(metric, qp + b * D, q.aux[b], kp + ei[j] * s0, D, s1);
        }
        std::copy_n(ev.data(), k, ov + b * k);
        std::copy_n(ei.data(), k, oi + b * k);
      }
    });
  });
  return {out_vals, out_idx};
}

}  // namespace clfast::retrieve
