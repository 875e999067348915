// Tests of validate_target: counts of off-simplex and all-zero pixels, the
// worst pixel and its error, the tolerance, and rejected input.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "qrloss/qrloss.hpp"
#include "test_support.hpp"

using qrloss::Shape;
using qrloss::TargetReport;
namespace testing = qrloss::testing;

namespace {

/// Shape of most cases: C = 3 classes, P = 20 pixels per item, 40 pixels.
const Shape kShape{2, 3, 4, 5};
constexpr std::int64_t kClasses = 3;
constexpr std::int64_t kPixelsPerItem = 20;

/// Writes `values` into the C entries of pixel (b, n) of a kShape tensor.
template <typename T>
void set_pixel(std::vector<T>& target, std::int64_t b, std::int64_t n,
               T c0, T c1, T c2) {
  const T values[] = {c0, c1, c2};
  for (std::int64_t c = 0; c < kClasses; ++c) {
    target[(b * kClasses + c) * kPixelsPerItem + n] = values[c];
  }
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

TEST_SUITE("validate") {
  TEST_CASE_TEMPLATE("simplex target ok", T, float, double) {
    const std::vector<T> target = testing::random_simplex<T>(kShape, 600);
    const TargetReport report = qrloss::validate_target(target.data(), kShape);
    INFO(report.summary());
    CHECK(report.ok);
    CHECK(report.num_pixels == 40);
    CHECK(report.num_off_simplex == 0);
    CHECK(report.num_all_zero == 0);
    // Each row sums to 1 up to a few units of rounding of T.
    CHECK(report.max_sum_error <= 4.0 * std::numeric_limits<T>::epsilon());
    CHECK(contains(report.summary(), "target ok"));

    const std::vector<T> one_hot = testing::one_hot<T>(kShape);
    const TargetReport exact = qrloss::validate_target(one_hot.data(), kShape);
    CHECK(exact.ok);
    CHECK(exact.max_sum_error == 0.0);
    CHECK(exact.worst_pixel == -1);
  }

  TEST_CASE_TEMPLATE("rows summing to 0.9", T, float, double) {
    // Pixels 13 (b=0) and 27 (b=1, n=7) sum to 0.9. With equal errors the
    // first in (b, pixel) order is the worst.
    std::vector<T> target = testing::random_simplex<T>(kShape, 610);
    set_pixel(target, 0, 13, T(0.3), T(0.3), T(0.3));
    set_pixel(target, 1, 7, T(0.3), T(0.3), T(0.3));
    const double expected_error = 1.0 - 3.0 * double(T(0.3));
    const TargetReport report = qrloss::validate_target(target.data(), kShape);
    INFO(report.summary());
    CHECK_FALSE(report.ok);
    CHECK(report.num_pixels == 40);
    CHECK(report.num_off_simplex == 2);
    CHECK(report.num_all_zero == 0);
    CHECK(report.worst_pixel == 13);
    CHECK(report.max_sum_error ==
          doctest::Approx(expected_error).epsilon(1e-12));
    CHECK(contains(report.summary(), "target rows off the simplex"));
    CHECK(contains(report.summary(), "2 of 40"));
  }

  TEST_CASE_TEMPLATE("all-zero pixels counted", T, float, double) {
    // Two rows sum to 0.9 and pixels 2 (b=0) and 39 (b=1, n=19) are all
    // zero, so the worst error is 1 at pixel 2.
    std::vector<T> target = testing::random_simplex<T>(kShape, 620);
    set_pixel(target, 0, 13, T(0.3), T(0.3), T(0.3));
    set_pixel(target, 1, 7, T(0.3), T(0.3), T(0.3));
    set_pixel(target, 0, 2, T(0), T(0), T(0));
    set_pixel(target, 1, 19, T(0), T(0), T(0));
    const TargetReport report = qrloss::validate_target(target.data(), kShape);
    INFO(report.summary());
    CHECK_FALSE(report.ok);
    CHECK(report.num_off_simplex == 4);
    CHECK(report.num_all_zero == 2);
    CHECK(report.worst_pixel == 2);
    CHECK(report.max_sum_error == 1.0);
    CHECK(contains(report.summary(), "4 of 40"));
    CHECK(contains(report.summary(), "(2 are all zero)"));
    CHECK(contains(report.summary(), "at pixel 2"));
  }

  TEST_CASE_TEMPLATE("tolerance decides off simplex", T, float, double) {
    // Pixel 5 sums to about 1 + 5e-5: inside the default 1e-4, outside
    // 1e-5. A tolerance of 0 is allowed.
    std::vector<T> target = testing::one_hot<T>(kShape);
    set_pixel(target, 0, 5, T(0.5), T(0.25), T(0.25 + 5e-5));
    const TargetReport loose = qrloss::validate_target(target.data(), kShape);
    CHECK(loose.ok);
    CHECK(loose.num_off_simplex == 0);
    CHECK(loose.worst_pixel == 5);
    CHECK(loose.max_sum_error == doctest::Approx(5e-5).epsilon(1e-3));

    const TargetReport tight =
        qrloss::validate_target(target.data(), kShape, 1e-5);
    CHECK_FALSE(tight.ok);
    CHECK(tight.num_off_simplex == 1);
    CHECK(tight.worst_pixel == 5);

    const TargetReport zero =
        qrloss::validate_target(target.data(), kShape, 0.0);
    CHECK(zero.num_off_simplex == 1);
  }

  TEST_CASE_TEMPLATE("rank two target", T, float, double) {
    // For (B, C) each row b is one pixel.
    const Shape shape{6, 4};
    std::vector<T> target = testing::random_simplex<T>(shape, 630);
    for (std::int64_t c = 0; c < 4; ++c) target[4 * 4 + c] = T(0);
    const TargetReport report = qrloss::validate_target(target.data(), shape);
    CHECK(report.num_pixels == 6);
    CHECK(report.num_all_zero == 1);
    CHECK(report.num_off_simplex == 1);
    CHECK(report.worst_pixel == 4);
  }

  TEST_CASE_TEMPLATE("validate bad input rejected", T, float, double) {
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const std::vector<T> target = testing::random_simplex<T>(kShape, 640);

    testing::check_invalid_argument(
        [&] { qrloss::validate_target<T>(nullptr, kShape); },
        "validate_target: null data: target is a null pointer");
    for (const Shape& bad : {Shape{}, Shape{120}, Shape{2, 3, 20}}) {
      testing::check_invalid_argument(
          [&] { qrloss::validate_target(target.data(), bad); },
          "validate_target: bad rank: expected target of rank 2 (B,C) or 4 "
          "(B,C,H,W), got rank " +
              std::to_string(bad.size()));
    }
    testing::check_invalid_argument(
        [&] { qrloss::validate_target(target.data(), Shape{2, 3, 0, 5}); },
        "validate_target: empty tensor: target has shape [2,3,0,5]");
    testing::check_invalid_argument(
        [&] { qrloss::validate_target(target.data(), Shape{2, -3, 4, 5}); },
        "validate_target: bad shape: target has shape [2,-3,4,5]");
    constexpr std::int64_t kOne = 1;
    testing::check_invalid_argument(
        [&] {
          qrloss::validate_target(target.data(),
                                  Shape{kOne << 40, kOne << 30, 1, 1});
        },
        "validate_target: size overflow");

    // Values: the first bad one in memory order is named.
    const T bad_values[] = {kNaN, kInf, T(-0.25)};
    const std::string expected[] = {
        "validate_target: non-finite input: target is nan at "
        "(b=1,c=0,h=2,w=4)",
        "validate_target: non-finite input: target is inf at "
        "(b=1,c=0,h=2,w=4)",
        "validate_target: negative input: target is -0.25 at "
        "(b=1,c=0,h=2,w=4), expected >= 0",
    };
    for (int k = 0; k < 3; ++k) {
      CAPTURE(k);
      std::vector<T> bad = target;
      bad[(1 * kClasses + 2) * kPixelsPerItem + 3] = kNaN;
      bad[(1 * kClasses + 0) * kPixelsPerItem + 14] = bad_values[k];
      testing::check_invalid_argument(
          [&] { qrloss::validate_target(bad.data(), kShape); }, expected[k]);
    }

    for (double tolerance : {-1e-4, std::numeric_limits<double>::quiet_NaN(),
                             std::numeric_limits<double>::infinity()}) {
      CAPTURE(tolerance);
      testing::check_invalid_argument(
          [&] { qrloss::validate_target(target.data(), kShape, tolerance); },
          "validate_target: bad tolerance: expected finite and >= 0, got ");
    }
  }

  TEST_CASE_TEMPLATE("validate first bad across chunks", T, float, double) {
    // {1,3,64,64}: two chunks of 2048 pixels. The bad value at (c=0,
    // pixel 3000) is in chunk 1 but first in memory.
    const Shape shape{1, 3, 64, 64};
    std::vector<T> target = testing::random_simplex<T>(shape, 650);
    target[2 * 4096 + 100] = T(-1);
    target[3000] = T(-2);
    testing::check_invalid_argument(
        [&] { qrloss::validate_target(target.data(), shape); },
        "validate_target: negative input: target is -2 at "
        "(b=0,c=0,h=46,w=56)");
  }
}
