// Target validation for callers.

#include "qrloss/validate.hpp"

#include <cmath>
#include <sstream>
#include <string>

#include "detail/passes.hpp"
#include "qrloss/error.hpp"

namespace qrloss {

std::string TargetReport::summary() const {
  std::ostringstream out;
  out << (ok ? "target ok" : "target rows off the simplex") << ": "
      << num_off_simplex << " of " << num_pixels << " pixels do not sum to 1 ("
      << num_all_zero << " are all zero); max |sum - 1| = " << max_sum_error;
  if (worst_pixel >= 0) out << " at pixel " << worst_pixel;
  return out.str();
}

template <typename T>
TargetReport validate_target(const T* target, const Shape& shape,
                             double tolerance) {
  using namespace detail;
  const char* function = "validate_target";
  const Geometry geometry = make_geometry(function, "target", shape, sizeof(T));
  check_not_null(function, "target", target);
  if (!(tolerance >= 0.0) || !std::isfinite(tolerance)) {
    throw invalid_argument(std::string(function) +
                           ": bad tolerance: expected finite and >= 0, got " +
                           std::to_string(tolerance));
  }
  check_values(function, "target", target, geometry, shape,
               ValueRule::kNonNegative, resolve_threads(0));
  TargetReport report;
  report.num_pixels = geometry.num_pixels();
  for (Index b = 0; b < geometry.B; ++b) {
    for (Index pixel = 0; pixel < geometry.P; ++pixel) {
      double sum = 0.0;
      bool all_zero = true;
      for (Index c = 0; c < geometry.C; ++c) {
        const T value = target[geometry.offset(b, c, pixel)];
        sum += static_cast<double>(value);
        all_zero = all_zero && value == T(0);
      }
      const double error = std::abs(sum - 1.0);
      if (all_zero) ++report.num_all_zero;
      if (error > tolerance) ++report.num_off_simplex;
      if (error > report.max_sum_error) {
        report.max_sum_error = error;
        report.worst_pixel = b * geometry.P + pixel;
      }
    }
  }
  report.ok = report.num_off_simplex == 0;
  return report;
}

template TargetReport validate_target<float>(const float*, const Shape&,
                                             double);
template TargetReport validate_target<double>(const double*, const Shape&,
                                              double);

}  // namespace qrloss
