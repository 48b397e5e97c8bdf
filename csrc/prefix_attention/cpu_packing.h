// How prefix_attention's CPU kernels see their inputs (rows of (B,H,N,d) tensors, the virtual key sequence
// [prefix ; attended keys]) and pack them into GEMM operands (common/brgemm.h): fp32 row-major, or bf16/fp16
// with B operands in VNNI pairs.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/brgemm.h"
#include "common/index_math.h"
#include "common/prefetch.h"
#include "common/static_switch.h"
#include "common/transpose.h"

namespace clfast::prefix_attention {
// Internal linkage, as when this code sat inside prefix_attention_cpu.cpp (its only includer): GCC then
// specialises and inlines these calls as it did there.
namespace {

using cpu::kVnni;
using cpu::RowPrefetch;

// Rows of a (B,H,N,d) or shared (H,N,d) tensor whose last dimension is contiguous.
template <typename T>
struct RowView {
  const T* data = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;
  const T* rows(int64_t b, int64_t h) const {
    return data + b * sb + h * sh;
  }
};

template <typename T>
RowView<T> row_view(const at::Tensor& t) {
  RowView<T> v;
  v.data = t.data_ptr<T>();
  if (t.dim() == 4) {
    v.sb = t.stride(0);
    v.sh = t.stride(1);
    v.sn = t.stride(2);
  } else {  // shared prefix (H,P,d): same rows for every sample
    v.sh = t.stride(0);
    v.sn = t.stride(1);
  }
  return v;
}

// Key j of the virtual sequence [prefix ; attended keys] of one (b,h).
template <typename T>
struct KeyRows {
  using value_type = T;
  const T* pre = nullptr;
  int64_t pre_sn = 0;
  const T* seq = nullptr;
  int64_t seq_sn = 0;
  const int64_t* idx = nullptr;  // attended positions, or nullptr when every key is attended
  int64_t P = 0;
  const T* row(int64_t j) const {
    if (j < P) {
      return pre + j * pre_sn;
    }
    const int64_t n = j - P;
    return seq + (idx != nullptr ? idx[n] : n) * seq_sn;
  }
  const T* operator()(int64_t j) const {
    return row(j);
  }
};

// Rows at a fixed stride.
template <typename T>
struct StridedRows {
  using value_type = T;
  const T* base;
  int64_t sn;
  const T* operator()(int64_t i) const {
    return base + i * sn;
  }
};

template <typename T>
void prefetch_keys(RowPrefetch& pf, const KeyRows<T>& src, int64_t L, int64_t d) {
  if (src.P > 0) {
    pf.add(src.pre, src.pre_sn * sizeof(T), std::min(src.P, L), d * sizeof(T));
  }
  if (src.idx == nullptr && L > src.P) {  // masked (gathered) keys are left to the hardware
    pf.add(src.seq, src.seq_sn * sizeof(T), L - src.P, d * sizeof(T));
  }
}

template <typename C>
using Bits = std::conditional_t<sizeof(C) == 4, uint32_t, uint16_t>;

// A operand with keys as rows: dst[j][c] for j < L, c < dp (zero for c >= d).
template <typename C, typename RowFn>
void pack_rows(const RowFn& src, int64_t L, int64_t d, int64_t dp, C* dst) {
  using T = typename RowFn::value_type;
  for (int64_t j = 0; j < L; ++j) {
    const T* s = src(j);
    C* o = dst + j * dp;
    if constexpr (std::is_same_v<T, C>) {
      std::memcpy(o, s, d * sizeof(C));
    } else {
      for (int64_t c = 0; c < d; ++c) {
        o[c] = C(static_cast<float>(s[c]));
      }
    }
    for (int64_t c = d; c < dp; ++c) {
      o[c] = C(0.f);
    }
  }
}

// A operand with keys as columns: dst[c][j] for c < d, j < L; column L zeroed when L is odd
// (the 16-bit GEMMs reduce over an even number of keys).
template <typename C, typename T>
void pack_cols(const KeyRows<T>& src, int64_t L, int64_t d, int64_t ld, C* dst) {
  if constexpr (std::is_same_v<T, C>) {
    cpu::transpose_rows(src, L, d, reinterpret_cast<Bits<C>*>(dst), ld);
  } else {
    for (int64_t j = 0; j < L; ++j) {
      const T* s = src.row(j);
      for (int64_t c = 0; c < d; ++c) {
        dst[c * ld + j] = C(static_cast<float>(s[c]));
      }
    }
  }
  if (L % 2 == 1 && L < ld) {
    for (int64_t c = 0; c < d; ++c) {
      dst[c * ld + L] = C(0.f);
    }
  }
}

// B operand [dp x ncol] whose reduction dimension is the feature: element (c, i) = src(i)[c].
// Columns i in [n, ncol) and features c in [d, dp) are zero.
template <typename C, typename RowFn>
void pack_b_features(const RowFn& src, int64_t n, int64_t ncol, int64_t d, int64_t dp, int64_t ld,
                     C* dst) {
  using T = typename RowFn::value_type;
  constexpr bool vnni = kVnni<C>;
  if constexpr (std::is_same_v<T, C>) {
    if (!vnni || d % 2 == 0) {
      // fp32: a plain transpose; 16-bit VNNI: a transpose of 32-bit feature pairs.
      const int64_t words = vnni ? d / 2 : d;
      uint32_t* out = reinterpret_cast<uint32_t*>(dst);
      if (round_up(ncol, 16) <= ld) {  // room for the AVX-512 form's whole 16-column blocks
        ISA_SWITCH(true, Isa, [&] { cpu::transpose_words(Isa{}, src, n, ncol, words, out, ld); });
      } else {
        cpu::transpose_words(cpu::isa::Avx2{}, src, n, ncol, words, out, ld);
      }
      return;
    }
  }
  for (int64_t i = 0; i < ncol; ++i) {
    const T* s = i < n ? src(i) : nullptr;
    for (int64_t c = 0; c < dp; ++c) {
      const C x = (i < n && c < d) ? C(static_cast<float>(s[c])) : C(0.f);
      dst[vnni ? (c / 2) * ld * 2 + i * 2 + (c % 2) : c * ld + i] = x;
    }
  }
}

// B operand [nrow x d] whose reduction dimension is the row index: element (i, c) = src(i)[c];
// rows i in [n, nrow) are zero.
template <typename C, typename RowFn>
void pack_b_rows(const RowFn& src, int64_t n, int64_t nrow, int64_t d, C* dst) {
  using T = typename RowFn::value_type;
  constexpr bool vnni = kVnni<C>;
  if constexpr (std::is_same_v<T, C>) {
    if constexpr (!vnni) {
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(dst + i * d, src(i), d * sizeof(C));
      }
      std::memset(dst + n * d, 0, (nrow - n) * d * sizeof(C));
      return;
    } else {
      ISA_SWITCH(true, Isa, [&] { cpu::interleave_rows<C>(Isa{}, src, n, nrow, d, dst); });
      return;
    }
  }
  for (int64_t i = 0; i < nrow; ++i) {
    const T* s = i < n ? src(i) : nullptr;
    for (int64_t c = 0; c < d; ++c) {
      const C x = i < n ? C(static_cast<float>(s[c])) : C(0.f);
      dst[vnni ? (i / 2) * d * 2 + c * 2 + (i % 2) : i * d + c] = x;
    }
  }
}

}  // namespace
}  // namespace clfast::prefix_attention
