#pragma once
/// Optional checks a caller can run on its target before training.

#include <cstdint>
#include <string>

#include "qrloss/tensor.hpp"

namespace qrloss {

/// Summary of how far target rows are from probability distributions.
struct TargetReport {
  std::int64_t num_pixels = 0;
  /// Pixels whose sum over C differs from 1 by more than `tolerance`.
  std::int64_t num_off_simplex = 0;
  /// Pixels whose entries are all 0 (RQ then clamps the pixel sum).
  std::int64_t num_all_zero = 0;
  /// Largest |sum_c p_c - 1| and the flat pixel index where it occurs.
  double max_sum_error = 0.0;
  std::int64_t worst_pixel = -1;
  bool ok = true;
  std::string summary() const;
};

/// Reports pixels of `target` whose class values do not sum to 1 within
/// `tolerance`. The losses accept such targets as given, like the
/// reference implementation; this lets a caller notice them.
/// @throws qrloss::invalid_argument on a bad shape, null data, or
///   non-finite or negative values (naming the first bad index).
template <typename T>
TargetReport validate_target(const T* target, const Shape& shape,
                             double tolerance = 1e-4);

}  // namespace qrloss
