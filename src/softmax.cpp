// Softmax over the class axis, its vector-Jacobian product and the
// explicit Jacobian of one pixel.

#include "qrloss/softmax.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "detail/lanes.hpp"
#include "detail/passes.hpp"
#include "detail/softmax_tile.hpp"
#include "detail/workspace.hpp"
#include "qrloss/error.hpp"

// NOTE: softmax and softmax_vjp always run the baseline variant; only the
// loss kernels have AVX2 and AVX-512 variants (detail/kernels.hpp).

namespace qrloss {
namespace detail {
namespace {

/// Runs tile_fn(b, p0, n, space) over every tile of the tensor in
/// parallel. Per-pixel work only, so any schedule gives the same bits.
template <typename T, typename TileFn>
void for_each_pixel_tile(const Geometry& geometry, int threads,
                         WorkspaceNeeds needs, TileFn&& tile_fn) {
  const ChunkPlan plan = plan_chunks(geometry.num_pixels());
  const Index L = tile_pixels(geometry.C);
  const int team = static_cast<int>(std::min<Index>(threads, plan.num_chunks));
  std::vector<Workspace<T>> spaces =
      make_workspaces<T>(team, geometry.C, L, needs);
  QRLOSS_ISA::run_chunks(plan, team, [&](Index chunk, int thread) {
    const Index begin = chunk * plan.chunk_pixels;
    const Index end =
        std::min(begin + plan.chunk_pixels, geometry.num_pixels());
    QRLOSS_ISA::for_each_tile(geometry, begin, end, L, [&](Index b, Index p0, Index n) {
      tile_fn(b, p0, n, L, spaces[static_cast<std::size_t>(thread)]);
    });
  });
}

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
  const auto bytes =
      static_cast<std::size_t>(geometry.num_elements()) * sizeof(T);
  check_no_overlap(function, "probs", probs, "logits", logits, bytes);
  const int threads = resolve_threads(num_threads);
  check_values(function, "logits", logits, geometry, shape, ValueRule::kFinite,
               threads);
  WorkspaceNeeds needs;
  needs.softmax = true;
  for_each_pixel_tile<T>(
      geometry, threads, needs,
      [&](Index b, Index p0, Index n, Index L, Workspace<T>& space) {
        const Index offset = geometry.offset(b, 0, p0);
        QRLOSS_ISA::softmax_tile(logits + offset, geometry.P, geometry.C, n, space.q.data(),
                     L, space.pixel.data(), space.sum.data());
        for (Index c = 0; c < geometry.C; ++c) {
          std::copy(space.q.data() + c * L, space.q.data() + c * L + n,
                    probs + offset + c * geometry.P);
        }
      });
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
  const auto bytes =
      static_cast<std::size_t>(geometry.num_elements()) * sizeof(T);
  check_no_overlap(function, "dL_dx", dL_dx, "probs", probs, bytes);
  if (dL_dx != dL_dq) {
    check_no_overlap(function, "dL_dx", dL_dx, "dL_dq", dL_dq, bytes);
  }
  const int threads = resolve_threads(num_threads);
  check_values(function, "probs", probs, geometry, shape,
               ValueRule::kNonNegative, threads);
  check_values(function, "dL_dq", dL_dq, geometry, shape, ValueRule::kFinite,
               threads);
  for_each_pixel_tile<T>(
      geometry, threads, WorkspaceNeeds{},
      [&](Index b, Index p0, Index n, Index, Workspace<T>& space) {
        const Index offset = geometry.offset(b, 0, p0);
        QRLOSS_ISA::softmax_vjp_tile(probs + offset, geometry.P, dL_dq + offset, geometry.P,
                         dL_dx + offset, geometry.P, geometry.C, n,
                         space.sum.data(), space.pixel.data());
      });
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
  const T max_logit = logits.maxCoeff();
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
