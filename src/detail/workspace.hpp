#pragma once
// Per-thread scratch for the tile kernels, allocated before the parallel
// region so that no allocation (and no exception) happens inside it.

#include <Eigen/Core>
#include <vector>

#include "detail/passes.hpp"

namespace qrloss::detail {

/// Buffer aligned to EIGEN_MAX_ALIGN_BYTES. Eigen evaluates the first
/// elements of an unaligned destination with scalar code, so writing
/// transcendental results only into aligned scratch keeps every value
/// independent of where the caller's buffers happen to live.
template <typename T>
using AlignedVector = std::vector<T, Eigen::aligned_allocator<T>>;

/// Scratch of one thread. Class rows of a tile start at multiples of the
/// tile length, which is a multiple of 16 elements, so they stay aligned.
template <typename T>
struct Workspace {
  AlignedVector<T> q;        // C x L: softmax of a logits tile
  AlignedVector<T> grad;     // C x L: dL/dq of a tile before the softmax VJP
  AlignedVector<T> a;        // C x L: RQ's dL/dr (or log k when eps = 0)
  AlignedVector<T> r;        // C x L: RQ's r
  AlignedVector<T> w;        // C x L: RQ's p / (s_c t), kept when eps = 0
  AlignedVector<T> q_share;  // C x L: RQ 1 / (q + eps), then q / (q + eps)
  AlignedVector<T> tmp1;     // L
  AlignedVector<T> tmp2;     // L
  AlignedVector<T> pixel;    // L: per-pixel value in T (max logit, 1 / t)
  AlignedVector<T> pixel_inverse;  // L: 1 / (per-pixel value)
  AlignedVector<double> sum;       // L: per-pixel sums in double
  AlignedVector<double> abar;      // L
  AlignedVector<double> loss_sum;  // L: RQ's per-pixel loss terms
  AlignedVector<double> lanes;     // (C + 1) x kLanes: ChunkSums scratch
};

/// Flags for the optional scratch arrays a kernel needs.
struct WorkspaceNeeds {
  bool softmax = false;
  bool grad_tile = false;
  bool rq_rows = false;
};

template <typename T>
std::vector<Workspace<T>> make_workspaces(int threads, Index C, Index L,
                                          WorkspaceNeeds needs) {
  std::vector<Workspace<T>> spaces(static_cast<std::size_t>(threads));
  const auto rows = static_cast<std::size_t>(C * L);
  const auto line = static_cast<std::size_t>(L);
  for (Workspace<T>& space : spaces) {
    if (needs.softmax) space.q.resize(rows);
    if (needs.grad_tile) space.grad.resize(rows);
    if (needs.rq_rows) {
      space.a.resize(rows);
      space.r.resize(rows);
      space.w.resize(rows);
      space.q_share.resize(rows);
    }
    space.tmp1.resize(line);
    space.tmp2.resize(line);
    space.pixel.resize(line);
    space.pixel_inverse.resize(line);
    space.sum.resize(line);
    space.abar.resize(line);
    if (needs.rq_rows) space.loss_sum.resize(line);
    space.lanes.resize(static_cast<std::size_t>((C + 1) * kLanes));
  }
  return spaces;
}

}  // namespace qrloss::detail
