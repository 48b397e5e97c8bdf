// CPU kernels of clfast::prefix_attention (forward and backward), registered by bindings.cpp as
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
// GEMMs: oneDNN micro-kernels (common/brgemm.h); bf16/fp16 are computed in fp32 where the machine has no
// bf16/fp16 brgemm. Operand packing: cpu_packing.h. Element-wise kernels between the GEMMs: cpu_tiles.h
// (AVX-512 forms chosen at run time, AVX2, or scalar). Per-thread buffers: common/scratch.h. Each task, its GEMMs,
// packing, element-wise code and stores are timed phases (common/phases.h) when clfast.ops.cpu_phases asks.
//
// Environment (read once): CLFAST_CPU_DISABLE_BRGEMM=1, CLFAST_CPU_DISABLE_AVX512=1 force the
// fallbacks (for tests).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/brgemm.h"
#include "common/check.h"
#include "common/cpu_features.h"
#include "common/parallel.h"
#include "common/phases.h"
#include "common/prefetch.h"
#include "common/scratch.h"
#include "common/static_switch.h"
#include "common/tensor_util.h"
#include "ops.h"
#include "prefix_attention/cpu_packing.h"
#include "prefix_attention/cpu_tiles.h"
#include "prefix_attention/prefix_attention.h"

namespace clfast {
namespace prefix_attention {
namespace {

using cpu::gemm;
using cpu::gemm_release;
using cpu::Phase;
using cpu::PhaseTimer;
using cpu::scratch;

// lse of padding queries in the backward: exp(scale*S - kPadLse) == 0 for any finite score.
constexpr float kPadLse = 1e30f;

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

constexpr const char* kOp = "prefix_attention: ";  // the prefix of every error message

void check_float_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_cpu(t, name, kOp);
  check_same_dtype(t, name, q, "q", kOp);
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& prefix_k,
                     const std::optional<at::Tensor>& prefix_v,
                     const std::optional<at::Tensor>& kv_mask, double scale) {
  TORCH_CHECK(q.dim() == 4, "prefix_attention: q must have shape (B,H,Nq,d), got ", q.sizes());
  check_cpu(q, "q", kOp);
  check_kernel_dtype(q, "q", kOp);
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
    check_cpu(m, "kv_mask", kOp);
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

  // an item is one (b, h, query block): QKᵀ and PV over every key
  at::parallel_for(0, B * H * nqb, work_grain(2 * BQ * std::max<int64_t>(Lmax, 1) * d),
                   [&](int64_t begin, int64_t end) {
    const PhaseTimer task_timer(Phase::kTask);
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
        const PhaseTimer timer(Phase::kPack, 2 * L * d);
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
        const PhaseTimer timer(Phase::kPack, nq * d);
        pack_rows<C>(q_src, nq, d, dp, Qa);
        A = Qa;
      }

      const int64_t ntiles = ceil_div(L, BK);
      const int64_t pf_step = ceil_div(pf.lines_left(), ntiles * nq);
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t k0 = t * BK, kn = std::min(BK, L - k0);
        const bool first = t == 0;
        gemm<C>(nq, kn, dp, A, lda, Kt + (vnni ? 2 * k0 : k0), ldk, S, lds, false);
        {
          const PhaseTimer timer(Phase::kElementwise, nq * kn);
          softmax_rows<C>(S, lds, nq, kn, scale, m, l, alpha, Pm, first, pf, pf_step);
          if (!first) {
            for (int64_t i = 0; i < nq; ++i) {
              float* o = O + i * d;
              for (int64_t c = 0; c < d; ++c) {
                o[c] *= alpha[i];
              }
            }
          }
        }
        const int64_t kk = vnni ? round_up(kn, 2) : kn;
        gemm<C>(nq, d, kk, vnni ? Pm : reinterpret_cast<C*>(S), lds, Vb + k0 * d, d, O, d, !first);
      }
      const PhaseTimer timer(Phase::kStore, nq * d);
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
  // an item is one (b, h, group of query blocks): five products of its queries with every key
  const int64_t group_rows = ceil_div(Nq, G);
  at::parallel_for(0, BH * G, work_grain(5 * group_rows * std::max<int64_t>(Lmax, 1) * d),
                   [&](int64_t begin, int64_t end) {
    const PhaseTimer task_timer(Phase::kTask);
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
      {
        const PhaseTimer timer(Phase::kPack, (keys_direct ? 1 : 3) * L * d);
        if (!keys_direct) {
          pack_rows<C>(keys, L, d, dp, Ka);
          pack_rows<C>(vals, L, d, dp, Va);
        }
        pack_cols<C>(keys, L, d, ldk, Kt);
      }
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
        {
          const PhaseTimer timer(Phase::kPack, 4 * nq * d);
          pack_b_features<C>(q_src, nq, nqk, d, dp, ldq, Qt);
          pack_b_features<C>(g_src, nq, nqk, d, dp, ldq, dOt);
          pack_b_rows<C>(q_src, nq, nqk, d, Qr);
          pack_b_rows<C>(g_src, nq, nqk, d, dOr);
        }
        const float* lse_rows = lse_p + bh * Nq + q0;
        {
          const PhaseTimer timer(Phase::kElementwise, nq * d);  // Di = rowsum(dout * out)
          for (int64_t i = 0; i < ldq; ++i) {
            if (i < nq) {
              lse_b[i] = lse_rows[i];
              di[i] = dot_row<T>(g_rows + i * gv.sn, o_rows + i * ov.sn, d);
            } else {  // padding queries: P = 0, dS = 0
              lse_b[i] = kPadLse;
              di[i] = 0.f;
            }
          }
        }

        for (int64_t t = 0; t < ntiles; ++t) {
          const int64_t k0 = t * BK, kn = std::min(BK, L - k0);
          const int64_t knk = vnni ? round_up(kn, 2) : kn;
          gemm_keys(keys, Ka, k0, kn, nqk, Qt, S);
          gemm_keys(vals, Va, k0, kn, nqk, dOt, dP);
          {
            const PhaseTimer timer(Phase::kElementwise, kn * nqk);
            grad_tile<C>(S, dP, ldq, kn, nqk, scale, lse_b, di, Pa, dSa, dSv, pf, pf_step);
          }
          const C* Pm = vnni ? Pa : reinterpret_cast<const C*>(S);
          const C* dSm = vnni ? dSa : reinterpret_cast<const C*>(dP);
          const C* dSb = vnni ? dSv : reinterpret_cast<const C*>(dP);
          gemm<C>(kn, d, nqk, Pm, ldq, dOr, d, dV_acc + k0 * d, d, !first_q);
          gemm<C>(kn, d, nqk, dSm, ldq, Qr, d, dK_acc + k0 * d, d, !first_q);
          gemm<C>(d, nqk, knk, Kt + k0, ldk, dSb, ldq, dQt, ldq, t > 0);
        }
        const PhaseTimer timer(Phase::kStore, nq * d);
        store_transposed<T>(dQt, ldq, nq, d, nullptr, dq_p + (bh * Nq + q0) * d);
      }
      if (G == 1) {
        const PhaseTimer timer(Phase::kStore, 2 * L * d);
        emit(b, h, dK_acc, dV_acc);
      }
    }
    gemm_release<C>();
    store_fence();
  });

  if (G > 1) {
    const int64_t Ls = std::max<int64_t>(Lmax, 1);
    at::parallel_for(0, BH, work_grain(G * 2 * Ls * d), [&](int64_t begin, int64_t end) {
      const PhaseTimer task_timer(Phase::kTask);
      for (int64_t bh = begin; bh < end; ++bh) {
        const PhaseTimer timer(Phase::kStore, 2 * G * Ls * d);
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

// f(T{}, C{}) with T the input dtype and C the GEMM operand dtype: T itself, or float for a 16-bit T that
// brgemm cannot multiply here. The one-time probes run here, outside the parallel regions.
template <typename F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  cpu::brgemm_usable<float>();
  cpu::use_avx512();
  FLOAT_SWITCH(dt, T, [&] {
    BOOL_SWITCH(cpu::brgemm_usable<T>(), kNative, [&] { f(T{}, std::conditional_t<kNative, T, float>{}); });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
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
  check_cpu(lse, "lse", kOp);

  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty({p.B, p.H, p.Nq, p.d}, opts);
  // Masked keys get zero gradients; without a mask every key row is written.
  at::Tensor dk = p.has_mask || p.Nq == 0 ? at::zeros({p.B, p.H, p.Nk, p.d}, opts)
                                          : at::empty({p.B, p.H, p.Nk, p.d}, opts);
  at::Tensor dv = p.has_mask || p.Nq == 0 ? at::zeros({p.B, p.H, p.Nk, p.d}, opts)
                                          : at::empty({p.B, p.H, p.Nk, p.d}, opts);
  at::Tensor dpk, dpv;
  if (p.has_prefix) {
    // no query (or, for a shared (H,P,d) prefix, no sample): nothing below writes the prefix gradients
    const bool no_work = p.Nq == 0 || p.B * p.H == 0;
    dpk = no_work ? at::zeros(p.pk.sizes(), opts) : at::empty(p.pk.sizes(), opts);
    dpv = no_work ? at::zeros(p.pv.sizes(), opts) : at::empty(p.pv.sizes(), opts);
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

}  // namespace prefix_attention
}  // namespace clfast
