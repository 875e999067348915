#pragma once
// A division helper for the kernel variants (see detail/isa.hpp).

#include <cmath>

#include "detail/isa.hpp"

namespace qrloss::detail::QRLOSS_ISA {

/// Returns u / t correctly rounded, given y = 1 / t correctly rounded.
/// With FMA it needs no division: q0 = u y lies within one ulp of u / t,
/// the residual u - q0 t is exact in an FMA, and q0 plus the residual
/// times y rounds to the quotient (Markstein's correction step). A
/// subnormal quotient can come out one unit off, and so, in about one case
/// in 2e7, can a float quotient whose t exceeds 2^126 (y subnormal). u = t
/// gives exactly 1 (checked for every float t above 2^126).
/// tests/test_divide.cpp checks all this against the division. That
/// division was the slowest step of RQ's loop that forms r: in-cache RQ
/// took 1.25 ns per element with it and 1.19 without.
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

}  // namespace qrloss::detail::QRLOSS_ISA
