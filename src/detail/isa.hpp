#pragma once
// Names the kernel variant being compiled. A translation unit that builds a
// variant for another instruction set defines QRLOSS_ISA before it includes
// any header that uses it (see detail/kernels_body.hpp). Every other unit
// gets the baseline variant, which uses the compiler flags of the build.

#ifndef QRLOSS_ISA
#define QRLOSS_ISA isa_base
#endif

/// Vector width of the variant: 2 for AVX-512 (F, DQ, VL, BW), 1 for AVX2 +
/// FMA, 0 for SSE2. The baseline variant takes it from the compiler flags;
/// the others define it with QRLOSS_ISA, since a target pragma does not
/// define __AVX2__ or __AVX512F__.
#ifndef QRLOSS_ISA_LEVEL
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512BW__)
#define QRLOSS_ISA_LEVEL 2
#elif defined(__AVX2__) && defined(__FMA__)
#define QRLOSS_ISA_LEVEL 1
#else
#define QRLOSS_ISA_LEVEL 0
#endif
#endif

/// Marks an element-wise loop over distinct arrays for vectorisation
/// (OpenMP SIMD, enabled by -fopenmp-simd even without OpenMP threads).
/// Only loops without a floating-point reduction carry it, so it changes
/// no result.
#define QRLOSS_SIMD_LOOP _Pragma("omp simd")
/// The same for a loop that also folds validity flags into `bad` with |.
/// GCC 12 gets `ivdep`, because its OpenMP reduction left such loops scalar
/// inside a target pragma region. The integer | reduction is exact either way.
#if defined(__clang__)
#define QRLOSS_SIMD_LOOP_FLAGS _Pragma("omp simd reduction(|:bad)")
#else
#define QRLOSS_SIMD_LOOP_FLAGS _Pragma("GCC ivdep")
#endif

