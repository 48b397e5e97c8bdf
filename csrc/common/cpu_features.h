// The instruction sets of the CPU kernels: what the build compiled in, and which form runs here.
//
// setup.py builds for AVX2 + FMA + F16C. Kernels that also have an AVX-512 form compile it with
// CLFAST_AVX512_TARGET on top of that baseline, and run it where cpu::use_avx512() says so (pick the form with
// ISA_SWITCH, static_switch.h). Builds without AVX2 run the scalar code of the AVX2 forms.
//
// Environment (read once): CLFAST_CPU_DISABLE_AVX512=1 runs the AVX2 forms on an AVX-512 machine (for tests).
#pragma once

#include <cstdlib>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CLFAST_HAS_AVX2 1
#else
#define CLFAST_HAS_AVX2 0
#endif

#if CLFAST_HAS_AVX2 && defined(__GNUC__) && defined(__x86_64__)
#define CLFAST_HAS_AVX512 1
#define CLFAST_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#else
#define CLFAST_HAS_AVX512 0
#define CLFAST_AVX512_TARGET
#endif

// GCC 12 reports the _mm512_undefined_*() placeholders inside its own AVX-512 intrinsics (lane shuffles,
// reductions, scalef) as uninitialized: false positives, silenced around AVX-512 code.
#if defined(__GNUC__) && !defined(__clang__)
#define CLFAST_AVX512_DIAG_PUSH                                \
  _Pragma("GCC diagnostic push")                              \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define CLFAST_AVX512_DIAG_POP _Pragma("GCC diagnostic pop")
#else
#define CLFAST_AVX512_DIAG_PUSH
#define CLFAST_AVX512_DIAG_POP
#endif

namespace clfast::cpu {

// Whether the environment variable `name` is set to a value starting with '1'.
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '1';
}

// Whether the AVX-512 forms run: compiled in, the CPU has AVX-512 F/BW/VL/DQ with BF16, and
// CLFAST_CPU_DISABLE_AVX512 is not set. Decided once per process.
inline bool use_avx512() {
#if CLFAST_HAS_AVX512
  static const bool use = [] {
    if (env_flag("CLFAST_CPU_DISABLE_AVX512")) {
      return false;
    }
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return use;
#else
  return false;
#endif
}

// Tags naming a kernel's form: overloads taking isa::Avx2 hold the AVX2 (or scalar) code, those taking
// isa::Avx512 the AVX-512 code (defined only where CLFAST_HAS_AVX512).
namespace isa {
struct Avx2 {};
struct Avx512 {};
}  // namespace isa

}  // namespace clfast::cpu
