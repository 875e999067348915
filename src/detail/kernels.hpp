#pragma once
// Kernel variants per instruction set and the choice among them.
//
// With QRLOSS_DISPATCH (the default `simd=auto` build with GCC on x86-64)
// the kernels are compiled three times: baseline x86-64 (SSE2), AVX2 + FMA
// and AVX-512 (F, DQ, VL, BW), and each call runs the best variant the CPU
// supports. The environment variable QRLOSS_ISA=baseline|avx2|avx512 caps
// the choice (for tests and benchmarks). Other builds compile only the
// baseline variant, with the build's own flags.

#include "detail/passes.hpp"
#include "qrloss/losses.hpp"
#include "qrloss/tensor.hpp"

#ifndef QRLOSS_DISPATCH
#define QRLOSS_DISPATCH 0
#endif

namespace qrloss::detail {

#define QRLOSS_DECLARE_KERNELS_                                            \
  template <typename T, bool kFromLogits>                                  \
  double qr_impl(const char* function, const T* input, const T* target,    \
                 T* grad, const Shape& shape, const LossOptions& options); \
  template <typename T, bool kFromLogits>                                  \
  double rq_impl(const char* function, const T* input, const T* target,    \
                 T* grad, const Shape& shape, const LossOptions& options); \
  template <typename T>                                                    \
  void softmax_impl(const char* function, const T* logits, T* probs,       \
                    const Geometry& geometry, const Shape& shape,          \
                    int threads);                                          \
  template <typename T>                                                    \
  void softmax_vjp_impl(const char* function, const T* probs,              \
                        const T* dL_dq, T* dL_dx, const Geometry& geometry,  \
                        const Shape& shape, int threads);

namespace isa_base {
QRLOSS_DECLARE_KERNELS_
}
#if QRLOSS_DISPATCH
namespace isa_avx2 {
QRLOSS_DECLARE_KERNELS_
}
namespace isa_avx512 {
QRLOSS_DECLARE_KERNELS_
}
#else
// Without dispatch the baseline variant is the only one, and active_isa()
// never selects another; the aliases let the run_ functions name all three.
namespace isa_avx2 = isa_base;
namespace isa_avx512 = isa_base;
#endif

#undef QRLOSS_DECLARE_KERNELS_

enum class Isa { kBaseline, kAvx2, kAvx512 };

/// Returns the variant that runs the kernels: the best the CPU supports,
/// capped by QRLOSS_ISA. Decided once per process.
Isa active_isa();

/// Returns the one of three variants of a kernel that active_isa() selects.
template <typename Kernel>
Kernel select_variant(Kernel baseline, Kernel avx2, Kernel avx512) {
  switch (active_isa()) {
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    default:
      return baseline;
  }
}

template <typename T, bool kFromLogits>
double run_qr(const char* function, const T* input, const T* target, T* grad,
              const Shape& shape, const LossOptions& options) {
  const auto kernel = select_variant(&isa_base::qr_impl<T, kFromLogits>,
                                     &isa_avx2::qr_impl<T, kFromLogits>,
                                     &isa_avx512::qr_impl<T, kFromLogits>);
  return kernel(function, input, target, grad, shape, options);
}

template <typename T, bool kFromLogits>
double run_rq(const char* function, const T* input, const T* target, T* grad,
              const Shape& shape, const LossOptions& options) {
  const auto kernel = select_variant(&isa_base::rq_impl<T, kFromLogits>,
                                     &isa_avx2::rq_impl<T, kFromLogits>,
                                     &isa_avx512::rq_impl<T, kFromLogits>);
  return kernel(function, input, target, grad, shape, options);
}

/// Computes softmax over whole tensors in the active variant and checks
/// the logits on the way (see softmax_impl).
template <typename T>
void run_softmax(const char* function, const T* logits, T* probs,
                 const Geometry& geometry, const Shape& shape, int threads) {
  const auto kernel =
      select_variant(&isa_base::softmax_impl<T>, &isa_avx2::softmax_impl<T>,
                     &isa_avx512::softmax_impl<T>);
  kernel(function, logits, probs, geometry, shape, threads);
}

/// Computes the softmax VJP over whole tensors in the active variant and
/// checks probs and dL_dq on the way (see softmax_vjp_impl).
template <typename T>
void run_softmax_vjp(const char* function, const T* probs, const T* dL_dq,
                     T* dL_dx, const Geometry& geometry, const Shape& shape,
                     int threads) {
  const auto kernel = select_variant(&isa_base::softmax_vjp_impl<T>,
                                     &isa_avx2::softmax_vjp_impl<T>,
                                     &isa_avx512::softmax_vjp_impl<T>);
  kernel(function, probs, dL_dq, dL_dx, geometry, shape, threads);
}

}  // namespace qrloss::detail
