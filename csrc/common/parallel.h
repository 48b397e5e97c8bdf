// at::parallel_for for bodies that call ATen ops.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace clfast {

// Least work per task of a parallel region, in multiply-adds (about 40-200 µs of one core). A region ends at a
// barrier where the calling thread waits for its slowest worker: on an idle machine that costs microseconds, but
// with more runnable threads than cores a worker may first wait a scheduler slice (milliseconds) for its core.
// Work too small to repay that runs on the calling thread.
constexpr int64_t kMinTaskMacs = int64_t(1) << 21;

// The grain (items per task) of a parallel loop over items of `macs_per_item` multiply-adds each.
inline int64_t work_grain(int64_t macs_per_item) {
  const int64_t per = macs_per_item > 0 ? macs_per_item : 1;
  return (kMinTaskMacs + per - 1) / per;
}

// at::parallel_for whose workers run with the calling thread's thread-local state. A kernel runs below autograd
// (its inputs may require grad: a saved forward output does); an ATen op called on a worker thread would
// otherwise see the Autograd dispatch key again, and refuse out= arguments that require grad.
template <class F>
inline void parallel_for_aten(int64_t begin, int64_t end, int64_t grain, const F& body) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    body(b, e);
  });
}

}  // namespace clfast
