// AVX-512 (F, DQ, VL, BW) kernel variant, chosen at run time
// (detail/kernels.hpp).
// NOTE: RQ's second pass runs about 10 % slower here than in a -Dsimd=avx512
// build on the machine of docs/performance.md, although its tile code is
// instruction for instruction the same. Code placement is the likely cause:
// -falign-loops=32 narrowed the gap to about 5 %, but slowed QR.

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
