#pragma once
/// QR and RQ losses (Rolf et al., "Resolving label uncertainty with implicit
/// generative models", ICLR 2022) and their exact gradients.
///
/// Notation: q = probs, p = target (the per-pixel prior), x = logits,
/// N = number of pixels over (b, h, w). Tensors are row-major (B, C, H, W)
/// with W fastest, or (B, C), which is treated as (B, C, 1, 1). Every sum is
/// accumulated in double, also for float inputs. Results are bitwise
/// identical for any thread count: pixels are split into chunks whose
/// boundaries depend only on the shape, and per-chunk partial sums are added
/// in chunk order.
///
/// Shared rules of every function below:
/// - eps must be 0 or in [1e-20, 1e20] (default 1e-8). 0 * log(0) counts
///   as 0.
/// - probs and target must be finite and >= 0; logits must be finite. Rows of
///   target need not sum to 1 (they are used as given; see
///   validate_target).
/// - Every pointer must address at least as many elements as `shape`
///   holds. A raw pointer carries no size, so a shape larger than the
///   buffers reads and writes past their ends. The TensorMap overloads
///   below take the shape from the views instead.
/// - The gradient buffer must have the same shape, must not overlap probs,
///   logits or target, and needs no particular alignment. It is fully
///   written on success; after an exception its contents are unspecified.
/// - At an entry of probs that is exactly 0 the gradient is the one-sided
///   derivative from q >= 0. Below a clamp (RQ's class sum s_c < eps, or a
///   pixel's sum < 1e-12) the clamped value has derivative 0.
/// @throws qrloss::invalid_argument (derived from std::invalid_argument) on
///   null data, rank other than 2 or 4, a zero or negative extent, an
///   element count that overflows, shape mismatch, bad eps or overlapping
///   buffers. It is also thrown for non-finite or negative input values,
///   and then the message names the tensor and the first bad index (the
///   input's before the target's, wherever they lie in memory). It is
///   thrown for probs so large that a result would overflow, too. That
///   means a class total over the batch beyond float64, a QR batch total
///   above 1e300, or an RQ class total in double above about 4.5e307,
///   where 1 / s_c would be subnormal. RQ in double also throws for a
///   target so large that a pixel's sum of q p / s_c overflows. Float RQ
///   redoes such calls in double instead (see rq_loss).
/// Derivations and the pass structure: docs/derivations.md.

#include <cstdint>
#include <string>
#include <type_traits>

#include "qrloss/tensor.hpp"

namespace qrloss {

/// Default eps added inside every log, as in the reference implementation.
inline constexpr double kDefaultEps = 1e-8;

/// Smallest and largest eps > 0 accepted. Outside this range float cannot
/// hold eps (it would round to 0 or inf), and RQ's weight p / (s_c t) can
/// overflow even in double: with s_c = eps and the pixel sum t clamped at
/// 1e-12, 1 / (s_c t) is 1e32 at eps = 1e-20, leaving float a factor of
/// 1e6 of headroom for p.
inline constexpr double kMinPositiveEps = 1e-20;
inline constexpr double kMaxEps = 1e20;

/// Threshold below which RQ's per-pixel sum sum_c q*p/s_c is clamped.
inline constexpr double kPixelSumFloor = 1e-12;

/// Instruction set of the loss kernels that run in this process: "baseline"
/// (x86-64 SSE2), "avx2" or "avx512". The default build compiles all three
/// and picks the best the CPU supports at the first call. The environment
/// variable QRLOSS_ISA=baseline|avx2|avx512, read once at that call, sets
/// a maximum for that choice, for comparisons; a set the CPU lacks is never
/// used. Results can differ in the last bits between instruction
/// sets (their vector log and exp differ), never between thread counts.
/// @throws qrloss::invalid_argument if QRLOSS_ISA is set to another value.
const char* kernel_isa();

/// Settings shared by all loss entry points.
struct LossOptions {
  /// Added inside every log; must be 0 or in [kMinPositiveEps, kMaxEps].
  /// Per-element sums such as p + eps are formed in the input type, so in
  /// float an eps below the resolution of p has no effect there (QR of
  /// q = p = (0.5, 0.5) over two classes is about 2e-8 in float and 0 in
  /// double).
  double eps = kDefaultEps;
  /// Reject NaN, infinite and negative input values with an error naming the
  /// first bad index. When false, such values give unspecified results.
  bool check_finite = true;
  /// OpenMP threads for this call; 0 uses omp_get_max_threads().
  int num_threads = 0;
};

/// The two losses.
enum class LossKind { kQR, kRQ };

/// Returns "qr" or "rq", or "invalid" for a value outside the enum.
const char* loss_name(LossKind kind);

// ---------------------------------------------------------------------------
// Pointer interface: the data of a row-major tensor and its shape.
// ---------------------------------------------------------------------------

/// Computes the QR loss.
///   qbar_c = (1/N) sum_pixels q_c
///   L = sum_c qbar_c * log(qbar_c + eps)
///       - (1/N) sum_pixels sum_c q_c * log(p_c + eps)          [eq. 1]
/// Shapes: probs and target both `shape`. Cost: one pass over both.
template <typename T>
double qr_loss(const T* probs, const T* target, const Shape& shape,
               const LossOptions& options = {});

/// Computes the QR loss and writes dL/dq into dL_dq.
///   dL/dq_c = (1/N) * (log(qbar_c + eps) + qbar_c / (qbar_c + eps)
///                      - log(p_c + eps))                        [eq. 2]
/// With eps = 0, a class with qbar_c = 0 gets -inf, and an entry with
/// p = 0 gets +inf (the loss is +inf for any q > 0 there).
/// Cost: a pass over probs for the class means, then a pass that reads
/// probs and target and writes dL_dq.
template <typename T>
double qr_loss_grad(const T* probs, const T* target, T* dL_dq,
                    const Shape& shape, const LossOptions& options = {});

/// Computes the RQ loss.
///   s_c = max(sum_pixels q_c, eps)
///   r_c = (q_c p_c / s_c) / max(sum_k q_k p_k / s_k, 1e-12)   per pixel
///   L = (1/N) sum_pixels sum_c r_c * (log(r_c + eps) - log(q_c + eps))
///                                                               [eq. 3]
/// With eps = 0 every class must have a positive sum over the batch, since
/// z = q / s_c would be 0/0; an error is thrown otherwise.
/// Where float cannot hold an intermediate, a float call is redone in
/// double, on double copies of the tensors, and the results are rounded
/// to float. That covers 1 / s_c beyond float's normal range (a class
/// total below about 2.9e-39 with eps = 0, or above about 8.5e37), a
/// pixel sum of q p / s_c beyond float's range, and, with eps = 0, the
/// ratio r / q whose log the loss takes (r / q overflows where q is
/// subnormal). From logits with eps = 0 it also covers a class whose float
/// softmax underflows to 0 at every pixel. In double these cases throw:
/// below about 5.6e-309, above about 4.5e307, for a pixel sum beyond
/// double's range, for an infinite loss, and for a class total of 0.
template <typename T>
double rq_loss(const T* probs, const T* target, const Shape& shape,
               const LossOptions& options = {});

/// Computes the RQ loss and writes dL/dq into dL_dq.
///   a_c = log(r_c + eps) - log(q_c + eps) + r_c / (r_c + eps)
///   abar = sum_c a_c r_c            (0 where the pixel sum is clamped)
///   w_c = p_c / (s_c t),  t = the clamped pixel sum
///   G_c = (1/N) sum_pixels r_c (a_c - abar)
///   dL/dq_c = (1/N) w_c (a_c - abar - q_c / (q_c + eps)) - G_c / s_c
///             (the last term is 0 when s_c is clamped)          [eq. 4]
/// Cost: a pass over probs for s_c, a pass over probs and target that
/// writes the per-pixel part of the gradient, and a pass over dL_dq.
/// w_c can overflow T (a tiny s_c with eps = 0, or a huge target with a
/// tiny eps). Where float arithmetic overflows although the results fit,
/// a float call is redone in double, as for rq_loss, at the cost of three
/// double copies of the tensors. An entry of dL/dq beyond T's range
/// throws.
template <typename T>
double rq_loss_grad(const T* probs, const T* target, T* dL_dq,
                    const Shape& shape, const LossOptions& options = {});

/// Computes the QR loss of softmax(logits) over C without a probs buffer.
template <typename T>
double qr_loss_from_logits(const T* logits, const T* target, const Shape& shape,
                           const LossOptions& options = {});

/// Computes the QR loss of q = softmax(logits) and writes dL/dx into dL_dx.
///   dL/dx_c = q_c * (g_c - sum_k g_k q_k),  g = dL/dq of eq. 2  [eq. 7]
/// The first pass computes the softmax and keeps q in dL_dx, where the
/// second pass reads it back; no probs buffer is needed. Each
/// *_from_logits function gives what softmax, the probs function and
/// softmax_vjp give in turn, up to rounding: the tests allow 1e-12
/// relative in the loss and 64 units of T's rounding of max |dL/dx| in
/// the gradient, and about 6 units were seen.
/// With eps = 0 and a zero in target the loss is +inf for every x, so the
/// gradient is undefined and an invalid_argument ("infinite loss") is
/// thrown; qr_loss_from_logits still returns the +inf loss.
template <typename T>
double qr_loss_grad_from_logits(const T* logits, const T* target, T* dL_dx,
                                const Shape& shape,
                                const LossOptions& options = {});

/// Computes the RQ loss of softmax(logits) over C without a probs buffer.
template <typename T>
double rq_loss_from_logits(const T* logits, const T* target, const Shape& shape,
                           const LossOptions& options = {});

/// Computes the RQ loss of q = softmax(logits) and writes dL/dx into dL_dx
/// (eq. 4 chained through eq. 7).
template <typename T>
double rq_loss_grad_from_logits(const T* logits, const T* target, T* dL_dx,
                                const Shape& shape,
                                const LossOptions& options = {});

/// Computes either loss from probs; writes dL/dq when dL_dq is not null
/// (a literal nullptr works: T is deduced from probs and target).
/// Errors are those of the function it stands for, named compute_loss; a
/// `kind` outside the enum throws qrloss::invalid_argument.
template <typename T>
double compute_loss(LossKind kind, const T* probs, const T* target,
                    detail::NonDeduced<T>* dL_dq, const Shape& shape,
                    const LossOptions& options = {});

/// Computes either loss from logits; writes dL/dx when dL_dx is not null,
/// with the errors of compute_loss.
template <typename T>
double compute_loss_from_logits(LossKind kind, const T* logits, const T* target,
                                detail::NonDeduced<T>* dL_dx,
                                const Shape& shape,
                                const LossOptions& options = {});

// ---------------------------------------------------------------------------
// Eigen::TensorMap interface: the same functions over rank-2 or rank-4
// row-major TensorMaps (for example ConstTensorView<float, 4>). The input is
// probs or logits, as the function's name states. The gradient map is taken
// by value, so a temporary view of a buffer works too. It must be a
// writable TensorMap, because an Eigen::Tensor would be copied and the
// gradient lost (GradMapCheck stops such a call at compile time).
// ---------------------------------------------------------------------------

namespace detail {
/// Throws unless `actual` equals `expected`; names the function and tensor.
void check_same_shape(const char* function, const char* tensor,
                      const Shape& expected, const Shape& actual);
}  // namespace detail

#define QRLOSS_TENSOR_MAP_OVERLOADS_(loss, loss_grad)                          \
  template <typename InputMap, typename TargetMap,                             \
            typename = std::enable_if_t<                                       \
                detail::is_tensor_map<InputMap>::value &&                      \
                detail::is_tensor_map<TargetMap>::value>>                      \
  double loss(const InputMap& input, const TargetMap& target,                  \
              const LossOptions& options = {}) {                               \
    if constexpr (detail::LossMapCheck<InputMap, TargetMap>::value) {          \
      detail::check_same_shape(#loss, "target", detail::shape_of(input),       \
                               detail::shape_of(target));                      \
      return loss(input.data(), target.data(), detail::shape_of(input),        \
                  options);                                                    \
    } else {                                                                   \
      return 0.0; /* LossMapCheck failed: compilation stops */                 \
    }                                                                          \
  }                                                                            \
  template <typename InputMap, typename TargetMap, typename GradMap,           \
            typename = std::enable_if_t<                                       \
                detail::is_tensor_map<InputMap>::value &&                      \
                detail::is_tensor_map<TargetMap>::value &&                     \
                detail::is_tensor_map<GradMap>::value>>                        \
  double loss_grad(const InputMap& input, const TargetMap& target,             \
                   GradMap grad, const LossOptions& options = {}) {            \
    if constexpr (detail::LossMapCheck<InputMap, TargetMap,                    \
                                       GradMap>::value &&                      \
                  detail::GradMapCheck<GradMap>::value) {                      \
      detail::check_same_shape(#loss_grad, "target",                           \
                               detail::shape_of(input),                        \
                               detail::shape_of(target));                      \
      detail::check_same_shape(#loss_grad, "gradient",                         \
                               detail::shape_of(input),                        \
                               detail::shape_of(grad));                        \
      return loss_grad(input.data(), target.data(), grad.data(),               \
                       detail::shape_of(input), options);                      \
    } else {                                                                   \
      return 0.0; /* LossMapCheck failed: compilation stops */                 \
    }                                                                          \
  }

QRLOSS_TENSOR_MAP_OVERLOADS_(qr_loss, qr_loss_grad)
QRLOSS_TENSOR_MAP_OVERLOADS_(rq_loss, rq_loss_grad)
QRLOSS_TENSOR_MAP_OVERLOADS_(qr_loss_from_logits, qr_loss_grad_from_logits)
QRLOSS_TENSOR_MAP_OVERLOADS_(rq_loss_from_logits, rq_loss_grad_from_logits)

#undef QRLOSS_TENSOR_MAP_OVERLOADS_

}  // namespace qrloss
