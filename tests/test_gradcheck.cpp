// Tests of check_gradient: it passes an exact gradient, fails a gradient
// that is off at one entry and names that entry, handles NaN, honours
// explicit indices, sampling and the step rule, and rejects bad input.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "qrloss/qrloss.hpp"
#include "test_support.hpp"

using qrloss::GradientCheckOptions;
using qrloss::GradientCheckReport;
using qrloss::Shape;
namespace testing = qrloss::testing;

namespace {

/// f(x) = sum_i sin(x_i) * x_{i+1}: every entry couples to its neighbours,
/// so a gradient with swapped or shifted entries fails.
double chain_function(const Eigen::VectorXd& x) {
  double sum = 0.0;
  for (Eigen::Index i = 0; i + 1 < x.size(); ++i) {
    sum += std::sin(x[i]) * x[i + 1];
  }
  return sum;
}

/// df/dx_k = cos(x_k) x_{k+1} + sin(x_{k-1}), where the terms exist.
Eigen::VectorXd chain_gradient(const Eigen::VectorXd& x) {
  const Eigen::Index n = x.size();
  Eigen::VectorXd grad = Eigen::VectorXd::Zero(n);
  for (Eigen::Index k = 0; k < n; ++k) {
    if (k + 1 < n) grad[k] += std::cos(x[k]) * x[k + 1];
    if (k > 0) grad[k] += std::sin(x[k - 1]);
  }
  return grad;
}

/// Random normal point of size n.
Eigen::VectorXd random_point(std::int64_t n, std::uint64_t seed) {
  const std::vector<double> values =
      testing::random_logits<double>(Shape{1, n}, seed, 1.0);
  return Eigen::Map<const Eigen::VectorXd>(values.data(),
                                           static_cast<Eigen::Index>(n));
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

/// A float loss gradient from logits to check against double differences:
/// x (the float logits as double), the float analytic gradient, and f, the
/// double loss of the same target.
struct FloatLossCase {
  Eigen::VectorXd x;
  Eigen::VectorXd analytic;
  std::function<double(const Eigen::VectorXd&)> f;
};

FloatLossCase make_float_loss_case(qrloss::LossKind kind, const Shape& shape,
                                   std::uint64_t seed) {
  const std::vector<float> logits = testing::random_logits<float>(shape, seed);
  const std::vector<float> target =
      testing::random_simplex<float>(shape, seed + 1);
  std::vector<float> grad(logits.size());
  qrloss::compute_loss_from_logits(kind, logits.data(), target.data(),
                                   grad.data(), shape);
  FloatLossCase loss;
  loss.x.resize(static_cast<Eigen::Index>(logits.size()));
  loss.analytic.resize(loss.x.size());
  for (Eigen::Index i = 0; i < loss.x.size(); ++i) {
    loss.x[i] = logits[static_cast<std::size_t>(i)];
    loss.analytic[i] = grad[static_cast<std::size_t>(i)];
  }
  const auto target64 =
      std::make_shared<std::vector<double>>(target.begin(), target.end());
  loss.f = [kind, target64, shape](const Eigen::VectorXd& x) {
    return qrloss::compute_loss_from_logits<double>(kind, x.data(),
                                                    target64->data(), nullptr,
                                                    shape);
  };
  return loss;
}

/// Returns the tolerances that gradcheck.hpp suggests for a float analytic
/// gradient.
GradientCheckOptions float_options(const Shape& shape) {
  GradientCheckOptions options;
  options.rtol = 1e-4;
  options.atol_scale = 1e-5;
  options.shape = shape;
  return options;
}

}  // namespace

TEST_SUITE("gradcheck") {
  TEST_CASE("exact gradient passes") {
    const std::uint64_t seed = 500;
    CAPTURE(seed);
    const Eigen::VectorXd x = random_point(120, seed);
    GradientCheckOptions options;
    options.shape = {2, 5, 3, 4};
    const GradientCheckReport report =
        qrloss::check_gradient(chain_function, x, chain_gradient(x), options);
    INFO(report.summary());
    CHECK(report.passed);
    CHECK(report.num_checked == 120);
    CHECK(report.num_failed == 0);
    CHECK(report.max_abs_error < 1e-9);
    CHECK(report.worst_index >= 0);
    CHECK(report.worst_index < 120);
    CHECK(contains(report.summary(), "gradient check passed"));
    CHECK_FALSE(contains(report.summary(), "FAILED"));
  }

  TEST_CASE("atol follows numeric scale") {
    // atol_i = atol_scale * max |numeric| + 64 * DBL_EPSILON *
    // max(|f(x + h e_i)|, |f(x - h e_i)|) / h_i. f = 50 * sum x_i^2 at
    // x_i = 1 has numeric gradient 100 everywhere and f = 300 nearby.
    const double unit = std::numeric_limits<double>::epsilon();
    const double h = GradientCheckOptions{}.step_scale;
    const Eigen::VectorXd x = Eigen::VectorXd::Ones(6);
    const auto f = [](const Eigen::VectorXd& point) {
      return 50.0 * point.squaredNorm();
    };
    const GradientCheckReport report = qrloss::check_gradient(
        f, x, Eigen::VectorXd::Constant(6, 100.0));
    INFO(report.summary());
    CHECK(report.passed);
    CHECK(report.atol ==
          doctest::Approx(100.0 * 1e-9 + 64.0 * unit * 300.0 * (1 + h) *
                                             (1 + h) / h)
              .epsilon(1e-6));

    // A gradient far below 1 is judged on its own scale: with the float
    // tolerances, an all-zero gradient of f = 1e-6 * sum x_i fails (an
    // absolute atol of atol_scale let it pass).
    GradientCheckOptions float_options;
    float_options.rtol = 1e-4;
    float_options.atol_scale = 1e-5;
    const auto small_f = [](const Eigen::VectorXd& point) {
      return 1e-6 * point.sum();
    };
    const GradientCheckReport small = qrloss::check_gradient(
        small_f, x, Eigen::VectorXd::Constant(6, 1e-6), float_options);
    CHECK(small.passed);
    CHECK(small.atol < 1e-10);
    const GradientCheckReport zero = qrloss::check_gradient(
        small_f, x, Eigen::VectorXd::Zero(6), float_options);
    CHECK_FALSE(zero.passed);
    CHECK(zero.num_failed == 6);
  }

  TEST_CASE("noisy differences fail") {
    // f = 1e5 + 1e-3 |x|^2 has a gradient of about 2e-3, while the
    // round-off of f near 1e5 allows about 2.3e-4 per difference: wrong
    // gradients of that size would pass, so the check fails as too noisy,
    // even for the exact gradient. Without the offset it judges normally.
    const Eigen::VectorXd x = random_point(8, 590);
    for (double offset : {1e5, 0.0}) {
      CAPTURE(offset);
      const auto f = [offset](const Eigen::VectorXd& point) {
        return offset + 1e-3 * point.squaredNorm();
      };
      const Eigen::VectorXd exact = 2e-3 * x;
      const GradientCheckReport report = qrloss::check_gradient(f, x, exact);
      const GradientCheckReport zero =
          qrloss::check_gradient(f, x, Eigen::VectorXd::Zero(8));
      CHECK_FALSE(zero.passed);
      if (offset > 0.0) {
        CHECK(report.too_noisy);
        CHECK_FALSE(report.passed);
        CHECK(contains(report.summary(), "too noisy to judge"));
        CHECK(report.noise > 0.1 * report.gradient_scale);
        CHECK(zero.too_noisy);
      } else {
        CHECK_FALSE(report.too_noisy);
        CHECK_MESSAGE(report.passed, report.summary());
        CHECK_FALSE(contains(report.summary(), "too noisy"));
      }
    }

    // A constant f with an all-zero gradient has nothing to judge: both
    // are exactly zero, so it passes.
    const GradientCheckReport constant = qrloss::check_gradient(
        [](const Eigen::VectorXd&) { return 3.0; }, x,
        Eigen::VectorXd::Zero(8));
    CHECK(constant.passed);
    CHECK_FALSE(constant.too_noisy);
  }

  TEST_CASE("gradient off at one index fails") {
    const std::uint64_t seed = 510;
    CAPTURE(seed);
    const Eigen::VectorXd x = random_point(120, seed);
    Eigen::VectorXd analytic = chain_gradient(x);
    analytic[7] += 1e-4;
    GradientCheckOptions options;
    options.shape = {2, 5, 3, 4};
    const GradientCheckReport report =
        qrloss::check_gradient(chain_function, x, analytic, options);
    INFO(report.summary());
    CHECK_FALSE(report.passed);
    CHECK(report.num_checked == 120);
    CHECK(report.num_failed == 1);
    CHECK(report.worst_index == 7);
    CHECK(report.max_abs_index == 7);
    // Flat index 7 of {2,5,3,4} is b=0, c=0, pixel 7 = (h=1, w=3).
    CHECK(report.worst_position == "(b=0,c=0,h=1,w=3)");
    CHECK(report.worst_analytic == analytic[7]);
    CHECK(report.worst_analytic - report.worst_numeric ==
          doctest::Approx(1e-4).epsilon(1e-4));
    CHECK(report.max_abs_error == doctest::Approx(1e-4).epsilon(1e-4));
    CHECK(contains(report.summary(), "FAILED"));
    CHECK(contains(report.summary(), "(b=0,c=0,h=1,w=3)"));
  }

  TEST_CASE("worst position by rank") {
    const Eigen::VectorXd x = random_point(120, 520);
    Eigen::VectorXd analytic = chain_gradient(x);
    analytic[7] += 1e-4;

    GradientCheckOptions rank2;
    rank2.shape = {8, 15};
    CHECK(qrloss::check_gradient(chain_function, x, analytic, rank2)
              .worst_position == "(b=0,c=7)");

    // Without a shape the flat index is printed.
    const GradientCheckReport no_shape =
        qrloss::check_gradient(chain_function, x, analytic);
    CHECK(no_shape.worst_position == "[7]");
    CHECK(contains(no_shape.summary(), "[7]"));
  }

  TEST_CASE("error within tolerance passes") {
    // An error of 0.1 * rtol relative to the entry passes, and 10 * rtol
    // fails.
    const Eigen::VectorXd x = random_point(40, 530);
    const Eigen::VectorXd exact = chain_gradient(x);
    Eigen::VectorXd analytic = exact;
    analytic[5] += 1e-7 * std::abs(exact[5]);
    CHECK(qrloss::check_gradient(chain_function, x, analytic).passed);
    analytic[5] = exact[5] + 1e-5 * std::abs(exact[5]);
    const GradientCheckReport report =
        qrloss::check_gradient(chain_function, x, analytic);
    CHECK_FALSE(report.passed);
    CHECK(report.worst_index == 5);
  }

  TEST_CASE("nan analytic fails") {
    const Eigen::VectorXd x = random_point(30, 540);
    Eigen::VectorXd analytic = chain_gradient(x);
    analytic[11] = std::numeric_limits<double>::quiet_NaN();
    const GradientCheckReport report =
        qrloss::check_gradient(chain_function, x, analytic);
    INFO(report.summary());
    CHECK_FALSE(report.passed);
    CHECK(report.num_failed == 1);
    CHECK(report.worst_index == 11);
    CHECK(report.max_abs_index == 11);
    CHECK(std::isnan(report.max_abs_error));
    CHECK(contains(report.summary(), "FAILED"));
  }

  TEST_CASE("explicit indices checked") {
    const Eigen::VectorXd x = random_point(120, 550);
    Eigen::VectorXd analytic = chain_gradient(x);
    analytic[7] += 1e-4;
    int calls = 0;
    const auto counted = [&](const Eigen::VectorXd& point) {
      ++calls;
      return chain_function(point);
    };

    GradientCheckOptions options;
    options.indices = {3, 10, 50};
    const GradientCheckReport skip_bad =
        qrloss::check_gradient(counted, x, analytic, options);
    CHECK(skip_bad.passed);
    CHECK(skip_bad.num_checked == 3);
    CHECK(calls == 6);

    options.indices = {50, 7, 3};
    const GradientCheckReport hit_bad =
        qrloss::check_gradient(counted, x, analytic, options);
    CHECK_FALSE(hit_bad.passed);
    CHECK(hit_bad.num_checked == 3);
    CHECK(hit_bad.worst_index == 7);
  }

  TEST_CASE("sampling with max_elements") {
    const Eigen::VectorXd x = random_point(120, 560);
    const Eigen::VectorXd analytic = chain_gradient(x);
    int calls = 0;
    const auto counted = [&](const Eigen::VectorXd& point) {
      ++calls;
      return chain_function(point);
    };

    GradientCheckOptions options;
    options.max_elements = 16;
    options.seed = 5;
    const GradientCheckReport first =
        qrloss::check_gradient(counted, x, analytic, options);
    CHECK(first.passed);
    CHECK(first.num_checked > 0);
    CHECK(first.num_checked <= 16);
    CHECK(calls == 2 * first.num_checked);

    // The same seed draws the same indices.
    const GradientCheckReport again =
        qrloss::check_gradient(chain_function, x, analytic, options);
    CHECK(again.num_checked == first.num_checked);
    CHECK(again.worst_index == first.worst_index);
    CHECK(again.max_abs_error == first.max_abs_error);

    // At most max_elements entries: all are checked.
    options.max_elements = 120;
    CHECK(qrloss::check_gradient(chain_function, x, analytic, options)
              .num_checked == 120);
  }

  TEST_CASE("step scales with entry") {
    // h = step_scale * max(1, |x|). For f = x^3 the central difference is
    // 3 x^2 + h^2 exactly, so the numeric value shows the step: at x = 10
    // with step_scale 1e-2, h = 0.1 and numeric = 300.01.
    const auto cube = [](const Eigen::VectorXd& point) {
      return point[0] * point[0] * point[0];
    };
    GradientCheckOptions options;
    options.step_scale = 1e-2;
    const GradientCheckReport report = qrloss::check_gradient(
        cube, Eigen::VectorXd::Constant(1, 10.0),
        Eigen::VectorXd::Constant(1, 300.0), options);
    CHECK(report.worst_numeric == doctest::Approx(300.01).epsilon(1e-10));

    // Below |x| = 1 the step is step_scale itself: h = 0.01 at x = 0.5.
    const GradientCheckReport small = qrloss::check_gradient(
        cube, Eigen::VectorXd::Constant(1, 0.5),
        Eigen::VectorXd::Constant(1, 0.75), options);
    CHECK(small.worst_numeric == doctest::Approx(0.7501).epsilon(1e-10));
  }

  TEST_CASE("f sees one perturbed entry") {
    // f gets a copy of x with exactly one entry moved, and x itself is left
    // unchanged.
    const Eigen::VectorXd x = random_point(20, 570);
    const Eigen::VectorXd x_copy = x;
    int bad_calls = 0;
    const auto probe = [&](const Eigen::VectorXd& point) {
      if ((point.array() != x_copy.array()).count() != 1) ++bad_calls;
      return chain_function(point);
    };
    qrloss::check_gradient(probe, x, chain_gradient(x));
    CHECK(bad_calls == 0);
    CHECK(x == x_copy);
  }

  TEST_CASE("float gradient passes float tolerances") {
    // gradcheck.hpp suggests rtol = 1e-4 and atol_scale = 1e-5 for a float
    // analytic gradient against double differences. The float RQ and QR
    // gradients from logits must pass with them, and a 1 % error at one
    // entry must still fail.
    const Shape shape{2, 5, 3, 4};
    for (qrloss::LossKind kind : {qrloss::LossKind::kQR,
                                  qrloss::LossKind::kRQ}) {
      const std::string name = qrloss::loss_name(kind);
      CAPTURE(name);
      const FloatLossCase loss = make_float_loss_case(kind, shape, 90);
      const GradientCheckOptions options = float_options(shape);
      const GradientCheckReport report =
          qrloss::check_gradient(loss.f, loss.x, loss.analytic, options);
      CHECK_MESSAGE(report.passed, report.summary());

      Eigen::VectorXd off = loss.analytic;
      off[37] *= 1.01;
      const GradientCheckReport off_report =
          qrloss::check_gradient(loss.f, loss.x, off, options);
      CHECK_FALSE(off_report.passed);
      CHECK(off_report.worst_index == 37);
    }
  }

  TEST_CASE("float tolerances reject wrong loss gradients") {
    // With 2 x 5 x 48 x 48 the loss gradients are below 1e-4. The true
    // float gradient passes, while a zero gradient and the true one times
    // 1.5 fail. So does a 1 % error at the smallest sampled entry above a
    // quarter of the largest (smaller entries sit near the round-off of
    // the differences, about 4e-9 here).
    const Shape shape{2, 5, 48, 48};
    GradientCheckOptions options = float_options(shape);
    options.indices = {5, 1234, 4321, 9999, 17000, 23039};
    for (qrloss::LossKind kind : {qrloss::LossKind::kQR,
                                  qrloss::LossKind::kRQ}) {
      const std::string name = qrloss::loss_name(kind);
      CAPTURE(name);
      const FloatLossCase loss = make_float_loss_case(kind, shape, 92);
      double largest = 0.0;
      for (std::int64_t i : options.indices) {
        largest = std::max(largest, std::abs(loss.analytic[i]));
      }
      CHECK(largest < 1e-4);

      const GradientCheckReport report =
          qrloss::check_gradient(loss.f, loss.x, loss.analytic, options);
      CHECK_MESSAGE(report.passed, report.summary());
      const Eigen::VectorXd zero = Eigen::VectorXd::Zero(loss.x.size());
      CHECK_FALSE(qrloss::check_gradient(loss.f, loss.x, zero, options).passed);
      const Eigen::VectorXd scaled = 1.5 * loss.analytic;
      CHECK_FALSE(
          qrloss::check_gradient(loss.f, loss.x, scaled, options).passed);

      std::int64_t smallest = -1;
      for (std::int64_t i : options.indices) {
        const double magnitude = std::abs(loss.analytic[i]);
        if (magnitude > 0.25 * largest &&
            (smallest < 0 || magnitude < std::abs(loss.analytic[smallest]))) {
          smallest = i;
        }
      }
      REQUIRE(smallest >= 0);
      Eigen::VectorXd off = loss.analytic;
      off[smallest] *= 1.01;
      const GradientCheckReport off_report =
          qrloss::check_gradient(loss.f, loss.x, off, options);
      CHECK_FALSE(off_report.passed);
      CHECK(off_report.worst_index == smallest);
    }
  }

  TEST_CASE("bad input rejected") {
    const Eigen::VectorXd x = random_point(10, 580);
    const Eigen::VectorXd analytic = chain_gradient(x);

    testing::check_invalid_argument(
        [&] {
          qrloss::check_gradient(chain_function, x, analytic.head(9));
        },
        "check_gradient: shape mismatch: expected analytic of size 10, got "
        "9");
    testing::check_invalid_argument(
        [&] {
          qrloss::check_gradient(chain_function, Eigen::VectorXd(),
                                 Eigen::VectorXd());
        },
        "check_gradient: empty tensor: x has size 0");

    for (std::int64_t bad_index : {std::int64_t{-1}, std::int64_t{10}}) {
      CAPTURE(bad_index);
      GradientCheckOptions options;
      options.indices = {2, bad_index};
      testing::check_invalid_argument(
          [&] { qrloss::check_gradient(chain_function, x, analytic, options); },
          "check_gradient: index out of range: " +
              std::to_string(bad_index) + " for x of size 10");
    }

    // f becomes NaN or infinite once x_2 moves up.
    const double base = x[2];
    for (double bad_value : {std::numeric_limits<double>::quiet_NaN(),
                             std::numeric_limits<double>::infinity()}) {
      CAPTURE(bad_value);
      const auto broken = [&](const Eigen::VectorXd& point) {
        return point[2] > base ? bad_value : chain_function(point);
      };
      testing::check_invalid_argument(
          [&] { qrloss::check_gradient(broken, x, analytic); },
          "check_gradient: non-finite result: f is not finite at [2]");
      GradientCheckOptions with_shape;
      with_shape.shape = {1, 2, 1, 5};
      testing::check_invalid_argument(
          [&] { qrloss::check_gradient(broken, x, analytic, with_shape); },
          "check_gradient: non-finite result: f is not finite at "
          "(b=0,c=0,h=0,w=2)");
    }
  }

  TEST_CASE("invalid options rejected") {
    // A zero step gave a FAILED report with a NaN numeric gradient, a NaN
    // step blamed f, max_elements = 0 checked every entry and a shape of
    // the wrong size was used to print positions.
    const Eigen::VectorXd x = random_point(10, 581);
    const Eigen::VectorXd analytic = chain_gradient(x);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    struct Case {
      const char* name;
      GradientCheckOptions options;
      std::string message;
    };

    std::vector<Case> cases(8);
    cases[0] = {"zero step", {}, "invalid step_scale: expected a finite value "
                                 "> 0, got 0"};
    cases[0].options.step_scale = 0.0;

    cases[1] = {"nan step", {}, "invalid step_scale: expected a finite value "
                                "> 0, got nan"};
    cases[1].options.step_scale = nan;

    cases[2] = {"nan rtol", {}, "invalid rtol: expected a finite value >= 0, "
                                "got nan"};
    cases[2].options.rtol = nan;

    cases[3] = {"negative atol_scale", {}, "invalid atol_scale: expected a "
                                           "finite value >= 0, got -1"};
    cases[3].options.atol_scale = -1.0;

    cases[4] = {"zero max_elements", {}, "invalid max_elements: expected at "
                                         "least 1, got 0"};
    cases[4].options.max_elements = 0;

    cases[5] = {"shape of wrong size", {}, "shape mismatch: shape [7,7] does "
                                           "not match x of size 10"};
    cases[5].options.shape = {7, 7};

    cases[6] = {"shape that overflows", {}, "shape mismatch: shape "
                                            "[4294967296,4294967296] does not "
                                            "match x of size 10"};
    cases[6].options.shape = {std::int64_t{1} << 32, std::int64_t{1} << 32};

    cases[7] = {"negative roundoff_units", {}, "invalid roundoff_units: "
                                               "expected a finite value >= 0, "
                                               "got -1"};
    cases[7].options.roundoff_units = -1.0;

    for (const Case& test : cases) {
      CAPTURE(test.name);
      testing::check_invalid_argument(
          [&] {
            qrloss::check_gradient(chain_function, x, analytic, test.options);
          },
          "check_gradient: " + test.message);
    }
  }
}
