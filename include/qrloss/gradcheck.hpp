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
  /// round-off (~DBL_EPSILON / h). Below |x_i| = 1 the step stays at
  /// step_scale, so entries far below 1, such as probabilities near 0,
  /// need a smaller step_scale or a check through logits: a step near an
  /// entry's size gives large truncation errors, and a larger one leaves
  /// the domain (the losses reject negative probs).
  double step_scale = 6.0554544523933395e-06;
  /// Relative tolerance of the pass test.
  double rtol = 1e-6;
  /// Absolute tolerance as a fraction of max |numeric|, so that near-zero
  /// entries are judged on the scale of the whole gradient, even where
  /// that scale is far below 1 (a mean over many pixels). The round-off
  /// allowance of each entry (roundoff_units) is added to it.
  double atol_scale = 1e-9;
  /// Round-off allowance of each difference, in units of DBL_EPSILON *
  /// max(|f(x + h e_i)|, |f(x - h e_i)|) / h_i: about 2.3e-9 for an f of
  /// order 1 at the default step, the smallest error the check can see in
  /// an entry. 64 covers f's own rounding for sums of thousands of terms;
  /// an f whose terms cancel needs more (QR with C = 4096 needed 1024, with
  /// a step of 1e-4). Where the largest allowance exceeds a tenth of the
  /// gradient's scale the check fails as too noisy (see the report).
  double roundoff_units = 64.0;
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
  /// The largest round-off allowance, and the gradient's scale: the largest
  /// |numeric| or |analytic| of the checked entries.
  double noise = 0.0;
  double gradient_scale = 0.0;
  /// True when noise exceeds a tenth of a nonzero gradient_scale. The
  /// differences then cannot tell a wrong gradient of that size from a
  /// right one, so the check fails (passed is false) whatever the entries
  /// give.
  bool too_noisy = false;
  bool passed = false;

  /// One-line summary naming the worst entry, for test output and logs.
  std::string summary() const;
};

/// Compares `analytic` with central differences of `f` at `x`:
///   numeric_i = (f(x + h_i e_i) - f(x - h_i e_i)) / (2 h_i)
/// An entry passes when |a - n| <= atol_i + rtol * max(|a|, |n|), where
/// atol_i = atol_scale * max |numeric| + the round-off allowance of
/// entry i (GradientCheckOptions::roundoff_units). A gradient whose
/// entries are all far below 1 is thus judged on its own scale. The check
/// fails as too noisy where that allowance is not small next to the
/// gradient, for example for f = 1e5 + 1e-3 |x|^2, whose round-off hides
/// a gradient of 2e-3.
/// `f` is called twice per checked entry on a copy of x; x is not modified.
/// @throws qrloss::invalid_argument if x and analytic differ in size, x is
///   empty, an index is out of range, f returns a non-finite value, or an
///   option is invalid: step_scale not finite and > 0, rtol, atol_scale
///   or roundoff_units not finite and >= 0, max_elements below 1 (with no
///   indices), or a non-empty shape whose element count differs from x's
///   size.
GradientCheckReport check_gradient(
    const std::function<double(const Eigen::VectorXd&)>& f,
    const Eigen::VectorXd& x, const Eigen::VectorXd& analytic,
    const GradientCheckOptions& options = {});

}  // namespace qrloss
