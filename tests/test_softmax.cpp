// Tests of softmax, softmax_vjp and softmax_jacobian: values, invariants,
// agreement with the explicit Jacobian and with central differences,
// in-place use, rejected input and thread-count determinism.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "qrloss/qrloss.hpp"
#include "test_support.hpp"

using qrloss::Shape;
namespace testing = qrloss::testing;

namespace {

template <typename T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

template <typename T>
constexpr double unit_roundoff() {
  return std::numeric_limits<T>::epsilon();
}

/// Logits of one pixel (b, n) of a (B, C, P) buffer.
template <typename T>
Vector<T> pixel_of(const std::vector<T>& values, const Shape& shape,
                   std::int64_t b, std::int64_t n) {
  const std::int64_t C = shape[1];
  const std::int64_t P = testing::count(shape) / (shape[0] * C);
  Vector<T> out(C);
  for (std::int64_t c = 0; c < C; ++c) out[c] = values[(b * C + c) * P + n];
  return out;
}

template <typename T>
std::vector<T> run_softmax(const std::vector<T>& logits, const Shape& shape,
                           int num_threads = 0) {
  std::vector<T> probs(logits.size());
  qrloss::softmax(logits.data(), probs.data(), shape, num_threads);
  return probs;
}

}  // namespace

TEST_SUITE("softmax") {
  // -------------------------------------------------------------------------
  // softmax
  // -------------------------------------------------------------------------

  TEST_CASE_TEMPLATE("softmax rows sum to one", T, float, double) {
    std::uint64_t seed = 300;
    for (const Shape& shape :
         {Shape{2, 5, 3, 4}, Shape{7, 4}, Shape{1, 19, 33, 35}}) {
      ++seed;
      const std::string shape_text = qrloss::format_shape(shape);
      CAPTURE(shape_text);
      CAPTURE(seed);
      const std::vector<T> logits =
          testing::random_logits<T>(shape, seed, 3.0);
      const std::vector<T> probs = run_softmax(logits, shape);
      const std::int64_t B = shape[0];
      const std::int64_t C = shape[1];
      const std::int64_t P = testing::count(shape) / (B * C);
      // Each q carries about 2 units of rounding (exp and the product with
      // the rounded 1/sum), so the sum is within a few units of 1.
      double worst = 0.0;
      for (std::int64_t b = 0; b < B; ++b) {
        for (std::int64_t n = 0; n < P; ++n) {
          double sum = 0.0;
          for (std::int64_t c = 0; c < C; ++c) {
            sum += double(probs[(b * C + c) * P + n]);
          }
          worst = std::max(worst, std::abs(sum - 1.0));
        }
      }
      CAPTURE(worst);
      CHECK(worst <= 4.0 * unit_roundoff<T>());
      CHECK(std::all_of(probs.begin(), probs.end(),
                        [](T q) { return q > T(0) && q <= T(1); }));
    }
  }

  TEST_CASE_TEMPLATE("softmax hand-computed pixel", T, float, double) {
    // Pixel (b=1, h=0, w=1) of a {2,3,1,2} tensor has logits (1, 2, 3):
    // q_c = e^c / (e + e^2 + e^3) for c = 1, 2, 3.
    const Shape shape{2, 3, 1, 2};
    const std::vector<T> logits = {T(0.5),  T(-1), T(0.25), T(4),
                                   T(-2.5), T(-3), T(7),    T(1),
                                   T(0),    T(2),  T(-1),   T(3)};
    const std::vector<T> probs = run_softmax(logits, shape);
    const double denominator = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
    for (int c = 0; c < 3; ++c) {
      CAPTURE(c);
      const double expected = std::exp(1.0 + c) / denominator;
      const double got = double(probs[(1 * 3 + c) * 2 + 1]);
      CAPTURE(got);
      CAPTURE(expected);
      CHECK(std::abs(got - expected) <= 4.0 * unit_roundoff<T>() * expected);
    }
  }

  TEST_CASE_TEMPLATE("softmax shift invariance", T, float, double) {
    // Logits are multiples of 2^-10 in [-8, 8] and the shifts are powers of
    // two, so x + k and max + k are exact and the shifted pixel gives the
    // same bits.
    const Shape shape{3, 6, 5, 7};
    const std::int64_t C = 6;
    const std::int64_t P = 35;
    const std::vector<T> noise = testing::random_logits<T>(shape, 310, 3.0);
    std::vector<T> logits(noise.size());
    for (std::size_t i = 0; i < noise.size(); ++i) {
      const double clipped = std::clamp(double(noise[i]), -8.0, 8.0);
      logits[i] = T(std::round(clipped * 1024.0) / 1024.0);
    }
    const T shifts[] = {T(64), T(-32), T(1024), T(0.5), T(-4096)};
    std::vector<T> shifted = logits;
    for (std::int64_t b = 0; b < 3; ++b) {
      for (std::int64_t n = 0; n < P; ++n) {
        const T shift = shifts[(b * P + n) % 5];
        for (std::int64_t c = 0; c < C; ++c) {
          shifted[(b * C + c) * P + n] += shift;
        }
      }
    }
    CHECK(testing::same_bits(run_softmax(shifted, shape),
                             run_softmax(logits, shape)));
  }

  TEST_CASE_TEMPLATE("softmax large logits", T, float, double) {
    // +-1e4 would overflow exp without the max shift. Within a pixel the
    // largest logits tie, so each of them gets 1/k.
    const Shape shape{2, 4, 3, 5};
    const std::int64_t C = 4;
    const std::int64_t P = 15;
    std::vector<T> logits = testing::random_logits<T>(shape, 320);
    for (T& x : logits) x = x > T(0) ? T(1e4) : T(-1e4);
    const std::vector<T> probs = run_softmax(logits, shape);
    CHECK_FALSE(testing::any_nan(probs));
    for (std::int64_t b = 0; b < 2; ++b) {
      for (std::int64_t n = 0; n < P; ++n) {
        int ties = 0;
        T max_logit = -std::numeric_limits<T>::infinity();
        for (std::int64_t c = 0; c < C; ++c) {
          max_logit = std::max(max_logit, logits[(b * C + c) * P + n]);
        }
        for (std::int64_t c = 0; c < C; ++c) {
          ties += logits[(b * C + c) * P + n] == max_logit;
        }
        for (std::int64_t c = 0; c < C; ++c) {
          CAPTURE(b);
          CAPTURE(n);
          CAPTURE(c);
          const std::int64_t i = (b * C + c) * P + n;
          if (logits[i] == max_logit) {
            CHECK(std::abs(double(probs[i]) - 1.0 / ties) <=
                  2.0 * unit_roundoff<T>());
          } else {
            // The exact value exp(-2e4) rounds to 0. Eigen's vectorised exp
            // returns a value just below the smallest normal number instead
            // (see "softmax far below max"), which this bound allows.
            CHECK(double(probs[i]) <=
                  double(std::numeric_limits<T>::min()) * 4.0);
          }
        }
      }
    }
  }

  TEST_CASE_TEMPLATE("softmax far below max", T, float, double) {
    // Eigen 3.4's packet exp clamps its argument at -88.723 (float) or
    // -709.784 (double), so without a fix-up a logit 90 below the pixel max
    // would give 2.94e-39 in float (exact 8.19e-40) and nothing would ever
    // underflow to 0. Every pixel position must get the rounded exact value.
    const Shape shape{1, 2, 1, 16};
    for (double below : {90.0, 104.0, 800.0, 1e4}) {
      CAPTURE(below);
      std::vector<T> logits(32, T(0));
      for (int n = 0; n < 16; ++n) logits[16 + n] = T(-below);
      const std::vector<T> probs = run_softmax(logits, shape);
      const double exact = std::exp(double(T(-below)));
      for (int n = 0; n < 16; ++n) {
        CAPTURE(n);
        const double got = double(probs[16 + n]);
        CAPTURE(got);
        CAPTURE(exact);
        // Correct rounding of the exact value to T, give or take a few
        // units of the smallest subnormal.
        CHECK(std::abs(got - exact) <=
              4.0 * unit_roundoff<T>() * exact +
                  4.0 * double(std::numeric_limits<T>::denorm_min()));
      }
    }
  }

  TEST_CASE_TEMPLATE("softmax thread count same bits", T, float, double) {
    const Shape shape{3, 6, 61, 67};
    const std::vector<T> logits = testing::random_logits<T>(shape, 330);
    const std::vector<T> serial = run_softmax(logits, shape, 1);
    for (int threads : {2, 3, 4, 0}) {
      CAPTURE(threads);
      CHECK(testing::same_bits(run_softmax(logits, shape, threads), serial));
    }
  }

  // -------------------------------------------------------------------------
  // softmax_vjp
  // -------------------------------------------------------------------------

  TEST_CASE_TEMPLATE("vjp of constant is zero", T, float, double) {
    // dL/dx_c = q_c (g - g sum_k q_k), and sum_k q_k = 1 up to rounding.
    const Shape shape{2, 7, 3, 4};
    const std::vector<T> probs =
        testing::random_simplex<T>(shape, 340, 0.0);
    for (T g : {T(3.7), T(-0.25), T(1e3)}) {
      CAPTURE(g);
      const std::vector<T> dL_dq(probs.size(), g);
      std::vector<T> dL_dx(probs.size(), T(99));
      qrloss::softmax_vjp(probs.data(), dL_dq.data(), dL_dx.data(), shape);
      double worst = 0.0;
      for (T v : dL_dx) worst = std::max(worst, std::abs(double(v)));
      CAPTURE(worst);
      CHECK(worst <= 4.0 * unit_roundoff<T>() * std::abs(double(g)));
    }
  }

  TEST_CASE_TEMPLATE("vjp equals jacobian product", T, float, double) {
    // At every pixel, dL/dx = J^T g with J from softmax_jacobian.
    const Shape shape{2, 6, 3, 5};
    const std::int64_t C = 6;
    const std::int64_t P = 15;
    const std::uint64_t seed = 350;
    CAPTURE(seed);
    const std::vector<T> logits = testing::random_logits<T>(shape, seed);
    const std::vector<T> dL_dq = testing::random_logits<T>(shape, seed + 1);
    const std::vector<T> probs = run_softmax(logits, shape);
    std::vector<T> dL_dx(probs.size());
    qrloss::softmax_vjp(probs.data(), dL_dq.data(), dL_dx.data(), shape);
    const double tolerance = 16.0 * unit_roundoff<T>();
    for (std::int64_t b = 0; b < 2; ++b) {
      for (std::int64_t n = 0; n < P; ++n) {
        CAPTURE(b);
        CAPTURE(n);
        const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> J_q_x =
            qrloss::softmax_jacobian<T>(pixel_of(logits, shape, b, n));
        const Vector<T> expected =
            J_q_x.transpose() * pixel_of(dL_dq, shape, b, n);
        const Vector<T> got = pixel_of(dL_dx, shape, b, n);
        const double scale =
            std::max(1.0, double(pixel_of(dL_dq, shape, b, n)
                                     .cwiseAbs()
                                     .maxCoeff()));
        for (std::int64_t c = 0; c < C; ++c) {
          CAPTURE(c);
          CHECK(std::abs(double(got[c]) - double(expected[c])) <=
                tolerance * scale);
        }
      }
    }
  }

  TEST_CASE_TEMPLATE("vjp in place same bits", T, float, double) {
    const Shape shape{3, 6, 61, 67};
    const std::vector<T> logits = testing::random_logits<T>(shape, 360);
    const std::vector<T> dL_dq = testing::random_logits<T>(shape, 361);
    const std::vector<T> probs = run_softmax(logits, shape);
    std::vector<T> separate(probs.size());
    qrloss::softmax_vjp(probs.data(), dL_dq.data(), separate.data(), shape);
    std::vector<T> in_place = dL_dq;
    qrloss::softmax_vjp(probs.data(), in_place.data(), in_place.data(),
                        shape);
    CHECK(testing::same_bits(in_place, separate));
  }

  TEST_CASE_TEMPLATE("vjp thread count same bits", T, float, double) {
    const Shape shape{3, 6, 61, 67};
    const std::vector<T> probs =
        run_softmax(testing::random_logits<T>(shape, 370), shape);
    const std::vector<T> dL_dq = testing::random_logits<T>(shape, 371);
    std::vector<T> serial(probs.size());
    qrloss::softmax_vjp(probs.data(), dL_dq.data(), serial.data(), shape, 1);
    for (int threads : {2, 3, 4, 0}) {
      CAPTURE(threads);
      std::vector<T> dL_dx(probs.size());
      qrloss::softmax_vjp(probs.data(), dL_dq.data(), dL_dx.data(), shape,
                          threads);
      CHECK(testing::same_bits(dL_dx, serial));
    }
  }

  TEST_CASE_TEMPLATE("few-pixel items match merged item", T, float, double) {
    // Items of fewer than 16 pixels run on a repacked copy. Each pixel's
    // softmax and VJP depend on that pixel alone, so the results match a
    // call on the merged tensor bit for bit, in place too.
    for (const Shape& shape :
         {Shape{70, 5}, Shape{77, 19}, Shape{3000, 3, 2, 3}}) {
      const std::string shape_text = qrloss::format_shape(shape);
      CAPTURE(shape_text);
      const Shape merged = testing::merged_shape(shape);
      const std::vector<T> logits = testing::random_logits<T>(shape, 380);
      const std::vector<T> probs = run_softmax(logits, shape, 2);
      CHECK(testing::same_bits(
          testing::merge_items(probs, shape),
          run_softmax(testing::merge_items(logits, shape), merged, 2)));

      const std::vector<T> dL_dq = testing::random_logits<T>(shape, 381);
      std::vector<T> dL_dx(probs.size());
      qrloss::softmax_vjp(probs.data(), dL_dq.data(), dL_dx.data(), shape, 2);
      const std::vector<T> merged_probs = testing::merge_items(probs, shape);
      const std::vector<T> merged_dq = testing::merge_items(dL_dq, shape);
      std::vector<T> merged_dx(probs.size());
      qrloss::softmax_vjp(merged_probs.data(), merged_dq.data(),
                          merged_dx.data(), merged, 2);
      CHECK(testing::same_bits(testing::merge_items(dL_dx, shape), merged_dx));
      std::vector<T> in_place = dL_dq;
      qrloss::softmax_vjp(probs.data(), in_place.data(), in_place.data(),
                          shape, 2);
      CHECK(testing::same_bits(in_place, dL_dx));
    }
  }

  // -------------------------------------------------------------------------
  // softmax_jacobian
  // -------------------------------------------------------------------------

  TEST_CASE_TEMPLATE("jacobian rows sum to zero", T, float, double) {
    const Shape shape{1, 9};
    const std::vector<T> logits = testing::random_logits<T>(shape, 380);
    const Vector<T> x = Eigen::Map<const Vector<T>>(logits.data(), 9);
    const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> J_q_x =
        qrloss::softmax_jacobian<T>(x);
    REQUIRE(J_q_x.rows() == 9);
    REQUIRE(J_q_x.cols() == 9);
    for (Eigen::Index i = 0; i < 9; ++i) {
      CAPTURE(i);
      double row_sum = 0.0;
      for (Eigen::Index j = 0; j < 9; ++j) row_sum += double(J_q_x(i, j));
      CHECK(std::abs(row_sum) <= 4.0 * unit_roundoff<T>());
    }
  }

  TEST_CASE_TEMPLATE("jacobian is symmetric", T, float, double) {
    // J = diag(q) - q q^T, and q_i q_j rounds the same as q_j q_i.
    const Shape shape{1, 9};
    const std::vector<T> logits = testing::random_logits<T>(shape, 390);
    const Vector<T> x = Eigen::Map<const Vector<T>>(logits.data(), 9);
    const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> J_q_x =
        qrloss::softmax_jacobian<T>(x);
    CHECK(J_q_x == J_q_x.transpose());
  }

  TEST_CASE("jacobian matches central differences") {
    // Row i of J is the gradient of q_i(x). Each row is checked with
    // check_gradient against the library's softmax.
    const std::int64_t C = 7;
    const Shape shape{1, C};
    const std::uint64_t seed = 400;
    CAPTURE(seed);
    const std::vector<double> logits =
        testing::random_logits<double>(shape, seed);
    const Eigen::VectorXd x = Eigen::Map<const Eigen::VectorXd>(
        logits.data(), static_cast<Eigen::Index>(C));
    const Eigen::MatrixXd J_q_x = qrloss::softmax_jacobian<double>(x);
    for (std::int64_t i = 0; i < C; ++i) {
      CAPTURE(i);
      const auto q_i = [&](const Eigen::VectorXd& point) {
        std::vector<double> probs(static_cast<std::size_t>(C));
        qrloss::softmax(point.data(), probs.data(), shape);
        return probs[static_cast<std::size_t>(i)];
      };
      const Eigen::VectorXd row = J_q_x.row(i).transpose();
      const qrloss::GradientCheckReport report =
          qrloss::check_gradient(q_i, x, row);
      CHECK_MESSAGE(report.passed, report.summary());
    }
  }

  TEST_CASE_TEMPLATE("jacobian of one class is zero", T, float, double) {
    Vector<T> x(1);
    x[0] = T(3.5);
    const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> J_q_x =
        qrloss::softmax_jacobian<T>(x);
    REQUIRE(J_q_x.size() == 1);
    CHECK(J_q_x(0, 0) == T(0));
  }

  // -------------------------------------------------------------------------
  // Rejected input
  // -------------------------------------------------------------------------

  TEST_CASE_TEMPLATE("softmax bad input rejected", T, float, double) {
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const Shape shape{2, 5, 3, 4};
    const std::size_t n = 120;
    std::vector<T> logits = testing::random_logits<T>(shape, 410);
    std::vector<T> probs(n);

    testing::check_invalid_argument(
        [&] { qrloss::softmax<T>(nullptr, probs.data(), shape); },
        "softmax: null data: logits is a null pointer");
    testing::check_invalid_argument(
        [&] { qrloss::softmax<T>(logits.data(), nullptr, shape); },
        "softmax: null data: probs is a null pointer");
    for (const Shape& bad : {Shape{}, Shape{5}, Shape{2, 5, 12},
                             Shape{1, 2, 5, 3, 4}}) {
      testing::check_invalid_argument(
          [&] { qrloss::softmax(logits.data(), probs.data(), bad); },
          "softmax: bad rank: expected logits of rank 2 (B,C) or 4 "
          "(B,C,H,W), got rank " +
              std::to_string(bad.size()) + " " + qrloss::format_shape(bad));
    }
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax(logits.data(), probs.data(), Shape{2, 0, 3, 4});
        },
        "softmax: empty tensor: logits has shape [2,0,3,4]");
    testing::check_invalid_argument(
        [&] { qrloss::softmax(logits.data(), probs.data(), shape, -1); },
        "softmax: bad num_threads: expected >= 0, got -1");

    // probs equal to, or partly overlapping, logits.
    std::vector<T> storage(2 * n);
    std::copy(logits.begin(), logits.end(), storage.begin());
    testing::check_invalid_argument(
        [&] { qrloss::softmax(storage.data(), storage.data(), shape); },
        "softmax: overlapping buffers: probs overlaps logits");
    testing::check_invalid_argument(
        [&] { qrloss::softmax(storage.data(), storage.data() + 5, shape); },
        "softmax: overlapping buffers: probs overlaps logits");
    CHECK_NOTHROW(
        qrloss::softmax(storage.data(), storage.data() + n, shape));

    // The first bad logit in memory order is reported.
    const T bad_values[] = {kNaN, kInf, -kInf};
    const char* printed[] = {"nan", "inf", "-inf"};
    for (int k = 0; k < 3; ++k) {
      CAPTURE(k);
      std::vector<T> bad_logits = logits;
      bad_logits[((1 * 5 + 3) * 3 + 2) * 4 + 1] = kNaN;
      bad_logits[((1 * 5 + 2) * 3 + 0) * 4 + 3] = bad_values[k];
      testing::check_invalid_argument(
          [&] { qrloss::softmax(bad_logits.data(), probs.data(), shape); },
          std::string("softmax: non-finite input: logits is ") + printed[k] +
              " at (b=1,c=2,h=0,w=3)");
    }
  }

  TEST_CASE_TEMPLATE("vjp bad input rejected", T, float, double) {
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    const Shape shape{2, 5, 3, 4};
    const std::size_t n = 120;
    const std::vector<T> probs = testing::random_simplex<T>(shape, 420);
    const std::vector<T> dL_dq = testing::random_logits<T>(shape, 421);
    std::vector<T> dL_dx(n);

    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp<T>(nullptr, dL_dq.data(), dL_dx.data(), shape);
        },
        "softmax_vjp: null data: probs is a null pointer");
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp<T>(probs.data(), nullptr, dL_dx.data(), shape);
        },
        "softmax_vjp: null data: dL_dq is a null pointer");
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp<T>(probs.data(), dL_dq.data(), nullptr, shape);
        },
        "softmax_vjp: null data: dL_dx is a null pointer");
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs.data(), dL_dq.data(), dL_dx.data(),
                              Shape{2, 5, 12});
        },
        "softmax_vjp: bad rank: expected probs of rank 2 (B,C) or 4 "
        "(B,C,H,W), got rank 3 [2,5,12]");
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs.data(), dL_dq.data(), dL_dx.data(),
                              shape, -2);
        },
        "softmax_vjp: bad num_threads: expected >= 0, got -2");

    // dL_dx may be dL_dq itself but must not overlap probs, or overlap
    // dL_dq partially.
    std::vector<T> storage(3 * n);
    std::copy(probs.begin(), probs.end(), storage.begin());
    std::copy(dL_dq.begin(), dL_dq.end(), storage.begin() + n);
    T* probs_data = storage.data();
    T* grad_data = storage.data() + n;
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs_data, grad_data, probs_data, shape);
        },
        "softmax_vjp: overlapping buffers: dL_dx overlaps probs");
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs_data, grad_data, grad_data - 3, shape);
        },
        "softmax_vjp: overlapping buffers: dL_dx overlaps probs");
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs_data, grad_data, grad_data + 3, shape);
        },
        "softmax_vjp: overlapping buffers: dL_dx overlaps dL_dq");

    // Values: probs must be finite and >= 0, dL_dq finite.
    std::vector<T> bad_probs = probs;
    bad_probs[((0 * 5 + 4) * 3 + 1) * 4 + 2] = T(-0.25);
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(bad_probs.data(), dL_dq.data(), dL_dx.data(),
                              shape);
        },
        "softmax_vjp: negative input: probs is -0.25 at (b=0,c=4,h=1,w=2), "
        "expected >= 0");
    std::vector<T> bad_grad = dL_dq;
    bad_grad[((1 * 5 + 1) * 3 + 2) * 4 + 0] = kNaN;
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs.data(), bad_grad.data(), dL_dx.data(),
                              shape);
        },
        "softmax_vjp: non-finite input: dL_dq is nan at (b=1,c=1,h=2,w=0)");

    // An infinite dL_dq usually comes from QR with eps = 0, so the message
    // names that cause, on the direct path, in place and on the few-pixel
    // path.
    const std::string hint =
        "; qr_loss_grad with eps = 0 writes inf where target is 0 and -inf "
        "for a class whose probs are all 0, so use eps > 0";
    bad_grad[((1 * 5 + 1) * 3 + 2) * 4 + 0] =
        std::numeric_limits<T>::infinity();
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs.data(), bad_grad.data(), dL_dx.data(),
                              shape);
        },
        "softmax_vjp: non-finite input: dL_dq is inf at (b=1,c=1,h=2,w=0)" +
            hint);
    std::vector<T> in_place = bad_grad;
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs.data(), in_place.data(), in_place.data(),
                              shape);
        },
        "softmax_vjp: non-finite input: dL_dq is inf at (b=1,c=1,h=2,w=0)" +
            hint);
    const Shape items{24, 5};
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs.data(), bad_grad.data(), dL_dx.data(),
                              items);
        },
        "softmax_vjp: non-finite input: dL_dq is inf at (b=16,c=0)" + hint);
  }

  TEST_CASE_TEMPLATE("softmax bad logit across chunks", T, float, double) {
    // Over 8 chunks the logits are checked inside the softmax's loops, and
    // the first bad value in memory order is still the one reported.
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const Shape shape{4, 3, 64, 64};
    const std::int64_t P = 64 * 64;
    std::vector<T> logits = testing::random_logits<T>(shape, 450);
    logits[static_cast<std::size_t>((3 * 3 + 0) * P + 7)] = kNaN;
    logits[static_cast<std::size_t>((1 * 3 + 2) * P + 4095)] = -kInf;
    logits[static_cast<std::size_t>((1 * 3 + 1) * P + 4000)] = kInf;
    std::vector<T> probs(logits.size());
    for (int threads : {1, 2, 3}) {
      CAPTURE(threads);
      testing::check_invalid_argument(
          [&] {
            qrloss::softmax(logits.data(), probs.data(), shape, threads);
          },
          "softmax: non-finite input: logits is inf at (b=1,c=1,h=62,w=32)");
    }
  }

  TEST_CASE_TEMPLATE("vjp bad values across chunks", T, float, double) {
    // 4 x 3 x 64 x 64 is 16384 pixels, so 8 chunks of 2048 and many tiles:
    // the checks inside the VJP's loops must still report the first bad
    // value in memory order, and probs before dL_dq.
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    const Shape shape{4, 3, 64, 64};
    const std::int64_t P = 64 * 64;
    const auto flat = [&](std::int64_t b, std::int64_t c, std::int64_t p) {
      return static_cast<std::size_t>((b * 3 + c) * P + p);
    };
    const std::vector<T> probs = testing::random_simplex<T>(shape, 430);
    const std::vector<T> dL_dq = testing::random_logits<T>(shape, 431);
    std::vector<T> dL_dx(probs.size());

    for (int threads : {1, 2, 3}) {
      CAPTURE(threads);
      // A later chunk and an earlier class row of a later tile: the smaller
      // flat index, class 0 of pixel 3000 in item 2, is reported.
      std::vector<T> bad_probs = probs;
      bad_probs[flat(3, 0, 10)] = T(-1);
      bad_probs[flat(2, 1, 5)] = T(-0.5);
      bad_probs[flat(2, 0, 3000)] = T(-0.25);
      testing::check_invalid_argument(
          [&] {
            qrloss::softmax_vjp(bad_probs.data(), dL_dq.data(), dL_dx.data(),
                                shape, threads);
          },
          "softmax_vjp: negative input: probs is -0.25 at (b=2,c=0,h=46,"
          "w=56), expected >= 0");

      // dL_dq has a bad value earlier in memory than probs; probs is still
      // the one reported.
      std::vector<T> bad_grad = dL_dq;
      bad_grad[flat(0, 0, 0)] = kNaN;
      testing::check_invalid_argument(
          [&] {
            qrloss::softmax_vjp(bad_probs.data(), bad_grad.data(),
                                dL_dx.data(), shape, threads);
          },
          "softmax_vjp: negative input: probs is -0.25 at (b=2,c=0,h=46,"
          "w=56), expected >= 0");
      testing::check_invalid_argument(
          [&] {
            qrloss::softmax_vjp(probs.data(), bad_grad.data(), dL_dx.data(),
                                shape, threads);
          },
          "softmax_vjp: non-finite input: dL_dq is nan at (b=0,c=0,h=0,w=0)");
    }
  }

  TEST_CASE_TEMPLATE("vjp overflow rejected", T, float, double) {
    // With q = (0.9, 0.1) and dL_dq = (-0.6, 0.6) of T's largest value,
    // dL_dx = (-0.108, 0.108) of it fits T, but g - sum_k g_k q_k in T
    // overflowed. q = (4, 4) (probs need not sum to 1) makes dL_dx itself
    // overflow. Shape {2, 2} goes through the few-pixel copies,
    // {1, 2, 4, 4} does not.
    const T largest = std::numeric_limits<T>::max();
    const std::string expected =
        std::string("softmax_vjp: non-finite result: dL_dx overflows ") +
        (sizeof(T) == 4 ? "float32" : "float64") +
        " although probs and dL_dq are finite; rescale dL_dq";
    for (const Shape& shape : {Shape{2, 2}, Shape{1, 2, 4, 4}}) {
      CAPTURE(shape.size());
      const std::int64_t pixels = testing::count(shape) / 2;
      // Class c of pixel 0 lies at c * stride in both layouts.
      const auto at = static_cast<std::size_t>(shape.size() == 2 ? 1 : pixels);
      std::vector<T> probs(static_cast<std::size_t>(2 * pixels), T(0.5));
      std::vector<T> dL_dq(probs.size(), T(1));
      std::vector<T> dL_dx(probs.size());

      probs[0] = T(0.9);
      probs[at] = T(0.1);
      dL_dq[0] = T(-0.6) * largest;
      dL_dq[at] = T(0.6) * largest;
      qrloss::softmax_vjp(probs.data(), dL_dq.data(), dL_dx.data(), shape);
      CHECK(dL_dx[0] / largest == doctest::Approx(-0.108).epsilon(1e-6));
      CHECK(dL_dx[at] / largest == doctest::Approx(0.108).epsilon(1e-6));

      probs[0] = T(4);
      probs[at] = T(4);
      dL_dq[0] = T(0.9) * largest;
      dL_dq[at] = T(-0.9) * largest;
      testing::check_invalid_argument(
          [&] {
            qrloss::softmax_vjp(probs.data(), dL_dq.data(), dL_dx.data(),
                                shape);
          },
          expected);
    }
  }

  TEST_CASE_TEMPLATE("vjp in place bad value keeps dL_dq", T, float, double) {
    // In place, dL_dq is also the output; a bad value in the last tile must
    // be found before any pixel is overwritten.
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const Shape shape{4, 3, 64, 64};
    const std::vector<T> probs = testing::random_simplex<T>(shape, 440);
    std::vector<T> grad = testing::random_logits<T>(shape, 441);
    grad.back() = kInf;
    const std::vector<T> before = grad;
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs.data(), grad.data(), grad.data(), shape);
        },
        "softmax_vjp: non-finite input: dL_dq is inf at (b=3,c=2,h=63,w=63)");
    CHECK(testing::same_bits(grad, before));
  }

  TEST_CASE_TEMPLATE("few-pixel items report caller position", T, float,
                     double) {
    // 300 x 4 runs on repacked copies, which are checked as they are made:
    // the error still names the first bad value in the caller's memory
    // order, probs before dL_dq, and in place dL_dq is left unchanged.
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const Shape shape{300, 4};
    std::vector<T> logits = testing::random_logits<T>(shape, 460);
    logits[250 * 4 + 1] = kNaN;
    logits[201 * 4 + 3] = -kInf;
    std::vector<T> out(logits.size());
    for (int threads : {1, 2}) {
      CAPTURE(threads);
      testing::check_invalid_argument(
          [&] { qrloss::softmax(logits.data(), out.data(), shape, threads); },
          "softmax: non-finite input: logits is -inf at (b=201,c=3)");
    }

    std::vector<T> probs = testing::random_simplex<T>(shape, 461);
    std::vector<T> grad = testing::random_logits<T>(shape, 462);
    probs[120 * 4 + 2] = T(-0.25);
    grad[3 * 4 + 0] = kNaN;
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs.data(), grad.data(), out.data(), shape);
        },
        "softmax_vjp: negative input: probs is -0.25 at (b=120,c=2), "
        "expected >= 0");
    probs = testing::random_simplex<T>(shape, 461);
    const std::vector<T> before = grad;
    testing::check_invalid_argument(
        [&] {
          qrloss::softmax_vjp(probs.data(), grad.data(), grad.data(), shape);
        },
        "softmax_vjp: non-finite input: dL_dq is nan at (b=3,c=0)");
    CHECK(testing::same_bits(grad, before));
  }

  TEST_CASE_TEMPLATE("jacobian bad input rejected", T, float, double) {
    testing::check_invalid_argument(
        [&] { qrloss::softmax_jacobian<T>(Vector<T>()); },
        "softmax_jacobian: empty tensor: logits has 0 classes");
    Vector<T> x(4);
    x << T(1), std::numeric_limits<T>::quiet_NaN(), T(2), T(3);
    testing::check_invalid_argument(
        [&] { qrloss::softmax_jacobian<T>(x); },
        "softmax_jacobian: non-finite input: logits is ");
    testing::check_invalid_argument([&] { qrloss::softmax_jacobian<T>(x); },
                                    " at (c=1)");
  }
}
