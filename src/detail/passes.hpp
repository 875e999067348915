#pragma once
// Building blocks of every pixel pass: argument checks, the deterministic
// chunk plan, tiles of pixels, lane sums and input scans.

// The NaN and infinity checks, the eps handling and the fixed-order sums
// need IEEE arithmetic. GCC 12 defines these macros for -ffast-math,
// -Ofast, -ffinite-math-only, -funsafe-math-optimizations,
// -fassociative-math and -freciprocal-math. Clang 14 defines only the
// first two, for -ffast-math, -Ofast and -ffinite-math-only, so
// meson.build also rejects the other flags by name. A -Ofast build passed
// NaN inputs through and printed a loss of 0.
#if defined(__FAST_MATH__) || \
    (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__) || \
    defined(__ASSOCIATIVE_MATH__) || defined(__RECIPROCAL_MATH__)
#error "qrloss needs IEEE floating-point semantics: build it without -ffast-math, -Ofast, -ffinite-math-only or other unsafe-math flags"
#endif

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/openmp.hpp"
#include "qrloss/error.hpp"
#include "qrloss/tensor.hpp"

namespace qrloss::detail {

using Index = std::int64_t;

template <typename T>
using ArrayX = Eigen::Array<T, Eigen::Dynamic, 1>;
template <typename T>
using ArrayMap = Eigen::Map<ArrayX<T>>;
template <typename T>
using ConstArrayMap = Eigen::Map<const ArrayX<T>>;

/// Memory order of the class axis. Only channels-first (B, C, H, W) exists
/// today; a channels-last layout changes Geometry::offset and the tile
/// loads, not the passes.
enum class Layout { kChannelsFirst };

/// Extents of one call: B items, C classes, P = H*W pixels per item.
struct Geometry {
  Index B = 0;
  Index C = 0;
  Index P = 0;
  int rank = 4;
  Layout layout = Layout::kChannelsFirst;

  Index num_pixels() const { return B * P; }
  Index num_elements() const { return B * C * P; }
  /// Flat element index of (b, c, pixel).
  Index offset(Index b, Index c, Index pixel) const {
    return (b * C + c) * P + pixel;
  }
  /// Formats a flat element index as (b=..,c=..,h=..,w=..).
  std::string position(Index flat, const Shape& shape) const;
};

/// Validates a shape and returns its geometry. The element count and byte
/// count are checked against int64 and size_t overflow before anything is
/// allocated.
Geometry make_geometry(const char* function, const char* tensor,
                       const Shape& shape, std::size_t element_size);

/// Throws unless eps is 0 or lies in [kMinPositiveEps, kMaxEps].
void check_eps(const char* function, double eps);

/// Throws if `data` is null.
void check_not_null(const char* function, const char* tensor, const void* data);

/// Throws if `output` and `input`, each taken as the element count of a
/// validated `shape`, overlap.
void check_no_overlap(const char* function, const char* output_name,
                      const void* output, const char* input_name,
                      const void* input, const Shape& shape,
                      std::size_t element_size);

/// Throws the error for RQ with eps = 0 where class c's total probability
/// is so small that 1 / s_c overflows `dtype` (float64: a float call is
/// redone in double instead), or negative, which unchecked probs can give.
[[noreturn]] void throw_tiny_class_total(const char* function, Index c,
                                         double total, const char* dtype,
                                         bool inputs_checked);

/// Name of the element type T in messages.
template <typename T>
constexpr const char* type_name() {
  return sizeof(T) == 4 ? "float32" : "float64";
}

/// End of an error message that a bad input value can explain, when
/// check_finite is false. The throw_* functions here that take
/// inputs_checked append it when that is false.
inline constexpr char kUncheckedInputsHint[] =
    "check_finite = false lets NaN, infinite and negative inputs through, "
    "which can cause this";

/// Returns "; " followed by kUncheckedInputsHint when inputs_checked is
/// false, else an empty string.
inline std::string unchecked_hint(bool inputs_checked) {
  return inputs_checked ? std::string()
                        : std::string("; ") + kUncheckedInputsHint;
}

/// Throws unless every class total S_c is finite (float64 probs near the
/// largest double can overflow it) and their sum is at most max_total.
/// Without inputs_checked (check_finite = false) the message states that
/// unchecked inputs can be the cause. probs_name is the tensor whose class
/// totals these are: "probs", or "softmax(logits)" from logits.
void check_class_totals(const char* function, const char* probs_name,
                        const std::vector<double>& sum_q, double max_total,
                        bool inputs_checked);

/// Throws the error for RQ where class c's total probability is so large
/// that 1 / s_c lies below the normal range of `dtype` (float64, as for
/// throw_tiny_class_total).
[[noreturn]] void throw_large_class_total(const char* function, Index c,
                                          double total, const char* dtype,
                                          bool inputs_checked);

/// Throws the error for RQ where a pixel's sum over classes of q p / s_c
/// overflows `dtype` (float64, as for throw_tiny_class_total).
[[noreturn]] void throw_pixel_sum_overflow(const char* function,
                                           const char* dtype,
                                           bool inputs_checked);

/// Throws the error for an RQ loss that overflows `dtype` with eps = 0,
/// where r / q = p / (s_c t) exceeds the type's range at a subnormal q.
[[noreturn]] void throw_loss_overflow(const char* function, const char* dtype,
                                      bool inputs_checked);

/// Throws the error for an RQ gradient entry that overflows `dtype` while
/// the loss is finite. c and total name the class of smallest total.
[[noreturn]] void throw_gradient_overflow(const char* function,
                                          const char* dtype, double eps,
                                          Index c, double total,
                                          bool inputs_checked);

/// Pixel chunks whose boundaries depend only on the pixel count, so that
/// per-chunk partial sums combined in chunk order give the same bits for any
/// thread count.
struct ChunkPlan {
  Index num_chunks = 1;
  Index chunk_pixels = 1;
};

/// At most this many chunks: enough to balance 16+ threads while the
/// partial-sum scratch stays O(C) per chunk.
inline constexpr Index kMaxChunks = 256;
/// Chunks below this many pixels would spend more on scheduling than work.
inline constexpr Index kMinChunkPixels = 2048;

inline ChunkPlan plan_chunks(Index num_pixels) {
  ChunkPlan plan;
  Index chunks = (num_pixels + kMinChunkPixels - 1) / kMinChunkPixels;
  chunks = std::clamp<Index>(chunks, 1, kMaxChunks);
  plan.chunk_pixels = (num_pixels + chunks - 1) / chunks;
  plan.num_chunks = (num_pixels + plan.chunk_pixels - 1) / plan.chunk_pixels;
  return plan;
}

/// Returns the number of threads that a call planned as `plan` runs on,
/// given `requested` (already resolved, >= 1): one per chunk at most.
/// `qrloss bench` uses it too, so that its floor runs on the same team.
inline int call_threads(const ChunkPlan& plan, int requested) {
  return static_cast<int>(std::min<Index>(requested, plan.num_chunks));
}

/// Pixels per tile: a tile contains all C classes of its pixels in scratch.
/// Depends only on C, so per-pixel results never depend on threads.
inline Index tile_pixels(Index C) {
  // Preferred tile size: the per-class rows of a tile stay in L1.
  constexpr Index kTileElements = 2048;
  // Rows shorter than this cost more in loop overhead than the tile saves
  // in cache misses (at C = 64, 32-pixel rows were 1.5x slower per element
  // than 128-pixel rows).
  constexpr Index kShortestRow = 128;
  // Bounds the per-thread scratch for very large C (C = 4096 gets 16).
  constexpr Index kMaxScratchElements = 65536;
  constexpr Index kMinTile = 16;
  constexpr Index kMaxTile = 1024;
  const Index tile = std::max(kTileElements / C,
                              std::min(kShortestRow, kMaxScratchElements / C));
  return std::clamp<Index>(tile, kMinTile, kMaxTile) / kMinTile * kMinTile;
}

/// Rule for the values an input may take.
enum class ValueRule { kNonNegative, kFinite };

/// Lanes of the fixed-order sums: x[i] of a row goes to lane i % kLanes.
/// 32 double lanes are four or more independent vector accumulators, which
/// hide the latency of the adds. The compiler vectorises the lanes without
/// reassociating, so a sum depends neither on alignment nor on the
/// instruction set.
inline constexpr int kLanes = 32;

/// Per-chunk partial sums of `width` values, combined in chunk order.
class PartialSums {
 public:
  PartialSums(Index num_chunks, Index width)
      : width_(width), values_(static_cast<std::size_t>(num_chunks * width)) {}
  double* chunk(Index k) { return values_.data() + k * width_; }
  /// Adds the chunks in order into a vector of `width` totals.
  std::vector<double> total() const {
    std::vector<double> sum(static_cast<std::size_t>(width_), 0.0);
    const Index chunks = static_cast<Index>(values_.size()) / width_;
    for (Index k = 0; k < chunks; ++k) {
      for (Index j = 0; j < width_; ++j) sum[j] += values_[k * width_ + j];
    }
    return sum;
  }

 private:
  Index width_;
  std::vector<double> values_;
};

/// Per-class statistics of a batch: the only values that a pixel's loss
/// terms need from other pixels (QR's qbar_c = sum_q[c] / num_pixels, RQ's
/// s_c = max(sum_q[c], eps)). They are plain sums, so shards of one batch
/// can add them up (an all-reduce) and each then gets the whole-batch loss.
struct ClassStats {
  std::vector<double> sum_q;
  double num_pixels = 0.0;
};


/// First bad element found per chunk (-1 for none); the smallest over all
/// chunks is the first bad index in memory order.
class BadIndexLog {
 public:
  explicit BadIndexLog(Index num_chunks)
      : first_(static_cast<std::size_t>(num_chunks), -1) {}
  void record(Index chunk, Index flat) {
    Index& slot = first_[static_cast<std::size_t>(chunk)];
    if (slot < 0 || flat < slot) slot = flat;
  }
  Index first() const {
    Index best = -1;
    for (Index v : first_) {
      if (v >= 0 && (best < 0 || v < best)) best = v;
    }
    return best;
  }

 private:
  std::vector<Index> first_;
};

/// Throws the error for a bad value found by a scan, naming the tensor, the
/// value and its position; infinite_hint, if given, ends the message for an
/// infinite value.
template <typename T>
[[noreturn]] void throw_bad_value(const char* function, const char* tensor,
                                  const T* data, Index flat,
                                  const Geometry& geometry, const Shape& shape,
                                  const char* infinite_hint = nullptr);

/// Scans a whole tensor (used where no pass reads it first) and throws
/// through throw_bad_value.
template <typename T>
void check_values(const char* function, const char* tensor, const T* data,
                  const Geometry& geometry, const Shape& shape, ValueRule rule,
                  int threads, const char* infinite_hint = nullptr);

}  // namespace qrloss::detail
