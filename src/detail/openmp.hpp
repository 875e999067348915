#pragma once
// OpenMP's run-time queries, with serial results in a build without
// OpenMP (-Dopenmp=disabled). There the pragmas are ignored and every
// region runs on the calling thread, but <omp.h> still declares the
// run-time functions, so calling them compiled and then failed to link.

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>

namespace qrloss::detail {

/// Returns the threads a call runs with: `requested`, or the OpenMP
/// default for 0. Without OpenMP it is 1, whatever was requested.
inline int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : std::max(1, omp_get_max_threads());
#else
  static_cast<void>(requested);
  return 1;
#endif
}

/// Returns this thread's number in the current team, or 0 without OpenMP.
inline int thread_number() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace qrloss::detail
