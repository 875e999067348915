// Baseline kernel variant: compiled with the build's own flags (x86-64 SSE2
// by default, or the instruction set that -Dsimd names).

#include "detail/kernel_prelude.hpp"
#include "detail/kernels.hpp"

#define QRLOSS_ISA isa_base
#include "detail/kernels_body.hpp"
