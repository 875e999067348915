#pragma once
// Tile iteration, fixed-order lane sums and input-value checks for the tile
// loops. Part of the per-instruction-set code (see detail/kernels_body.hpp).

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "detail/isa.hpp"
#include "detail/passes.hpp"
#include "detail/vmath.hpp"

namespace qrloss::detail::QRLOSS_ISA {

/// Runs body(chunk, thread) for every chunk of the plan on `threads` OpenMP
/// threads. The body must not throw. It lives with the variant, like
/// for_each_tile, so that the OpenMP region is compiled for the same
/// instruction set as the pass body and inlines it. Baseline code cannot
/// inline an AVX body, so each chunk was a call of its own.
template <typename Body>
void run_chunks(const ChunkPlan& plan, int threads, Body&& body) {
  // Unused without OpenMP, where the pragma is ignored.
  [[maybe_unused]] const int team = static_cast<int>(
      std::min<Index>(static_cast<Index>(threads), plan.num_chunks));
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
  for (Index chunk = 0; chunk < plan.num_chunks; ++chunk) {
    body(chunk, thread_number());
  }
}

/// Calls tile(b, first_pixel, length) for the tiles covering global pixels
/// [begin, end), never crossing a batch item. It lives with the variant
/// so that the tile body can be inlined into it.
template <typename TileFn>
void for_each_tile(const Geometry& geometry, Index begin, Index end,
                   Index tile_length, TileFn&& tile) {
  Index n = begin;
  while (n < end) {
    const Index b = n / geometry.P;
    const Index pixel = n - b * geometry.P;
    const Index item_end = std::min(end, (b + 1) * geometry.P);
    const Index length = std::min(tile_length, item_end - n);
    tile(b, pixel, length);
    n += length;
  }
}

/// Integer flag of the element's width: folding flags with | is a
/// reduction the compiler vectorises without reassociating any
/// floating-point sum.
template <typename T>
using Flag = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;

/// Nonzero when v breaks the rule. NaN fails both comparisons.
template <typename T>
inline Flag<T> invalid_flag(T v, ValueRule rule) {
  constexpr T kMax = std::numeric_limits<T>::max();
  const T lowest = rule == ValueRule::kNonNegative ? T(0) : -kMax;
  return static_cast<Flag<T>>(!(v >= lowest)) |
         static_cast<Flag<T>>(!(v <= kMax));
}

/// Nonzero unless |v| <= max(T) / 4, so also for NaN. Below that bound a
/// sum or difference of two such values cannot overflow T, nor can the
/// softmax VJP of them (whose entries are at most half the largest |g|).
template <typename T>
inline Flag<T> beyond_quarter_range(T v) {
  constexpr T kBound = std::numeric_limits<T>::max() / 4;
  return static_cast<Flag<T>>(!(v >= -kBound)) |
         static_cast<Flag<T>>(!(v <= kBound));
}

/// Calls finish(i, s_i) for every pixel i < n, where s_i is the sum over
/// classes c < C of term(c, i) in double, added in class order from 0.0.
/// Pixels go in blocks whose sums stay in registers while the classes are
/// added. A loop per class that adds its row into an array of sums would
/// load and store every sum once per class. The additions are the same and
/// in the same order, so the sums are bitwise those of that loop.
template <typename Term, typename Finish>
inline void sum_over_classes(Index C, Index n, Term&& term, Finish&& finish) {
  constexpr Index kBlock = 16;
  Index i0 = 0;
  for (; i0 + kBlock <= n; i0 += kBlock) {
    double acc[kBlock] = {};
    for (Index c = 0; c < C; ++c) {
      QRLOSS_SIMD_LOOP
      for (Index j = 0; j < kBlock; ++j) acc[j] += term(c, i0 + j);
    }
    QRLOSS_SIMD_LOOP
    for (Index j = 0; j < kBlock; ++j) finish(i0 + j, acc[j]);
  }
  for (Index i = i0; i < n; ++i) {
    double total = 0.0;
    for (Index c = 0; c < C; ++c) total += term(c, i);
    finish(i, total);
  }
}

/// Adds x[0, n) into lanes[0, kLanes). The loop runs on a local copy of
/// the lanes because GCC keeps that in registers, while it loads and
/// stores lanes reached through the pointer on every step.
template <typename T>
inline void accumulate_lanes(const T* x, Index n, double* lanes) {
  double acc[kLanes];
  std::copy(lanes, lanes + kLanes, acc);
  Index i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(x[i + j]);
  }
  for (int j = 0; i + j < n; ++j) acc[j] += static_cast<double>(x[i + j]);
  std::copy(acc, acc + kLanes, lanes);
}

/// Combines kLanes lanes in a fixed pairwise order.
inline double reduce_lanes(const double* lanes) {
  double tree[kLanes];
  std::copy(lanes, lanes + kLanes, tree);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) tree[j] += tree[j + width];
  }
  return tree[0];
}

/// Sums of one chunk: `width` sums of kLanes lanes each, kept in the
/// thread's scratch across the tiles of the chunk and reduced once at the
/// end, so a short tile row costs no reduction of its own.
class ChunkSums {
 public:
  /// `lanes` points to width * kLanes doubles; `out` receives the width sums.
  ChunkSums(double* lanes, Index width, double* out)
      : lanes_(lanes), width_(width), out_(out) {
    std::fill(lanes_, lanes_ + width_ * kLanes, 0.0);
  }
  template <typename T>
  void add(Index k, const T* x, Index n) {
    accumulate_lanes(x, n, lanes_ + k * kLanes);
  }
  /// Adds the products x[i] * y[i], formed in double, to sum k. For float
  /// they are exact and cannot overflow.
  template <typename T>
  void add_products(Index k, const T* x, const T* y, Index n) {
    add_each<T>(k, n, [&](Index i, Flag<T>&) {
      return static_cast<double>(x[i]) * static_cast<double>(y[i]);
    });
  }
  /// Adds a long row of the caller's memory, such as a class row of a
  /// chunk, to sum k as add() does, and prefetches the row
  /// kStreamAheadBytes ahead into L1. Given a rule, it also returns whether
  /// every x[i] satisfies it, so the row is read once for both.
  template <typename T>
  bool add_streamed(Index k, const T* x, Index n, const ValueRule* rule) {
    return add_each<T>(
               k, n,
               [&](Index i, Flag<T>& bad) {
                 if (rule != nullptr) bad |= invalid_flag(x[i], *rule);
                 return x[i];
               },
               x) == 0;
  }
  /// Adds step(i, flag) to sum k for every i < n, in the lane order of
  /// add(), and returns the | of the flags that step sets. A step may also
  /// write results of its own element, so that one loop does what would
  /// otherwise take several passes over the same rows. Given `stream`, the
  /// row that the steps read, it prefetches that row ahead.
  template <typename T, typename Step>
  Flag<T> add_each(Index k, Index n, Step&& step, const T* stream = nullptr) {
    double* lanes = lanes_ + k * kLanes;
    double acc[kLanes];
    std::copy(lanes, lanes + kLanes, acc);
    Flag<T> bad[kLanes] = {};
    Index i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      if (stream != nullptr) prefetch_stream<T, kLanes>(stream + i);
      for (int j = 0; j < kLanes; ++j) {
        acc[j] += static_cast<double>(step(i + j, bad[j]));
      }
    }
    for (int j = 0; i + j < n; ++j) {
      acc[j] += static_cast<double>(step(i + j, bad[j]));
    }
    std::copy(acc, acc + kLanes, lanes);
    Flag<T> any = 0;
    for (int j = 0; j < kLanes; ++j) any |= bad[j];
    return any;
  }
  void finish() {
    for (Index k = 0; k < width_; ++k) out_[k] = reduce_lanes(lanes_ + k * kLanes);
  }

 private:
  double* lanes_;
  Index width_;
  double* out_;
};

/// True when every value of x[0, n) satisfies the rule.
template <typename T>
inline bool all_valid(const T* x, Index n, ValueRule rule) {
  Flag<T> bad = 0;
  for (Index i = 0; i < n; ++i) bad |= invalid_flag(x[i], rule);
  return bad == 0;
}

/// Index of the first value of x[0, n) that breaks the rule, or -1.
template <typename T>
inline Index first_invalid(const T* x, Index n, ValueRule rule) {
  for (Index i = 0; i < n; ++i) {
    const T v = x[i];
    const bool ok = rule == ValueRule::kNonNegative
                        ? (v >= T(0) && std::isfinite(v))
                        : std::isfinite(v);
    if (!ok) return i;
  }
  return -1;
}

/// Logs the first element of a row that breaks the rule, if any; for rows
/// that a fused loop has already flagged.
template <typename T>
inline void log_first_invalid(const T* row, Index length, ValueRule rule,
                              Index row_offset, Index chunk,
                              BadIndexLog& log) {
  const Index i = first_invalid(row, length, rule);
  if (i >= 0) log.record(chunk, row_offset + i);
}

/// Checks one class row of a tile and logs the first bad element.
template <typename T>
inline void scan_row(const T* row, Index length, ValueRule rule,
                     Index row_offset, Index chunk, BadIndexLog& log) {
  if (all_valid(row, length, rule)) return;
  log_first_invalid(row, length, rule, row_offset, chunk, log);
}

}  // namespace qrloss::detail::QRLOSS_ISA
