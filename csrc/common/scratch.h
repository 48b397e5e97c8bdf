// Per-thread scratch memory of the CPU kernels, kept from call to call: no allocation, page faults or zeroing
// per call (a kernel must write what it reads). A buffer is reallocated when too small, or when far larger
// than needed (a big call's memory is not kept forever).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "common/index_math.h"

namespace clfast::cpu {

constexpr int kScratchSlots = 8;

inline void* scratch_bytes(int slot, int64_t bytes) {
  struct Buffer {
    void* data = nullptr;
    int64_t capacity = 0;
    ~Buffer() {
      std::free(data);
    }
  };
  thread_local Buffer buffers[kScratchSlots];
  Buffer& b = buffers[slot];
  bytes = round_up(std::max<int64_t>(bytes, 1), 64);
  if (b.capacity < bytes || b.capacity > 4 * bytes + (int64_t{1} << 22)) {
    std::free(b.data);
    b.data = std::aligned_alloc(64, bytes);
    b.capacity = b.data != nullptr ? bytes : 0;
    TORCH_CHECK(b.data != nullptr, "clfast: out of memory (", bytes, " bytes of CPU scratch)");
  }
  return b.data;
}

// n elements of C, 64-byte aligned, in scratch slot `slot` (0 <= slot < kScratchSlots) of this thread.
template <typename C>
inline C* scratch(int slot, int64_t n) {
  return static_cast<C*>(scratch_bytes(slot, n * static_cast<int64_t>(sizeof(C))));
}

}  // namespace clfast::cpu
