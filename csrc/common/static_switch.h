// Runtime choices turned into compile-time constants, in the manner of flash-attention's static_switch.h.
// Each switch runs its last argument, a lambda, with the chosen constant in scope:
//
//   FLOAT_SWITCH(q.scalar_type(), T, [&] { kernel<T>(...); });       // float32 / bfloat16 / float16 -> T
//   BOOL_SWITCH(scale >= 0.f, kPositive, [&] { kernel<kPositive>(...); });
//   ISA_SWITCH(has_avx512_form<T>, Isa, [&] { kernel(Isa{}, ...); });  // the CPU form (cpu_features.h)
//   int_switch<4>(n, [&](auto c) { kernel<decltype(c)::value>(...); });  // n in [1, 4]
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <type_traits>
#include <utility>

#include "common/cpu_features.h"

// T = the C++ type of a float32, bfloat16 or float16 tensor dtype.
#define FLOAT_SWITCH(DTYPE, T, ...)                                                 \
  [&] {                                                                              \
    switch (DTYPE) {                                                                 \
      case ::c10::ScalarType::Float: {                                               \
        using T = float;                                                             \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case ::c10::ScalarType::BFloat16: {                                            \
        using T = ::c10::BFloat16;                                                   \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case ::c10::ScalarType::Half: {                                                \
        using T = ::c10::Half;                                                       \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      default:                                                                       \
        TORCH_CHECK(false, "expected a float32, bfloat16 or float16 tensor, got ", DTYPE); \
    }                                                                                \
  }()

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// ISA = cpu::isa::Avx512 where HAS_AVX512_FORM (a constant: this instantiation has an AVX-512 overload) and
// cpu::use_avx512(); else cpu::isa::Avx2. Builds without AVX-512 code never name the AVX-512 overloads.
#if CLFAST_HAS_AVX512
#define ISA_SWITCH(HAS_AVX512_FORM, ISA, ...)    \
  [&] {                                          \
    if constexpr (HAS_AVX512_FORM) {             \
      if (::clfast::cpu::use_avx512()) {         \
        using ISA = ::clfast::cpu::isa::Avx512;  \
        return __VA_ARGS__();                    \
      }                                          \
    }                                            \
    using ISA = ::clfast::cpu::isa::Avx2;        \
    return __VA_ARGS__();                        \
  }()
#else
#define ISA_SWITCH(HAS_AVX512_FORM, ISA, ...) \
  [&] {                                       \
    using ISA = ::clfast::cpu::isa::Avx2;     \
    return __VA_ARGS__();                     \
  }()
#endif

namespace clfast {

// f(std::integral_constant<int, n>{}) for a runtime n in [1, N]; nothing for any other n.
template <int N, typename F>
inline void int_switch(int n, F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (void)((n == I + 1 && (f(std::integral_constant<int, I + 1>{}), true)) || ...);
  }(std::make_integer_sequence<int, N>{});
}

}  // namespace clfast
