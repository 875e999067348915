#pragma once
// Softmax and its vector-Jacobian product over one tile of pixels.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "detail/passes.hpp"

namespace qrloss::detail {

/// Lowest exp argument where Eigen's packet exp agrees with std::exp: just
/// above where exp(z) leaves the normal range (FLT_MIN = exp(-87.3),
/// DBL_MIN = exp(-708.4)), with a margin.
template <typename T>
inline constexpr T kPacketExpAccurateFrom = sizeof(T) == 4 ? T(-80) : T(-700);

/// True when x[i] - shift[i] >= bound for every i < n. Integer flags keep
/// the reduction vectorisable.
template <typename T>
inline bool all_above(const T* x, const T* shift, Index n, T bound) {
  using Flag = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
  Flag below = 0;
  for (Index i = 0; i < n; ++i) {
    below |= static_cast<Flag>(x[i] - shift[i] < bound);
  }
  return below == 0;
}

/// Computes q = softmax(x) over C for n pixels. Row c of x starts at
/// x + c * x_stride; row c of q at q + c * q_stride (aligned scratch).
/// `pixel` (T) and `sum` (double) are scratch of at least n entries.
template <typename T>
void softmax_tile(const T* x, Index x_stride, Index C, Index n, T* q,
                  Index q_stride, T* pixel, double* sum) {
  // Subtracting the per-pixel max keeps exp <= 1, so nothing overflows.
  std::copy(x, x + n, pixel);
  for (Index c = 1; c < C; ++c) {
    const T* row = x + c * x_stride;
    for (Index i = 0; i < n; ++i) pixel[i] = std::max(pixel[i], row[i]);
  }
  std::fill(sum, sum + n, 0.0);
  for (Index c = 0; c < C; ++c) {
    T* out = q + c * q_stride;
    const T* row = x + c * x_stride;
    ArrayMap<T>(out, n) =
        (ConstArrayMap<T>(row, n) - ConstArrayMap<T>(pixel, n)).exp();
    if (!all_above(row, pixel, n, kPacketExpAccurateFrom<T>)) {
      // Eigen 3.4's packet exp clamps its argument at -88.7 (float) or
      // -709.8 (double), so it never returns a subnormal or 0; std::exp
      // does, and matches what the scalar tail of the Eigen loop returns.
      for (Index i = 0; i < n; ++i) {
        const T z = row[i] - pixel[i];
        if (z < kPacketExpAccurateFrom<T>) out[i] = std::exp(z);
      }
    }
    for (Index i = 0; i < n; ++i) sum[i] += static_cast<double>(out[i]);
  }
  for (Index i = 0; i < n; ++i) pixel[i] = static_cast<T>(1.0 / sum[i]);
  for (Index c = 0; c < C; ++c) {
    T* out = q + c * q_stride;
    for (Index i = 0; i < n; ++i) out[i] *= pixel[i];
  }
}

/// Writes dx_c = q_c * (g_c - sum_k g_k q_k) for n pixels. Rows are
/// strided as in softmax_tile. `out` may be the same memory as `g`, since
/// every g of a pixel is read before any of its outputs is written.
/// `dot` (double) and `pixel` (T) are scratch of at least n entries.
template <typename T>
void softmax_vjp_tile(const T* q, Index q_stride, const T* g, Index g_stride,
                      T* out, Index out_stride, Index C, Index n, double* dot,
                      T* pixel) {
  std::fill(dot, dot + n, 0.0);
  for (Index c = 0; c < C; ++c) {
    const T* qr = q + c * q_stride;
    const T* gr = g + c * g_stride;
    for (Index i = 0; i < n; ++i) {
      dot[i] += static_cast<double>(gr[i]) * static_cast<double>(qr[i]);
    }
  }
  for (Index i = 0; i < n; ++i) pixel[i] = static_cast<T>(dot[i]);
  for (Index c = 0; c < C; ++c) {
    const T* qr = q + c * q_stride;
    const T* gr = g + c * g_stride;
    T* dst = out + c * out_stride;
    for (Index i = 0; i < n; ++i) dst[i] = qr[i] * (gr[i] - pixel[i]);
  }
}

}  // namespace qrloss::detail
