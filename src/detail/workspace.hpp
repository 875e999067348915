#pragma once
// Per-thread scratch for the tile kernels, allocated before the parallel
// region so that no allocation (and no exception) happens inside it.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "detail/passes.hpp"

namespace qrloss::detail {

/// One scratch array of a thread: a pointer into the call's block.
template <typename U>
struct Scratch {
  U* pointer = nullptr;
  U* data() const { return pointer; }
};

/// Scratch of one thread. Every array starts on a 64-byte boundary, and
/// class rows of a tile start at multiples of the tile length, which is a
/// multiple of 16 elements, so vector loads and stores of scratch rows do
/// not split cache lines.
template <typename T>
struct Workspace {
  Scratch<T> q;        // C x L: softmax of a logits tile
  Scratch<T> grad;     // C x L: dL/dq of a tile before the softmax VJP
  Scratch<T> a;        // C x L: RQ's dL/dr (or log k when eps = 0)
  Scratch<T> r;        // C x L: RQ's r
  Scratch<T> w;        // C x L: RQ's p / (s_c t), kept when eps = 0
  Scratch<T> q_share;  // C x L: RQ 1 / (q + eps), then q / (q + eps)
  Scratch<T> tmp1;     // L
  Scratch<T> tmp2;     // L
  Scratch<T> pixel;    // L: per-pixel value in T (max logit, 1 / t)
  Scratch<T> pixel_inverse;  // L: 1 / (per-pixel value)
  Scratch<double> sum;       // L: per-pixel sums in double
  Scratch<double> abar;      // L
  Scratch<double> loss_sum;  // L: RQ's per-pixel loss terms
  Scratch<double> lanes;     // (C + 1) x kLanes: ChunkSums scratch
};

/// Flags for the optional scratch arrays a kernel needs.
struct WorkspaceNeeds {
  bool softmax = false;
  bool grad_tile = false;
  bool rq_rows = false;
};

/// The scratch of every thread of a call, carved from one allocation and
/// left uninitialised, because each kernel writes an array before it reads
/// it. One zero-filled vector per array wrote up to 1.5 MB per thread and
/// call at C = 1000. With glibc, one freed block stays mapped for the next
/// call (see RepackBuffers), where many separate blocks did not.
template <typename T>
class Workspaces {
 public:
  Workspaces(int threads, Index C, Index L, WorkspaceNeeds needs)
      : spaces_(static_cast<std::size_t>(threads)) {
    // Two rounds over the same layout: the first sizes the block, the
    // second hands out the pointers.
    const std::size_t bytes = layout(C, L, needs, nullptr);
    block_.reset(new unsigned char[bytes + kAlign]);
    const auto start = reinterpret_cast<std::uintptr_t>(block_.get());
    const std::uintptr_t aligned = (start + kAlign - 1) / kAlign * kAlign;
    layout(C, L, needs, reinterpret_cast<unsigned char*>(aligned));
  }
  Workspace<T>& operator[](std::size_t thread) { return spaces_[thread]; }

 private:
  static constexpr std::size_t kAlign = 64;

  /// Lays out the arrays of every thread from `base` and returns the bytes
  /// used. With a null base it only counts them.
  std::size_t layout(Index C, Index L, WorkspaceNeeds needs,
                     unsigned char* base) {
    std::size_t used = 0;
    const auto take = [&](auto& array, Index count, bool wanted) {
      using U = std::remove_pointer_t<decltype(array.pointer)>;
      if (!wanted) return;
      if (base != nullptr) array.pointer = reinterpret_cast<U*>(base + used);
      const std::size_t size = static_cast<std::size_t>(count) * sizeof(U);
      used += (size + kAlign - 1) / kAlign * kAlign;
    };
    const Index rows = C * L;
    for (Workspace<T>& space : spaces_) {
      take(space.q, rows, needs.softmax);
      take(space.grad, rows, needs.grad_tile);
      take(space.a, rows, needs.rq_rows);
      take(space.r, rows, needs.rq_rows);
      take(space.w, rows, needs.rq_rows);
      take(space.q_share, rows, needs.rq_rows);
      take(space.tmp1, L, true);
      take(space.tmp2, L, true);
      take(space.pixel, L, true);
      take(space.pixel_inverse, L, true);
      take(space.sum, L, true);
      take(space.abar, L, true);
      take(space.loss_sum, L, needs.rq_rows);
      take(space.lanes, (C + 1) * kLanes, true);
    }
    return used;
  }

  std::vector<Workspace<T>> spaces_;
  std::unique_ptr<unsigned char[]> block_;
};

}  // namespace qrloss::detail
