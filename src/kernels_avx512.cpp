// AVX-512 (F, DQ, VL, BW) kernel variant, chosen at run time
// (detail/kernels.hpp).
// NOTE: in some runs on the machines of docs/performance.md these kernels
// took up to 11 % longer than in a -Dsimd=avx512 build (in others the same
// time), although their tile loops are instruction for instruction the
// same. Code and data placement are the likely causes, and no change tried
// so far helped every kernel.

#include "detail/kernel_prelude.hpp"
#include "detail/kernels.hpp"

#if QRLOSS_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#define QRLOSS_ISA_LEVEL 2
#define QRLOSS_ISA isa_avx512
#include "detail/kernels_body.hpp"
#pragma GCC pop_options
#endif
