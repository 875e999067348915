// Tests of the QR and RQ losses and their gradients: hand-computed values,
// central-difference gradient checks, float32 against float64, agreement of
// the entry points, thread-count determinism, rejected input, eps = 0 and
// numerical limits.

#include <doctest/doctest.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "qrloss/qrloss.hpp"
#include "test_support.hpp"

using qrloss::LossKind;
using qrloss::LossOptions;
using qrloss::Shape;
namespace testing = qrloss::testing;

namespace {

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

/// One of the eight pointer entry points, named by loss, input and whether
/// it writes a gradient.
struct EntryPoint {
  LossKind kind;
  bool from_logits;
  bool with_grad;
};

constexpr EntryPoint kAllEntryPoints[] = {
    {LossKind::kQR, false, false}, {LossKind::kQR, false, true},
    {LossKind::kQR, true, false},  {LossKind::kQR, true, true},
    {LossKind::kRQ, false, false}, {LossKind::kRQ, false, true},
    {LossKind::kRQ, true, false},  {LossKind::kRQ, true, true},
};

constexpr EntryPoint kGradEntryPoints[] = {
    {LossKind::kQR, false, true},
    {LossKind::kQR, true, true},
    {LossKind::kRQ, false, true},
    {LossKind::kRQ, true, true},
};

/// The function name that error messages start with, e.g.
/// "rq_loss_grad_from_logits".
std::string function_name(const EntryPoint& entry) {
  std::string name = std::string(qrloss::loss_name(entry.kind)) + "_loss";
  if (entry.with_grad) name += "_grad";
  if (entry.from_logits) name += "_from_logits";
  return name;
}

const char* input_name(const EntryPoint& entry) {
  return entry.from_logits ? "logits" : "probs";
}

const char* grad_name(const EntryPoint& entry) {
  return entry.from_logits ? "dL_dx" : "dL_dq";
}

/// Calls the entry point by its own name (not through compute_loss), so
/// that every one of them is exercised. `grad` is ignored by the loss-only
/// entry points.
template <typename T>
double call_entry(const EntryPoint& entry, const T* input, const T* target,
                  T* grad, const Shape& shape,
                  const LossOptions& options = {}) {
  if (entry.kind == LossKind::kQR) {
    if (entry.from_logits) {
      return entry.with_grad ? qrloss::qr_loss_grad_from_logits(
                                   input, target, grad, shape, options)
                             : qrloss::qr_loss_from_logits(input, target,
                                                           shape, options);
    }
    return entry.with_grad
               ? qrloss::qr_loss_grad(input, target, grad, shape, options)
               : qrloss::qr_loss(input, target, shape, options);
  }
  if (entry.from_logits) {
    return entry.with_grad ? qrloss::rq_loss_grad_from_logits(
                                 input, target, grad, shape, options)
                           : qrloss::rq_loss_from_logits(input, target, shape,
                                                         options);
  }
  return entry.with_grad
             ? qrloss::rq_loss_grad(input, target, grad, shape, options)
             : qrloss::rq_loss(input, target, shape, options);
}

/// Probabilities (a random simplex per pixel) or random logits.
template <typename T>
std::vector<T> make_input(bool from_logits, const Shape& shape,
                          std::uint64_t seed) {
  return from_logits ? testing::random_logits<T>(shape, seed)
                     : testing::random_simplex<T>(shape, seed);
}

/// Flat row-major index of (b, c, h, w) in a rank-4 shape.
std::int64_t flat_index(const Shape& shape, std::int64_t b, std::int64_t c,
                        std::int64_t h, std::int64_t w) {
  return ((b * shape[1] + c) * shape[2] + h) * shape[3] + w;
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

enum class TargetKind { kSimplex, kOneHot, kZeroPixels };

constexpr TargetKind kTargetKinds[] = {TargetKind::kSimplex,
                                       TargetKind::kOneHot,
                                       TargetKind::kZeroPixels};

const char* target_kind_name(TargetKind kind) {
  switch (kind) {
    case TargetKind::kSimplex:
      return "simplex";
    case TargetKind::kOneHot:
      return "one-hot";
    case TargetKind::kZeroPixels:
      return "simplex with all-zero pixels";
  }
  return "";
}

/// A random simplex, a one-hot target, or a random simplex in which every
/// third pixel is all zero (RQ then clamps that pixel's sum).
template <typename T>
std::vector<T> make_target(TargetKind kind, const Shape& shape,
                           std::uint64_t seed) {
  if (kind == TargetKind::kOneHot) return testing::one_hot<T>(shape);
  std::vector<T> target = testing::random_simplex<T>(shape, seed);
  if (kind == TargetKind::kZeroPixels) {
    const std::int64_t B = shape[0];
    const std::int64_t C = shape[1];
    const std::int64_t P = testing::count(shape) / (B * C);
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t p = 0; p < P; ++p) {
        if ((b * P + p) % 3 != 1) continue;
        for (std::int64_t c = 0; c < C; ++c) target[(b * C + c) * P + p] = 0;
      }
    }
  }
  return target;
}

// ---------------------------------------------------------------------------
// Tolerances of hand-computed values
// ---------------------------------------------------------------------------

/// Relative tolerance of a loss or gradient computed by the library against
/// the same formula evaluated here in double. float evaluates its logs in
/// float (unit round-off 6e-8, times log values up to |log 1e-8| ~ 18 before
/// the double sums), so it gets 1e-6.
template <typename T>
double value_tolerance() {
  return std::is_same_v<T, float> ? 1e-6 : 1e-12;
}

template <typename T>
void check_close(double got, double expected) {
  CAPTURE(got);
  CAPTURE(expected);
  CHECK(std::abs(got - expected) <=
        value_tolerance<T>() * std::max(1.0, std::abs(expected)));
}

/// The largest |got - expected| over the tensor, relative to max |expected|.
template <typename T>
void check_close(const std::vector<T>& got,
                 const std::vector<double>& expected) {
  const double error = testing::max_error_over_max(got, expected);
  CAPTURE(error);
  CHECK(error <= value_tolerance<T>());
}

/// RQ loss evaluated directly from eq. 3 in double: the formula, not the
/// library's pass structure.
double rq_loss_by_formula(const std::vector<double>& q,
                          const std::vector<double>& p, const Shape& shape,
                          double eps) {
  const std::int64_t B = shape[0];
  const std::int64_t C = shape[1];
  const std::int64_t P = testing::count(shape) / (B * C);
  std::vector<double> s(static_cast<std::size_t>(C), 0.0);
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t c = 0; c < C; ++c) {
      for (std::int64_t n = 0; n < P; ++n) s[c] += q[(b * C + c) * P + n];
    }
  }
  for (double& value : s) value = std::max(value, eps);
  double total = 0.0;
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t n = 0; n < P; ++n) {
      double pixel_sum = 0.0;
      for (std::int64_t c = 0; c < C; ++c) {
        const std::int64_t i = (b * C + c) * P + n;
        pixel_sum += q[i] * p[i] / s[c];
      }
      const double t = std::max(pixel_sum, qrloss::kPixelSumFloor);
      for (std::int64_t c = 0; c < C; ++c) {
        const std::int64_t i = (b * C + c) * P + n;
        const double r = q[i] * p[i] / s[c] / t;
        if (r > 0.0) total += r * (std::log(r + eps) - std::log(q[i] + eps));
      }
    }
  }
  return total / static_cast<double>(B * P);
}

// ---------------------------------------------------------------------------
// Gradient checks
// ---------------------------------------------------------------------------

/// Compares the analytic gradient of a double entry point with central
/// differences of its loss-only twin, with the STYLE.md double tolerances
/// (rtol 1e-6, atol 1e-9 * max(1, max |numeric|)) unless rtol is given.
qrloss::GradientCheckReport check_entry_gradient(
    LossKind kind, bool from_logits, const std::vector<double>& input,
    const std::vector<double>& target, const Shape& shape, double eps,
    qrloss::GradientCheckOptions check = {}, double rtol = 1e-6) {
  LossOptions options;
  options.eps = eps;
  std::vector<double> grad(input.size());
  call_entry<double>({kind, from_logits, true}, input.data(), target.data(),
                     grad.data(), shape, options);
  const auto f = [&](const Eigen::VectorXd& x) {
    return call_entry<double>({kind, from_logits, false}, x.data(),
                              target.data(), nullptr, shape, options);
  };
  check.rtol = rtol;
  check.atol_scale = 1e-9;
  check.shape = shape;
  const Eigen::Map<const Eigen::VectorXd> x(
      input.data(), static_cast<Eigen::Index>(input.size()));
  const Eigen::Map<const Eigen::VectorXd> analytic(
      grad.data(), static_cast<Eigen::Index>(grad.size()));
  return qrloss::check_gradient(f, x, analytic, check);
}

// Items of fewer than 16 pixels run on a repacked copy (the first three
// shapes), the others on the caller's layout.
const Shape kGradientShapes[] = {
    {2, 5, 3, 4},
    {3, 1, 2, 2},  // C = 1
    {7, 4},        // rank 2
    {1, 3, 1, 17},
    {2, 3, 4, 5},  // two items of 20 pixels
};

constexpr double kGradientEps[] = {1e-8, 1e-3, 0.0};

/// Runs the gradient check of one loss and input path over every shape,
/// target kind and eps of the grid.
void check_gradient_grid(LossKind kind, bool from_logits) {
  std::uint64_t seed = from_logits ? 2000 : 1000;
  for (const Shape& shape : kGradientShapes) {
    for (TargetKind target_kind : kTargetKinds) {
      for (double eps : kGradientEps) {
        ++seed;
        // QR with eps = 0 is +inf wherever p = 0 and q > 0, so only the
        // strictly positive simplex target has a finite loss.
        if (kind == LossKind::kQR && eps == 0.0 &&
            target_kind != TargetKind::kSimplex) {
          continue;
        }
        const std::string shape_text = qrloss::format_shape(shape);
        const std::string target_text = target_kind_name(target_kind);
        CAPTURE(shape_text);
        CAPTURE(target_text);
        CAPTURE(eps);
        CAPTURE(seed);
        // The losses take probs as given, without renormalising, so
        // independent entries in [0.05, 0.95] are valid and stay far from
        // the q = 0 kink.
        const std::vector<double> input =
            from_logits ? testing::random_logits<double>(shape, seed, 1.5)
                        : testing::random_uniform<double>(shape, seed, 0.05,
                                                          0.95);
        const std::vector<double> target =
            make_target<double>(target_kind, shape, seed + 500);
        const qrloss::GradientCheckReport report = check_entry_gradient(
            kind, from_logits, input, target, shape, eps);
        CHECK_MESSAGE(report.passed, report.summary());
        CHECK(report.num_checked == testing::count(shape));
      }
    }
  }
}

/// Second-order one-sided difference (-3 f(x) + 4 f(x + h) - f(x + 2h)) /
/// (2h) at entry i, for entries at the edge q = 0 of the domain.
double forward_difference(
    const std::function<double(const Eigen::VectorXd&)>& f,
    const Eigen::VectorXd& x, std::int64_t i, double h) {
  Eigen::VectorXd point = x;
  const double f0 = f(point);
  point[i] = x[i] + h;
  const double f1 = f(point);
  point[i] = x[i] + 2.0 * h;
  const double f2 = f(point);
  return (-3.0 * f0 + 4.0 * f1 - f2) / (2.0 * h);
}

/// Checks that both RQ entry points from probs reject the inputs with
/// eps = 0, with a message "<function>: <text>...", and that with eps =
/// 1e-8 (where every class sum is clamped) the gradient has no NaN.
template <typename T>
void check_rq_eps_zero_rejects(const std::vector<T>& probs,
                               const std::vector<T>& target,
                               const Shape& shape, const std::string& text) {
  std::vector<T> grad(probs.size());
  LossOptions options;
  options.eps = 0.0;
  for (const EntryPoint& entry : kAllEntryPoints) {
    if (entry.kind != LossKind::kRQ || entry.from_logits) continue;
    const std::string name = function_name(entry);
    CAPTURE(name);
    testing::check_invalid_argument(
        [&] {
          call_entry(entry, probs.data(), target.data(), grad.data(), shape,
                     options);
        },
        name + ": " + text);
  }

  LossOptions positive;
  positive.eps = 1e-8;
  CHECK(std::isfinite(qrloss::rq_loss_grad(probs.data(), target.data(),
                                           grad.data(), shape, positive)));
  CHECK_FALSE(testing::any_nan(grad));
}

/// Where the float loss without a gradient comes from: redone in double
/// like the gradient call, or computed in float because its own arithmetic
/// fits (it then matches double to float precision).
enum class LossOnlyPath { kDouble, kFloat };

/// Checks that float RQ on probs (or logits) and target, which are beyond
/// float's arithmetic and so redone in double, equals the double call on
/// the same values: the same loss bits, and the double gradient rounded to
/// float.
void check_float_rq_as_double(const std::vector<float>& input,
                              const std::vector<float>& target,
                              const Shape& shape, const LossOptions& options,
                              bool from_logits = false,
                              LossOnlyPath loss_only = LossOnlyPath::kDouble) {
  const auto loss_of = [&](const auto* x, const auto* p, auto* grad) {
    return from_logits ? qrloss::compute_loss_from_logits(
                             LossKind::kRQ, x, p, grad, shape, options)
                       : qrloss::compute_loss(LossKind::kRQ, x, p, grad,
                                              shape, options);
  };
  const std::vector<double> input64(input.begin(), input.end());
  const std::vector<double> target64(target.begin(), target.end());
  std::vector<double> grad64(input.size());
  const double loss64 =
      loss_of(input64.data(), target64.data(), grad64.data());
  CHECK(std::isfinite(loss64));

  const double loss =
      loss_of(input.data(), target.data(), static_cast<float*>(nullptr));
  if (loss_only == LossOnlyPath::kDouble) {
    CHECK(testing::same_bits(loss, loss64));
  } else {
    CHECK(std::isfinite(loss));
    CHECK(loss == doctest::Approx(loss64).epsilon(1e-6));
  }

  std::vector<float> grad(input.size());
  CHECK(testing::same_bits(loss_of(input.data(), target.data(), grad.data()),
                           loss64));
  for (std::size_t i = 0; i < grad.size(); ++i) {
    CAPTURE(i);
    CHECK(testing::same_bits(
        static_cast<double>(grad[i]),
        static_cast<double>(static_cast<float>(grad64[i]))));
  }
}

}  // namespace

TEST_SUITE("losses") {
  TEST_CASE("kernel variant follows QRLOSS_ISA") {
    // tests/meson.build runs this suite with QRLOSS_ISA=baseline and =avx2;
    // the cap may only lower the choice.
    const std::string isa = qrloss::kernel_isa();
    CHECK((isa == "baseline" || isa == "avx2" || isa == "avx512"));
    const char* cap = std::getenv("QRLOSS_ISA");
    if (cap != nullptr && std::string(cap) == "baseline") {
      CHECK(isa == "baseline");
    }
    if (cap != nullptr && std::string(cap) == "avx2") {
      CHECK(isa != "avx512");
    }
  }

  // -------------------------------------------------------------------------
  // A.1 Hand-computed values
  // -------------------------------------------------------------------------

  TEST_CASE_TEMPLATE("qr loss one class", T, float, double) {
    // With C = 1: L = qbar log(qbar + eps) - (1/N) sum_n q_n log(p_n + eps)
    // and dL/dq_n = (1/N) (log(qbar + eps) + qbar / (qbar + eps)
    //                      - log(p_n + eps)).
    const Shape shape{2, 1, 2, 3};
    const std::uint64_t seed = 11;
    CAPTURE(seed);
    const std::vector<T> q =
        testing::random_uniform<T>(shape, seed, 0.05, 0.95);
    std::vector<T> p = testing::random_uniform<T>(shape, seed + 1, 0.0, 1.0);
    p[4] = 0;  // log(0 + eps) enters the loss
    const double N = 12.0;
    for (double eps : {1e-8, 1e-3}) {
      CAPTURE(eps);
      double qbar = 0.0;
      for (T v : q) qbar += double(v);
      qbar /= N;
      double cross = 0.0;
      for (std::size_t i = 0; i < q.size(); ++i) {
        cross += double(q[i]) * std::log(double(p[i]) + eps);
      }
      const double expected_loss = qbar * std::log(qbar + eps) - cross / N;
      std::vector<double> expected_grad(q.size());
      for (std::size_t i = 0; i < q.size(); ++i) {
        expected_grad[i] = (std::log(qbar + eps) + qbar / (qbar + eps) -
                            std::log(double(p[i]) + eps)) /
                           N;
      }

      LossOptions options;
      options.eps = eps;
      std::vector<T> grad(q.size());
      check_close<T>(qrloss::qr_loss(q.data(), p.data(), shape, options),
                     expected_loss);
      check_close<T>(
          qrloss::qr_loss_grad(q.data(), p.data(), grad.data(), shape,
                               options),
          expected_loss);
      check_close(grad, expected_grad);
    }
  }

  TEST_CASE_TEMPLATE("qr logits one class", T, float, double) {
    // softmax over one class is exactly 1, so L = log(1 + eps) - mean
    // log(p + eps) and dL/dx = q (g - g q) = 0 exactly.
    const Shape shape{3, 1, 2, 2};
    const std::vector<T> x = testing::random_logits<T>(shape, 12);
    const std::vector<T> p =
        testing::random_uniform<T>(shape, 13, 0.05, 1.0);
    const double eps = 1e-3;
    double mean_log_p = 0.0;
    for (T v : p) mean_log_p += std::log(double(v) + eps);
    mean_log_p /= 12.0;
    const double expected = std::log(1.0 + eps) - mean_log_p;

    LossOptions options;
    options.eps = eps;
    std::vector<T> grad(x.size(), T(7));
    check_close<T>(qrloss::qr_loss_grad_from_logits(x.data(), p.data(),
                                                    grad.data(), shape,
                                                    options),
                   expected);
    for (T g : grad) CHECK(g == T(0));
  }

  TEST_CASE_TEMPLATE("rq loss one class", T, float, double) {
    // With C = 1 every pixel with p > 0 has a single nonzero u, so r = 1
    // and L = (1/N) sum_{p > 0} (log(1 + eps) - log(q + eps)). Pixels with
    // p = 0 are clamped (r = 0) and contribute nothing. Then a = abar, so
    // G = 0, w = 1/q and dL/dq = -1 / (N (q + eps)) where p > 0, else 0.
    // With eps = 0 the same follows from eq. 16.
    const Shape shape{2, 1, 2, 3};
    const std::uint64_t seed = 14;
    CAPTURE(seed);
    const std::vector<T> q =
        testing::random_uniform<T>(shape, seed, 0.05, 0.95);
    std::vector<T> p =
        testing::random_uniform<T>(shape, seed + 1, 0.05, 1.0);
    p[4] = 0;
    p[7] = 0;
    const double N = 12.0;
    for (double eps : {1e-8, 1e-3, 0.0}) {
      CAPTURE(eps);
      double expected_loss = 0.0;
      std::vector<double> expected_grad(q.size(), 0.0);
      for (std::size_t i = 0; i < q.size(); ++i) {
        if (p[i] == T(0)) continue;
        expected_loss += std::log(1.0 + eps) - std::log(double(q[i]) + eps);
        expected_grad[i] = -1.0 / (N * (double(q[i]) + eps));
      }
      expected_loss /= N;

      LossOptions options;
      options.eps = eps;
      std::vector<T> grad(q.size());
      check_close<T>(qrloss::rq_loss(q.data(), p.data(), shape, options),
                     expected_loss);
      check_close<T>(
          qrloss::rq_loss_grad(q.data(), p.data(), grad.data(), shape,
                               options),
          expected_loss);
      check_close(grad, expected_grad);
    }
  }

  TEST_CASE_TEMPLATE("losses with uniform target", T, float, double) {
    const Shape shape{2, 5, 3, 4};
    const std::int64_t C = 5;
    const std::int64_t P = 12;
    const double N = 24.0;
    const std::uint64_t seed = 15;
    CAPTURE(seed);
    const std::vector<T> q = testing::random_simplex<T>(shape, seed);
    const std::vector<T> p(q.size(), T(1.0 / C));
    const double p_value = double(T(1.0 / C));
    for (double eps : {1e-8, 1e-3}) {
      CAPTURE(eps);
      LossOptions options;
      options.eps = eps;

      // QR: the cross term is log(p + eps) times the sum of all q.
      std::vector<double> qbar(static_cast<std::size_t>(C), 0.0);
      double q_total = 0.0;
      for (std::int64_t b = 0; b < 2; ++b) {
        for (std::int64_t c = 0; c < C; ++c) {
          for (std::int64_t n = 0; n < P; ++n) {
            qbar[c] += double(q[(b * C + c) * P + n]);
            q_total += double(q[(b * C + c) * P + n]);
          }
        }
      }
      double expected_qr = -std::log(p_value + eps) * q_total / N;
      for (double& value : qbar) {
        value /= N;
        expected_qr += value * std::log(value + eps);
      }
      check_close<T>(qrloss::qr_loss(q.data(), p.data(), shape, options),
                     expected_qr);

      // RQ: r_c = (q_c / s_c) / sum_k (q_k / s_k), since p cancels.
      const double expected_rq = rq_loss_by_formula(
          testing::to_double(q), testing::to_double(p), shape, eps);
      check_close<T>(qrloss::rq_loss(q.data(), p.data(), shape, options),
                     expected_rq);
    }
  }

  TEST_CASE_TEMPLATE("losses with one-hot target", T, float, double) {
    // QR: L = sum_c qbar_c log(qbar_c + eps)
    //         - (1/N) sum_n (q_hot log(1 + eps) + sum_{c != hot} q_c log eps).
    // RQ: only the hot class has u > 0, so r = 1 there and
    //     L = (1/N) sum_n (log(1 + eps) - log(q_hot + eps)).
    const Shape shape{2, 5, 3, 4};
    const std::int64_t C = 5;
    const std::int64_t P = 12;
    const double N = 24.0;
    const std::uint64_t seed = 16;
    CAPTURE(seed);
    const std::vector<T> q = testing::random_simplex<T>(shape, seed);
    const std::vector<T> p = testing::one_hot<T>(shape);
    for (double eps : {1e-8, 1e-3}) {
      CAPTURE(eps);
      LossOptions options;
      options.eps = eps;
      double expected_qr = 0.0;
      for (std::int64_t c = 0; c < C; ++c) {
        double qbar = 0.0;
        for (std::int64_t b = 0; b < 2; ++b) {
          for (std::int64_t n = 0; n < P; ++n) {
            qbar += double(q[(b * C + c) * P + n]);
          }
        }
        qbar /= N;
        expected_qr += qbar * std::log(qbar + eps);
      }
      double expected_rq = 0.0;
      for (std::int64_t b = 0; b < 2; ++b) {
        for (std::int64_t n = 0; n < P; ++n) {
          const std::int64_t hot = (b + 3 * n) % C;  // as in one_hot()
          for (std::int64_t c = 0; c < C; ++c) {
            const double value = double(q[(b * C + c) * P + n]);
            expected_qr -=
                value * std::log((c == hot ? 1.0 : 0.0) + eps) / N;
            if (c == hot) {
              expected_rq +=
                  (std::log(1.0 + eps) - std::log(value + eps)) / N;
            }
          }
        }
      }
      check_close<T>(qrloss::qr_loss(q.data(), p.data(), shape, options),
                     expected_qr);
      check_close<T>(qrloss::rq_loss(q.data(), p.data(), shape, options),
                     expected_rq);
    }
  }

  TEST_CASE("rq loss matches formula") {
    // A random simplex target on a rank-2 and a rank-4 shape, against the
    // direct evaluation of eq. 3.
    std::uint64_t seed = 17;
    for (const Shape& shape : {Shape{2, 5, 3, 4}, Shape{7, 4}}) {
      for (double eps : {1e-8, 1e-3, 0.0}) {
        ++seed;
        const std::string shape_text = qrloss::format_shape(shape);
        CAPTURE(shape_text);
        CAPTURE(eps);
        CAPTURE(seed);
        const std::vector<double> q =
            testing::random_simplex<double>(shape, seed);
        const std::vector<double> p = make_target<double>(
            TargetKind::kZeroPixels, shape, seed + 1);
        LossOptions options;
        options.eps = eps;
        check_close<double>(
            qrloss::rq_loss(q.data(), p.data(), shape, options),
            rq_loss_by_formula(q, p, shape, eps));
      }
    }
  }

  // -------------------------------------------------------------------------
  // A.2 Central-difference gradient checks
  // -------------------------------------------------------------------------

  TEST_CASE("qr gradient via probs") {
    check_gradient_grid(LossKind::kQR, false);
  }

  TEST_CASE("qr gradient via logits") {
    check_gradient_grid(LossKind::kQR, true);
  }

  TEST_CASE("rq gradient via probs") {
    check_gradient_grid(LossKind::kRQ, false);
  }

  TEST_CASE("rq gradient via logits") {
    check_gradient_grid(LossKind::kRQ, true);
  }

  TEST_CASE("rq gradient below clamps") {
    // Below a clamp the clamped value is a constant. Every third pixel of
    // the target is scaled by 1e-13, so its sum of q p / s_c is nonzero but
    // below the 1e-12 floor. With eps = 0.1, class 0 also gets q around
    // 1e-3 everywhere, so its batch sum (about 0.04) is below eps.
    const Shape shape{2, 5, 3, 4};
    const std::int64_t C = 5;
    const std::int64_t P = 12;
    std::uint64_t seed = 20;
    for (bool from_logits : {false, true}) {
      for (double eps : {1e-8, 0.1}) {
        ++seed;
        const bool clamp_class = eps == 0.1;
        CAPTURE(from_logits);
        CAPTURE(eps);
        CAPTURE(seed);
        std::vector<double> input =
            from_logits ? testing::random_logits<double>(shape, seed, 1.0)
                        : testing::random_uniform<double>(shape, seed, 0.05,
                                                          0.95);
        std::vector<double> target =
            testing::random_simplex<double>(shape, seed + 1);
        for (std::int64_t b = 0; b < 2; ++b) {
          for (std::int64_t n = 0; n < P; ++n) {
            const std::int64_t class0 = (b * C + 0) * P + n;
            // softmax of a logit 7 below the others is about 2e-4.
            if (clamp_class) {
              input[class0] = from_logits ? input[class0] - 7.0
                                          : 1e-3 * (1.0 + input[class0]);
            }
            if ((b * P + n) % 3 != 0) continue;
            for (std::int64_t c = 0; c < C; ++c) {
              target[(b * C + c) * P + n] *= 1e-13;
            }
          }
        }
        // With s_0 clamped, r = q p / (s_0 t) bends on the scale of q ~ 1e-3
        // itself, so probs need a step of 1e-7, which keeps the truncation
        // error near (h / q)^2 = 1e-8.
        qrloss::GradientCheckOptions check;
        if (clamp_class && !from_logits) check.step_scale = 1e-7;
        const qrloss::GradientCheckReport report = check_entry_gradient(
            LossKind::kRQ, from_logits, input, target, shape, eps, check);
        CHECK_MESSAGE(report.passed, report.summary());
      }
    }
  }

  TEST_CASE("gradient at zero probs") {
    // At q = 0 the library returns the one-sided derivative from q >= 0.
    // Zero entries are checked against a second-order forward difference,
    // the other entries against central differences.
    //
    // Step: QR is linear in each entry apart from the smooth qbar term, so
    // h = 1e-6 suffices. RQ's r log(r + eps) - r log(q + eps) bends on the
    // scale of eps, so its step is eps * 1e-4 (truncation ~ (w h / eps)^2,
    // about 1e-7 relative here). With eps = 1e-8 that step would be 1e-12
    // and round-off of L over it would exceed the gradient, so RQ is
    // checked at eps = 1e-3 and eps = 0 (where the loss term q w log w is
    // smooth through 0) only.
    //
    // RQ entries whose pixel has no other nonzero q * p are skipped. RQ
    // clamps that pixel's sum at 1e-12, and the kink where the clamp ends
    // lies at q = 1e-12 * s_c / p, closer to 0 than any usable step.
    const Shape shape{2, 5, 3, 4};
    const std::int64_t C = 5;
    const std::int64_t P = 12;
    struct ZeroCase {
      LossKind kind;
      double eps;
      double h;
    };
    const ZeroCase cases[] = {
        {LossKind::kQR, 1e-8, 1e-6}, {LossKind::kQR, 1e-3, 1e-6},
        {LossKind::kQR, 0.0, 1e-6},  {LossKind::kRQ, 1e-3, 1e-7},
        {LossKind::kRQ, 0.0, 1e-6},
    };
    constexpr double kRelTolerance = 1e-4;
    std::uint64_t seed = 30;
    for (const ZeroCase& zero_case : cases) {
      for (TargetKind target_kind :
           {TargetKind::kSimplex, TargetKind::kOneHot}) {
        ++seed;
        // QR with eps = 0 is +inf once q > 0 where p = 0.
        if (zero_case.kind == LossKind::kQR && zero_case.eps == 0.0 &&
            target_kind == TargetKind::kOneHot) {
          continue;
        }
        const std::string loss = qrloss::loss_name(zero_case.kind);
        const std::string target_text = target_kind_name(target_kind);
        const double eps = zero_case.eps;
        CAPTURE(loss);
        CAPTURE(target_text);
        CAPTURE(eps);
        CAPTURE(seed);
        std::vector<double> q =
            testing::random_uniform<double>(shape, seed, 0.05, 0.95);
        std::vector<std::int64_t> zeros;
        std::vector<std::int64_t> positive;
        for (std::int64_t i = 0; i < testing::count(shape); ++i) {
          if (i % 7 == 3) {
            q[i] = 0.0;
            zeros.push_back(i);
          } else {
            positive.push_back(i);
          }
        }
        const std::vector<double> p =
            make_target<double>(target_kind, shape, seed + 1);

        qrloss::GradientCheckOptions central;
        central.indices = positive;
        const qrloss::GradientCheckReport report = check_entry_gradient(
            zero_case.kind, false, q, p, shape, eps, central);
        CHECK_MESSAGE(report.passed, report.summary());

        LossOptions options;
        options.eps = eps;
        std::vector<double> grad(q.size());
        const double loss_value =
            call_entry<double>({zero_case.kind, false, true}, q.data(),
                               p.data(), grad.data(), shape, options);
        const auto f = [&](const Eigen::VectorXd& x) {
          return call_entry<double>({zero_case.kind, false, false}, x.data(),
                                    p.data(), nullptr, shape, options);
        };
        const Eigen::Map<const Eigen::VectorXd> x(
            q.data(), static_cast<Eigen::Index>(q.size()));
        // Round-off of the difference: 8 units of rounding of L over h.
        const double atol = 8.0 * std::numeric_limits<double>::epsilon() *
                            std::max(1.0, std::abs(loss_value)) / zero_case.h;
        int checked = 0;
        for (std::int64_t i : zeros) {
          const std::int64_t b = i / (C * P);
          const std::int64_t n = i % P;
          double other_mass = 0.0;
          for (std::int64_t c = 0; c < C; ++c) {
            const std::int64_t k = (b * C + c) * P + n;
            other_mass += q[k] * p[k];
          }
          if (zero_case.kind == LossKind::kRQ && other_mass == 0.0) continue;
          ++checked;
          const double numeric = forward_difference(f, x, i, zero_case.h);
          CAPTURE(i);
          CAPTURE(grad[i]);
          CAPTURE(numeric);
          CHECK(std::abs(grad[i] - numeric) <=
                atol + kRelTolerance *
                           std::max(std::abs(grad[i]), std::abs(numeric)));
        }
        CHECK(checked >= 10);
      }
    }
  }

  // -------------------------------------------------------------------------
  // A.3 float32 against float64
  // -------------------------------------------------------------------------

  TEST_CASE("float gradient matches double") {
    // float inputs are rounded first, and double runs on the same rounded
    // values, so the difference is the float arithmetic alone.
    std::uint64_t seed = 40;
    for (const EntryPoint& entry : kGradEntryPoints) {
      for (const Shape& shape :
           {Shape{2, 5, 3, 4}, Shape{2, 19, 8, 8}, Shape{7, 4}}) {
        for (TargetKind target_kind :
             {TargetKind::kSimplex, TargetKind::kOneHot}) {
          ++seed;
          const std::string name = function_name(entry);
          const std::string shape_text = qrloss::format_shape(shape);
          const std::string target_text = target_kind_name(target_kind);
          CAPTURE(name);
          CAPTURE(shape_text);
          CAPTURE(target_text);
          CAPTURE(seed);
          const std::vector<float> input32 =
              make_input<float>(entry.from_logits, shape, seed);
          const std::vector<float> target32 =
              make_target<float>(target_kind, shape, seed + 1);
          const std::vector<double> input64 = testing::to_double(input32);
          const std::vector<double> target64 = testing::to_double(target32);

          std::vector<float> grad32(input32.size());
          std::vector<double> grad64(input64.size());
          const double loss32 = call_entry(entry, input32.data(),
                                           target32.data(), grad32.data(),
                                           shape);
          const double loss64 = call_entry(entry, input64.data(),
                                           target64.data(), grad64.data(),
                                           shape);
          const double grad_error =
              testing::max_error_over_max(grad32, grad64);
          CAPTURE(loss32);
          CAPTURE(loss64);
          CAPTURE(grad_error);
          CHECK(std::abs(loss32 - loss64) <= 1e-6 * std::abs(loss64));
          CHECK(grad_error <= 1e-5);
        }
      }
    }
  }

  // -------------------------------------------------------------------------
  // A.4 Agreement of the entry points
  // -------------------------------------------------------------------------

  TEST_CASE_TEMPLATE("loss-only equals grad value", T, float, double) {
    const Shape shape{2, 5, 13, 17};
    std::uint64_t seed = 50;
    for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
      for (bool from_logits : {false, true}) {
        ++seed;
        const std::string name = function_name({kind, from_logits, true});
        CAPTURE(name);
        CAPTURE(seed);
        const std::vector<T> input = make_input<T>(from_logits, shape, seed);
        const std::vector<T> target =
            make_target<T>(TargetKind::kZeroPixels, shape, seed + 1);
        std::vector<T> grad(input.size());
        const double with_grad =
            call_entry<T>({kind, from_logits, true}, input.data(),
                          target.data(), grad.data(), shape);
        const double loss_only =
            call_entry<T>({kind, from_logits, false}, input.data(),
                          target.data(), nullptr, shape);
        CHECK(testing::same_bits(loss_only, with_grad));
      }
    }
  }

  TEST_CASE_TEMPLATE("compute_loss dispatches by kind", T, float, double) {
    const Shape shape{2, 5, 3, 4};
    std::uint64_t seed = 60;
    for (bool from_logits : {false, true}) {
      ++seed;
      CAPTURE(from_logits);
      CAPTURE(seed);
      const std::vector<T> input = make_input<T>(from_logits, shape, seed);
      const std::vector<T> target = testing::random_simplex<T>(shape, seed);
      const auto direct = [&](LossKind kind, T* grad) {
        return call_entry<T>({kind, from_logits, grad != nullptr},
                             input.data(), target.data(), grad, shape);
      };
      const auto dispatched = [&](LossKind kind, T* grad) {
        return from_logits
                   ? qrloss::compute_loss_from_logits<T>(
                         kind, input.data(), target.data(), grad, shape)
                   : qrloss::compute_loss<T>(kind, input.data(),
                                             target.data(), grad, shape);
      };
      // The two losses differ here, so a swapped dispatch cannot pass.
      CHECK(direct(LossKind::kQR, nullptr) != direct(LossKind::kRQ, nullptr));
      for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
        const std::string loss = qrloss::loss_name(kind);
        CAPTURE(loss);
        std::vector<T> grad_direct(input.size());
        std::vector<T> grad_dispatched(input.size());
        CHECK(testing::same_bits(dispatched(kind, nullptr),
                                 direct(kind, nullptr)));
        CHECK(testing::same_bits(dispatched(kind, grad_dispatched.data()),
                                 direct(kind, grad_direct.data())));
        CHECK(testing::same_bits(grad_dispatched, grad_direct));
      }
    }
  }

  TEST_CASE("compute_loss rejects invalid kind") {
    // A kind outside the enum was computed as RQ without an error.
    const Shape shape{2, 2};
    const std::vector<double> values = {0.5, 0.5, 0.5, 0.5};
    const auto invalid = static_cast<LossKind>(7);
    testing::check_invalid_argument(
        [&] {
          qrloss::compute_loss<double>(invalid, values.data(), values.data(),
                                       nullptr, shape);
        },
        "compute_loss: invalid loss kind 7: expected LossKind::kQR or "
        "LossKind::kRQ");
    testing::check_invalid_argument(
        [&] {
          qrloss::compute_loss_from_logits<double>(
              invalid, values.data(), values.data(), nullptr, shape);
        },
        "compute_loss_from_logits: invalid loss kind 7");
    CHECK(std::string(qrloss::loss_name(invalid)) == "invalid");

    // Errors name the function the caller called.
    const std::vector<double> negative = {0.5, -0.5, 0.5, 0.5};
    testing::check_invalid_argument(
        [&] {
          qrloss::compute_loss<double>(LossKind::kRQ, negative.data(),
                                       values.data(), nullptr, shape);
        },
        "compute_loss: negative input: probs is -0.5 at (b=0,c=1)");
  }

  TEST_CASE_TEMPLATE("tensor maps match pointers", T, float, double) {
    using ConstView4 = qrloss::ConstTensorView<T, 4>;
    using ConstView2 = qrloss::ConstTensorView<T, 2>;
    using View4 = qrloss::TensorView<T, 4>;
    using View2 = qrloss::TensorView<T, 2>;
    const std::uint64_t seed = 70;
    CAPTURE(seed);

    // Rank 4.
    const Shape shape{2, 5, 3, 4};
    const std::vector<T> probs = testing::random_simplex<T>(shape, seed);
    const std::vector<T> logits = testing::random_logits<T>(shape, seed);
    const std::vector<T> target = testing::random_simplex<T>(shape, seed + 1);
    const ConstView4 probs_map(probs.data(), 2, 5, 3, 4);
    const ConstView4 logits_map(logits.data(), 2, 5, 3, 4);
    const ConstView4 target_map(target.data(), 2, 5, 3, 4);
    std::vector<T> grad_map_data(probs.size());
    std::vector<T> grad(probs.size());
    View4 grad_map(grad_map_data.data(), 2, 5, 3, 4);

    CHECK(qrloss::qr_loss(probs_map, target_map) ==
          qrloss::qr_loss(probs.data(), target.data(), shape));
    CHECK(qrloss::rq_loss(probs_map, target_map) ==
          qrloss::rq_loss(probs.data(), target.data(), shape));
    CHECK(qrloss::qr_loss_from_logits(logits_map, target_map) ==
          qrloss::qr_loss_from_logits(logits.data(), target.data(), shape));
    CHECK(qrloss::rq_loss_from_logits(logits_map, target_map) ==
          qrloss::rq_loss_from_logits(logits.data(), target.data(), shape));

    CHECK(qrloss::qr_loss_grad(probs_map, target_map, grad_map) ==
          qrloss::qr_loss_grad(probs.data(), target.data(), grad.data(),
                               shape));
    CHECK(testing::same_bits(grad_map_data, grad));
    CHECK(qrloss::rq_loss_grad(probs_map, target_map, grad_map) ==
          qrloss::rq_loss_grad(probs.data(), target.data(), grad.data(),
                               shape));
    CHECK(testing::same_bits(grad_map_data, grad));
    CHECK(qrloss::qr_loss_grad_from_logits(logits_map, target_map,
                                           grad_map) ==
          qrloss::qr_loss_grad_from_logits(logits.data(), target.data(),
                                           grad.data(), shape));
    CHECK(testing::same_bits(grad_map_data, grad));
    CHECK(qrloss::rq_loss_grad_from_logits(logits_map, target_map,
                                           grad_map) ==
          qrloss::rq_loss_grad_from_logits(logits.data(), target.data(),
                                           grad.data(), shape));
    CHECK(testing::same_bits(grad_map_data, grad));

    // A temporary view of the gradient buffer works as the output.
    std::fill(grad_map_data.begin(), grad_map_data.end(), T(0));
    CHECK(qrloss::rq_loss_grad(probs_map, target_map,
                               View4(grad_map_data.data(), 2, 5, 3, 4)) ==
          qrloss::rq_loss_grad(probs.data(), target.data(), grad.data(),
                               shape));
    CHECK(testing::same_bits(grad_map_data, grad));

    // A writable map works as an input too.
    std::vector<T> probs_copy = probs;
    const View4 writable_probs(probs_copy.data(), 2, 5, 3, 4);
    CHECK(qrloss::qr_loss(writable_probs, target_map) ==
          qrloss::qr_loss(probs.data(), target.data(), shape));

    // Rank 2.
    const Shape shape2{7, 4};
    const std::vector<T> probs2 = testing::random_simplex<T>(shape2, seed);
    const std::vector<T> target2 =
        testing::random_simplex<T>(shape2, seed + 1);
    const ConstView2 probs2_map(probs2.data(), 7, 4);
    const ConstView2 target2_map(target2.data(), 7, 4);
    std::vector<T> grad2_map_data(probs2.size());
    std::vector<T> grad2(probs2.size());
    View2 grad2_map(grad2_map_data.data(), 7, 4);
    CHECK(qrloss::rq_loss(probs2_map, target2_map) ==
          qrloss::rq_loss(probs2.data(), target2.data(), shape2));
    CHECK(qrloss::rq_loss_grad(probs2_map, target2_map, grad2_map) ==
          qrloss::rq_loss_grad(probs2.data(), target2.data(), grad2.data(),
                               shape2));
    CHECK(testing::same_bits(grad2_map_data, grad2));
    CHECK(qrloss::qr_loss_grad(probs2_map, target2_map, grad2_map) ==
          qrloss::qr_loss_grad(probs2.data(), target2.data(), grad2.data(),
                               shape2));
    CHECK(testing::same_bits(grad2_map_data, grad2));
  }

  TEST_CASE_TEMPLATE("tensor maps reject shape mismatch", T, float,
                     double) {
    using ConstView4 = qrloss::ConstTensorView<T, 4>;
    using ConstView2 = qrloss::ConstTensorView<T, 2>;
    using View4 = qrloss::TensorView<T, 4>;
    const Shape shape{2, 5, 3, 4};
    const std::vector<T> probs = testing::random_simplex<T>(shape, 71);
    const std::vector<T> target = testing::random_simplex<T>(shape, 72);
    std::vector<T> grad(probs.size());
    const ConstView4 probs_map(probs.data(), 2, 5, 3, 4);
    const ConstView4 target_map(target.data(), 2, 5, 3, 4);
    const ConstView4 swapped_target(target.data(), 2, 5, 4, 3);
    const ConstView2 flat_target(target.data(), 2, 60);
    View4 grad_map(grad.data(), 2, 5, 3, 4);
    View4 swapped_grad(grad.data(), 2, 5, 4, 3);

    testing::check_invalid_argument(
        [&] { qrloss::qr_loss(probs_map, swapped_target); },
        "qr_loss: shape mismatch: expected target [2,5,3,4], got [2,5,4,3]");
    testing::check_invalid_argument(
        [&] { qrloss::rq_loss(probs_map, flat_target); },
        "rq_loss: shape mismatch: expected target [2,5,3,4], got [2,60]");
    testing::check_invalid_argument(
        [&] { qrloss::qr_loss_grad(probs_map, swapped_target, grad_map); },
        "qr_loss_grad: shape mismatch: expected target [2,5,3,4], got "
        "[2,5,4,3]");
    testing::check_invalid_argument(
        [&] { qrloss::qr_loss_grad(probs_map, target_map, swapped_grad); },
        "qr_loss_grad: shape mismatch: expected gradient [2,5,3,4], got "
        "[2,5,4,3]");
    testing::check_invalid_argument(
        [&] { qrloss::rq_loss_grad(probs_map, target_map, swapped_grad); },
        "rq_loss_grad: shape mismatch: expected gradient [2,5,3,4], got "
        "[2,5,4,3]");
    testing::check_invalid_argument(
        [&] { qrloss::qr_loss_from_logits(probs_map, swapped_target); },
        "qr_loss_from_logits: shape mismatch: expected target [2,5,3,4], "
        "got [2,5,4,3]");
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad_from_logits(probs_map, target_map,
                                           swapped_grad);
        },
        "rq_loss_grad_from_logits: shape mismatch: expected gradient "
        "[2,5,3,4], got [2,5,4,3]");
  }

  // -------------------------------------------------------------------------
  // A.5 Determinism across threads
  // -------------------------------------------------------------------------

  TEST_CASE_TEMPLATE("thread count gives same bits", T, float, double) {
    // {3,6,61,67}: 12261 pixels in 6 chunks of 2044 with a partial last
    // chunk, chunks that cross batch items, and tiles of 1024 pixels that
    // leave partial tiles. {5000,3}: rank 2 in 3 chunks.
    std::uint64_t seed = 80;
    for (const Shape& shape : {Shape{3, 6, 61, 67}, Shape{5000, 3}}) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        ++seed;
        const std::string name = function_name(entry);
        const std::string shape_text = qrloss::format_shape(shape);
        CAPTURE(name);
        CAPTURE(shape_text);
        CAPTURE(seed);
        const std::vector<T> input =
            make_input<T>(entry.from_logits, shape, seed);
        const std::vector<T> target =
            make_target<T>(TargetKind::kZeroPixels, shape, seed + 1);
        LossOptions options;
        options.num_threads = 1;
        std::vector<T> serial_grad(input.size());
        const double serial = call_entry(entry, input.data(), target.data(),
                                         serial_grad.data(), shape, options);
        for (int threads : {2, 3, 4, 0}) {
          CAPTURE(threads);
          options.num_threads = threads;
          std::vector<T> grad(input.size());
          const double loss = call_entry(entry, input.data(), target.data(),
                                         grad.data(), shape, options);
          CHECK(testing::same_bits(loss, serial));
          CHECK(testing::same_bits(grad, serial_grad));
        }
      }
    }
  }

  TEST_CASE_TEMPLATE("few-pixel items match merged item", T, float, double) {
    // Items of fewer than 16 pixels run on a repacked copy, one item of
    // B * P pixels. {70,5}: rank 2, with a partial block of 64 items.
    // {70,19} and {77,19}: rank 2 with register blocks of the transposing
    // copy (8 x 8 floats, 4 x 4 doubles), a last block of classes that
    // overlaps the one before, and 6 items left over (scalar) or 13
    // (again an overlapping block).
    // {3000,3,2,3}: 6 pixels per item, 18000 pixels in 9 chunks. {2,3,3,5}:
    // 15 pixels, just below the threshold.
    std::uint64_t seed = 500;
    for (const Shape& shape :
         {Shape{70, 5}, Shape{70, 19}, Shape{77, 19}, Shape{3000, 3, 2, 3},
          Shape{2, 3, 3, 5}}) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        ++seed;
        const std::string name = function_name(entry);
        const std::string shape_text = qrloss::format_shape(shape);
        CAPTURE(name);
        CAPTURE(shape_text);
        const std::vector<T> input =
            make_input<T>(entry.from_logits, shape, seed);
        const std::vector<T> target =
            make_target<T>(TargetKind::kZeroPixels, shape, seed + 1);
        for (int threads : {1, 2}) {
          CAPTURE(threads);
          LossOptions options;
          options.num_threads = threads;
          std::vector<T> grad(input.size());
          const double loss = call_entry(entry, input.data(), target.data(),
                                         grad.data(), shape, options);
          const std::vector<T> merged_input =
              testing::merge_items(input, shape);
          const std::vector<T> merged_target =
              testing::merge_items(target, shape);
          std::vector<T> merged_grad(input.size());
          const double merged_loss =
              call_entry(entry, merged_input.data(), merged_target.data(),
                         merged_grad.data(), testing::merged_shape(shape),
                         options);
          CHECK(testing::same_bits(loss, merged_loss));
          if (entry.with_grad) {
            CHECK(testing::same_bits(testing::merge_items(grad, shape),
                                     merged_grad));
          }
        }
      }
    }
  }

  TEST_CASE_TEMPLATE("few-pixel items report caller position", T, float,
                     double) {
    // The repacked copies are checked as they are made, and a bad value is
    // then located in the caller's tensor: the position names the caller's
    // (b, c), and the first bad value in the caller's memory order is
    // reported.
    const Shape shape{300, 4};
    for (const EntryPoint& entry : kAllEntryPoints) {
      const std::string name = function_name(entry);
      CAPTURE(name);
      std::vector<T> input = make_input<T>(entry.from_logits, shape, 530);
      std::vector<T> target = testing::random_simplex<T>(shape, 531);
      std::vector<T> grad(input.size());
      const auto rejects = [&](const std::string& message) {
        testing::check_invalid_argument(
            [&] {
              call_entry(entry, input.data(), target.data(), grad.data(),
                         shape);
            },
            message);
      };
      const std::string bad_input = name + ": non-finite input: " +
                                    input_name(entry) +
                                    " is nan at (b=201,c=3)";
      input[250 * 4 + 1] = std::numeric_limits<T>::quiet_NaN();
      input[201 * 4 + 3] = std::numeric_limits<T>::quiet_NaN();
      rejects(bad_input);
      // A bad target does not hide the bad input, as in a direct call.
      target[7 * 4 + 2] = T(-0.5);
      rejects(bad_input);
      input = make_input<T>(entry.from_logits, shape, 530);
      rejects(name +
              ": negative input: target is -0.5 at (b=7,c=2), expected >= 0");
    }
  }

#ifdef _OPENMP  // the test is about OpenMP teams
  TEST_CASE_TEMPLATE("calls inside omp parallel region", T, float, double) {
    // Each caller thread writes its own gradient buffer, and all of them
    // read the same inputs.
    // Nested parallelism is tried both off (inner regions get one thread)
    // and on.
    const Shape shape{2, 7, 45, 50};  // 4500 pixels in 3 chunks
    constexpr int kCallers = 4;
    const int saved_levels = omp_get_max_active_levels();
    std::uint64_t seed = 90;
    for (const EntryPoint& entry : kGradEntryPoints) {
      ++seed;
      const std::string name = function_name(entry);
      CAPTURE(name);
      CAPTURE(seed);
      const std::vector<T> input =
          make_input<T>(entry.from_logits, shape, seed);
      const std::vector<T> target =
          make_target<T>(TargetKind::kSimplex, shape, seed + 1);
      LossOptions options;
      options.num_threads = 1;
      std::vector<T> serial_grad(input.size());
      const double serial = call_entry(entry, input.data(), target.data(),
                                       serial_grad.data(), shape, options);
      for (int levels : {1, 2}) {
        for (int inner_threads : {0, 2}) {
          CAPTURE(levels);
          CAPTURE(inner_threads);
          omp_set_max_active_levels(levels);
          options.num_threads = inner_threads;
          std::vector<std::vector<T>> grads(
              kCallers, std::vector<T>(input.size()));
          std::vector<double> losses(kCallers, 0.0);
          std::vector<int> ran(kCallers, 0);
#pragma omp parallel num_threads(kCallers)
          {
            const int caller = omp_get_thread_num();
            losses[caller] =
                call_entry(entry, input.data(), target.data(),
                           grads[caller].data(), shape, options);
            ran[caller] = 1;
          }
          omp_set_max_active_levels(saved_levels);
          CHECK(ran[0] == 1);
          for (int caller = 0; caller < kCallers; ++caller) {
            if (ran[caller] == 0) continue;
            CAPTURE(caller);
            CHECK(testing::same_bits(losses[caller], serial));
            CHECK(testing::same_bits(grads[caller], serial_grad));
          }
        }
      }
    }
  }
#endif

  TEST_CASE_TEMPLATE("concurrent std threads", T, float, double) {
    // Each std::thread has its own input, target and gradient buffers and
    // starts its own OpenMP team.
    const Shape shape{2, 7, 45, 50};
    constexpr int kCallers = 4;
    std::uint64_t seed = 100;
    for (const EntryPoint& entry : kGradEntryPoints) {
      ++seed;
      const std::string name = function_name(entry);
      CAPTURE(name);
      CAPTURE(seed);
      const std::vector<T> input =
          make_input<T>(entry.from_logits, shape, seed);
      const std::vector<T> target =
          make_target<T>(TargetKind::kZeroPixels, shape, seed + 1);
      std::vector<T> serial_grad(input.size());
      LossOptions serial_options;
      serial_options.num_threads = 1;
      const double serial =
          call_entry(entry, input.data(), target.data(), serial_grad.data(),
                     shape, serial_options);

      std::vector<std::vector<T>> inputs(kCallers, input);
      std::vector<std::vector<T>> targets(kCallers, target);
      std::vector<std::vector<T>> grads(kCallers,
                                        std::vector<T>(input.size()));
      std::vector<double> losses(kCallers, 0.0);
      std::vector<std::thread> callers;
      for (int caller = 0; caller < kCallers; ++caller) {
        callers.emplace_back([&, caller] {
          LossOptions options;
          options.num_threads = 1 + caller % 3;
          losses[caller] = call_entry(entry, inputs[caller].data(),
                                      targets[caller].data(),
                                      grads[caller].data(), shape, options);
        });
      }
      for (std::thread& caller : callers) caller.join();
      for (int caller = 0; caller < kCallers; ++caller) {
        CAPTURE(caller);
        CHECK(testing::same_bits(losses[caller], serial));
        CHECK(testing::same_bits(grads[caller], serial_grad));
      }
    }
  }

  // -------------------------------------------------------------------------
  // A.6 Rejected input
  // -------------------------------------------------------------------------

  TEST_CASE_TEMPLATE("bad rank rejected", T, float, double) {
    const std::vector<T> input(256, T(0.5));
    const std::vector<T> target(256, T(0.5));
    std::vector<T> grad(256);
    const Shape shapes[] = {{}, {4}, {2, 3, 4}, {1, 2, 3, 4, 5}};
    for (const Shape& shape : shapes) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        const std::string name = function_name(entry);
        CAPTURE(name);
        const std::string expected =
            name + ": bad rank: expected " + input_name(entry) +
            " of rank 2 (B,C) or 4 (B,C,H,W), got rank " +
            std::to_string(shape.size()) + " " + qrloss::format_shape(shape);
        testing::check_invalid_argument(
            [&] {
              call_entry(entry, input.data(), target.data(), grad.data(),
                         shape);
            },
            expected);
      }
    }
  }

  TEST_CASE_TEMPLATE("empty extent rejected", T, float, double) {
    const std::vector<T> input(256, T(0.5));
    const std::vector<T> target(256, T(0.5));
    std::vector<T> grad(256);
    const Shape shapes[] = {{0, 2, 3, 4}, {2, 0, 3, 4},  {2, 3, 0, 4},
                            {2, 3, 4, 0}, {0, 3},        {3, 0},
                            {2, -1, 3, 4}, {2, 3, 4, -5}, {-3, 4}};
    for (const Shape& shape : shapes) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        const std::string name = function_name(entry);
        CAPTURE(name);
        // A zero extent makes an empty tensor; a negative one is no shape.
        const bool empty =
            std::find(shape.begin(), shape.end(), 0) != shape.end();
        testing::check_invalid_argument(
            [&] {
              call_entry(entry, input.data(), target.data(), grad.data(),
                         shape);
            },
            name + (empty ? ": empty tensor: " : ": bad shape: ") +
                input_name(entry) + " has shape " +
                qrloss::format_shape(shape) +
                ", expected every extent >= 1");
      }
    }
  }

  TEST_CASE_TEMPLATE("size overflow rejected", T, float, double) {
    // The buffers are tiny, so the shape must be rejected before anything is
    // read or allocated. {2^40, 2^30, 1, 1} overflows the element count, and
    // {2^31, 2^30, 1, 1} fits in int64 elements but not in bytes.
    const std::vector<T> input(16, T(0.5));
    const std::vector<T> target(16, T(0.5));
    std::vector<T> grad(16);
    constexpr std::int64_t kOne = 1;
    const Shape shapes[] = {{kOne << 40, kOne << 30, 1, 1},
                            {kOne << 31, kOne << 30, 1, 1},
                            {kOne << 62, 4},
                            {3, kOne << 62}};
    for (const Shape& shape : shapes) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        const std::string name = function_name(entry);
        const std::string shape_text = qrloss::format_shape(shape);
        CAPTURE(name);
        CAPTURE(shape_text);
        testing::check_invalid_argument(
            [&] {
              call_entry(entry, input.data(), target.data(), grad.data(),
                         shape);
            },
            name + ": size overflow: " + input_name(entry) + " shape " +
                shape_text + " has more bytes than fit in int64");
      }
    }
  }

  TEST_CASE_TEMPLATE("bad eps rejected", T, float, double) {
    const Shape shape{2, 5, 3, 4};
    const std::vector<T> probs = testing::random_simplex<T>(shape, 110);
    const std::vector<T> target = testing::random_simplex<T>(shape, 111);
    std::vector<T> grad(probs.size());
    const double bad_eps[] = {-1e-7, std::numeric_limits<double>::quiet_NaN(),
                              std::numeric_limits<double>::infinity(),
                              -std::numeric_limits<double>::infinity()};
    // Only the sign of -1e-7 is checked, so that either 17-digit or
    // shortest round-trip formatting of the value passes.
    const char* printed[] = {"-", "nan", "inf", "-inf"};
    for (int k = 0; k < 4; ++k) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        const std::string name = function_name(entry);
        CAPTURE(name);
        CAPTURE(bad_eps[k]);
        LossOptions options;
        options.eps = bad_eps[k];
        testing::check_invalid_argument(
            [&] {
              call_entry(entry, probs.data(), target.data(), grad.data(),
                         shape, options);
            },
            name + ": bad eps: expected 0 or a value in [1e-20, 1e20], got " +
                printed[k]);
      }
    }
  }

  TEST_CASE_TEMPLATE("bad probs values rejected", T, float, double) {
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const Shape shape{2, 5, 3, 4};
    const std::int64_t at = flat_index(shape, 1, 3, 2, 1);
    const std::string position = "(b=1,c=3,h=2,w=1)";
    const std::vector<T> target = testing::random_simplex<T>(shape, 120);
    std::vector<T> grad(target.size());
    const T bad_values[] = {kNaN, kInf, -kInf, T(-0.25)};
    const char* expected[] = {
        "non-finite input: probs is nan at ",
        "non-finite input: probs is inf at ",
        "non-finite input: probs is -inf at ",
        "negative input: probs is -0.25 at ",
    };
    for (int k = 0; k < 4; ++k) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        if (entry.from_logits) continue;
        const std::string name = function_name(entry);
        CAPTURE(name);
        CAPTURE(k);
        std::vector<T> probs = testing::random_simplex<T>(shape, 121);
        probs[at] = bad_values[k];
        testing::check_invalid_argument(
            [&] {
              call_entry(entry, probs.data(), target.data(), grad.data(),
                         shape);
            },
            name + ": " + expected[k] + position);
      }
    }

    // Rank 2 positions name (b, c) only.
    const Shape shape2{6, 4};
    std::vector<T> probs2 = testing::random_simplex<T>(shape2, 122);
    const std::vector<T> target2 = testing::random_simplex<T>(shape2, 123);
    probs2[4 * 4 + 2] = T(-0.25);
    testing::check_invalid_argument(
        [&] { qrloss::rq_loss(probs2.data(), target2.data(), shape2); },
        "rq_loss: negative input: probs is -0.25 at (b=4,c=2), expected "
        ">= 0");
  }

  TEST_CASE_TEMPLATE("bad target values rejected", T, float, double) {
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const Shape shape{2, 5, 3, 4};
    const std::int64_t at = flat_index(shape, 0, 1, 2, 3);
    const std::string position = "(b=0,c=1,h=2,w=3)";
    const T bad_values[] = {kNaN, kInf, -kInf, T(-0.25)};
    const char* expected[] = {
        "non-finite input: target is nan at ",
        "non-finite input: target is inf at ",
        "non-finite input: target is -inf at ",
        "negative input: target is -0.25 at ",
    };
    for (int k = 0; k < 4; ++k) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        const std::string name = function_name(entry);
        CAPTURE(name);
        CAPTURE(k);
        const std::vector<T> input =
            make_input<T>(entry.from_logits, shape, 130);
        std::vector<T> target = testing::random_simplex<T>(shape, 131);
        std::vector<T> grad(input.size());
        target[at] = bad_values[k];
        testing::check_invalid_argument(
            [&] {
              call_entry(entry, input.data(), target.data(), grad.data(),
                         shape);
            },
            name + ": " + expected[k] + position);
      }
    }
  }

  TEST_CASE_TEMPLATE("bad logits values rejected", T, float, double) {
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const Shape shape{2, 5, 3, 4};
    const std::int64_t at = flat_index(shape, 1, 4, 0, 2);
    const std::string position = "(b=1,c=4,h=0,w=2)";
    const std::vector<T> target = testing::random_simplex<T>(shape, 140);
    std::vector<T> grad(target.size());
    const T bad_values[] = {kNaN, kInf, -kInf};
    const char* expected[] = {
        "non-finite input: logits is nan at ",
        "non-finite input: logits is inf at ",
        "non-finite input: logits is -inf at ",
    };
    for (int k = 0; k < 3; ++k) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        if (!entry.from_logits) continue;
        const std::string name = function_name(entry);
        CAPTURE(name);
        CAPTURE(k);
        std::vector<T> logits = testing::random_logits<T>(shape, 141);
        logits[at] = bad_values[k];
        testing::check_invalid_argument(
            [&] {
              call_entry(entry, logits.data(), target.data(), grad.data(),
                         shape);
            },
            name + ": " + expected[k] + position);
      }
    }

    // Negative logits are valid.
    std::vector<T> logits(target.size(), T(-3));
    CHECK(std::isfinite(
        qrloss::qr_loss_from_logits(logits.data(), target.data(), shape)));
  }

  TEST_CASE_TEMPLATE("first bad index reported", T, float, double) {
    // {1,3,64,64}: 4096 pixels in two chunks of 2048. The bad value at
    // (c=0, pixel 3000) lies in chunk 1 but comes first in memory. The one
    // at (c=2, pixel 100) lies in chunk 0.
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    const Shape shape{1, 3, 64, 64};
    const std::int64_t P = 64 * 64;
    const std::int64_t later = 2 * P + 100;
    const std::int64_t first = 3000;
    const std::string position = "(b=0,c=0,h=46,w=56)";
    for (int threads : {1, 4}) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        const std::string name = function_name(entry);
        CAPTURE(name);
        CAPTURE(threads);
        LossOptions options;
        options.num_threads = threads;
        std::vector<T> grad(static_cast<std::size_t>(3 * P));

        std::vector<T> input = make_input<T>(entry.from_logits, shape, 150);
        const std::vector<T> target = testing::random_simplex<T>(shape, 151);
        input[later] = kNaN;
        input[first] = kNaN;
        testing::check_invalid_argument(
            [&] {
              call_entry(entry, input.data(), target.data(), grad.data(),
                         shape, options);
            },
            name + ": non-finite input: " + input_name(entry) +
                " is nan at " + position);

        const std::vector<T> good_input =
            make_input<T>(entry.from_logits, shape, 150);
        std::vector<T> bad_target = target;
        bad_target[later] = T(-1);
        bad_target[first] = T(-2);
        testing::check_invalid_argument(
            [&] {
              call_entry(entry, good_input.data(), bad_target.data(),
                         grad.data(), shape, options);
            },
            name + ": negative input: target is -2 at " + position);
      }
    }
  }

  TEST_CASE_TEMPLATE("null buffers rejected", T, float, double) {
    const Shape shape{2, 5, 3, 4};
    const std::vector<T> probs = testing::random_simplex<T>(shape, 160);
    const std::vector<T> target = testing::random_simplex<T>(shape, 161);
    std::vector<T> grad(probs.size());
    for (const EntryPoint& entry : kAllEntryPoints) {
      const std::string name = function_name(entry);
      CAPTURE(name);
      testing::check_invalid_argument(
          [&] {
            call_entry<T>(entry, nullptr, target.data(), grad.data(), shape);
          },
          name + ": null data: " + input_name(entry) + " is a null pointer");
      testing::check_invalid_argument(
          [&] {
            call_entry<T>(entry, probs.data(), nullptr, grad.data(), shape);
          },
          name + ": null data: target is a null pointer");
      if (entry.with_grad) {
        testing::check_invalid_argument(
            [&] {
              call_entry<T>(entry, probs.data(), target.data(), nullptr,
                            shape);
            },
            name + ": null data: " + grad_name(entry) +
                " is a null pointer");
      }
    }
  }

  TEST_CASE_TEMPLATE("overlapping buffers rejected", T, float, double) {
    const Shape shape{2, 5, 3, 4};
    const std::size_t n = 120;
    for (const EntryPoint& entry : kGradEntryPoints) {
      const std::string name = function_name(entry);
      CAPTURE(name);
      const std::string overlaps_input = name + ": overlapping buffers: " +
                                         grad_name(entry) + " overlaps " +
                                         input_name(entry);
      const std::string overlaps_target = name + ": overlapping buffers: " +
                                          grad_name(entry) +
                                          " overlaps target";
      // Input and scratch share one allocation so that partial overlaps
      // stay inside it.
      std::vector<T> storage(3 * n);
      const std::vector<T> input =
          make_input<T>(entry.from_logits, shape, 170);
      std::copy(input.begin(), input.end(), storage.begin() + n);
      T* input_data = storage.data() + n;
      std::vector<T> target = testing::random_simplex<T>(shape, 171);

      testing::check_invalid_argument(
          [&] {
            call_entry(entry, input_data, target.data(), input_data, shape);
          },
          overlaps_input + ", as each spans 120 elements for shape "
                           "[2,5,3,4]; pass a separate output buffer, or fix "
                           "the shape if the buffers hold fewer elements");
      testing::check_invalid_argument(
          [&] {
            call_entry(entry, input_data, target.data(), input_data + 3,
                       shape);
          },
          overlaps_input);
      testing::check_invalid_argument(
          [&] {
            call_entry(entry, input_data, target.data(), input_data - 7,
                       shape);
          },
          overlaps_input);
      testing::check_invalid_argument(
          [&] {
            call_entry(entry, input_data, target.data(), target.data(),
                       shape);
          },
          overlaps_target);

      // Adjacent buffers do not overlap.
      std::vector<T> grad_storage(2 * n);
      std::copy(target.begin(), target.end(), grad_storage.begin());
      CHECK_NOTHROW(call_entry(entry, input_data, grad_storage.data(),
                               grad_storage.data() + n, shape));
    }
  }

  TEST_CASE_TEMPLATE("negative num_threads rejected", T, float, double) {
    const Shape shape{2, 5, 3, 4};
    const std::vector<T> probs = testing::random_simplex<T>(shape, 180);
    const std::vector<T> target = testing::random_simplex<T>(shape, 181);
    std::vector<T> grad(probs.size());
    LossOptions options;
    options.num_threads = -1;
    for (const EntryPoint& entry : kAllEntryPoints) {
      const std::string name = function_name(entry);
      CAPTURE(name);
      testing::check_invalid_argument(
          [&] {
            call_entry(entry, probs.data(), target.data(), grad.data(),
                       shape, options);
          },
          name + ": bad num_threads: expected >= 0, got -1");
    }
  }

  TEST_CASE_TEMPLATE("inputs unchanged by calls", T, float, double) {
    const Shape shape{2, 5, 13, 17};
    std::uint64_t seed = 190;
    for (const EntryPoint& entry : kAllEntryPoints) {
      ++seed;
      const std::string name = function_name(entry);
      CAPTURE(name);
      CAPTURE(seed);
      std::vector<T> input = make_input<T>(entry.from_logits, shape, seed);
      std::vector<T> target =
          make_target<T>(TargetKind::kZeroPixels, shape, seed + 1);
      const std::vector<T> input_copy = input;
      const std::vector<T> target_copy = target;
      std::vector<T> grad(input.size());

      call_entry(entry, input.data(), target.data(), grad.data(), shape);
      CHECK(testing::same_bits(input, input_copy));
      CHECK(testing::same_bits(target, target_copy));

      // A failing call: the last target entry is NaN, found in the last
      // pass that reads the target.
      target.back() = std::numeric_limits<T>::quiet_NaN();
      const std::vector<T> bad_target_copy = target;
      testing::check_invalid_argument(
          [&] {
            call_entry(entry, input.data(), target.data(), grad.data(),
                       shape);
          },
          name + ": non-finite input: target is nan at (b=1,c=4,h=12,w=16)");
      CHECK(testing::same_bits(input, input_copy));
      CHECK(testing::same_bits(target, bad_target_copy));
    }
  }

  TEST_CASE("many classes few pixels") {
    // C = 4096 over 6 pixels, both losses and inputs, checked on 48 entries
    // drawn with a fixed seed.
    const Shape shape{2, 4096, 1, 3};
    std::uint64_t seed = 200;
    for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
      for (bool from_logits : {false, true}) {
        ++seed;
        const std::string name = function_name({kind, from_logits, true});
        CAPTURE(name);
        CAPTURE(seed);
        const std::vector<double> input =
            from_logits ? testing::random_logits<double>(shape, seed, 1.5)
                        : testing::random_uniform<double>(shape, seed, 0.05,
                                                          0.95);
        const std::vector<double> target =
            testing::random_simplex<double>(shape, seed + 1);
        qrloss::GradientCheckOptions check;
        check.max_elements = 48;
        check.seed = seed;
        // L sums 24576 terms of order 1 while one entry moves it by only
        // ~1e-5 * h, so round-off of L limits the default step to ~1e-4
        // relative accuracy. A step of 1e-4 cuts that round-off to ~1e-10
        // absolute. Its truncation error, ~h^2 / (3 q^2) <= 2e-6 for
        // q >= 0.05, fits rtol = 1e-4.
        check.step_scale = 1e-4;
        // QR's two terms cancel, so L's own rounding reaches about 160
        // units of |L| here, beyond the default allowance of 64.
        check.roundoff_units = 1024.0;
        const qrloss::GradientCheckReport report = check_entry_gradient(
            kind, from_logits, input, target, shape, qrloss::kDefaultEps,
            check, 1e-4);
        CHECK_MESSAGE(report.passed, report.summary());
        CHECK(report.num_checked > 40);
      }
    }
  }

  TEST_CASE_TEMPLATE("unaligned buffers same bits", T, float, double) {
    // Buffers start one element past a 64-byte boundary. Results must not
    // depend on where the caller's buffers live.
    std::uint64_t seed = 210;
    for (const Shape& shape : {Shape{2, 5, 13, 17}, Shape{3, 19, 7, 9}}) {
      for (const EntryPoint& entry : kAllEntryPoints) {
        ++seed;
        const std::string name = function_name(entry);
        const std::string shape_text = qrloss::format_shape(shape);
        CAPTURE(name);
        CAPTURE(shape_text);
        CAPTURE(seed);
        const std::vector<T> input =
            make_input<T>(entry.from_logits, shape, seed);
        const std::vector<T> target =
            make_target<T>(TargetKind::kZeroPixels, shape, seed + 1);
        const std::size_t n = input.size();

        // Each storage gets room for the values plus 64 bytes of slack.
        const std::size_t slack = 64 / sizeof(T) + 1;
        const auto place = [&](std::vector<T>& storage, std::size_t offset) {
          storage.assign(n + slack + offset, T(0));
          const auto address = reinterpret_cast<std::uintptr_t>(storage.data());
          const std::size_t skip = ((64 - address % 64) % 64) / sizeof(T);
          return storage.data() + skip + offset;
        };
        std::vector<T> input_storage[2];
        std::vector<T> target_storage[2];
        std::vector<T> grad_storage[2];
        double losses[2];
        std::vector<T> grads[2];
        for (std::size_t offset : {0, 1}) {
          T* input_data = place(input_storage[offset], offset);
          T* target_data = place(target_storage[offset], offset);
          T* grad_data = place(grad_storage[offset], offset);
          std::copy(input.begin(), input.end(), input_data);
          std::copy(target.begin(), target.end(), target_data);
          losses[offset] =
              call_entry<T>(entry, input_data, target_data, grad_data, shape);
          grads[offset].assign(grad_data, grad_data + n);
        }
        CHECK(testing::same_bits(losses[1], losses[0]));
        if (entry.with_grad) CHECK(testing::same_bits(grads[1], grads[0]));
      }
    }
  }

  // -------------------------------------------------------------------------
  // A.7 eps = 0
  // -------------------------------------------------------------------------

  TEST_CASE("eps outside the supported range") {
    // Float cannot hold eps below ~1e-45 or above ~3e38, and RQ's weight
    // p / (s_c t) overflows for tiny eps, so such eps are rejected.
    const Shape shape{1, 2, 1, 2};
    const std::vector<double> probs = {0.5, 0.5, 0.5, 0.5};
    // The message prints eps with the fewest digits that read back.
    const std::pair<double, const char*> bad[] = {
        {1e-21, "1e-21"}, {1e-300, "1e-300"}, {1e21, "1e21"}, {1e300, "1e300"}};
    for (const auto& [eps, printed] : bad) {
      CAPTURE(eps);
      LossOptions options;
      options.eps = eps;
      testing::check_invalid_argument(
          [&] { qrloss::qr_loss(probs.data(), probs.data(), shape, options); },
          std::string("qr_loss: bad eps: expected 0 or a value in [1e-20, "
                      "1e20], got ") +
              printed);
    }
    for (double eps : {0.0, 1e-20, 1e20}) {
      CAPTURE(eps);
      LossOptions options;
      options.eps = eps;
      CHECK(std::isfinite(
          qrloss::rq_loss(probs.data(), probs.data(), shape, options)));
    }
  }

  TEST_CASE("rq float at clamped pixel matches double") {
    // Found by fuzzing. Pixel 1 has q = 0 in class 0 and p = 0.5 elsewhere
    // with q = 0, so its sum is clamped at 1e-12 and the weight p/(s t) is
    // about 1e12: any rounding in log((r + eps)/(q + eps)) at r = q = 0 is
    // multiplied by it. The second case has r and q far below eps, where
    // the log of the rounded ratio loses the difference. In the third, q
    // of class 1 is the smallest subnormal float and its class sum is
    // clamped at eps, so q p is subnormal in float, while z p with
    // z = q / s is not.
    struct Case {
      Shape shape;
      std::vector<double> probs;
      std::vector<double> target;
      double eps;
    };
    const double tiny = std::numeric_limits<float>::denorm_min();
    const std::vector<Case> cases = {
        {{1, 2, 1, 2}, {0.6, 0.0, 0.0, 0.0}, {0.5, 0.5, 0.5, 0.5}, 9e-4},
        {{1, 2, 1, 2}, {0.6, 5e-30, 0.4, 0.0}, {1.0, 1.0, 0.0, 0.0}, 1e-8},
        {{1, 2}, {0.8168, tiny}, {tiny, 0.8168}, 1e-8},
    };
    for (const Case& test : cases) {
      const std::string shape_text = qrloss::format_shape(test.shape);
      CAPTURE(shape_text);
      CAPTURE(test.eps);
      LossOptions options;
      options.eps = test.eps;
      const std::vector<float> probs32(test.probs.begin(), test.probs.end());
      const std::vector<float> target32(test.target.begin(),
                                        test.target.end());
      const std::vector<double> probs64(probs32.begin(), probs32.end());
      const std::vector<double> target64(target32.begin(), target32.end());
      std::vector<float> grad32(probs32.size());
      std::vector<double> grad64(probs64.size());
      qrloss::rq_loss_grad(probs32.data(), target32.data(), grad32.data(),
                           test.shape, options);
      qrloss::rq_loss_grad(probs64.data(), target64.data(), grad64.data(),
                           test.shape, options);
      for (std::size_t i = 0; i < grad32.size(); ++i) {
        CAPTURE(i);
        CAPTURE(grad32[i]);
        CAPTURE(grad64[i]);
        CHECK(std::abs(double(grad32[i]) - grad64[i]) <=
              1e-5 * testing::max_abs(grad64) + 1e-6);
      }
    }
  }

  TEST_CASE_TEMPLATE("rq eps zero absent class logits", T, float, double) {
    // Class 1 sits 1e4 below the others, so softmax underflows to exactly 0
    // for it at every pixel and its class sum is 0, in double too (float
    // redoes the call in double, which then throws).
    const Shape shape{2, 3, 2, 3};
    std::vector<T> logits = testing::random_logits<T>(shape, 221);
    for (std::int64_t b = 0; b < 2; ++b) {
      for (std::int64_t n = 0; n < 6; ++n) logits[(b * 3 + 1) * 6 + n] = -1e4;
    }
    const std::vector<T> target = testing::random_simplex<T>(shape, 222);
    std::vector<T> grad(logits.size());
    LossOptions options;
    options.eps = 0.0;
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad_from_logits(logits.data(), target.data(),
                                           grad.data(), shape, options);
        },
        "rq_loss_grad_from_logits: undefined loss: class 1 of "
        "softmax(logits) has zero total probability");
  }

  TEST_CASE("rq eps zero float softmax underflow redone") {
    // Class 1 sits 200 below the others: float's softmax rounds it to 0,
    // so its class total is 0 and the loss would be undefined, while in
    // exact arithmetic (and in double) every q is positive. The float call
    // is redone in double and equals the double call on the same logits.
    const Shape shape{2, 3, 2, 2};
    std::vector<float> logits(24, 0.0f);
    for (int b = 0; b < 2; ++b) {
      for (int n = 0; n < 4; ++n) logits[b * 12 + 4 + n] = -200.0f;
    }
    const std::vector<float> target = testing::random_simplex<float>(shape,
                                                                      224);
    LossOptions options;
    options.eps = 0.0;
    check_float_rq_as_double(logits, target, shape, options, true);
  }

  TEST_CASE_TEMPLATE("qr eps zero infinite loss logits", T, float, double) {
    // A zero in the target makes the QR loss +inf for every logits value,
    // so the loss is returned as inf and the gradient request is rejected.
    const Shape shape{1, 3, 2, 2};
    const std::vector<T> logits = testing::random_logits<T>(shape, 223);
    const std::vector<T> target = testing::one_hot<T>(shape);
    LossOptions options;
    options.eps = 0.0;
    const double loss = qrloss::qr_loss_from_logits(
        logits.data(), target.data(), shape, options);
    CHECK(std::isinf(loss));
    CHECK(loss > 0);
    std::vector<T> grad(logits.size());
    testing::check_invalid_argument(
        [&] {
          qrloss::qr_loss_grad_from_logits(logits.data(), target.data(),
                                           grad.data(), shape, options);
        },
        "qr_loss_grad_from_logits: infinite loss: target is 0 where probs > 0 "
        "and eps = 0");
  }

  TEST_CASE_TEMPLATE("qr loss of zero probs is +0", T, float, double) {
    // Every term is 0. The loss must not come out as -0, which the CLI
    // would print as "-0".
    const Shape shape{2, 3, 2, 2};
    const std::vector<T> probs(static_cast<std::size_t>(testing::count(shape)),
                               T(0));
    const std::vector<T> target = testing::random_simplex<T>(shape, 226);
    const double loss = qrloss::qr_loss(probs.data(), target.data(), shape);
    CHECK(loss == 0.0);
    CHECK_FALSE(std::signbit(loss));
    std::vector<T> grad(probs.size());
    const double loss_with_grad =
        qrloss::qr_loss_grad(probs.data(), target.data(), grad.data(), shape);
    CHECK_FALSE(std::signbit(loss_with_grad));
  }

  TEST_CASE("qr eps zero underflowed class logits") {
    // Class 2 sits 200 below the others. In float its softmax underflows to
    // exactly 0 at every pixel, so its mean is 0 and h_2 = log(0) = -inf.
    // In double it is about 1e-87 and everything stays finite. The float
    // gradient must be finite and match the double one, whose class-2
    // entries are about 1e-87 * 200.
    const Shape shape{2, 3, 2, 3};
    std::vector<double> logits = testing::random_logits<double>(shape, 224);
    for (std::int64_t b = 0; b < 2; ++b) {
      for (std::int64_t n = 0; n < 6; ++n) logits[(b * 3 + 2) * 6 + n] = -200;
    }
    const std::vector<double> target =
        testing::random_simplex<double>(shape, 225);
    LossOptions options;
    options.eps = 0.0;
    std::vector<double> grad64(logits.size());
    const double loss64 = qrloss::qr_loss_grad_from_logits(
        logits.data(), target.data(), grad64.data(), shape, options);
    const std::vector<float> logits32(logits.begin(), logits.end());
    const std::vector<float> target32(target.begin(), target.end());
    std::vector<float> grad32(logits.size());
    const double loss32 = qrloss::qr_loss_grad_from_logits(
        logits32.data(), target32.data(), grad32.data(), shape, options);
    CHECK(loss32 == doctest::Approx(loss64).epsilon(1e-5));
    REQUIRE(testing::all_finite(grad32));
    double largest = 0.0;
    for (const double g : grad64) largest = std::max(largest, std::abs(g));
    REQUIRE(largest > 0.0);
    for (std::size_t i = 0; i < grad32.size(); ++i) {
      CAPTURE(i);
      CHECK(std::abs(grad32[i] - grad64[i]) <= 1e-5 * largest);
    }

    // 1e4 below underflows in double too: the gradient stays finite, and
    // the underflowed class gets exactly 0.
    for (std::int64_t b = 0; b < 2; ++b) {
      for (std::int64_t n = 0; n < 6; ++n) logits[(b * 3 + 2) * 6 + n] = -1e4;
    }
    qrloss::qr_loss_grad_from_logits(logits.data(), target.data(),
                                     grad64.data(), shape, options);
    REQUIRE(testing::all_finite(grad64));
    for (std::int64_t b = 0; b < 2; ++b) {
      for (std::int64_t n = 0; n < 6; ++n) {
        CHECK(grad64[static_cast<std::size_t>((b * 3 + 2) * 6 + n)] == 0.0);
      }
    }
    // Central differences of the loss agree there too.
    const auto loss_at = [&](const Eigen::VectorXd& x) {
      return qrloss::qr_loss_from_logits(x.data(), target.data(), shape,
                                         options);
    };
    const auto size = static_cast<Eigen::Index>(logits.size());
    const Eigen::VectorXd point =
        Eigen::Map<const Eigen::VectorXd>(logits.data(), size);
    const Eigen::VectorXd analytic =
        Eigen::Map<const Eigen::VectorXd>(grad64.data(), size);
    qrloss::GradientCheckOptions check;
    check.shape = shape;
    const qrloss::GradientCheckReport report =
        qrloss::check_gradient(loss_at, point, analytic, check);
    INFO(report.summary());
    CHECK(report.passed);
  }

  TEST_CASE_TEMPLATE("rq eps zero absent class", T, float, double) {
    // Class 2 has zero probability everywhere, so z = q / s_2 is 0/0.
    const Shape shape{2, 5, 3, 4};
    std::vector<T> probs = testing::random_simplex<T>(shape, 220);
    for (std::int64_t b = 0; b < 2; ++b) {
      for (std::int64_t n = 0; n < 12; ++n) probs[(b * 5 + 2) * 12 + n] = 0;
    }
    const std::vector<T> target = testing::one_hot<T>(shape);
    check_rq_eps_zero_rejects(
        probs, target, shape,
        "undefined loss: class 2 has zero total probability");
  }

  TEST_CASE("rq eps zero tiny class total") {
    // Class 1's total is positive but so small that 1 / s_1 overflows the
    // type: 4e-310 in double, 1e-40 (a subnormal) in float. Double must
    // throw rather than return NaN or a loss of 0. Float redoes the call
    // in double: the loss is that of double, and the gradient, about 1e40
    // at class 1, overflows float.
    const Shape shape{3, 3};
    const std::vector<double> probs = {0.5, 4e-310, 0.5, 0.3, 0.0,
                                       0.7, 0.2,    0.0, 0.8};
    const std::vector<double> target = {0.2, 0.5, 0.3, 0.1, 0.6,
                                        0.3, 0.3, 0.3, 0.4};
    check_rq_eps_zero_rejects(probs, target, shape,
                              "non-finite result: class 1 has total "
                              "probability ");

    std::vector<float> probs32(probs.begin(), probs.end());
    probs32[1] = 1e-40f;
    const std::vector<float> target32(target.begin(), target.end());
    const std::vector<double> probs64(probs32.begin(), probs32.end());
    const std::vector<double> target64(target32.begin(), target32.end());
    LossOptions options;
    options.eps = 0.0;
    CHECK(testing::same_bits(
        qrloss::rq_loss(probs32.data(), target32.data(), shape, options),
        qrloss::rq_loss(probs64.data(), target64.data(), shape, options)));
    std::vector<float> grad(9);
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad(probs32.data(), target32.data(), grad.data(),
                               shape, options);
        },
        "rq_loss_grad: non-finite result: the gradient overflows float32 "
        "although the loss is finite; with eps = 0 it scales with p / s_c, "
        "so a large target or a small class total overflows it (class 1 has "
        "the smallest total, ");
  }

  TEST_CASE("rq eps zero gradient overflow") {
    // With a class total of 1e-308, 1 / s_1 = 1e308 still fits in double
    // and the loss is finite, but dL/dq of class 1 at pixels where q = 0
    // scales with p / (s_1 t) and overflows.
    const Shape shape{3, 3};
    const std::vector<double> probs = {0.5, 1e-308, 0.5, 0.3, 0.0,
                                       0.7, 0.2,    0.0, 0.8};
    const std::vector<double> target = {0.2, 0.5, 0.3, 0.1, 0.6,
                                        0.3, 0.3, 0.3, 0.4};
    LossOptions options;
    options.eps = 0.0;

    // The loss straight from its definition, dividing q by s_c.
    double expected = 0.0;
    for (int b = 0; b < 3; ++b) {
      double t = 0.0;
      for (int c = 0; c < 3; ++c) {
        const double s = probs[c] + probs[3 + c] + probs[6 + c];
        t += probs[b * 3 + c] / s * target[b * 3 + c];
      }
      for (int c = 0; c < 3; ++c) {
        const double q = probs[b * 3 + c];
        const double s = probs[c] + probs[3 + c] + probs[6 + c];
        const double r = q / s * target[b * 3 + c] / t;
        if (r > 0.0) expected += r * (std::log(r) - std::log(q)) / 3.0;
      }
    }
    const double loss =
        qrloss::rq_loss(probs.data(), target.data(), shape, options);
    CHECK(loss == doctest::Approx(expected).epsilon(1e-12));

    std::vector<double> grad(probs.size());
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad(probs.data(), target.data(), grad.data(),
                               shape, options);
        },
        "rq_loss_grad: non-finite result: the gradient overflows float64 "
        "although the loss is finite; with eps = 0 it scales with p / s_c, "
        "so a large target or a small class total overflows it (class 1 has "
        "the smallest total, ");
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad(probs.data(), target.data(), grad.data(),
                               shape, options);
        },
        "); rescale the target or use eps > 0");
  }

  TEST_CASE("rq gradient overflow with eps") {
    // eps = 1e-20 clamps s_1 = 0 to 1e-20. A target of 1e19 where q = 0
    // then makes dL/dq, which scales with p / (N s_1 t), too large for
    // float.
    const Shape shape{3, 3};
    const std::vector<float> probs = {0.5f, 0.0f, 0.5f, 0.3f, 0.0f,
                                      0.7f, 0.2f, 0.0f, 0.8f};
    const std::vector<float> target = {0.2f, 1e19f, 0.3f, 0.1f, 0.6f,
                                       0.3f, 0.3f,  0.3f, 0.4f};
    LossOptions options;
    options.eps = 1e-20;
    std::vector<float> grad(probs.size());
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad(probs.data(), target.data(), grad.data(),
                               shape, options);
        },
        "rq_loss_grad: non-finite result: the gradient overflows float32 "
        "although the loss is finite; it scales with p / s_c, so rescale the "
        "target (or use a larger eps)");
    // In double the same gradient is finite.
    const std::vector<double> probs64(probs.begin(), probs.end());
    const std::vector<double> target64(target.begin(), target.end());
    std::vector<double> grad64(probs.size());
    qrloss::rq_loss_grad(probs64.data(), target64.data(), grad64.data(), shape,
                         options);
    CHECK_FALSE(testing::any_nan(grad64));
    CHECK(std::isfinite(testing::max_abs(grad64)));
  }

  TEST_CASE("qr huge float probs match double") {
    // Class 0 has probs up to 3e38, near float's largest value. Their
    // products with log(p + eps) overflowed float before the double sum,
    // so the loss came out inf and no error was raised.
    const Shape shape{1, 2, 4, 4};
    std::vector<float> probs(32);
    std::vector<float> target(32);
    for (int i = 0; i < 16; ++i) {
      probs[i] = 1e38f * static_cast<float>(1 + i % 3);
      probs[16 + i] = 1.0f;
      target[i] = 0.01f;
      target[16 + i] = 0.99f;
    }
    std::vector<float> grad(32);
    const double loss =
        qrloss::qr_loss_grad(probs.data(), target.data(), grad.data(), shape);
    const std::vector<double> probs64(probs.begin(), probs.end());
    const std::vector<double> target64(target.begin(), target.end());
    std::vector<double> grad64(32);
    const double loss64 = qrloss::qr_loss_grad(
        probs64.data(), target64.data(), grad64.data(), shape);
    CHECK(std::isfinite(loss));
    CHECK(loss == doctest::Approx(loss64).epsilon(1e-6));
    CHECK(loss == doctest::Approx(qrloss::qr_loss(probs.data(), target.data(),
                                                  shape))
                      .epsilon(1e-12));
    CHECK(testing::max_error_over_max(grad, grad64) <= 1e-6);
  }

  TEST_CASE("huge float64 class totals rejected") {
    // A class total of 2e308 overflows double: QR gave an infinite loss
    // with a NaN gradient and RQ a loss of 0.
    const Shape shape{2, 2};
    const std::vector<double> overflow = {1e308, 1.0, 1e308, 1.0};
    const std::vector<double> target = {0.5, 0.5, 0.5, 0.5};
    std::vector<double> grad(4);
    const std::string message =
        "non-finite result: the total of class 0 of probs over the batch "
        "overflows float64; scale probs down";
    testing::check_invalid_argument(
        [&] {
          qrloss::qr_loss_grad(overflow.data(), target.data(), grad.data(),
                               shape);
        },
        "qr_loss_grad: " + message);
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad(overflow.data(), target.data(), grad.data(),
                               shape);
        },
        "rq_loss_grad: " + message);

    // QR's log terms stay finite up to a batch total of 1e300.
    const std::vector<double> large = {1e300, 1.0, 1e300, 1.0};
    testing::check_invalid_argument(
        [&] { qrloss::qr_loss(large.data(), target.data(), shape); },
        "qr_loss: probs too large: they sum to 2e300 over the batch, above "
        "the largest total accepted, 1e300, below which no term of the loss "
        "can overflow float64; scale probs down");
    const std::vector<double> within = {4e299, 1.0, 4e299, 1.0};
    const double loss =
        qrloss::qr_loss_grad(within.data(), target.data(), grad.data(), shape);
    CHECK(std::isfinite(loss));
    CHECK(std::isfinite(testing::max_abs(grad)));
  }

  TEST_CASE("rq huge class total") {
    // Above about 4.5e307 in double 1 / s_c is subnormal, so z = q / s_c
    // would lose digits, and double throws. In float that bound is 8.5e37:
    // class totals of 6.5e40 gave a loss 9e-6 off (relative) and gradient
    // entries 0.04 % off, without an error. Float now redoes such a call
    // in double.
    const Shape shape{2, 2};
    const std::vector<double> probs = {1e308, 1.0, 0.5, 1.0};
    const std::vector<double> target = {0.3, 0.7, 0.6, 0.4};
    std::vector<double> grad(4);
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad(probs.data(), target.data(), grad.data(),
                               shape);
        },
        "rq_loss_grad: probs too large: class 0 has total probability ");
    testing::check_invalid_argument(
        [&] { qrloss::rq_loss(probs.data(), target.data(), shape); },
        "lies below the normal range of float64 and z = q / s_c would lose "
        "digits; scale probs down");

    const std::vector<float> target32(target.begin(), target.end());
    for (float big : {1e38f, 3e38f}) {
      CAPTURE(big);
      check_float_rq_as_double({big, 1.0f, 0.5f, 1.0f}, target32, shape, {});
    }

    // Just inside the normal range float computes in float and matches
    // double to float precision.
    const std::vector<float> fits = {4e37f, 1.0f, 0.5f, 1.0f};
    const std::vector<double> fits64(fits.begin(), fits.end());
    const std::vector<double> target64(target32.begin(), target32.end());
    std::vector<float> grad32(4);
    std::vector<double> grad64(4);
    const double loss = qrloss::rq_loss_grad(fits.data(), target32.data(),
                                             grad32.data(), shape);
    const double loss64 = qrloss::rq_loss_grad(fits64.data(), target64.data(),
                                               grad64.data(), shape);
    CHECK(loss == doctest::Approx(loss64).epsilon(1e-6));
    CHECK(testing::max_error_over_max(grad32, grad64) <= 1e-5);
  }

  TEST_CASE("rq quotient bits outside the reciprocal range") {
    // r = u / t comes from 1 / t through FMAs in the AVX2 and AVX-512
    // variants, which is the rounded quotient only for u >= 2^-100,
    // t <= 2^126 and r >= 2^-125 in float. Outside that range RQ divides.
    // The expected values are what the division gives (the baseline
    // variant, and every variant before the FMA quotient). With the FMA
    // quotient everywhere, the other variants gave 0x1.858fd2p-19,
    // 0.30437715351581573, and the values in the comments below.
    const Shape shape{1, 2};
    LossOptions options;
    options.eps = 1e-3;
    const std::vector<float> tiny_probs = {0x1.f9ae2p-130f, 0x1p-140f};
    const std::vector<float> ones = {1.0f, 1.0f};
    std::vector<float> grad(2);
    qrloss::rq_loss_grad(tiny_probs.data(), ones.data(), grad.data(), shape,
                         options);
    CHECK(grad[0] == 0x1.858fd4p-19f);

    const std::vector<float> halves = {0.5f, 0.5f};
    const std::vector<float> huge_target = {0x1.4dd0bap+124f,
                                            0x1.142cacp+127f};
    CHECK(qrloss::rq_loss(halves.data(), huge_target.data(), shape) ==
          0.30437713861465454);

    // r = 0x1.2p-100 / 0x1.8p+48 = 3 * 2^-150, halfway between two float
    // subnormals: the FMA quotient rounded it down (loss
    // -1.2611686178923354e-44, gradient -0x1.ep-146).
    const Shape pairs{2, 2};
    const std::vector<float> probs = {1.0f, 1.0f, 0.0f, 1.0f};
    const std::vector<float> tie_target = {0x1.8p+48f, 0x1.2p-99f, 0.0f,
                                           1.0f};
    std::vector<float> tie_grad(4);
    LossOptions default_eps;
    CHECK(qrloss::rq_loss_grad(probs.data(), tie_target.data(),
                               tie_grad.data(), pairs,
                               default_eps) == -2.5924021590009116e-44);
    CHECK(tie_grad[1] == -0x1.4p-146f);

    // The same in double, with eps = 0 (FMA quotient:
    // -1.8379242025294371e-321).
    LossOptions no_eps;
    no_eps.eps = 0.0;
    const std::vector<double> probs64 = {1.0, 1.0, 0.0, 1.0};
    const std::vector<double> tie_target64 = {0x1.8p+135, 0x1.2p-937, 0.0,
                                              1.0};
    CHECK(qrloss::rq_loss(probs64.data(), tie_target64.data(), pairs,
                          no_eps) == -3.6758484050588743e-321);

    // With eps = 0, RQ forms r in a loop of its own. u is near 2^-124 (FMA
    // quotient: loss -4.4653645878295427e-23, gradient -0x1.24258p-83).
    const std::vector<float> small_target = {0x1.4137dap-124f, 0x1p-120f};
    CHECK(qrloss::rq_loss_grad(halves.data(), small_target.data(),
                               grad.data(), shape,
                               no_eps) == -4.465364627272588e-23);
    CHECK(grad[0] == -0x1.2425p-83f);
  }

  TEST_CASE("rq huge target pixel sum") {
    // At pixel 0, z = q / s_c is near 1 for both classes, so the pixel sum
    // of z p exceeds the type's range. r = u / t then came out 0, and float
    // RQ without a gradient returned 1e-28 instead of 0.028. Double throws;
    // float redoes the call in double.
    const Shape shape{2, 2};
    const std::vector<double> probs = {0.5, 0.5, 1e-30, 1e-30};
    const std::vector<double> target = {1.7e308, 0.85e308, 0.5, 0.5};
    const std::string message =
        ": target too large: at some pixel the sum over classes of q p / s_c "
        "overflows float64, which would make r = 0; rescale the target";
    testing::check_invalid_argument(
        [&] { qrloss::rq_loss(probs.data(), target.data(), shape); },
        "rq_loss" + message);
    std::vector<double> grad(4);
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad(probs.data(), target.data(), grad.data(),
                               shape);
        },
        "rq_loss_grad" + message);

    check_float_rq_as_double({0.5f, 0.5f, 1e-30f, 1e-30f},
                             {3.4e38f, 1.7e38f, 0.5f, 0.5f}, shape, {});
  }

  TEST_CASE_TEMPLATE("qr eps zero zero target", T, float, double) {
    // With eps = 0, q > 0 where p = 0 makes the loss +inf, and dL/dq is +inf
    // at every entry with p = 0. Class 0 has qbar = 0, so its entries with
    // p > 0 get -inf (the limit of log qbar + 1) and its entries with p = 0
    // still get +inf.
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const Shape shape{2, 5, 3, 4};
    std::vector<T> probs = testing::random_simplex<T>(shape, 230);
    for (std::int64_t b = 0; b < 2; ++b) {
      for (std::int64_t n = 0; n < 12; ++n) probs[(b * 5 + 0) * 12 + n] = 0;
    }
    std::vector<T> target = testing::random_simplex<T>(shape, 231);
    for (std::size_t i = 0; i < target.size(); i += 5) target[i] = 0;
    LossOptions options;
    options.eps = 0.0;
    std::vector<T> grad(probs.size());
    const double loss = qrloss::qr_loss_grad(probs.data(), target.data(),
                                             grad.data(), shape, options);
    CHECK(loss == std::numeric_limits<double>::infinity());
    CHECK(qrloss::qr_loss(probs.data(), target.data(), shape, options) ==
          std::numeric_limits<double>::infinity());
    CHECK_FALSE(testing::any_nan(grad));
    for (std::size_t i = 0; i < grad.size(); ++i) {
      CAPTURE(i);
      const bool class_zero = (i / 12) % 5 == 0;
      if (target[i] == T(0)) {
        CHECK(grad[i] == kInf);
      } else if (class_zero) {
        CHECK(grad[i] == -kInf);
      } else {
        CHECK(std::isfinite(grad[i]));
      }
    }
  }

  TEST_CASE("rq eps zero one-hot target") {
    std::uint64_t seed = 240;
    for (const Shape& shape : {Shape{2, 5, 3, 4}, Shape{7, 4}}) {
      for (bool from_logits : {false, true}) {
        ++seed;
        const std::string shape_text = qrloss::format_shape(shape);
        CAPTURE(shape_text);
        CAPTURE(from_logits);
        CAPTURE(seed);
        const std::vector<double> input =
            from_logits ? testing::random_logits<double>(shape, seed, 1.5)
                        : testing::random_uniform<double>(shape, seed, 0.05,
                                                          0.95);
        const std::vector<double> target = testing::one_hot<double>(shape);
        LossOptions options;
        options.eps = 0.0;
        std::vector<double> grad(input.size());
        const double loss =
            call_entry<double>({LossKind::kRQ, from_logits, true},
                               input.data(), target.data(), grad.data(),
                               shape, options);
        CHECK(std::isfinite(loss));
        CHECK_FALSE(testing::any_nan(grad));
        const qrloss::GradientCheckReport report = check_entry_gradient(
            LossKind::kRQ, from_logits, input, target, shape, 0.0);
        CHECK_MESSAGE(report.passed, report.summary());
      }
    }
  }

  // -------------------------------------------------------------------------
  // A.8 Numerical limits
  // -------------------------------------------------------------------------

  TEST_CASE_TEMPLATE("subnormal and one-hot probs", T, float, double) {
    // Subnormal entries, and pixels whose probs are exactly 0 and 1.
    const T subnormal = std::is_same_v<T, float> ? T(1e-40) : T(1e-310);
    REQUIRE(std::fpclassify(subnormal) == FP_SUBNORMAL);
    const Shape shape{2, 5, 3, 4};
    std::uint64_t seed = 250;
    for (TargetKind target_kind : kTargetKinds) {
      for (double eps : {1e-8, 1e-3}) {
        ++seed;
        const std::string target_text = target_kind_name(target_kind);
        CAPTURE(target_text);
        CAPTURE(eps);
        CAPTURE(seed);
        std::vector<T> probs = testing::random_simplex<T>(shape, seed);
        const std::vector<T> one_hot_probs = testing::one_hot<T>(Shape{
            2, 5, 3, 4});
        for (std::size_t i = 0; i < probs.size(); ++i) {
          const std::size_t pixel = i % 12;
          if (pixel < 4) probs[i] = one_hot_probs[i];
          if (pixel >= 4 && pixel < 8 && i % 3 == 0) probs[i] = subnormal;
        }
        // One pixel holds only subnormal values.
        for (std::int64_t c = 0; c < 5; ++c) probs[c * 12 + 11] = subnormal;
        const std::vector<T> target =
            make_target<T>(target_kind, shape, seed + 1);
        LossOptions options;
        options.eps = eps;
        for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
          const std::string loss_text = qrloss::loss_name(kind);
          CAPTURE(loss_text);
          std::vector<T> grad(probs.size());
          const double loss =
              call_entry<T>({kind, false, true}, probs.data(), target.data(),
                            grad.data(), shape, options);
          CHECK(std::isfinite(loss));
          CHECK_FALSE(testing::any_nan(grad));
          CHECK(testing::all_finite(grad));
        }
      }
    }
  }

  TEST_CASE_TEMPLATE("saturated logits", T, float, double) {
    // Logits of +-1e4 saturate the softmax to exact 0 and 1 (or ties).
    const Shape shape{2, 5, 3, 4};
    std::uint64_t seed = 260;
    for (TargetKind target_kind : kTargetKinds) {
      for (double eps : {1e-8, 1e-3}) {
        ++seed;
        const std::string target_text = target_kind_name(target_kind);
        CAPTURE(target_text);
        CAPTURE(eps);
        CAPTURE(seed);
        std::vector<T> logits = testing::random_logits<T>(shape, seed);
        for (T& x : logits) x = x > T(0) ? T(1e4) : T(-1e4);
        const std::vector<T> target =
            make_target<T>(target_kind, shape, seed + 1);
        LossOptions options;
        options.eps = eps;
        for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
          const std::string loss_text = qrloss::loss_name(kind);
          CAPTURE(loss_text);
          std::vector<T> grad(logits.size());
          const double loss =
              call_entry<T>({kind, true, true}, logits.data(), target.data(),
                            grad.data(), shape, options);
          CHECK(std::isfinite(loss));
          CHECK_FALSE(testing::any_nan(grad));
          CHECK(testing::all_finite(grad));
        }
      }
    }
  }

  TEST_CASE_TEMPLATE("check_finite off accepts valid input", T, float,
                     double) {
    // Switching the scan off must not change results on valid input.
    const Shape shape{2, 5, 13, 17};
    std::uint64_t seed = 270;
    for (const EntryPoint& entry : kGradEntryPoints) {
      ++seed;
      const std::string name = function_name(entry);
      CAPTURE(name);
      CAPTURE(seed);
      const std::vector<T> input =
          make_input<T>(entry.from_logits, shape, seed);
      const std::vector<T> target = testing::random_simplex<T>(shape, seed);
      std::vector<T> grad_checked(input.size());
      std::vector<T> grad_unchecked(input.size());
      LossOptions unchecked;
      unchecked.check_finite = false;
      const double checked_loss = call_entry(
          entry, input.data(), target.data(), grad_checked.data(), shape);
      const double unchecked_loss =
          call_entry(entry, input.data(), target.data(),
                     grad_unchecked.data(), shape, unchecked);
      CHECK(testing::same_bits(unchecked_loss, checked_loss));
      CHECK(testing::same_bits(grad_unchecked, grad_checked));
    }
  }

  TEST_CASE("check_finite off names unchecked inputs") {
    // Bad inputs that the scan would have rejected were blamed on overflow
    // ("scale probs down") or on inputs that "passed validation".
    const Shape shape{2, 2};
    LossOptions unchecked;
    unchecked.check_finite = false;
    const std::string hint =
        "check_finite = false lets NaN, infinite and negative inputs "
        "through, which can cause this";
    const std::vector<double> nan_probs = {
        std::numeric_limits<double>::quiet_NaN(), 0.5, 0.5, 0.5};
    const std::vector<double> target = {0.5, 0.5, 0.5, 0.5};
    testing::check_invalid_argument(
        [&] {
          qrloss::qr_loss(nan_probs.data(), target.data(), shape, unchecked);
        },
        "qr_loss: non-finite result: the total of class 0 of probs over the "
        "batch is nan; " + hint);
    // From logits the totals are those of softmax(logits), not of an input.
    const std::vector<double> nan_logits = {
        0.0, std::numeric_limits<double>::quiet_NaN(), 0.0, 0.0};
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_from_logits(nan_logits.data(), target.data(), shape,
                                      unchecked);
        },
        "rq_loss_from_logits: non-finite result: the total of class 0 of "
        "softmax(logits) over the batch is nan; " + hint);
    const std::vector<double> probs = {0.5, 0.5, 0.5, 0.5};
    const std::vector<double> negative_target = {0.5, -0.5, 0.5, 0.5};
    testing::check_invalid_argument(
        [&] {
          qrloss::qr_loss(probs.data(), negative_target.data(), shape,
                          unchecked);
        },
        "qr_loss: non-finite result: the loss is NaN; " + hint);
  }

  TEST_CASE_TEMPLATE("check_finite off hints at inputs", T, float, double) {
    // With the scan off, an error that a bad input can explain keeps its
    // own advice and adds the hint that unchecked inputs can be the cause.
    // Float RQ reaches these errors through its redo in double.
    const Shape shape{1, 2, 2, 1};
    LossOptions unchecked;
    unchecked.check_finite = false;
    LossOptions unchecked_eps_zero = unchecked;
    unchecked_eps_zero.eps = 0.0;
    const std::string hint =
        "; check_finite = false lets NaN, infinite and negative inputs "
        "through, which can cause this";
    constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const std::vector<T> probs = {T(0.5), T(0.5), T(0.5), T(0.5)};
    const std::vector<T> logits = {T(0.0), T(0.0), T(0.0), T(0.0)};
    std::vector<T> grad(4);

    const std::string pixel_sum =
        ": non-finite result: at some pixel the sum over classes of q p / "
        "s_c overflows float64 or is NaN, which would make r zero or NaN; "
        "rescale the target if it is large" + hint;
    const std::vector<T> nan_target = {T(0.5), kNaN, T(0.5), T(0.5)};
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss(probs.data(), nan_target.data(), shape, unchecked);
        },
        "rq_loss" + pixel_sum);
    const std::vector<T> inf_target = {T(0.5), T(0.5), kInf, T(0.5)};
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad_from_logits(logits.data(), inf_target.data(),
                                           grad.data(), shape, unchecked);
        },
        "rq_loss_grad_from_logits" + pixel_sum);

    // An infinite target gives QR a loss of -inf, which is never returned.
    const std::string minus_inf = ": non-finite result: the loss is -inf";
    testing::check_invalid_argument(
        [&] {
          qrloss::qr_loss(probs.data(), inf_target.data(), shape, unchecked);
        },
        "qr_loss" + minus_inf + hint);
    testing::check_invalid_argument(
        [&] {
          qrloss::qr_loss_grad(probs.data(), inf_target.data(), grad.data(),
                               shape, unchecked);
        },
        "qr_loss_grad" + minus_inf + hint);
    testing::check_invalid_argument(
        [&] {
          qrloss::qr_loss_grad_from_logits(logits.data(), inf_target.data(),
                                           grad.data(), shape, unchecked);
        },
        "qr_loss_grad_from_logits" + minus_inf + hint);

    // QR's gradient from logits is undefined at a loss of +inf, which a
    // target of -eps gives, and with eps = 0 also a valid target of 0.
    const std::string undefined =
        "qr_loss_grad_from_logits: infinite loss: a target of -eps makes "
        "log(p + eps) = -inf, so the gradient with respect to logits is "
        "undefined";
    const auto eps = static_cast<T>(unchecked.eps);
    const std::vector<T> minus_eps_target = {T(0.5), -eps, T(0.5), T(0.5)};
    testing::check_invalid_argument(
        [&] {
          qrloss::qr_loss_grad_from_logits(logits.data(),
                                           minus_eps_target.data(),
                                           grad.data(), shape, unchecked);
        },
        undefined + hint);
    const std::string zero_target_error =
        "qr_loss_grad_from_logits: infinite loss: target is 0 where probs > 0 "
        "and eps = 0, so the gradient with respect to logits is undefined; "
        "use eps > 0";
    // No bad value gives the error for a target of 0 with eps = 0, so it
    // has no hint with the scan off either.
    const std::vector<T> zero_target = {T(0.5), T(0.0), T(0.5), T(0.5)};
    LossOptions eps_zero;
    eps_zero.eps = 0.0;
    for (const LossOptions& options : {unchecked_eps_zero, eps_zero}) {
      CAPTURE(options.check_finite);
      const testing::ThrownError error =
          testing::catch_invalid_argument([&] {
            qrloss::qr_loss_grad_from_logits(logits.data(), zero_target.data(),
                                             grad.data(), shape, options);
          });
      CHECK(error.message == zero_target_error);
    }

    // With eps = 0, negative probs can make a class total negative or 0.
    const std::vector<T> target = {T(0.5), T(0.5), T(0.5), T(0.5)};
    const std::vector<T> negative_total = {T(0.5), T(0.5), T(0.25), T(-0.5)};
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss(negative_total.data(), target.data(), shape,
                          unchecked_eps_zero);
        },
        "rq_loss: non-finite result: class 1 has total probability -0.25 "
        "over the batch, which eps = 0 clamps to 0, so the factor 1 / s_c is "
        "infinite" + hint);
    const std::vector<T> zero_total = {T(0.5), T(0.5), T(0.5), T(-0.5)};
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss(zero_total.data(), target.data(), shape,
                          unchecked_eps_zero);
        },
        "rq_loss: undefined loss: class 1 has zero total probability over "
        "the batch and eps = 0, so z = q / s_c is 0/0; use eps > 0" + hint);

    // +inf logits give inf - inf = NaN in the softmax. A NaN prints as
    // "nan" whatever its sign bit.
    const std::vector<T> inf_logits = {kInf, T(0.0), T(0.0), T(0.0)};
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_from_logits(inf_logits.data(), target.data(), shape,
                                      unchecked);
        },
        "rq_loss_from_logits: non-finite result: the total of class 0 of "
        "softmax(logits) over the batch is nan" + hint);

    // A valid target too large for double keeps the advice to rescale it:
    // at pixel 0, z = q / s_c is near 1 in both classes, so the pixel sum
    // is near 3.4e308. Float calls are redone in double, where any float
    // target fits.
    if constexpr (std::is_same_v<T, double>) {
      const std::vector<double> peaked = {1.0, 1e-30, 1.0, 1e-30};
      const std::vector<double> huge_target(4, 1.7e308);
      testing::check_invalid_argument(
          [&] {
            qrloss::rq_loss(peaked.data(), huge_target.data(), shape,
                            unchecked);
          },
          "rq_loss" + pixel_sum);
      // With the scan on, that error names the large target alone.
      const testing::ThrownError checked_error =
          testing::catch_invalid_argument([&] {
            qrloss::rq_loss(peaked.data(), huge_target.data(), shape);
          });
      CHECK(checked_error.message ==
            "rq_loss: target too large: at some pixel the sum over classes "
            "of q p / s_c overflows float64, which would make r = 0; "
            "rescale the target");
    }
  }
  TEST_CASE_TEMPLATE("probs and logits routes agree", T, float, double) {
    // softmax, then X_loss_grad, then softmax_vjp gives what the
    // *_from_logits functions give, up to the rounding of the chain.
    constexpr double kGradientUnits = 64.0;
    const double unit = std::numeric_limits<T>::epsilon();
    std::uint64_t seed = 300;
    for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
      for (const Shape& shape : {Shape{2, 5, 3, 4}, Shape{3, 11, 40, 50}}) {
        ++seed;
        const std::string name = qrloss::loss_name(kind);
        const std::string shape_text = qrloss::format_shape(shape);
        CAPTURE(name);
        CAPTURE(shape_text);
        CAPTURE(seed);
        const std::vector<T> logits = testing::random_logits<T>(shape, seed);
        const std::vector<T> target =
            testing::random_simplex<T>(shape, seed + 1);
        const std::size_t count = logits.size();

        std::vector<T> probs(count);
        std::vector<T> dL_dq(count);
        std::vector<T> chained(count);
        qrloss::softmax(logits.data(), probs.data(), shape);
        const double chained_loss = qrloss::compute_loss(
            kind, probs.data(), target.data(), dL_dq.data(), shape);
        qrloss::softmax_vjp(probs.data(), dL_dq.data(), chained.data(), shape);

        std::vector<T> direct(count);
        const double direct_loss = qrloss::compute_loss_from_logits(
            kind, logits.data(), target.data(), direct.data(), shape);

        CHECK(direct_loss == doctest::Approx(chained_loss).epsilon(1e-12));
        const std::vector<double> direct64 = testing::to_double(direct);
        CHECK(testing::max_error_over_max(chained, direct64) <=
              kGradientUnits * unit);
      }
    }
  }

  TEST_CASE("compute_loss takes a literal nullptr") {
    // T is deduced from probs and target alone, so no cast is needed.
    const Shape shape{2, 3};
    const std::vector<float> probs = {0.2f, 0.3f, 0.5f, 0.6f, 0.3f, 0.1f};
    const std::vector<float> target = {0.1f, 0.1f, 0.8f, 0.7f, 0.2f, 0.1f};
    const double loss = qrloss::compute_loss(LossKind::kRQ, probs.data(),
                                             target.data(), nullptr, shape);
    CHECK(testing::same_bits(
        loss, qrloss::rq_loss(probs.data(), target.data(), shape)));
    const double logits_loss = qrloss::compute_loss_from_logits(
        LossKind::kQR, probs.data(), target.data(), nullptr, shape);
    CHECK(testing::same_bits(logits_loss,
                             qrloss::qr_loss_from_logits(
                                 probs.data(), target.data(), shape)));
  }

  TEST_CASE("rq float overflow redone in double") {
    // With eps = 0 and class 1's total between about 3e-39 and 1e-37, float
    // arithmetic overflowed inside the kernel although the results fit:
    // w = p / (s_1 t) beyond float's range made the loss inf, and the
    // per-pixel part of dL/dq overflowed where the class term cancels it.
    // Such calls are redone in double, so they equal the double call on
    // the same values, with the gradient rounded to float.
    const Shape shape{2, 3, 2, 2};
    LossOptions options;
    options.eps = 0.0;
    for (double total : {3.5e-39, 1e-38, 4e-38}) {
      CAPTURE(total);
      std::vector<float> probs(24, 0.2f);
      const std::vector<float> target(24, 0.5f);
      for (int b = 0; b < 2; ++b) {
        for (int n = 0; n < 4; ++n) {
          probs[b * 12 + 4 + n] = static_cast<float>(total / 8.0);
        }
      }
      // Without a gradient the float kernel overflows only for the
      // smallest total, so the loss alone is compared to float precision.
      check_float_rq_as_double(probs, target, shape, options, false,
                               LossOnlyPath::kFloat);
    }

    // From logits: class 1 sits 90 below the others, so float's softmax
    // gives it subnormal probabilities and a total near 5e-39.
    std::vector<float> logits(24, 0.0f);
    for (int b = 0; b < 2; ++b) {
      for (int n = 0; n < 4; ++n) logits[b * 12 + 4 + n] = -90.0f;
    }
    const std::vector<float> target(24, 0.5f);
    check_float_rq_as_double(logits, target, shape, options, true,
                             LossOnlyPath::kFloat);
  }

  TEST_CASE("rq eps zero loss overflow rejected") {
    // Double has no wider type to redo the call in. Class 1's probs are
    // subnormal (1.25e-309), so with eps = 0 the ratio r / q that the loss
    // takes the log of exceeds double's range; the loss came out inf.
    const Shape shape{2, 3, 2, 2};
    std::vector<double> probs(24, 0.2);
    const std::vector<double> target(24, 0.5);
    for (int b = 0; b < 2; ++b) {
      for (int n = 0; n < 4; ++n) probs[b * 12 + 4 + n] = 1.25e-309;
    }
    LossOptions options;
    options.eps = 0.0;
    const std::string message =
        ": non-finite result: the loss overflows float64 although it is "
        "finite in exact arithmetic. With eps = 0 it is formed from "
        "log(r / q), and r / q = p / (s_c t) exceeds the range of float64 "
        "where q is subnormal; use eps > 0";
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss(probs.data(), target.data(), shape, options);
        },
        "rq_loss" + message);
    std::vector<double> grad(24);
    testing::check_invalid_argument(
        [&] {
          qrloss::rq_loss_grad(probs.data(), target.data(), grad.data(),
                               shape, options);
        },
        "rq_loss_grad" + message);
  }
}
