// CPU kernels of clfast's Gaussian ops: mahalanobis (squared distances under a shared precision) and
// gaussian_kl (KL of diagonal Gaussians from a full-covariance prior), forward and backward, registered by
// bindings.cpp.
//
// The precision is P = L·Lᵀ with L lower-triangular (only its lower triangle is read) or a diagonal given as
// a vector l (P = diag(l²)). Everything reduces to products with L, done as GEMMs that skip L's zero triangle:
//
//   mahalanobis: Z = [x; μ] − c (c = mean of the means; distances are translation invariant, and centring
//                keeps ‖y‖² small so the expansion below loses little to cancellation),
//                Y = Z·L, dist = ‖Y_x‖² + ‖Y_μ‖² − 2 Y_x Y_μᵀ (one GEMM), clamped at 0.
//                Backward with G = d dist, r = G·1, s = Gᵀ·1:
//                dY_x = 2(r∘Y_x − G Y_μ), dY_μ = 2(s∘Y_μ − Gᵀ Y_x), dZ = dY·Lᵀ, dL = tril(Zᵀ dY).
//                (c is a constant here: the distances do not depend on it, so neither do the gradients.)
//   gaussian_kl: U = (m − mu)·L, kl_b = ½(Σ_d P_dd e^{lv_bd} + U_bd² − lv_bd) − ½(D + log|P|).
//                Backward with g = d kl: dlv = ½g(P_dd e^{lv} − 1), d(m − mu) = g∘(U·Lᵀ),
//                dL = tril((g∘δ)ᵀ U) + diag(w)·L − diag(Σg / L_dd), w_d = Σ_b g_b e^{lv_bd}.
//
// GEMMs go to ATen (MKL/oneDNN): a hand-written GEMM would not beat them. What is fused here: x and μ are
// projected by one triangular GEMM, the distance epilogue and the KL row reduction are single parallel passes,
// and few-row products (a GPLS step has one KL row per layer) run as triangular loops that read half of L.
// 16-bit inputs compute in fp32; float64 stays float64.
//
// Parallel regions are few and each carries enough work: every region ends at a barrier where the calling thread
// waits for the slowest worker, and on a machine with more runnable threads than cores that wait can be a
// scheduler slice (milliseconds) per region. So a blocked triangular GEMM is one region in which each thread runs
// the column blocks for its own rows (ATen's GEMMs called inside a parallel region run on the calling thread),
// not one multi-threaded GEMM per block, and the centring, the row norms and the backward's first products are
// each a single pass. `python benchmarks/parallel_regions.py` counts the regions per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "common/parallel.h"
#include "common/tensor_util.h"
#include "mahalanobis/mahalanobis.h"
#include "ops.h"

namespace clfast::gaussian {
namespace {

using at::Tensor;

// Column block of the triangular GEMMs: big enough for GEMM efficiency, small enough to skip most of the
// zero triangle (D = 768 in blocks of 128 does 58% of the dense work).
constexpr int64_t kBlock = 128;
// Below this many rows, products with L run as loops over its lower triangle instead of GEMMs.
constexpr int64_t kFewRows = 8;
// Rows per thread at least, in the row-parallel GEMMs (one region per product).
constexpr int64_t kRowGrain = 64;
// Output rows per task of tril_outer's row blocks.
constexpr int64_t kOuterRows = 64;

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
  check_cpu(t, name);
}

void check_prec_chol(const Tensor& L, int64_t D, at::ScalarType dtype) {
  check_float(L, "prec_chol");
  TORCH_CHECK(L.scalar_type() == dtype, "prec_chol must have the dtype of the other inputs (", dtype, "), got ",
              L.scalar_type());
  TORCH_CHECK((L.dim() == 2 && L.size(0) == D && L.size(1) == D) || (L.dim() == 1 && L.size(0) == D),
              "prec_chol must have shape (D,D) or (D,) with D = ", D, ", got ", L.sizes());
}

// ---------------------------------------------------------------------------------------------------
// Products with a lower-triangular L (row-major, contiguous, D×D). Z, Y: (N, D) contiguous.
// ---------------------------------------------------------------------------------------------------

// Y = Z·tril(L). Few rows: y_n = Σ_i z_ni L[i, :i+1], parallel over column chunks.
template <typename T>
void tril_project_loops(const T* Z, const T* L, T* Y, int64_t N, int64_t D) {
  at::parallel_for(0, D, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < N; ++n) {
      T* y = Y + n * D;
      const T* z = Z + n * D;
      std::fill(y + c0, y + c1, T(0));
      for (int64_t i = c0; i < D; ++i) {
        const T zi = z[i];
        if (zi == T(0)) continue;
        const T* Li = L + i * D;
        const int64_t jend = std::min(i + 1, c1);
        for (int64_t j = c0; j < jend; ++j) y[j] += zi * Li[j];
      }
    }
  });
}

// Dot product with 8 independent partial sums, so that the compiler vectorises it without -ffast-math.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[j + k] * b[j + k];
  T s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// dZ = dY·tril(L)ᵀ. Few rows: dz_ni = dY[n, :i+1]·L[i, :i+1], parallel over i.
template <typename T>
void tril_project_t_loops(const T* dY, const T* L, T* dZ, int64_t N, int64_t D) {
  at::parallel_for(0, D, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t n = 0; n < N; ++n) dZ[n * D + i] = dot(dY + n * D, L + i * D, i + 1);
  });
}

// Out = tril(Aᵀ B) (D×D). Few rows: row i = Σ_n A[n,i] B[n, :i+1], parallel over rows.
template <typename T>
void tril_outer_loops(const T* A, const T* Bm, T* Out, int64_t N, int64_t D) {
  at::parallel_for(0, D, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* o = Out + i * D;
      std::fill(o, o + D, T(0));
      for (int64_t n = 0; n < N; ++n) {
        const T a = A[n * D + i];
        const T* b = Bm + n * D;
        for (int64_t j = 0; j <= i; ++j) o[j] += a * b[j];
      }
    }
  });
}

// tril(L) as a new contiguous matrix (at::tril is a slow generic kernel; this is a parallel row copy).
Tensor lower_copy(const Tensor& L) {
  const int64_t D = L.size(0);
  Tensor out = at::empty({D, D}, L.options());
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "lower_copy", [&] {
    const scalar_t* src = L.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, D, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        std::copy(src + i * D, src + i * D + i + 1, dst + i * D);
        std::fill(dst + i * D + i + 1, dst + (i + 1) * D, scalar_t(0));
      }
    });
  });
  return out;
}

// Y = Z·tril(L) for a block of rows, on the calling thread: column block J of Y needs rows j >= j0 of L only; each
// block is written in place (ld = D). Lt = lower_copy(L).
void tril_project_rows(const Tensor& Z, const Tensor& Lt, Tensor Y) {
  const int64_t D = Z.size(1);
  if (D <= 2 * kBlock) {
    at::mm_out(Y, Z, Lt);
    return;
  }
  for (int64_t j0 = 0; j0 < D; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, D - j0);
    Tensor out = Y.narrow(1, j0, nb);
    at::mm_out(out, Z.narrow(1, j0, D - j0), Lt.narrow(0, j0, D - j0).narrow(1, j0, nb));
  }
}

// dZ = dY·tril(L)ᵀ for a block of rows, on the calling thread: column block I of dZ needs columns j < i1 of L's
// rows I only.
void tril_project_t_rows(const Tensor& dY, const Tensor& Lt, Tensor dZ) {
  const int64_t D = dY.size(1);
  if (D <= 2 * kBlock) {
    at::mm_out(dZ, dY, Lt.t());
    return;
  }
  for (int64_t i0 = 0; i0 < D; i0 += kBlock) {
    const int64_t nb = std::min(kBlock, D - i0);
    Tensor out = dZ.narrow(1, i0, nb);
    at::mm_out(out, dY.narrow(1, 0, i0 + nb), Lt.narrow(0, i0, nb).narrow(1, 0, i0 + nb).t());
  }
}

// Squared norms of rows [r0, r1) of Y (N×D, contiguous) into norms[r0:r1].
void row_norms(const Tensor& Y, Tensor& norms, int64_t r0, int64_t r1) {
  const int64_t D = Y.size(1);
  AT_DISPATCH_FLOATING_TYPES(Y.scalar_type(), "row_norms", [&] {
    const scalar_t* y = Y.data_ptr<scalar_t>();
    scalar_t* out = norms.data_ptr<scalar_t>();
    for (int64_t r = r0; r < r1; ++r) out[r] = dot(y + r * D, y + r * D, D);
  });
}

// Y = Z·tril(L) (N×D). With `norms` (N), also the squared row norms of Y, in the same region.
Tensor tril_project(const Tensor& Z, const Tensor& L, Tensor* norms = nullptr) {
  const int64_t N = Z.size(0), D = Z.size(1);
  Tensor Y = at::empty({N, D}, Z.options());
  if (norms) *norms = at::zeros({N}, Z.options());
  if (N == 0 || D == 0) return Y.zero_();
  if (N <= kFewRows) {
    AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "tril_project", [&] {
      tril_project_loops<scalar_t>(Z.data_ptr<scalar_t>(), L.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), N, D);
    });
    if (norms) row_norms(Y, *norms, 0, N);
    return Y;
  }
  const Tensor Lt = lower_copy(L);
  parallel_for_aten(0, N, kRowGrain, [&](int64_t r0, int64_t r1) {
    tril_project_rows(Z.narrow(0, r0, r1 - r0), Lt, Y.narrow(0, r0, r1 - r0));
    if (norms) row_norms(Y, *norms, r0, r1);
  });
  return Y;
}

Tensor tril_project_t(const Tensor& dY, const Tensor& L) {
  const int64_t N = dY.size(0), D = dY.size(1);
  Tensor dZ = at::empty({N, D}, dY.options());
  if (N == 0 || D == 0) return dZ.zero_();
  if (N <= kFewRows) {
    AT_DISPATCH_FLOATING_TYPES(dY.scalar_type(), "tril_project_t", [&] {
      tril_project_t_loops<scalar_t>(dY.data_ptr<scalar_t>(), L.data_ptr<scalar_t>(), dZ.data_ptr<scalar_t>(), N,
                                     D);
    });
    return dZ;
  }
  const Tensor Lt = lower_copy(L);
  parallel_for_aten(0, N, kRowGrain, [&](int64_t r0, int64_t r1) {
    tril_project_t_rows(dY.narrow(0, r0, r1 - r0), Lt, dZ.narrow(0, r0, r1 - r0));
  });
  return dZ;
}

Tensor tril_outer(const Tensor& A, const Tensor& Bm) {
  const int64_t N = A.size(0), D = A.size(1);
  Tensor out = at::empty({D, D}, A.options());
  if (N <= kFewRows) {
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "tril_outer", [&] {
      tril_outer_loops<scalar_t>(A.data_ptr<scalar_t>(), Bm.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, D);
    });
    return out;
  }
  // Row block I of the lower triangle is A[:, I]ᵀ·Bm[:, :i1], work ∝ i1: block p is paired with block n−1−p so
  // that every task of the one region does about the same work; each zeroes its rows' strict upper triangle.
  const int64_t nblk = (D + kOuterRows - 1) / kOuterRows, npairs = (nblk + 1) / 2;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "tril_outer", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    parallel_for_aten(0, npairs, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t pair[2] = {p, nblk - 1 - p};
        for (int t = 0; t < (pair[0] == pair[1] ? 1 : 2); ++t) {   // the middle block of an odd count is alone
          const int64_t i0 = pair[t] * kOuterRows, nb = std::min(kOuterRows, D - i0), i1 = i0 + nb;
          Tensor rows = out.narrow(0, i0, nb).narrow(1, 0, i1);
          at::mm_out(rows, A.narrow(1, i0, nb).t(), Bm.narrow(1, 0, i1));
          for (int64_t i = i0; i < i1; ++i) std::fill(o + i * D + i + 1, o + (i + 1) * D, scalar_t(0));
        }
      }
    });
  });
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// mahalanobis
// ---------------------------------------------------------------------------------------------------

namespace {

void check_mahalanobis(const Tensor& x, const Tensor& means, const Tensor& L) {
  check_float(x, "x");
  check_float(means, "means");
  TORCH_CHECK(x.dim() == 2, "x must have shape (B,D), got ", x.sizes());
  TORCH_CHECK(means.dim() == 2 && means.size(1) == x.size(1), "means must have shape (K,D) with D = ", x.size(1),
              ", got ", means.sizes());
  check_same_dtype(means, "means", x, "x");
  check_prec_chol(L, x.size(1), x.scalar_type());
}

// Z = [x; means] − mean(means), in the compute dtype, contiguous (B+K, D). Centred on the mean of the finite means
// (a NaN/Inf mean must not reach every distance), found and subtracted in one pass over column chunks.
Tensor centred_rows(const Tensor& x, const Tensor& means, at::ScalarType acc) {
  const int64_t B = x.size(0), K = means.size(0), D = x.size(1);
  Tensor Z = at::empty({B + K, D}, x.options().dtype(acc));
  Z.narrow(0, 0, B).copy_(x);
  Z.narrow(0, B, K).copy_(means);
  if (K == 0 || D == 0) return Z;
  AT_DISPATCH_FLOATING_TYPES(acc, "centred_rows", [&] {
    scalar_t* z = Z.data_ptr<scalar_t>();
    at::parallel_for(0, D, 64, [&](int64_t c0, int64_t c1) {
      const int64_t w = c1 - c0;
      std::vector<double> sum(w, 0.0);
      std::vector<int64_t> count(w, 0);
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* m = z + (B + k) * D + c0;
        for (int64_t j = 0; j < w; ++j)
          if (std::isfinite(m[j])) {
            sum[j] += static_cast<double>(m[j]);
            ++count[j];
          }
      }
      std::vector<scalar_t> centre(w);
      for (int64_t j = 0; j < w; ++j) centre[j] = static_cast<scalar_t>(sum[j] / std::max<int64_t>(count[j], 1));
      for (int64_t n = 0; n < B + K; ++n) {
        scalar_t* row = z + n * D + c0;
        for (int64_t j = 0; j < w; ++j) row[j] -= centre[j];
      }
    });
  });
  return Z;
}

}  // namespace

std::tuple<Tensor, Tensor> mahalanobis_fwd_cpu(const Tensor& x, const Tensor& means, const Tensor& prec_chol) {
  check_mahalanobis(x, means, prec_chol);
  const int64_t B = x.size(0), K = means.size(0);
  const auto acc = compute_type(x.scalar_type());
  const Tensor L = prec_chol.to(acc).contiguous();
  const Tensor Z = centred_rows(x, means, acc);
  Tensor norms;
  const Tensor Y = L.dim() == 1 ? Z * L : tril_project(Z, L, &norms);
  if (L.dim() == 1) norms = (Y * Y).sum(1);
  Tensor dist = at::mm(Y.narrow(0, 0, B), Y.narrow(0, B, K).t());  // the cross term, finished in place
  AT_DISPATCH_FLOATING_TYPES(acc, "mahalanobis_fwd", [&] {
    scalar_t* d = dist.data_ptr<scalar_t>();
    const scalar_t* nx = norms.data_ptr<scalar_t>();
    const scalar_t* nm = nx + B;
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t k = 0; k < K; ++k) d[b * K + k] = mahalanobis_epilogue(nx[b], nm[k], d[b * K + k]);
    });
  });
  return {dist.to(x.scalar_type()), Y};
}

std::tuple<Tensor, Tensor, Tensor> mahalanobis_bwd_cpu(const Tensor& grad, const Tensor& x, const Tensor& means,
                                                       const Tensor& prec_chol, const Tensor& proj) {
  check_mahalanobis(x, means, prec_chol);
  const int64_t B = x.size(0), K = means.size(0), D = x.size(1);
  const auto acc = compute_type(x.scalar_type());
  CHECK_SHAPE(grad, B, K);
  CHECK_SHAPE(proj, B + K, D);
  TORCH_CHECK(proj.scalar_type() == acc, "proj must be the forward's saved projection (", acc, "), got ",
              proj.scalar_type());
  const Tensor G = grad.to(acc).contiguous();
  const Tensor Y = proj.contiguous();
  const Tensor L = prec_chol.to(acc).contiguous();
  const Tensor Yx = Y.narrow(0, 0, B), Ym = Y.narrow(0, B, K);
  // dY_x = 2(r∘Y_x − G Y_μ) and dY_μ = 2(s∘Y_μ − Gᵀ Y_x) in one region over the B + K rows of dY
  Tensor dY = at::empty({B + K, D}, Y.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "mahalanobis_bwd_dy", [&] {
    const scalar_t* g = G.data_ptr<scalar_t>();
    const scalar_t* y = Y.data_ptr<scalar_t>();
    scalar_t* dy = dY.data_ptr<scalar_t>();
    // rows [r0, r1) of dY: dy_r = 2(c·y_r − prod_r), prod already in dY, c = the row's sum of G (or column's)
    auto finish = [&](int64_t r0, int64_t r1, auto weight) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t c = weight(r);
        for (int64_t d = 0; d < D; ++d) dy[r * D + d] = scalar_t(2) * (c * y[r * D + d] - dy[r * D + d]);
      }
    };
    parallel_for_aten(0, B + K, kRowGrain, [&](int64_t r0, int64_t r1) {
      const int64_t x1 = std::min(r1, B), m0 = std::max(r0, B);
      if (r0 < x1) {
        Tensor out = dY.narrow(0, r0, x1 - r0);
        at::mm_out(out, G.narrow(0, r0, x1 - r0), Ym);
        finish(r0, x1, [&](int64_t b) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k) s += static_cast<double>(g[b * K + k]);
          return static_cast<scalar_t>(s);
        });
      }
      if (m0 < r1) {
        Tensor out = dY.narrow(0, m0, r1 - m0);
        at::mm_out(out, G.narrow(1, m0 - B, r1 - m0).t(), Yx);
        finish(m0, r1, [&](int64_t r) {
          double s = 0;
          for (int64_t b = 0; b < B; ++b) s += static_cast<double>(g[b * K + (r - B)]);
          return static_cast<scalar_t>(s);
        });
      }
    });
  });
  const Tensor Z = centred_rows(x, means, acc);
  if (L.dim() == 1) {
    const Tensor dZ = dY * L;
    // dx and dmeans are row blocks of dZ: each gets its own storage (outputs of an op may not alias).
    return {owned(dZ.narrow(0, 0, B), x.scalar_type()), owned(dZ.narrow(0, B, K), means.scalar_type()),
            (Z * dY).sum(0).to(prec_chol.scalar_type())};
  }
  // dZ = dY·Lᵀ straight into dx and dmeans (separate storage: outputs of an op may not alias), in one region
  Tensor dx = at::empty({B, D}, dY.options()), dm = at::empty({K, D}, dY.options());
  if (B + K <= kFewRows) {
    const Tensor dZ = tril_project_t(dY, L);
    dx.copy_(dZ.narrow(0, 0, B));
    dm.copy_(dZ.narrow(0, B, K));
  } else if (D > 0) {
    const Tensor Lt = lower_copy(L);
    parallel_for_aten(0, B + K, kRowGrain, [&](int64_t r0, int64_t r1) {
      const int64_t x1 = std::min(r1, B), m0 = std::max(r0, B);
      if (r0 < x1) tril_project_t_rows(dY.narrow(0, r0, x1 - r0), Lt, dx.narrow(0, r0, x1 - r0));
      if (m0 < r1) tril_project_t_rows(dY.narrow(0, m0, r1 - m0), Lt, dm.narrow(0, m0 - B, r1 - m0));
    });
  }
  const Tensor dL = tril_outer(Z, dY);
  return {dx.to(x.scalar_type()), dm.to(means.scalar_type()), dL.to(prec_chol.scalar_type())};
}

// ---------------------------------------------------------------------------------------------------
// gaussian_kl
// ---------------------------------------------------------------------------------------------------

namespace {

void check_kl(const Tensor& mu, const Tensor& log_var, const Tensor& prior_mean, const Tensor& L) {
  check_float(mu, "mu");
  check_float(log_var, "log_var");
  check_float(prior_mean, "prior_mean");
  TORCH_CHECK(mu.dim() == 2, "mu must have shape (B,D), got ", mu.sizes());
  const int64_t B = mu.size(0), D = mu.size(1);
  CHECK_SHAPE(log_var, B, D);
  TORCH_CHECK(prior_mean.sizes() == mu.sizes() || (prior_mean.dim() == 1 && prior_mean.size(0) == D),
              "prior_mean must have shape (B,D) or (D,) with B = ", B, ", D = ", D, ", got ", prior_mean.sizes());
  TORCH_CHECK(log_var.scalar_type() == mu.scalar_type() && prior_mean.scalar_type() == mu.scalar_type(),
              "log_var and prior_mean must have mu's dtype ", mu.scalar_type());
  check_prec_chol(L, D, mu.scalar_type());
}

// P_dd (squared row norms of tril(L), or l²) and Σ_d log L_dd.
template <typename T>
std::pair<Tensor, T> precision_diag(const Tensor& L) {
  const int64_t D = L.size(0);
  Tensor diag_p = at::empty({D}, L.options());
  T* dp = diag_p.data_ptr<T>();
  const T* l = L.data_ptr<T>();
  T log_half = 0;
  if (L.dim() == 1) {
    for (int64_t d = 0; d < D; ++d) {
      dp[d] = l[d] * l[d];
      log_half += std::log(l[d]);
    }
  } else {
    at::parallel_for(0, D, 32, [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; ++d) dp[d] = dot(l + d * D, l + d * D, d + 1);
    });
    for (int64_t d = 0; d < D; ++d) log_half += std::log(l[d * D + d]);
  }
  return {diag_p, log_half};
}

}  // namespace

std::tuple<Tensor, Tensor> gaussian_kl_fwd_cpu(const Tensor& mu, const Tensor& log_var, const Tensor& prior_mean,
                                               const Tensor& prec_chol) {
  check_kl(mu, log_var, prior_mean, prec_chol);
  const int64_t B = mu.size(0), D = mu.size(1);
  const auto acc = compute_type(mu.scalar_type());
  const Tensor L = prec_chol.to(acc).contiguous();
  const Tensor delta = (prior_mean.to(acc) - mu.to(acc)).contiguous();  // (B, D), broadcasting a shared prior
  const Tensor U = L.dim() == 1 ? delta * L : tril_project(delta, L);
  const Tensor lv = log_var.to(acc).contiguous();
  Tensor kl = at::empty({B}, U.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "gaussian_kl_fwd", [&] {
    auto [diag_p, log_half] = precision_diag<scalar_t>(L);
    const scalar_t* dp = diag_p.data_ptr<scalar_t>();
    const scalar_t* u = U.data_ptr<scalar_t>();
    const scalar_t* v = lv.data_ptr<scalar_t>();
    scalar_t* out = kl.data_ptr<scalar_t>();
    const scalar_t offset = scalar_t(0.5) * scalar_t(D) + log_half;  // ½(D + log|P|)
    at::parallel_for(0, B, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t s = 0;
        for (int64_t d = 0; d < D; ++d) s += kl_term(dp[d], v[b * D + d], u[b * D + d]);
        out[b] = scalar_t(0.5) * s - offset;
      }
    });
  });
  return {kl.to(mu.scalar_type()), U};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gaussian_kl_bwd_cpu(const Tensor& grad, const Tensor& mu,
                                                               const Tensor& log_var, const Tensor& prior_mean,
                                                               const Tensor& prec_chol, const Tensor& proj) {
  check_kl(mu, log_var, prior_mean, prec_chol);
  const int64_t B = mu.size(0), D = mu.size(1);
  const auto acc = compute_type(mu.scalar_type());
  CHECK_SHAPE(grad, B);
  CHECK_SHAPE(proj, B, D);
  TORCH_CHECK(proj.scalar_type() == acc, "proj must be the forward's saved projection (", acc, "), got ",
              proj.scalar_type());
  const Tensor g = grad.to(acc).contiguous();
  const Tensor U = proj.contiguous();
  const Tensor L = prec_chol.to(acc).contiguous();
  const Tensor lv = log_var.to(acc).contiguous();
  const Tensor delta = (prior_mean.to(acc) - mu.to(acc)).contiguous();
  Tensor dlv = at::empty({B, D}, U.options());
  Tensor w = at::zeros({D}, U.options());  // Σ_b g_b e^{lv_bd}
  Tensor dL;
  AT_DISPATCH_FLOATING_TYPES(acc, "gaussian_kl_bwd", [&] {
    auto [diag_p, log_half] = precision_diag<scalar_t>(L);
    (void)log_half;
    const scalar_t* dp = diag_p.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* v = lv.data_ptr<scalar_t>();
    scalar_t* out = dlv.data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, D, 64, [&](int64_t d0, int64_t d1) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t d = d0; d < d1; ++d) {
          out[b * D + d] = kl_dlog_var(gp[b], dp[d], v[b * D + d]);
          wp[d] += gp[b] * std::exp(v[b * D + d]);
        }
    });
    const scalar_t gsum = g.sum().item<scalar_t>();
    const scalar_t* l = L.data_ptr<scalar_t>();
    if (L.dim() == 1) {
      dL = (delta * U * g.unsqueeze(1)).sum(0);
      scalar_t* o = dL.data_ptr<scalar_t>();
      for (int64_t d = 0; d < D; ++d) o[d] += l[d] * wp[d] - gsum / l[d];
    } else {
      dL = tril_outer(delta * g.unsqueeze(1), U);
      scalar_t* o = dL.data_ptr<scalar_t>();
      at::parallel_for(0, D, 32, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = 0; j <= i; ++j) o[i * D + j] += l[i * D + j] * wp[i];
          o[i * D + i] -= gsum / l[i * D + i];
        }
      });
    }
  });
  // d(m − mu) = g ∘ (U·Lᵀ)
  Tensor ddelta = (L.dim() == 1 ? U * L : tril_project_t(U, L)).mul_(g.unsqueeze(1));
  Tensor dprior = prior_mean.dim() == 1 ? ddelta.sum(0) : ddelta;
  return {ddelta.neg().to(mu.scalar_type()), dlv.to(log_var.scalar_type()), dprior.to(prior_mean.scalar_type()),
          dL.to(prec_chol.scalar_type())};
}

}  // namespace clfast::gaussian

