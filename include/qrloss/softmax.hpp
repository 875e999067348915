#pragma once
/// Softmax over the class axis and its vector-Jacobian product, used to
/// chain dL/dq back to logits.

#include <Eigen/Core>
#include <cstdint>

#include "qrloss/tensor.hpp"

namespace qrloss {

// Every pointer below must address at least as many elements as `shape`
// holds: a raw pointer carries no size, so a larger shape reads and writes
// past the buffers.

/// Computes probs = softmax(logits) over C for every pixel.
///   q_c = exp(x_c - m) / sum_k exp(x_k - m),  m = max_k x_k     [eq. 5]
/// Subtracting the per-pixel max keeps exp from overflowing; the sum is
/// accumulated in double. Shapes: logits and probs both `shape` (rank 2 or
/// 4, row-major). probs must not overlap logits.
/// @throws qrloss::invalid_argument on a bad shape, null or overlapping
///   buffers, or non-finite logits (naming the first bad index). probs is
///   unspecified after an exception.
template <typename T>
void softmax(const T* logits, T* probs, const Shape& shape,
             int num_threads = 0);

/// Chains dL/dq back to logits without forming the C x C Jacobian.
///   dL/dx_c = q_c * (g_c - sum_k g_k q_k),  g = dL/dq          [eq. 7]
/// probs is used as given: its rows need not sum to 1. With rows that do,
/// |dL/dx_c| = q_c (1 - q_c) |g_c - m| <= max |dL/dq| / 2, where m is the
/// q-weighted mean of the other classes' g.
/// Shapes: probs, dL_dq and dL_dx all `shape`. dL_dx may be the same buffer
/// as dL_dq (each pixel is read fully before it is written) but must not
/// overlap probs or overlap dL_dq partially. Cost O(B*C*H*W).
/// @throws qrloss::invalid_argument on a bad shape, null or overlapping
///   buffers, negative or non-finite probs, or non-finite dL_dq (naming
///   the first bad index, in probs before dL_dq). dL_dq is then left
///   unchanged, also in place. It is also thrown when an entry of dL_dx
///   overflows T, which needs |dL_dq| near T's largest value. In place,
///   g - sum_k g_k q_k beyond T's range can throw too, even where dL_dx
///   would fit. dL_dx is unspecified after an exception (in place, dL_dq is too
///   after an overflow).
template <typename T>
void softmax_vjp(const T* probs, const T* dL_dq, T* dL_dx, const Shape& shape,
                 int num_threads = 0);

/// Returns the C x C Jacobian of softmax at one pixel's logits.
///   J_q_x[i][j] = dq_i/dx_j = q_i * (delta_ij - q_j)           [eq. 6]
/// Meant for tests and for callers who want the matrix itself; the loss
/// entry points never form it.
/// @throws qrloss::invalid_argument on an empty or non-finite vector.
template <typename T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> softmax_jacobian(
    const Eigen::Matrix<T, Eigen::Dynamic, 1>& logits);

}  // namespace qrloss
