// The Python module clfast._C, and every kernel's registration: the schemas of the library _clfast_C
// (TORCH_LIBRARY_FRAGMENT) and their CPU kernels (TORCH_LIBRARY_IMPL), declared in ops.h. Importing the
// module runs these static registrations; the Python side calls torch.ops._clfast_C.<name>.
//
// setup.py defines CLFAST_WITH_<OP>=0 for the op folders that CLFAST_EXCLUDE_OPS leaves out: their schemas
// are not registered (clfast._ext.has_op reports them missing).
#include <Python.h>

#include <torch/library.h>

#include <iterator>
#include <string>
#include <vector>

#include "common/brgemm.h"
#include "common/cpu_features.h"
#include "common/phases.h"
#include "ops.h"

#ifndef CLFAST_BUILD_NOTE
#define CLFAST_BUILD_NOTE "unknown"
#endif
#ifndef CLFAST_WITH_PREFIX_ATTENTION
#define CLFAST_WITH_PREFIX_ATTENTION 1
#endif
#ifndef CLFAST_WITH_RETRIEVE
#define CLFAST_WITH_RETRIEVE 1
#endif
#ifndef CLFAST_WITH_MAHALANOBIS
#define CLFAST_WITH_MAHALANOBIS 1
#endif
#ifndef CLFAST_WITH_PROMPT_CONV
#define CLFAST_WITH_PROMPT_CONV 1
#endif

namespace {

std::string build_info() {
  std::string s = "compiler=";
#if defined(__clang__)
  s += "clang " __clang_version__;
#elif defined(__GNUC__)
  s += "gcc " __VERSION__;
#endif
  s += "; ";
  s += CLFAST_BUILD_NOTE;
#if defined(__AVX512F__)
  s += "; simd=avx512";
#elif defined(__AVX2__)
  s += "; simd=avx2";
#endif
#if defined(_OPENMP)
  s += "; openmp";
#endif
  return s;
}

bool built_with_cuda() { return CLFAST_BUILD_CUDA != 0; }

// What the CPU kernels run on this machine, decided at run time (build_info says what was compiled): the
// element-wise forms (AVX-512 where compiled in and the CPU has F/BW/VL/DQ/BF16, else AVX2, else scalar), and
// per GEMM operand type whether oneDNN's brgemm computes it here (a 16-bit type that fails is computed in fp32).
std::string cpu_kernels_info() {
  namespace cpu = clfast::cpu;
  std::string s = "simd forms=";
  if (cpu::use_avx512()) {
    s += "avx512";
  } else {
    s += CLFAST_HAS_AVX2 ? "avx2" : "scalar";
    if (CLFAST_HAS_AVX512) {
      s += cpu::env_flag("CLFAST_CPU_DISABLE_AVX512") ? " (avx512 forms off: CLFAST_CPU_DISABLE_AVX512=1)"
                                                      : " (avx512 forms compiled; this CPU lacks avx512 f/bw/vl/dq/bf16)";
    }
  }
  s += std::string("; brgemm fp32=") + (cpu::brgemm_usable<float>() ? "yes" : "no (at::mm)");
  s += std::string("; bf16=") + (cpu::brgemm_usable<at::BFloat16>() ? "native" : "computed in fp32");
  s += std::string("; fp16=") + (cpu::brgemm_usable<at::Half>() ? "native" : "computed in fp32");
  return s;
}

// The CPU kernels' phase counters (common/phases.h): cpu_phase_timing(on) zeroes them and turns the timers on or
// off; cpu_phase_counters() reads them, one row per phase of cpu_phase_names(): (nanoseconds, sections, work).
void cpu_phase_timing(bool on) { clfast::cpu::set_phase_timing(on); }

std::vector<std::string> cpu_phase_names() {
  return {std::begin(clfast::cpu::kPhaseNames), std::end(clfast::cpu::kPhaseNames)};
}

at::Tensor cpu_phase_counters() {
  namespace cpu = clfast::cpu;
  at::Tensor out = at::empty({cpu::kPhases, 3}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const cpu::PhaseCounters& c = cpu::phase_counters();
  for (int i = 0; i < cpu::kPhases; ++i) {
    o[3 * i] = c.ns[i].load(std::memory_order_relaxed);
    o[3 * i + 1] = c.sections[i].load(std::memory_order_relaxed);
    o[3 * i + 2] = c.work[i].load(std::memory_order_relaxed);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(_clfast_C, m) {
  m.def("build_info() -> str", &build_info);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("cpu_kernels_info() -> str", &cpu_kernels_info);
  m.def("cpu_phase_timing(bool on) -> ()", &cpu_phase_timing);
  m.def("cpu_phase_names() -> str[]", &cpu_phase_names);
  m.def("cpu_phase_counters() -> Tensor", &cpu_phase_counters);
#if CLFAST_WITH_PREFIX_ATTENTION
  m.def(
      "prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
      "Tensor? kv_mask, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "prefix_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, "
      "Tensor? prefix_v, Tensor? kv_mask, Tensor out, Tensor lse, float scale) -> "
      "(Tensor dq, Tensor dk, Tensor dv, Tensor dprefix_k, Tensor dprefix_v)");
#endif
#if CLFAST_WITH_RETRIEVE
  m.def("retrieve_topk(Tensor query, Tensor keys, int k, str metric) -> (Tensor, Tensor)");
#endif
#if CLFAST_WITH_MAHALANOBIS
  m.def("mahalanobis_fwd(Tensor x, Tensor means, Tensor prec_chol) -> (Tensor, Tensor)");
  m.def("mahalanobis_bwd(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor proj) -> (Tensor, Tensor, "
        "Tensor)");
  m.def("gaussian_kl_fwd(Tensor mu, Tensor log_var, Tensor prior_mean, Tensor prec_chol) -> (Tensor, Tensor)");
  m.def("gaussian_kl_bwd(Tensor grad, Tensor mu, Tensor log_var, Tensor prior_mean, Tensor prec_chol, "
        "Tensor proj) -> (Tensor, Tensor, Tensor, Tensor)");
#endif
#if CLFAST_WITH_PROMPT_CONV
  m.def("prompt_conv_fwd(Tensor embeddings, Tensor weight, Tensor bias, Tensor prompt_weights, bool mix_first) -> "
        "(Tensor, Tensor)");
  m.def("prompt_conv_bwd(Tensor grad, Tensor embeddings, Tensor weight, Tensor bias, Tensor prompt_weights, "
        "Tensor saved, bool mix_first) -> (Tensor, Tensor, Tensor, Tensor)");
#endif
}

TORCH_LIBRARY_IMPL(_clfast_C, CPU, m) {
#if CLFAST_WITH_PREFIX_ATTENTION
  m.impl("prefix_attention_fwd", &clfast::prefix_attention::prefix_attention_fwd_cpu);
  m.impl("prefix_attention_bwd", &clfast::prefix_attention::prefix_attention_bwd_cpu);
#endif
#if CLFAST_WITH_RETRIEVE
  m.impl("retrieve_topk", &clfast::retrieve::retrieve_topk_cpu);
#endif
#if CLFAST_WITH_MAHALANOBIS
  m.impl("mahalanobis_fwd", &clfast::gaussian::mahalanobis_fwd_cpu);
  m.impl("mahalanobis_bwd", &clfast::gaussian::mahalanobis_bwd_cpu);
  m.impl("gaussian_kl_fwd", &clfast::gaussian::gaussian_kl_fwd_cpu);
  m.impl("gaussian_kl_bwd", &clfast::gaussian::gaussian_kl_bwd_cpu);
#endif
#if CLFAST_WITH_PROMPT_CONV
  m.impl("prompt_conv_fwd", &clfast::prompt_conv::prompt_conv_fwd_cpu);
  m.impl("prompt_conv_bwd", &clfast::prompt_conv::prompt_conv_bwd_cpu);
#endif
}

static struct PyModuleDef clfast_c_module = {PyModuleDef_HEAD_INIT, "_C", "clfast compiled kernels", -1,
                                             nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&clfast_c_module); }
