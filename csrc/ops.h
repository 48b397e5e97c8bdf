// The kernels that bindings.cpp registers with the library _clfast_C, one block per op folder (its schemas
// are in bindings.cpp). Each op's <op>_cpu.cpp defines its block.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace clfast {

namespace prefix_attention {
std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const std::optional<at::Tensor>& prefix_k,
                                                            const std::optional<at::Tensor>& prefix_v,
                                                            const std::optional<at::Tensor>& kv_mask, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
    const std::optional<at::Tensor>& kv_mask, const at::Tensor& out, const at::Tensor& lse, double scale);
}  // namespace prefix_attention

namespace retrieve {
std::tuple<at::Tensor, at::Tensor> retrieve_topk_cpu(const at::Tensor& query, const at::Tensor& keys, int64_t k,
                                                     c10::string_view metric);
}  // namespace retrieve

namespace gaussian {
std::tuple<at::Tensor, at::Tensor> mahalanobis_fwd_cpu(const at::Tensor& x, const at::Tensor& means,
                                                       const at::Tensor& prec_chol);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mahalanobis_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& means,
                                                                   const at::Tensor& prec_chol,
                                                                   const at::Tensor& proj);
std::tuple<at::Tensor, at::Tensor> gaussian_kl_fwd_cpu(const at::Tensor& mu, const at::Tensor& log_var,
                                                       const at::Tensor& prior_mean, const at::Tensor& prec_chol);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& prior_mean,
    const at::Tensor& prec_chol, const at::Tensor& proj);
}  // namespace gaussian

namespace prompt_conv {
std::tuple<at::Tensor, at::Tensor> prompt_conv_fwd_cpu(const at::Tensor& embeddings, const at::Tensor& weight,
                                                       const at::Tensor& bias, const at::Tensor& prompt_weights,
                                                       bool mix_first);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_conv_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& prompt_weights, const at::Tensor& saved, bool mix_first);
}  // namespace prompt_conv

}  // namespace clfast
