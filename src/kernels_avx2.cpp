// AVX2 + FMA kernel variant, chosen at run time (detail/kernels.hpp).

#include "detail/kernel_prelude.hpp"
#include "detail/kernels.hpp"

#if QRLOSS_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define QRLOSS_ISA_LEVEL 1
#define QRLOSS_ISA isa_avx2
#include "detail/kernels_body.hpp"
#pragma GCC pop_options
#endif
