// Preconditions of the kernels' arguments. The Python layer validates first (ValueError / TypeError); these
// checks make a direct call of torch.ops._clfast_C.<kernel> raise instead of crash, in sentences:
//
//   CHECK_SHAPE(grad, B, K);                  "grad must have shape (B, K) = [2, 3], got [2, 4]"
//   check_cpu(k, "k", "prefix_attention: ");  "prefix_attention: k must be a CPU tensor, got cuda:0"
//
// `op` is the prefix of each message (the op's name and ": ", or nothing).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define CHECK_SHAPE(t, ...)                                                                            \
  TORCH_CHECK((t).sizes() == ::at::IntArrayRef({__VA_ARGS__}), #t " must have shape (" #__VA_ARGS__ \
              ") = ", ::at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

namespace clfast {

inline void check_cpu(const at::Tensor& t, const char* name, const char* op = "") {
  TORCH_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got ", t.device());
}

// The dtypes of the kernels that compute in fp32: float32, bfloat16, float16.
inline void check_kernel_dtype(const at::Tensor& t, const char* name, const char* op = "") {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, name,
              " must be float32, bfloat16 or float16, got ", dt);
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                             const char* op = "") {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

}  // namespace clfast
