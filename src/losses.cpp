// QR and RQ losses and their gradients: argument checks and the choice of
// kernel variant (src/kernels_*.cpp) for the machine.

#include "qrloss/losses.hpp"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "detail/passes.hpp"
#include "qrloss/error.hpp"

namespace qrloss {
namespace detail {
namespace {

/// Checks the shape, then that a gradient buffer was given, so that an
/// empty tensor is reported as such even when its buffers are null.
template <typename T>
void check_grad_buffer(const char* function, const char* input_name,
                       const char* grad_name, const T* grad,
                       const Shape& shape) {
  make_geometry(function, input_name, shape, sizeof(T));
  check_not_null(function, grad_name, grad);
}

/// Throws unless kind is one of the LossKind values.
void check_loss_kind(const char* function, LossKind kind) {
  if (kind == LossKind::kQR || kind == LossKind::kRQ) return;
  throw invalid_argument(std::string(function) + ": invalid loss kind " +
                         std::to_string(static_cast<int>(kind)) +
                         ": expected LossKind::kQR or LossKind::kRQ");
}

/// Best variant this CPU runs, among those compiled in.
Isa supported_isa() {
#if QRLOSS_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBaseline;
}

Isa choose_isa() {
  const Isa best = supported_isa();
  const char* cap = std::getenv("QRLOSS_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const std::string name = cap;
  Isa requested = Isa::kBaseline;
  if (name == "avx2") {
    requested = Isa::kAvx2;
  } else if (name == "avx512") {
    requested = Isa::kAvx512;
  } else if (name != "baseline") {
    throw invalid_argument(
        "QRLOSS_ISA: invalid value '" + name +
        "': expected baseline, avx2 or avx512 (or unset for the best the "
        "CPU supports)");
  }
  return std::min(requested, best);
}

}  // namespace

Isa active_isa() {
  // Thread-safe one-time initialisation; a bad QRLOSS_ISA throws on every
  // call, since the static is then never initialised.
  static const Isa isa = choose_isa();
  return isa;
}

}  // namespace detail

const char* kernel_isa() {
  switch (detail::active_isa()) {
    case detail::Isa::kAvx512:
      return "avx512";
    case detail::Isa::kAvx2:
      return "avx2";
    default:
      // The baseline variant is compiled with the build's flags, which
      // -Dsimd=avx2 or avx512 raise (detail/isa.hpp).
#if QRLOSS_ISA_LEVEL == 2
      return "avx512";
#elif QRLOSS_ISA_LEVEL == 1
      return "avx2";
#else
      return "baseline";
#endif
  }
}

template <typename T>
double qr_loss(const T* probs, const T* target, const Shape& shape,
               const LossOptions& options) {
  return detail::run_qr<T, false>("qr_loss", probs, target, nullptr, shape,
                                   options);
}

template <typename T>
double qr_loss_grad(const T* probs, const T* target, T* dL_dq,
                    const Shape& shape, const LossOptions& options) {
  detail::check_grad_buffer("qr_loss_grad", "probs", "dL_dq", dL_dq, shape);
  return detail::run_qr<T, false>("qr_loss_grad", probs, target, dL_dq, shape,
                                   options);
}

template <typename T>
double rq_loss(const T* probs, const T* target, const Shape& shape,
               const LossOptions& options) {
  return detail::run_rq<T, false>("rq_loss", probs, target, nullptr, shape,
                                   options);
}

template <typename T>
double rq_loss_grad(const T* probs, const T* target, T* dL_dq,
                    const Shape& shape, const LossOptions& options) {
  detail::check_grad_buffer("rq_loss_grad", "probs", "dL_dq", dL_dq, shape);
  return detail::run_rq<T, false>("rq_loss_grad", probs, target, dL_dq, shape,
                                   options);
}

template <typename T>
double qr_loss_from_logits(const T* logits, const T* target, const Shape& shape,
                           const LossOptions& options) {
  return detail::run_qr<T, true>("qr_loss_from_logits", logits, target,
                                  nullptr, shape, options);
}

template <typename T>
double qr_loss_grad_from_logits(const T* logits, const T* target, T* dL_dx,
                                const Shape& shape,
                                const LossOptions& options) {
  detail::check_grad_buffer("qr_loss_grad_from_logits", "logits", "dL_dx",
                            dL_dx, shape);
  return detail::run_qr<T, true>("qr_loss_grad_from_logits", logits, target,
                                  dL_dx, shape, options);
}

template <typename T>
double rq_loss_from_logits(const T* logits, const T* target, const Shape& shape,
                           const LossOptions& options) {
  return detail::run_rq<T, true>("rq_loss_from_logits", logits, target,
                                  nullptr, shape, options);
}

template <typename T>
double rq_loss_grad_from_logits(const T* logits, const T* target, T* dL_dx,
                                const Shape& shape,
                                const LossOptions& options) {
  detail::check_grad_buffer("rq_loss_grad_from_logits", "logits", "dL_dx",
                            dL_dx, shape);
  return detail::run_rq<T, true>("rq_loss_grad_from_logits", logits, target,
                                  dL_dx, shape, options);
}

template <typename T>
double compute_loss(LossKind kind, const T* probs, const T* target,
                    detail::NonDeduced<T>* dL_dq, const Shape& shape,
                    const LossOptions& options) {
  detail::check_loss_kind("compute_loss", kind);
  if (kind == LossKind::kQR) {
    return detail::run_qr<T, false>("compute_loss", probs, target, dL_dq,
                                     shape, options);
  }
  return detail::run_rq<T, false>("compute_loss", probs, target, dL_dq, shape,
                                   options);
}

template <typename T>
double compute_loss_from_logits(LossKind kind, const T* logits, const T* target,
                                detail::NonDeduced<T>* dL_dx,
                                const Shape& shape,
                                const LossOptions& options) {
  detail::check_loss_kind("compute_loss_from_logits", kind);
  if (kind == LossKind::kQR) {
    return detail::run_qr<T, true>("compute_loss_from_logits", logits, target,
                                    dL_dx, shape, options);
  }
  return detail::run_rq<T, true>("compute_loss_from_logits", logits, target,
                                  dL_dx, shape, options);
}

#define QRLOSS_INSTANTIATE_(T)                                             \
  template double qr_loss<T>(const T*, const T*, const Shape&,             \
                             const LossOptions&);                          \
  template double qr_loss_grad<T>(const T*, const T*, T*, const Shape&,    \
                                  const LossOptions&);                     \
  template double rq_loss<T>(const T*, const T*, const Shape&,             \
                             const LossOptions&);                          \
  template double rq_loss_grad<T>(const T*, const T*, T*, const Shape&,    \
                                  const LossOptions&);                     \
  template double qr_loss_from_logits<T>(const T*, const T*, const Shape&, \
                                         const LossOptions&);              \
  template double qr_loss_grad_from_logits<T>(                             \
      const T*, const T*, T*, const Shape&, const LossOptions&);           \
  template double rq_loss_from_logits<T>(const T*, const T*, const Shape&, \
                                         const LossOptions&);              \
  template double rq_loss_grad_from_logits<T>(                             \
      const T*, const T*, T*, const Shape&, const LossOptions&);           \
  template double compute_loss<T>(LossKind, const T*, const T*, T*,        \
                                  const Shape&, const LossOptions&);       \
  template double compute_loss_from_logits<T>(                             \
      LossKind, const T*, const T*, T*, const Shape&, const LossOptions&);

QRLOSS_INSTANTIATE_(float)
QRLOSS_INSTANTIATE_(double)

#undef QRLOSS_INSTANTIATE_

}  // namespace qrloss
