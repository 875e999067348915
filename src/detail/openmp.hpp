#pragma once
// OpenMP's run-time queries, with serial results in a build without
// OpenMP (-Dopenmp=disabled). There the pragmas are ignored and every
// region runs on the calling thread, but <omp.h> still declares the
// run-time functions, so calling them compiled and then failed to link.

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qrloss::detail {

/// Returns the OpenMP default team size, or 1 without OpenMP.
inline int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
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
