// The Python module clfast._C. Each op's translation unit registers its own kernels with
// TORCH_LIBRARY_FRAGMENT(_clfast_C, ...) and TORCH_LIBRARY_IMPL(_clfast_C, CPU/CUDA, ...); importing this
// module runs those static registrations. This file adds only the module itself and a build-info op.
#include <Python.h>

#include <torch/library.h>

#include <string>

#ifndef CLFAST_BUILD_NOTE
#define CLFAST_BUILD_NOTE "unknown"
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(_clfast_C, m) {
  m.def("build_info() -> str", &build_info);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}

static struct PyModuleDef clfast_c_module = {PyModuleDef_HEAD_INIT, "_C", "clfast compiled kernels", -1,
                                             nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&clfast_c_module); }
