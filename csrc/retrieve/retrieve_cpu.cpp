// retrieve on the CPU: top-k keys per query by cosine / inner product / negative squared L2, without the
// (B, M) score matrix.
//
// The keys are cut into tiles of T rows. A work item is (key tile, block of up to kRowBlock queries): one
// GEMM  S = Q_block · tileᵀ  into a per-thread (rows × T) float32 buffer, then each score is finished
// (cosine: / |key|, computed from the tile while it is in cache; l2: 2·dot − |key|² − |q|²) and offered
// to that thread's running top-k list of the row (a sorted array of k; almost every score fails the
// comparison with the list's last entry, so the scan costs about one compare per score). Threads take
// contiguous ranges of work items (at::parallel_for); their lists are merged per row at the end. So the
// scan is parallel even for a single query over a huge pool, and memory is O(threads · (B·k + rows·T)).
//
// Keys: float32 (read in place when rows are unit-stride) or bfloat16/float16 (converted tile by tile into
// a float32 buffer: half the bytes read from memory, float32 products and accumulation). Query: float32,
// or the keys' dtype; always used in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "retrieve/retrieve.h"

namespace clfast::retrieve {
namespace {

constexpr int64_t kRowBlock = 256;            // queries per GEMM
constexpr int64_t kTileBytes = 1536 * 1024;   // float32 bytes of one key tile (fits L2 + L3 comfortably)

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

// ---------------------------------------------------------------------------------------------------
// bfloat16 x bfloat16 -> float32 tiles with AVX512-BF16 (vdpbf16ps), chosen at run time.
//
// The key tile is packed in VNNI order: for each pair of dimensions p = (2i, 2i+1) and key j, the two
// bf16 values sit side by side, keys padded to a multiple of 32 with zeros:
//     packed[(i * n_pad + j) * 2 + {0,1}] = key[j][2i + {0,1}]
// One step of the microkernel broadcasts a query's pair (32 bits) and multiplies it by 32 keys' pairs
// (two zmm), accumulating R x 32 float32 scores in 2R registers. Products of bf16 are exact in float32.
// ---------------------------------------------------------------------------------------------------

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

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
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_packed_sq_norms(
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
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_micro(
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
    switch (nr - r) {
      case 7: bf16_micro<7>(q + r * q_ld, q_ld, kp, n_pad, d_pairs, out + r * out_ld + j, out_ld); break;
      case 6: bf16_micro<6>(q + r * q_ld, q_ld, kp, n_pad, d_pairs, out + r * out_ld + j, out_ld); break;
      case 5: bf16_micro<5>(q + r * q_ld, q_ld, kp, n_pad, d_pairs, out + r * out_ld + j, out_ld); break;
      case 4: bf16_micro<4>(q + r * q_ld, q_ld, kp, n_pad, d_pairs, out + r * out_ld + j, out_ld); break;
      case 3: bf16_micro<3>(q + r * q_ld, q_ld, kp, n_pad, d_pairs, out + r * out_ld + j, out_ld); break;
      case 2: bf16_micro<2>(q + r * q_ld, q_ld, kp, n_pad, d_pairs, out + r * out_ld + j, out_ld); break;
      case 1: bf16_micro<1>(q + r * q_ld, q_ld, kp, n_pad, d_pairs, out + r * out_ld + j, out_ld); break;
      default: break;
    }
  }
}

struct Plan {
  int64_t B, M, D, k;
  int64_t tile, n_tiles, row_block, n_row_blocks;
};

Plan make_plan(int64_t B, int64_t M, int64_t D, int64_t k) {
  Plan p{B, M, D, k, 0, 0, 0, 0};
  const int64_t t = std::max<int64_t>(32, kTileBytes / (4 * std::max<int64_t>(D, 1)) / 32 * 32);
  p.tile = std::min(t, M);
  p.n_tiles = (M + p.tile - 1) / p.tile;
  p.row_block = std::min(B, kRowBlock);
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
void scan(const Query& q, const at::Tensor& keys, Metric metric, const Plan& p, bool use_bf16_dp,
          std::vector<float>& all_vals, std::vector<int64_t>& all_idx) {
  const int64_t B = p.B, M = p.M, D = p.D, k = p.k;
  const T* kp = keys.data_ptr<T>();
  const int64_t s0 = keys.stride(0), s1 = keys.stride(1);
  // float32 rows that are unit-stride (and do not overlap) go to the GEMM in place
  const bool in_place = std::is_same_v<T, float> && s1 == 1 && s0 >= D;
  const bool need_norms = metric != Metric::kIP;
  const int64_t n_pad = (p.tile + kBf16Keys - 1) / kBf16Keys * kBf16Keys;
  const int64_t n_items = p.n_tiles * p.n_row_blocks;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);

  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;
    const int64_t tid = at::get_thread_num();
    float* vals = all_vals.data() + tid * B * k;
    int64_t* idx = all_idx.data() + tid * B * k;
    std::vector<float> kbuf(in_place || use_bf16_dp ? 0 : p.tile * D);
    std::vector<uint16_t> packed(use_bf16_dp ? n_pad * q.d_pairs * 2 : 0);
    std::vector<float> sbuf(p.row_block * (use_bf16_dp ? n_pad : p.tile));
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
        if (use_bf16_dp) {
          if constexpr (std::is_same_v<T, c10::BFloat16>) {
            pack_bf16_tile(kp, j0, nt, D, s0, s1, nt_pad, q.d_pairs, packed.data());
          }
        } else if (in_place) {
          tile_ptr = reinterpret_cast<const float*>(kp) + j0 * s0;
          tile_ld = s0;
        } else {
          rows_to_float<T>(kp, j0, nt, D, s0, s1, kbuf.data());
          tile_ptr = kbuf.data();
          tile_ld = D;
        }
        if (need_norms) {
          if (use_bf16_dp) {
            bf16_packed_sq_norms(packed.data(), nt_pad, q.d_pairs, k_aux.data());
          } else if (in_place) {
            row_sq_norms<float>(tile_ptr, 0, nt, D, tile_ld, 1, k_aux.data());
          } else {
            row_sq_norms<float>(kbuf.data(), 0, nt, D, D, 1, k_aux.data());
          }
          for (int64_t j = 0; j < nt; ++j) k_aux[j] = row_aux(metric, k_aux[j]);
        }
        loaded = t;
      }
      int64_t s_ld = nt;
      if (use_bf16_dp) {
        s_ld = nt_pad;
        bf16_tile_gemm(q.bf16.data() + r0 * q.d_pairs, q.d_pairs, nr, packed.data(), nt_pad, q.d_pairs,
                       sbuf.data(), s_ld);
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
  TORCH_CHECK(query.device().is_cpu() && keys.device().is_cpu(),
              "retrieve_topk: query and keys must be CPU tensors, got ", query.device(), " and ", keys.device());
  const auto kd = keys.scalar_type(), qd = query.scalar_type();
  TORCH_CHECK(kd == at::kFloat || kd == at::kBFloat16 || kd == at::kHalf,
              "retrieve_topk: keys must be float32, bfloat16 or float16, got ", kd);
  TORCH_CHECK(qd == kd || qd == at::kFloat, "retrieve_topk: query must be float32 or the keys' dtype ", kd,
              ", got ", qd);
  const int64_t B = query.size(0), M = keys.size(0), D = keys.size(1);
  TORCH_CHECK(k >= 1 && k <= M, "retrieve_topk: k must be in [1, M] = [1, ", M, "], got ", k);
  TORCH_CHECK(k <= 1024, "retrieve_topk: k must be at most 1024, got ", k);

  at::Tensor out_vals = at::empty({B, k}, query.options().dtype(at::kFloat));
  at::Tensor out_idx = at::empty({B, k}, query.options().dtype(at::kLong));
  if (B == 0) return {out_vals, out_idx};

  // bf16 x bf16 runs on vdpbf16ps where the CPU has it; everything else is a float32 GEMM
  const bool use_bf16_dp = kd == at::kBFloat16 && qd == at::kBFloat16 && cpu_has_avx512_bf16();
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

  const Plan plan = make_plan(B, M, D, k);
  const int64_t n_threads = at::get_num_threads();
  std::vector<float> all_vals(n_threads * B * k, -INFINITY);
  std::vector<int64_t> all_idx(n_threads * B * k, kNoIndex);
  switch (kd) {
    case at::kFloat: scan<float>(q, keys, metric, plan, false, all_vals, all_idx); break;
    case at::kBFloat16: scan<c10::BFloat16>(q, keys, metric, plan, use_bf16_dp, all_vals, all_idx); break;
    default: scan<c10::Half>(q, keys, metric, plan, false, all_vals, all_idx); break;
  }

  // merge the threads' lists row by row
  float* ov = out_vals.data_ptr<float>();
  int64_t* oi = out_idx.data_ptr<int64_t>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* rv = ov + b * k;
      int64_t* ri = oi + b * k;
      std::copy_n(all_vals.data() + b * k, k, rv);
      std::copy_n(all_idx.data() + b * k, k, ri);
      for (int64_t t = 1; t < n_threads; ++t) {
        const float* tv = all_vals.data() + (t * B + b) * k;
        const int64_t* ti = all_idx.data() + (t * B + b) * k;
        for (int64_t j = 0; j < k && ti[j] != kNoIndex; ++j) {
          if (!topk_insert(rv, ri, static_cast<int>(k), tv[j], ti[j])) break;  // the rest rank lower still
        }
      }
    }
  });
  return {out_vals, out_idx};
}

}  // namespace clfast::retrieve

TORCH_LIBRARY_FRAGMENT(_clfast_C, m) {
  m.def("retrieve_topk(Tensor query, Tensor keys, int k, str metric) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(_clfast_C, CPU, m) { m.impl("retrieve_topk", &clfast::retrieve::retrieve_topk_cpu); }
