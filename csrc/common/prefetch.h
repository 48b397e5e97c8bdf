// Software prefetch of the rows that a kernel's next work item will read.
#pragma once

#include <cstdint>

#include "common/index_math.h"

namespace clfast::cpu {

// Streams of rows (base, stride, rows, row bytes) prefetched a few cache lines at a time: the current item
// calls issue() from its element-wise loops, so that the next item's memory latency overlaps compute.
class RowPrefetch {
 public:
  void add(const void* base, int64_t stride_bytes, int64_t rows, int64_t row_bytes) {
    if (n_ < kMaxStreams && rows > 0 && row_bytes > 0) {
      streams_[n_++] = {static_cast<const char*>(base), stride_bytes, rows, ceil_div(row_bytes, 64)};
      left_ += rows * streams_[n_ - 1].lines;
    }
  }
  int64_t lines_left() const {
    return left_;
  }
  // Prefetches the next `count` cache lines (into L2).
  void issue(int64_t count) {
    for (; count > 0 && cur_ < n_; --count) {
      const Stream& st = streams_[cur_];
#if defined(__GNUC__)
      __builtin_prefetch(st.base + row_ * st.stride + line_ * 64, 0, 2);
#endif
      --left_;
      if (++line_ == st.lines) {
        line_ = 0;
        if (++row_ == st.rows) {
          row_ = 0;
          ++cur_;
        }
      }
    }
  }

 private:
  struct Stream {
    const char* base;
    int64_t stride, rows, lines;
  };
  static constexpr int kMaxStreams = 8;
  Stream streams_[kMaxStreams];
  int n_ = 0, cur_ = 0;
  int64_t row_ = 0, line_ = 0, left_ = 0;
};

}  // namespace clfast::cpu
