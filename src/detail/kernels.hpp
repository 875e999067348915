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
#endif

#undef QRLOSS_DECLARE_KERNELS_

enum class Isa { kBaseline, kAvx2, kAvx512 };

/// Returns the variant that runs the kernels: the best the CPU supports,
/// capped by QRLOSS_ISA. Decided once per process.
Isa active_isa();

template <typename T, bool kFromLogits>
double run_qr(const char* function, const T* input, const T* target, T* grad,
              const Shape& shape, const LossOptions& options) {
  switch (active_isa()) {
#if QRLOSS_DISPATCH
    case Isa::kAvx512:
      return isa_avx512::qr_impl<T, kFromLogits>(function, input, target,
                                                 grad, shape, options);
    case Isa::kAvx2:
      return isa_avx2::qr_impl<T, kFromLogits>(function, input, target, grad,
                                               shape, options);
#endif
    default:
      return isa_base::qr_impl<T, kFromLogits>(function, input, target, grad,
                                               shape, options);
  }
}

template <typename T, bool kFromLogits>
double run_rq(const char* function, const T* input, const T* target, T* grad,
              const Shape& shape, const LossOptions& options) {
  switch (active_isa()) {
#if QRLOSS_DISPATCH
    case Isa::kAvx512:
      return isa_avx512::rq_impl<T, kFromLogits>(function, input, target,
                                                 grad, shape, options);
    case Isa::kAvx2:
      return isa_avx2::rq_impl<T, kFromLogits>(function, input, target, grad,
                                               shape, options);
#endif
    default:
      return isa_base::rq_impl<T, kFromLogits>(function, input, target, grad,
                                               shape, options);
  }
}

/// Computes softmax over whole tensors in the active variant and checks
/// the logits on the way (see softmax_impl).
template <typename T>
void run_softmax(const char* function, const T* logits, T* probs,
                 const Geometry& geometry, const Shape& shape, int threads) {
  switch (active_isa()) {
#if QRLOSS_DISPATCH
    case Isa::kAvx512:
      return isa_avx512::softmax_impl<T>(function, logits, probs, geometry,
                                         shape, threads);
    case Isa::kAvx2:
      return isa_avx2::softmax_impl<T>(function, logits, probs, geometry,
                                       shape, threads);
#endif
    default:
      return isa_base::softmax_impl<T>(function, logits, probs, geometry,
                                       shape, threads);
  }
}

/// Computes the softmax VJP over whole tensors in the active variant and
/// checks probs and dL_dq on the way (see softmax_vjp_impl).
template <typename T>
void run_softmax_vjp(const char* function, const T* probs, const T* dL_dq,
                     T* dL_dx, const Geometry& geometry, const Shape& shape,
                     int threads) {
  switch (active_isa()) {
#if QRLOSS_DISPATCH
    case Isa::kAvx512:
      return isa_avx512::softmax_vjp_impl<T>(function, probs, dL_dq, dL_dx,
                                             geometry, shape, threads);
    case Isa::kAvx2:
      return isa_avx2::softmax_vjp_impl<T>(function, probs, dL_dq, dL_dx,
                                           geometry, shape, threads);
#endif
    default:
      return isa_base::softmax_vjp_impl<T>(function, probs, dL_dq, dL_dx,
                                           geometry, shape, threads);
  }
}

}  // namespace qrloss::detail
