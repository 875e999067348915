#pragma once
// Wall-clock helpers shared by `qrloss bench` and the programs in bench/.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <vector>

namespace qrloss::bench {

/// Runs f() once and returns its wall time in seconds.
template <typename F>
double seconds(F&& f) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// Returns the median of values, the mean of the two middle ones for an
/// even count.
inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t mid = values.size() / 2;
  return values.size() % 2 == 1 ? values[mid]
                                : 0.5 * (values[mid - 1] + values[mid]);
}

}  // namespace qrloss::bench
