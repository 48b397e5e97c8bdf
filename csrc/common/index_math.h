// Integer helpers for tiling: shared by the CPU kernels and the host/device math headers (C10_HOST_DEVICE).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace clfast {

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

C10_HOST_DEVICE inline int64_t round_up(int64_t a, int64_t multiple) {
  return ceil_div(a, multiple) * multiple;
}

}  // namespace clfast
