// Softmax over the class axis, its vector-Jacobian product and the
// explicit Jacobian of one pixel.

#include "qrloss/softmax.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "detail/kernels.hpp"
#include "detail/passes.hpp"
#include "qrloss/error.hpp"

namespace qrloss {
namespace detail {
namespace {

void check_threads(const char* function, int num_threads) {
  if (num_threads >= 0) return;
  throw invalid_argument(std::string(function) +
                         ": bad num_threads: expected >= 0, got " +
                         std::to_string(num_threads));
}

}  // namespace
}  // namespace detail

template <typename T>
void softmax(const T* logits, T* probs, const Shape& shape, int num_threads) {
  using namespace detail;
  const char* function = "softmax";
  const Geometry geometry = make_geometry(function, "logits", shape, sizeof(T));
  check_not_null(function, "logits", logits);
  check_not_null(function, "probs", probs);
  check_threads(function, num_threads);
  check_no_overlap(function, "probs", probs, "logits", logits, shape,
                   sizeof(T));
  run_softmax(function, logits, probs, geometry, shape,
              resolve_threads(num_threads));
}

template <typename T>
void softmax_vjp(const T* probs, const T* dL_dq, T* dL_dx, const Shape& shape,
                 int num_threads) {
  using namespace detail;
  const char* function = "softmax_vjp";
  const Geometry geometry = make_geometry(function, "probs", shape, sizeof(T));
  check_not_null(function, "probs", probs);
  check_not_null(function, "dL_dq", dL_dq);
  check_not_null(function, "dL_dx", dL_dx);
  check_threads(function, num_threads);
  check_no_overlap(function, "dL_dx", dL_dx, "probs", probs, shape,
                   sizeof(T));
  if (dL_dx != dL_dq) {
    check_no_overlap(function, "dL_dx", dL_dx, "dL_dq", dL_dq, shape,
                     sizeof(T));
  }
  run_softmax_vjp(function, probs, dL_dq, dL_dx, geometry, shape,
                  resolve_threads(num_threads));
}

template <typename T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> softmax_jacobian(
    const Eigen::Matrix<T, Eigen::Dynamic, 1>& logits) {
  const char* function = "softmax_jacobian";
  const Eigen::Index C = logits.size();
  if (C == 0) {
    throw invalid_argument(std::string(function) +
                           ": empty tensor: logits has 0 classes, expected "
                           ">= 1");
  }
  for (Eigen::Index c = 0; c < C; ++c) {
    if (!std::isfinite(logits[c])) {
      throw invalid_argument(std::string(function) +
                             ": non-finite input: logits is " +
                             std::to_string(static_cast<double>(logits[c])) +
                             " at (c=" + std::to_string(c) + ")");
    }
  }
  Eigen::Matrix<T, Eigen::Dynamic, 1> q(C);
  // A plain loop: Eigen's maxCoeff makes GCC 12 warn of an uninitialised
  // value inside the AVX-512 max intrinsic (a false positive).
  T max_logit = logits[0];
  for (Eigen::Index c = 1; c < C; ++c) {
    max_logit = std::max(max_logit, logits[c]);
  }
  double sum = 0.0;
  for (Eigen::Index c = 0; c < C; ++c) {
    q[c] = std::exp(logits[c] - max_logit);
    sum += static_cast<double>(q[c]);
  }
  q /= static_cast<T>(sum);
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> jacobian =
      -q * q.transpose();
  jacobian.diagonal() += q;
  return jacobian;
}

template void softmax<float>(const float*, float*, const Shape&, int);
template void softmax<double>(const double*, double*, const Shape&, int);
template void softmax_vjp<float>(const float*, const float*, float*,
                                 const Shape&, int);
template void softmax_vjp<double>(const double*, const double*, double*,
                                  const Shape&, int);
template Eigen::MatrixXf softmax_jacobian<float>(const Eigen::VectorXf&);
template Eigen::MatrixXd softmax_jacobian<double>(const Eigen::VectorXd&);

}  // namespace qrloss
