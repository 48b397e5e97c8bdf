// Shared math of the Gaussian ops (mahalanobis, gaussian_kl): scalar epilogues that the CPU kernels run and
// a CUDA kernel could run too (C10_HOST_DEVICE). The heavy lifting is GEMMs; these finish rows and tiles.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace clfast::gaussian {

// Squared distance from the expansion ‖y‖² + ‖m‖² − 2 y·m, clamped at 0 (the expansion can round below 0
// for coincident points; the true value never is). A NaN stays NaN (a NaN or Inf input).
template <typename T>
C10_HOST_DEVICE inline T mahalanobis_epilogue(T norm_x, T norm_m, T cross) {
  const T d = norm_x + norm_m - T(2) * cross;
  return d < T(0) ? T(0) : d;
}

// One coordinate's share of 2·KL: P_dd σ_d² + u_d² − log σ_d², with u = (m − mu)·L and σ² = e^{log_var}.
// The row's KL is ½(Σ_d kl_term − D − log|P|).
template <typename T>
C10_HOST_DEVICE inline T kl_term(T diag_p, T log_var, T u) {
  return diag_p * std::exp(log_var) + u * u - log_var;
}

// d KL / d log_var_d for an upstream gradient g: ½ g (P_dd σ_d² − 1).
template <typename T>
C10_HOST_DEVICE inline T kl_dlog_var(T g, T diag_p, T log_var) {
  return T(0.5) * g * (diag_p * std::exp(log_var) - T(1));
}

}  // namespace clfast::gaussian
