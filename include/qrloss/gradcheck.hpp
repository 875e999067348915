#pragma once
/// Numeric gradient check by central differences in double precision.

#include <Eigen/Core>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "qrloss/tensor.hpp"

namespace qrloss {

/// Settings of check_gradient. The defaults suit a double analytic
/// gradient. For a float one (computed in float, compared with the double
/// differences), rtol = 1e-4 and atol_scale = 1e-5 leave room for float's
/// rounding (6e-8) grown by sums over C and the error of log and exp
/// (test_gradcheck.cpp checks the float loss gradients with them).
struct GradientCheckOptions {
  /// Relative step: h_i = step_scale * max(1, |x_i|). The default,
  /// cbrt(DBL_EPSILON) ~ 6e-6, balances truncation error (~h^2) against
  /// round-off (~DBL_EPSILON / h).
  double step_scale = 6.0554544523933395e-06;
  /// Relative tolerance of the pass test.
  double rtol = 1e-6;
  /// Absolute tolerance as a fraction of max |numeric|, so that near-zero
  /// entries are judged on the scale of the whole gradient, even where
  /// that scale is far below 1 (a mean over many pixels). An allowance
  /// for the round-off of each difference, 1024 * DBL_EPSILON *
  /// max(|f(x + h e_i)|, |f(x - h e_i)|) / h_i, is added to it: about
  /// 4e-8 for an f of order 1 at the default step, which bounds the
  /// smallest error the check can see in an entry.
  double atol_scale = 1e-9;
  /// Flat indices to check. When empty, every element is checked if there
  /// are at most max_elements, otherwise max_elements indices drawn with
  /// `seed`.
  std::vector<std::int64_t> indices;
  std::int64_t max_elements = 4096;
  std::uint64_t seed = 0;
  /// Optional shape of x, used only to print the worst index as
  /// (b=..,c=..,h=..,w=..).
  Shape shape;
};

/// Result of check_gradient.
struct GradientCheckReport {
  std::int64_t num_checked = 0;
  std::int64_t num_failed = 0;
  /// Largest |analytic - numeric| and its flat index.
  double max_abs_error = 0.0;
  std::int64_t max_abs_index = -1;
  /// Largest |analytic - numeric| / max(|analytic|, |numeric|) over entries
  /// whose scale is above atol, and its flat index (-1 if none).
  double max_rel_error = 0.0;
  std::int64_t max_rel_index = -1;
  /// The entry that exceeds its tolerance by the largest factor (or, if all
  /// pass, comes closest), with both values.
  std::int64_t worst_index = -1;
  std::string worst_position;
  double worst_analytic = 0.0;
  double worst_numeric = 0.0;
  /// The largest absolute tolerance used: atol_scale * max |numeric| plus
  /// an entry's round-off allowance.
  double atol = 0.0;
  bool passed = false;

  /// One-line summary naming the worst entry, for test output and logs.
  std::string summary() const;
};

/// Compares `analytic` with central differences of `f` at `x`:
///   numeric_i = (f(x + h_i e_i) - f(x - h_i e_i)) / (2 h_i)
/// An entry passes when |a - n| <= atol_i + rtol * max(|a|, |n|), where
/// atol_i = atol_scale * max |numeric| + the round-off allowance of
/// entry i (see GradientCheckOptions::atol_scale). A gradient whose
/// entries are all far below 1 is thus judged on its own scale. The
/// allowance covers an f whose rounding error is up to a few hundred
/// units of |f|, as for QR with C = 4096 (whose two terms cancel); an f
/// with heavier cancellation needs a larger step_scale.
/// `f` is called twice per checked entry on a copy of x; x is not modified.
/// @throws qrloss::invalid_argument if x and analytic differ in size, x is
///   empty, an index is out of range, f returns a non-finite value, or an
///   option is invalid: step_scale not finite and > 0, rtol or atol_scale
///   not finite and >= 0, max_elements below 1 (with no indices), or a
///   non-empty shape whose element count differs from x's size.
GradientCheckReport check_gradient(
    const std::function<double(const Eigen::VectorXd&)>& f,
    const Eigen::VectorXd& x, const Eigen::VectorXd& analytic,
    const GradientCheckOptions& options = {});

}  // namespace qrloss
