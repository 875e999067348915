#pragma once
// A division helper for the kernel variants (see detail/isa.hpp).

#include <cmath>
#include <limits>
#include <type_traits>

#include "detail/isa.hpp"

namespace qrloss::detail::QRLOSS_ISA {

/// Smallest dividend for which divide_exactly is the correctly rounded
/// quotient (besides 0). Below it the residual u - q0 t needs bits below
/// the type's smallest subnormal, and the quotient can come out one unit
/// off (in float up to about 2^-106, in double up to about 2^-1008).
template <typename T>
inline constexpr T kExactDividendMin = std::is_same_v<T, float> ? T(0x1p-100)
                                                                : T(0x1p-966);

/// Smallest quotient for which divide_exactly is the correctly rounded
/// quotient: twice the smallest normal value, since divide_exactly can
/// miss by one unit. A subnormal quotient can fall exactly halfway
/// between two subnormals, and the correction step, which uses the
/// inexact 1 / t, can then round that tie the wrong way.
template <typename T>
inline constexpr T kExactQuotientMin = 2 * std::numeric_limits<T>::min();

/// Largest divisor for which divide_exactly is the correctly rounded
/// quotient: above it 1 / t is subnormal and has fewer digits.
template <typename T>
inline constexpr T kExactDivisorMax = std::is_same_v<T, float> ? T(0x1p126)
                                                               : T(0x1p1022);

/// Returns u / t correctly rounded, given y = 1 / t correctly rounded,
/// for kExactDividendMin <= u (or u = +0), 0 < t <= kExactDivisorMax and a
/// result of at least kExactQuotientMin (or 0). u = -0 gives +0 where the
/// division gives -0. RQ, which flags only u > 0, uses such an r only in
/// products and in sums that start from +0, so no loss or gradient
/// changes.
/// With FMA it needs no division: q0 = u y lies within one ulp of u / t,
/// the residual u - q0 t is exact in an FMA, and q0 plus the residual
/// times y rounds to the quotient (Markstein's correction step).
/// tests/test_divide.cpp checks it against the division. That division
/// was the slowest step of RQ's loop that forms r: in-cache RQ took 1.25
/// ns per element with it and 1.19 without.
template <typename T>
inline T divide_exactly(T u, T t, T y) {
#if QRLOSS_ISA_LEVEL >= 1
  const T q0 = u * y;
  return std::fma(std::fma(-q0, t, u), y, q0);
#else
  static_cast<void>(y);
  return u / t;
#endif
}

/// Returns u / t correctly rounded: divide_exactly with kUseReciprocal,
/// for operands in its range, otherwise the division itself.
template <bool kUseReciprocal, typename T>
inline T quotient(T u, T t, T y) {
  if constexpr (kUseReciprocal) {
    return divide_exactly(u, t, y);
  } else {
    static_cast<void>(y);
    return u / t;
  }
}

}  // namespace qrloss::detail::QRLOSS_ISA
