// detail::divide_exactly, which RQ uses for r = u / t. With FMA it forms
// the quotient from the reciprocal of t, and within its documented range
// it must round exactly as the division does: one-hot pixels rely on
// r = 1 exactly, and RQ divides outside that range, so that every variant
// gives the same r.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

// The helper as the AVX2 variant compiles it (src/kernels_avx2.cpp).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define QRLOSS_ISA isa_divide_test
#define QRLOSS_ISA_LEVEL 1
#include "detail/divide.hpp"
#pragma GCC pop_options

namespace {

using qrloss::detail::isa_divide_test::divide_exactly;
using qrloss::detail::isa_divide_test::kExactDividendMin;
using qrloss::detail::isa_divide_test::kExactDivisorMax;
using qrloss::detail::isa_divide_test::kExactQuotientMin;

bool has_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/// Tally of divide_exactly(u, t, 1 / t) against u / t, bit for bit. It
/// also counts the pairs where u * (1 / t) alone differs, which shows that
/// the correction step was needed.
template <typename T>
struct Comparison {
  std::int64_t pairs = 0;
  std::int64_t wrong = 0;
  std::int64_t product_off = 0;
  T first_u = 0;
  T first_t = 0;

  void add(T u, T t) {
    const T y = T(1) / t;
    const T expected = u / t;
    const T got = divide_exactly(u, t, y);
    ++pairs;
    if (std::memcmp(&got, &expected, sizeof(T)) != 0) {
      if (wrong == 0) {
        first_u = u;
        first_t = t;
      }
      ++wrong;
    }
    if (u * y != expected) ++product_off;
  }
};

/// Returns a random normal number whose exponent is uniform in [lo, hi].
template <typename T>
T random_normal(std::mt19937_64& rng, int lo, int hi) {
  std::uniform_real_distribution<T> significand(T(1), T(2));
  std::uniform_int_distribution<int> exponent(lo, hi);
  return std::ldexp(significand(rng), exponent(rng));
}

}  // namespace

TEST_SUITE("divide") {
  TEST_CASE_TEMPLATE("divide_exactly rounds as the division", T, float,
                     double) {
    if (!has_fma()) {
      MESSAGE("skipped: this CPU has no AVX2 and FMA");
      return;
    }
    // RQ divides u = (q / s_c) p by t = sum_c u_c >= u, clamped to 1e-12.
    std::mt19937_64 rng(29);
    Comparison<T> check;
    for (int k = 0; k < 1000000; ++k) {
      const T t = random_normal<T>(rng, -40, 40);
      const T u = t * random_normal<T>(rng, -30, -1);
      check.add(u, t);
    }
    CAPTURE(check.first_u);
    CAPTURE(check.first_t);
    CHECK(check.wrong == 0);
    // Without the correction about a quarter of these quotients are off.
    CHECK(check.product_off > check.pairs / 20);
  }

  TEST_CASE_TEMPLATE("divide_exactly at the ends of its range", T, float,
                     double) {
    if (!has_fma()) {
      MESSAGE("skipped: this CPU has no AVX2 and FMA");
      return;
    }
    const int low = std::ilogb(kExactDividendMin<T>);
    const int high = std::ilogb(kExactDivisorMax<T>);
    std::mt19937_64 rng(41);
    // Dividends in the lowest binades of the range, divisors from the
    // clamp 1e-12 to 1; then divisors in the highest binades.
    Comparison<T> low_end;
    Comparison<T> high_end;
    for (int k = 0; k < 500000; ++k) {
      low_end.add(random_normal<T>(rng, low, low + 4),
                  random_normal<T>(rng, -40, -1));
      const T t = random_normal<T>(rng, high - 4, high - 1);
      high_end.add(t * random_normal<T>(rng, -60, -1), t);
    }
    CAPTURE(low_end.first_u);
    CAPTURE(low_end.first_t);
    CHECK(low_end.wrong == 0);
    CAPTURE(high_end.first_u);
    CAPTURE(high_end.first_t);
    CHECK(high_end.wrong == 0);
    // Near the smallest normal dividend the residual loses bits to
    // underflow, which is why RQ divides below the range: some quotients
    // come out one unit off.
    const int smallest = std::numeric_limits<T>::min_exponent - 1;
    Comparison<T> below;
    for (int k = 0; k < 500000; ++k) {
      below.add(random_normal<T>(rng, smallest, smallest + 8),
                random_normal<T>(rng, -40, -1));
    }
    CHECK(below.wrong > 0);
  }

  TEST_CASE_TEMPLATE("divide_exactly on subnormal quotient ties", T, float,
                     double) {
    if (!has_fma()) {
      MESSAGE("skipped: this CPU has no AVX2 and FMA");
      return;
    }
    // u / t = (2j + 1) times half the smallest subnormal, exactly halfway
    // between two subnormals, with u and t inside the operand range. The
    // division rounds such a tie to even. The FMA quotient, which uses
    // the rounded 1 / t, can round it the other way, which is why RQ also
    // divides where r < kExactQuotientMin.
    const int half_subnormal = std::numeric_limits<T>::min_exponent -
                               std::numeric_limits<T>::digits - 1;
    // With t = 3 * 2^k and k >= first, u is at least kExactDividendMin.
    const int first = std::ilogb(kExactDividendMin<T>) - half_subnormal;
    Comparison<T> ties;
    std::int64_t outside = 0;
    for (int k = first; k < first + 60; ++k) {
      for (int j = 0; j < 200; ++j) {
        const T t = std::ldexp(T(3), k);
        const T u = std::ldexp(T(3 * (2 * j + 1)), k + half_subnormal);
        const bool operands_in_range =
            u >= kExactDividendMin<T> && t <= kExactDivisorMax<T>;
        const bool quotient_below = u / t < kExactQuotientMin<T>;
        if (!(operands_in_range && quotient_below)) ++outside;
        ties.add(u, t);
      }
    }
    CHECK(outside == 0);
    CHECK(ties.wrong > 0);
  }

  TEST_CASE("divide_exactly on every float significand") {
    if (!has_fma()) {
      MESSAGE("skipped: this CPU has no AVX2 and FMA");
      return;
    }
    // All 2^23 significands against divisors with awkward significands:
    // all ones, one bit past a power of two, and random ones.
    std::vector<float> divisors = {1.0f,
                                   std::nextafter(2.0f, 0.0f),
                                   std::nextafter(1.0f, 2.0f),
                                   1.5f,
                                   3.0f,
                                   1.75f,
                                   7.0f,
                                   std::nextafter(1.0f, 0.0f)};
    std::mt19937_64 rng(31);
    for (int k = 0; k < 8; ++k) {
      divisors.push_back(random_normal<float>(rng, 0, 1));
    }
    for (const float t : divisors) {
      CAPTURE(t);
      Comparison<float> check;
      for (float u = 1.0f; u < 2.0f; u = std::nextafter(u, 3.0f)) {
        check.add(u, t);
      }
      CAPTURE(check.first_u);
      CHECK(check.pairs == (std::int64_t{1} << 23));
      CHECK(check.wrong == 0);
    }
  }

  TEST_CASE_TEMPLATE("divide_exactly of t by t and of 0", T, float, double) {
    if (!has_fma()) {
      MESSAGE("skipped: this CPU has no AVX2 and FMA");
      return;
    }
    // A pixel with a single nonzero u has t = u, and r must be exactly 1
    // for its class terms to cancel.
    std::mt19937_64 rng(37);
    std::int64_t not_one = 0;
    std::int64_t not_zero = 0;
    for (int k = 0; k < 200000; ++k) {
      const T t = random_normal<T>(rng, -40, 40);
      if (divide_exactly(t, t, T(1) / t) != T(1)) ++not_one;
      const T zero = divide_exactly(T(0), t, T(1) / t);
      if (zero != T(0) || std::signbit(zero)) ++not_zero;
    }
    CHECK(not_one == 0);
    CHECK(not_zero == 0);
    // The top binades, where 1 / t is subnormal in float (t > 2^126), and
    // the largest value.
    const T largest = std::numeric_limits<T>::max();
    CHECK(divide_exactly(largest, largest, T(1) / largest) == T(1));
    if constexpr (std::is_same_v<T, float>) {
      std::int64_t count = 0;
      for (float t = std::ldexp(1.0f, 126); t <= largest;
           t = std::nextafter(t, 2 * largest)) {
        ++count;
        if (divide_exactly(t, t, 1.0f / t) != 1.0f) ++not_one;
      }
      CHECK(count == (std::int64_t{1} << 24));
      CHECK(not_one == 0);
    }
  }
}
