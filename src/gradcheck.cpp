// Central-difference gradient check.

#include "qrloss/gradcheck.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <sstream>
#include <string>

#include "detail/passes.hpp"
#include "qrloss/error.hpp"

namespace qrloss {
namespace {

/// The largest round-off allowance, as a fraction of the gradient's scale,
/// at which the differences can still tell a wrong gradient from a right
/// one. Above it the check fails as too noisy instead of passing anything.
constexpr double kMaxNoiseFraction = 0.1;

std::vector<std::int64_t> choose_indices(const GradientCheckOptions& options,
                                         std::int64_t size) {
  if (!options.indices.empty()) {
    for (std::int64_t index : options.indices) {
      if (index < 0 || index >= size) {
        throw invalid_argument(
            "check_gradient: index out of range: " + std::to_string(index) +
            " for x of size " + std::to_string(size));
      }
    }
    return options.indices;
  }
  std::vector<std::int64_t> indices;
  if (size <= options.max_elements) {
    indices.resize(static_cast<std::size_t>(size));
    for (std::int64_t i = 0; i < size; ++i) indices[i] = i;
    return indices;
  }
  std::mt19937_64 engine(options.seed);
  std::uniform_int_distribution<std::int64_t> pick(0, size - 1);
  for (std::int64_t k = 0; k < options.max_elements; ++k) {
    indices.push_back(pick(engine));
  }
  std::sort(indices.begin(), indices.end());
  indices.erase(std::unique(indices.begin(), indices.end()), indices.end());
  return indices;
}

/// Throws unless `value` is finite and at least `lowest` (above it when
/// `strictly`).
void check_setting(const char* name, double value, double lowest,
                   bool strictly) {
  const bool ok = std::isfinite(value) &&
                  (strictly ? value > lowest : value >= lowest);
  if (ok) return;
  std::ostringstream text;
  text << "check_gradient: invalid " << name << ": expected a finite value "
       << (strictly ? "> " : ">= ") << lowest << ", got " << value;
  throw invalid_argument(text.str());
}

/// Throws unless the options can be used for an x of `size` elements.
void check_options(const GradientCheckOptions& options, std::int64_t size) {
  check_setting("step_scale", options.step_scale, 0.0, true);
  check_setting("rtol", options.rtol, 0.0, false);
  check_setting("atol_scale", options.atol_scale, 0.0, false);
  check_setting("roundoff_units", options.roundoff_units, 0.0, false);
  if (options.indices.empty() && options.max_elements < 1) {
    throw invalid_argument(
        "check_gradient: invalid max_elements: expected at least 1, got " +
        std::to_string(options.max_elements));
  }
  if (!options.shape.empty()) {
    // The product stops once it passes size, so it cannot overflow.
    std::int64_t count = 1;
    for (const std::int64_t extent : options.shape) {
      if (extent < 0 || (extent > 0 && count > size / extent)) {
        count = -1;
        break;
      }
      count *= extent;
    }
    if (count != size) {
      throw invalid_argument("check_gradient: shape mismatch: shape " +
                             format_shape(options.shape) +
                             " does not match x of size " +
                             std::to_string(size));
    }
  }
}

std::string position_of(std::int64_t flat, const Shape& shape) {
  if (shape.size() != 2 && shape.size() != 4)
    return "[" + std::to_string(flat) + "]";
  detail::Geometry geometry;
  geometry.B = shape[0];
  geometry.C = shape[1];
  geometry.P = shape.size() == 4 ? shape[2] * shape[3] : 1;
  return geometry.position(flat, shape);
}

}  // namespace

std::string GradientCheckReport::summary() const {
  std::ostringstream out;
  out.precision(6);
  out << (passed ? "gradient check passed" : "gradient check FAILED") << ": ";
  if (too_noisy) {
    out << "the differences are too noisy to judge: their round-off "
           "allowance "
        << noise << " exceeds 10 % of the gradient's scale " << gradient_scale
        << " (use a larger step_scale, or subtract a constant from f); ";
  }
  out << num_failed << " of " << num_checked
      << " entries out of tolerance; max abs error " << max_abs_error
      << ", max rel error " << max_rel_error << ", atol " << atol
      << "; worst entry " << worst_position << " analytic " << worst_analytic
      << " numeric " << worst_numeric;
  return out.str();
}

GradientCheckReport check_gradient(
    const std::function<double(const Eigen::VectorXd&)>& f,
    const Eigen::VectorXd& x, const Eigen::VectorXd& analytic,
    const GradientCheckOptions& options) {
  if (x.size() == 0) {
    throw invalid_argument("check_gradient: empty tensor: x has size 0");
  }
  if (analytic.size() != x.size()) {
    throw invalid_argument(
        "check_gradient: shape mismatch: expected analytic "
        "of size " +
        std::to_string(x.size()) + ", got " + std::to_string(analytic.size()));
  }
  check_options(options, x.size());
  const std::vector<std::int64_t> indices = choose_indices(options, x.size());

  std::vector<double> numeric(indices.size());
  std::vector<double> roundoff(indices.size());
  Eigen::VectorXd point = x;
  for (std::size_t k = 0; k < indices.size(); ++k) {
    const std::int64_t i = indices[k];
    const double h = options.step_scale * std::max(1.0, std::abs(x[i]));
    point[i] = x[i] + h;
    const double plus = f(point);
    point[i] = x[i] - h;
    const double minus = f(point);
    point[i] = x[i];
    if (!std::isfinite(plus) || !std::isfinite(minus)) {
      throw invalid_argument(
          "check_gradient: non-finite result: f is not finite at " +
          position_of(i, options.shape) + " +/- " + std::to_string(h));
    }
    numeric[k] = (plus - minus) / (2.0 * h);
    roundoff[k] = options.roundoff_units *
                  std::numeric_limits<double>::epsilon() *
                  std::max(std::abs(plus), std::abs(minus)) / h;
  }

  GradientCheckReport report;
  report.num_checked = static_cast<std::int64_t>(indices.size());
  // The scale is the gradient's own, with no floor: a loss that is a mean
  // over many pixels has entries far below 1, and a floor of 1 let an
  // all-zero gradient pass.
  double scale = 0.0;
  for (double n : numeric) scale = std::max(scale, std::abs(n));
  const double scale_atol = options.atol_scale * scale;
  double worst_ratio = -1.0;
  for (std::size_t k = 0; k < indices.size(); ++k) {
    const std::int64_t i = indices[k];
    const double a = analytic[i];
    const double n = numeric[k];
    const double error = std::abs(a - n);
    const double magnitude = std::max(std::abs(a), std::abs(n));
    const double atol = scale_atol + roundoff[k];
    report.atol = std::max(report.atol, atol);
    const double tolerance = atol + options.rtol * magnitude;
    // NaN in the analytic gradient fails: the comparison below is false.
    const bool ok = error <= tolerance;
    if (!ok) ++report.num_failed;
    if (error > report.max_abs_error || std::isnan(error)) {
      report.max_abs_error = error;
      report.max_abs_index = i;
    }
    if (magnitude > atol && error / magnitude > report.max_rel_error) {
      report.max_rel_error = error / magnitude;
      report.max_rel_index = i;
    }
    const double ratio = std::isnan(error) ? INFINITY : error / tolerance;
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      report.worst_index = i;
      report.worst_analytic = a;
      report.worst_numeric = n;
    }
  }
  report.worst_position = position_of(report.worst_index, options.shape);

  // Where the round-off allowance is not small next to the gradient, any
  // gradient of that size would pass, so the check cannot judge it. An
  // all-zero gradient that the differences also find exactly zero (a
  // constant f) passes.
  double largest_roundoff = 0.0;
  double gradient_scale = scale;
  for (std::size_t k = 0; k < indices.size(); ++k) {
    largest_roundoff = std::max(largest_roundoff, roundoff[k]);
    gradient_scale = std::max(gradient_scale, std::abs(analytic[indices[k]]));
  }
  report.noise = largest_roundoff;
  report.gradient_scale = gradient_scale;
  report.too_noisy = gradient_scale > 0.0 &&
                     largest_roundoff > kMaxNoiseFraction * gradient_scale;
  report.passed = report.num_failed == 0 && !report.too_noisy;
  return report;
}

}  // namespace qrloss
