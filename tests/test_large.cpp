// A batch of 1e8 float32 elements, checked against the float64 computation
// on the same float-rounded inputs. At this size, sums kept in float would
// show: one float accumulator over a class (1.25e7 values near 0.125, a
// total of 1.6e6, where the float spacing is 0.125) is off by about 1e-4
// relative, a hundred times the loss tolerance.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>

#include "qrloss/qrloss.hpp"

using qrloss::LossKind;
using qrloss::Shape;

namespace {

// 5 * 8 * 1600 * 1563 = 100,032,000 elements. Buffers: three float32 and
// three float64 tensors of that size, 3.6 GB in all.
constexpr std::int64_t kB = 5;
constexpr std::int64_t kC = 8;
constexpr std::int64_t kH = 1600;
constexpr std::int64_t kW = 1563;
constexpr std::int64_t kPixelsPerItem = kH * kW;
constexpr std::int64_t kElements = kB * kC * kPixelsPerItem;

// Every uniform value gets this offset before a row is normalised, so no
// probability is closer to 0 than about 0.05 / (C * 1.05).
constexpr double kProbsFloor = 0.05;
// Target entries whose hash falls below this fraction are exactly 0, so the
// log(p + eps) terms with p = 0 are part of the sums.
constexpr double kTargetZeroFraction = 0.01;

// Relative agreement of the float32 loss with the float64 loss.
constexpr double kLossRtol = 1e-6;
// Largest float32 gradient error as a fraction of max |float64 gradient|.
constexpr double kGradientRtol = 1e-5;

/// Uniform double in [0, 1) from a 64-bit counter (splitmix64), so that the
/// inputs can be filled in parallel and are the same for any thread count.
double uniform_at(std::uint64_t counter) {
  std::uint64_t z = counter + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

/// Buffers allocated without zero-filling: the parallel fill below is the
/// first write, which spreads the page faults over the threads.
template <typename T>
std::unique_ptr<T[]> uninitialised(std::int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<std::size_t>(n)]);
}

/// Fills probs and target with rows that sum to 1 over C at every pixel.
void fill_inputs(float* probs, float* target) {
  const std::int64_t pixels = kB * kPixelsPerItem;
#pragma omp parallel for schedule(static)
  for (std::int64_t pixel = 0; pixel < pixels; ++pixel) {
    const std::int64_t b = pixel / kPixelsPerItem;
    const std::int64_t p = pixel % kPixelsPerItem;
    double q_row[kC];
    double t_row[kC];
    double q_sum = 0.0;
    double t_sum = 0.0;
    for (std::int64_t c = 0; c < kC; ++c) {
      const auto k = static_cast<std::uint64_t>((b * kC + c) * kPixelsPerItem + p);
      q_row[c] = kProbsFloor + uniform_at(2 * k);
      const double u = uniform_at(2 * k + 1);
      t_row[c] = u < kTargetZeroFraction ? 0.0 : u;
      q_sum += q_row[c];
      t_sum += t_row[c];
    }
    for (std::int64_t c = 0; c < kC; ++c) {
      const std::int64_t flat = (b * kC + c) * kPixelsPerItem + p;
      probs[flat] = static_cast<float>(q_row[c] / q_sum);
      target[flat] = static_cast<float>(t_row[c] / t_sum);
    }
  }
}

void widen(const float* in, double* out) {
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < kElements; ++i) out[i] = in[i];
}

struct GradientComparison {
  double max_error = 0.0;
  double max_reference = 0.0;
  std::int64_t non_finite = 0;
};

GradientComparison compare_gradients(const float* got, const double* ref) {
  GradientComparison result;
  double max_error = 0.0;
  double max_reference = 0.0;
  std::int64_t non_finite = 0;
#pragma omp parallel for schedule(static) \
    reduction(max : max_error, max_reference) reduction(+ : non_finite)
  for (std::int64_t i = 0; i < kElements; ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) {
      ++non_finite;
      continue;
    }
    max_error = std::max(max_error, std::abs(static_cast<double>(got[i]) - ref[i]));
    max_reference = std::max(max_reference, std::abs(ref[i]));
  }
  result.max_error = max_error;
  result.max_reference = max_reference;
  result.non_finite = non_finite;
  return result;
}

}  // namespace

TEST_SUITE("large") {
  TEST_CASE("float32 batch of 1e8 elements matches float64") {
    const Shape shape = {kB, kC, kH, kW};
    REQUIRE(kElements >= 100000000);

    auto probs32 = uninitialised<float>(kElements);
    auto target32 = uninitialised<float>(kElements);
    auto grad32 = uninitialised<float>(kElements);
    fill_inputs(probs32.get(), target32.get());

    auto probs64 = uninitialised<double>(kElements);
    auto target64 = uninitialised<double>(kElements);
    auto grad64 = uninitialised<double>(kElements);
    widen(probs32.get(), probs64.get());
    widen(target32.get(), target64.get());

    for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
      const std::string loss = qrloss::loss_name(kind);
      CAPTURE(loss);
      const double loss32 = qrloss::compute_loss<float>(
          kind, probs32.get(), target32.get(), grad32.get(), shape);
      const double loss64 = qrloss::compute_loss<double>(
          kind, probs64.get(), target64.get(), grad64.get(), shape);
      CAPTURE(loss32);
      CAPTURE(loss64);
      REQUIRE(std::isfinite(loss64));
      CHECK(std::abs(loss32 - loss64) <= kLossRtol * std::abs(loss64));

      // The loss without a gradient skips the gradient work inside the RQ
      // passes, and it must still return the same bits.
      const double loss32_only = qrloss::compute_loss<float>(
          kind, probs32.get(), target32.get(), nullptr, shape);
      CHECK(loss32_only == loss32);

      const GradientComparison grad = compare_gradients(grad32.get(), grad64.get());
      CAPTURE(grad.max_error);
      CAPTURE(grad.max_reference);
      CHECK(grad.non_finite == 0);
      CHECK(grad.max_reference > 0.0);
      CHECK(grad.max_error <= kGradientRtol * grad.max_reference);
    }
  }
}
