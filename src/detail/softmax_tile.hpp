#pragma once
// Softmax and its vector-Jacobian product over one tile of pixels.

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "detail/isa.hpp"
#include "detail/lanes.hpp"
#include "detail/passes.hpp"
#include "detail/vmath.hpp"

namespace qrloss::detail::QRLOSS_ISA {

/// Computes q = softmax(x) over C for n pixels. Row c of x starts at
/// x + c * x_stride; row c of q at q + c * q_stride (aligned scratch).
/// `pixel` is scratch of at least n entries.
/// Returns nonzero when some x is not finite (checked in the loop that
/// reads x first). The exp loop prefetches the rows two tiles ahead.
template <typename T>
Flag<T> softmax_tile(const T* x, Index x_stride, Index C, Index n, T* q,
                     Index q_stride, T* pixel) {
  // Subtracting the per-pixel max keeps exp <= 1, so nothing overflows.
  Flag<T> bad = 0;
  QRLOSS_SIMD_LOOP_FLAGS
  for (Index i = 0; i < n; ++i) {
    pixel[i] = x[i];
    bad |= invalid_flag(x[i], ValueRule::kFinite);
  }
  for (Index c = 1; c < C; ++c) {
    const T* row = x + c * x_stride;
    QRLOSS_SIMD_LOOP_FLAGS
    for (Index i = 0; i < n; ++i) {
      pixel[i] = pixel[i] < row[i] ? row[i] : pixel[i];
      bad |= invalid_flag(row[i], ValueRule::kFinite);
    }
  }
  for (Index c = 0; c < C; ++c) {
    const T* row = x + c * x_stride;
    exp_difference_prefetching(row, pixel, q + c * q_stride, n, row);
  }
  sum_over_classes(
      C, n,
      [&](Index c, Index i) {
        return static_cast<double>(q[c * q_stride + i]);
      },
      [&](Index i, double total) { pixel[i] = static_cast<T>(1.0 / total); });
  for (Index c = 0; c < C; ++c) {
    T* out = q + c * q_stride;
    QRLOSS_SIMD_LOOP
    for (Index i = 0; i < n; ++i) out[i] *= pixel[i];
  }
  return bad;
}

/// Writes dx_c = q_c * (g_c - dot) for n pixels, where dot contains
/// sum_k g_k q_k of each pixel: the second half of softmax_vjp_tile, whose
/// row layout it shares. The arithmetic is in the type of dot: T, or double
/// where g - dot may overflow T although dx fits (|g| near T's largest
/// value); the checked loop in double then also tries q g - q dot. With
/// kZeroAtZeroProb, dx_c is 0 where q_c = 0 even when g_c is infinite, for
/// a caller whose dot products also skip those entries. With kCheckOutput
/// the result is nonzero when some dx is not finite; without it, 0.
template <bool kZeroAtZeroProb = false, bool kCheckOutput = false, typename T,
          typename D>
Flag<T> softmax_vjp_scale(const T* q, Index q_stride, const T* g,
                          Index g_stride, T* out, Index out_stride, Index C,
                          Index n, const D* dot) {
  Flag<T> bad_output = 0;
  for (Index c = 0; c < C; ++c) {
    const T* qr = q + c * q_stride;
    const T* gr = g + c * g_stride;
    T* dst = out + c * out_stride;
    if constexpr (kCheckOutput) {
      Flag<T> bad = 0;
      QRLOSS_SIMD_LOOP_FLAGS
      for (Index i = 0; i < n; ++i) {
        const D qi = static_cast<D>(qr[i]);
        const D gi = static_cast<D>(gr[i]);
        D dx = qi * (gi - dot[i]);
        if constexpr (std::is_same_v<D, double>) {
          // In double, g - dot itself can overflow where q g - q dot fits.
          dx = std::isfinite(dx) ? dx : qi * gi - qi * dot[i];
        }
        dst[i] = kZeroAtZeroProb && !(qr[i] > T(0)) ? T(0)
                                                   : static_cast<T>(dx);
        bad |= invalid_flag(dst[i], ValueRule::kFinite);
      }
      bad_output |= bad;
    } else {
      for (Index i = 0; i < n; ++i) {
        const D dx = static_cast<D>(qr[i]) * (static_cast<D>(gr[i]) - dot[i]);
        dst[i] = kZeroAtZeroProb && !(qr[i] > T(0)) ? T(0)
                                                   : static_cast<T>(dx);
      }
    }
  }
  return bad_output;
}

/// Rounds the dot products (double, summed in class order) to T in
/// `pixel`, then runs softmax_vjp_scale in T.
template <bool kZeroAtZeroProb = false, typename T>
void softmax_vjp_apply(const T* q, Index q_stride, const T* g, Index g_stride,
                       T* out, Index out_stride, Index C, Index n,
                       const double* dot, T* pixel) {
  QRLOSS_SIMD_LOOP
  for (Index i = 0; i < n; ++i) pixel[i] = static_cast<T>(dot[i]);
  softmax_vjp_scale<kZeroAtZeroProb>(q, q_stride, g, g_stride, out,
                                     out_stride, C, n,
                                     static_cast<const T*>(pixel));
}

/// Writes dx_c = q_c * (g_c - sum_k g_k q_k) for n pixels. Rows are
/// strided as in softmax_tile. `out` may be the same memory as `g` or as
/// `q`, since every g and q of a pixel is read before any of its outputs is
/// written.
/// `dot` (double) and `pixel` (T) are scratch of at least n entries.
/// With kCheck, the loop that first reads q and g also checks them, and the
/// result has bit 0 set when some q is negative or not finite or some g is
/// not finite, and bit 1 when some dx is not finite (g - dot can overflow
/// for |g| near T's largest value). Without kCheck the result is 0.
template <bool kCheck = false, typename T>
Flag<T> softmax_vjp_tile(const T* q, Index q_stride, const T* g,
                         Index g_stride, T* out, Index out_stride, Index C,
                         Index n, double* dot, T* pixel) {
  if constexpr (kCheck) {
    Flag<T> bad_input = 0;
    std::fill(dot, dot + n, 0.0);
    for (Index c = 0; c < C; ++c) {
      const T* qr = q + c * q_stride;
      const T* gr = g + c * g_stride;
      Flag<T> bad = 0;
      QRLOSS_SIMD_LOOP_FLAGS
      for (Index i = 0; i < n; ++i) {
        dot[i] += static_cast<double>(gr[i]) * static_cast<double>(qr[i]);
        bad |= invalid_flag(qr[i], ValueRule::kNonNegative) |
               invalid_flag(gr[i], ValueRule::kFinite);
      }
      bad_input |= bad;
    }
    QRLOSS_SIMD_LOOP
    for (Index i = 0; i < n; ++i) pixel[i] = static_cast<T>(dot[i]);
    Flag<T> bad_output = softmax_vjp_scale<false, true>(
        q, q_stride, g, g_stride, out, out_stride, C, n,
        static_cast<const T*>(pixel));
    // Rare: an entry overflowed T, which an intermediate g - dot can cause
    // although dx fits. Unless out is g (in place, g is gone by now), the
    // tile is redone in double, where only a dx beyond T's range fails.
    if (bad_output != 0 && out != g) {
      bad_output = softmax_vjp_scale<false, true>(
          q, q_stride, g, g_stride, out, out_stride, C, n,
          static_cast<const double*>(dot));
    }
    return (bad_input != 0 ? 1 : 0) | (bad_output != 0 ? 2 : 0);
  } else {
    sum_over_classes(
        C, n,
        [&](Index c, Index i) {
          return static_cast<double>(g[c * g_stride + i]) *
                 static_cast<double>(q[c * q_stride + i]);
        },
        [&](Index i, double total) { pixel[i] = static_cast<T>(total); });
    softmax_vjp_scale(q, q_stride, g, g_stride, out, out_stride, C, n, pixel);
    return 0;
  }
}

}  // namespace qrloss::detail::QRLOSS_ISA
