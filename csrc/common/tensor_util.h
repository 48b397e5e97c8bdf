// Small preparations of kernel inputs and outputs.
#pragma once

#include <ATen/core/Tensor.h>

namespace clfast {

// t with a contiguous last dimension (a view when it already has one): the kernels take the other strides.
inline at::Tensor inner_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// t in dtype, in storage of its own (a copy, never a view of t): outputs of an op may not alias each other.
inline at::Tensor owned(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(t.options().dtype(dtype), /*non_blocking=*/false, /*copy=*/true);
}

}  // namespace clfast
