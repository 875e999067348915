#pragma once
// The loss kernels, compiled once per instruction set: a translation unit
// defines QRLOSS_ISA (the namespace of its variant) and, for a variant
// other than the baseline, opens a `#pragma GCC target` region before
// including this file. Everything here and in the ISA headers it includes
// lives in namespace qrloss::detail::QRLOSS_ISA, so no inline function or
// template instance is shared between variants. The standard library and
// Eigen are included before the region (detail/kernel_prelude.hpp), so
// their instances are the baseline ones in every variant.
// docs/derivations.md derives every formula used here and describes the
// passes.

#include "detail/divide.hpp"
#include "detail/isa.hpp"
#include "detail/lanes.hpp"
#include "detail/softmax_tile.hpp"
#include "detail/vmath.hpp"

namespace qrloss::detail::QRLOSS_ISA {

/// The tensor whose class totals a kernel forms, as messages name it.
template <bool kFromLogits>
inline constexpr const char* kProbsName =
    kFromLogits ? "softmax(logits)" : "probs";

/// Everything validated about one call before the first parallel region.
struct CallSetup {
  const char* function = "";
  const char* input_name = "";  // "logits" or "probs"
  Shape shape;
  Geometry geometry;
  ChunkPlan plan;
  Index tile = 0;
  int threads = 1;
  double eps = 0.0;
  bool check = true;
  double inv_pixels = 0.0;  // 1/N
};

template <typename T, bool kFromLogits>
CallSetup setup_call(const char* function, const T* input, const T* target,
                     const T* grad, const Shape& shape,
                     const LossOptions& options) {
  const char* input_name = kFromLogits ? "logits" : "probs";
  const char* grad_name = kFromLogits ? "dL_dx" : "dL_dq";
  // The shape is checked first: an empty std::vector may have a null
  // data(), and "empty tensor" is then the accurate message.
  CallSetup call;
  call.function = function;
  call.input_name = input_name;
  call.shape = shape;
  call.geometry = make_geometry(function, input_name, shape, sizeof(T));
  check_not_null(function, input_name, input);
  check_not_null(function, "target", target);
  check_eps(function, options.eps);
  if (options.num_threads < 0) {
    throw invalid_argument(std::string(function) +
                           ": bad num_threads: expected >= 0, got " +
                           std::to_string(options.num_threads));
  }
  if (grad != nullptr) {
    check_no_overlap(function, grad_name, grad, input_name, input, shape,
                     sizeof(T));
    check_no_overlap(function, grad_name, grad, "target", target, shape,
                     sizeof(T));
  }
  call.plan = plan_chunks(call.geometry.num_pixels());
  call.tile = tile_pixels(call.geometry.C);
  call.threads = call_threads(call.plan, resolve_threads(options.num_threads));
  call.eps = options.eps;
  call.check = options.check_finite;
  call.inv_pixels = 1.0 / static_cast<double>(call.geometry.num_pixels());
  return call;
}

// ---------------------------------------------------------------------------
// Items with few pixels
// ---------------------------------------------------------------------------

/// Tiles never cross a batch item, so items of P pixels give tiles of at
/// most P pixels. A B x C input (P = 1) then pays the fixed cost of a tile
/// for every pixel: 75 to 98 ns per element on one thread, against 2.7
/// to 4.9 ns at P = 16. Calls whose items have fewer pixels than this run
/// on copies repacked into one item of B * P pixels. At P = 16 the copies
/// already cost more than the short tiles (RQ on two threads: 6.2 ns per
/// element against 4.0).
/// NOTE: beyond the caches the copies read and write every tensor once
/// more, so a large B x C call still costs 2 to 3 times a segmentation
/// call per element. Loading tiles straight from the pixel-major layout
/// would avoid the copies.
inline constexpr Index kRepackBelowPixels = 16;

/// Returns whether a call on this geometry runs on repacked copies.
inline bool should_repack(const Geometry& geometry) {
  return geometry.B > 1 && geometry.P < kRepackBelowPixels;
}

/// Returns the geometry and the shape of a repacked copy: one item whose
/// pixels are those of the B items, in order.
inline Geometry repacked_geometry(const Geometry& geometry) {
  Geometry packed = geometry;
  packed.B = 1;
  packed.P = geometry.num_pixels();
  packed.rank = 4;
  return packed;
}

inline Shape repacked_shape(const Geometry& geometry) {
  return {1, geometry.C, geometry.num_pixels(), 1};
}

/// Copies the runs of P elements of items [b0, b_end) between the item
/// layout (B, C, P) and the repacked layout (C, B * P), 8 classes at a
/// time, with the inner loop along the packed rows. With the inner loop
/// over classes, a standalone copy of 16384 x 100 floats took 0.95 ns per
/// element (blocks of 64 x 8) to 2.4 (16 x 16) against 0.5. kRun = 1
/// fixes P = 1 at compile time. In the OpenMP region, a run length known
/// only at run time made a copy of 4096 x 6 floats take 0.86 ns per
/// element against 0.30.
template <bool kUnpack, Index kRun, typename T>
inline void repack_item_block(const T* src, T* dst, Index B, Index C,
                              Index P, Index b0, Index b_end) {
  constexpr Index kClasses = 8;
  const Index run = kRun > 0 ? kRun : P;
  for (Index c0 = 0; c0 < C; c0 += kClasses) {
    const Index c_end = std::min(C, c0 + kClasses);
    for (Index c = c0; c < c_end; ++c) {
      for (Index b = b0; b < b_end; ++b) {
        const Index item = (b * C + c) * run;
        const Index packed = (c * B + b) * run;
        const T* from = src + (kUnpack ? packed : item);
        T* to = dst + (kUnpack ? item : packed);
        for (Index e = 0; e < run; ++e) to[e] = from[e];
      }
    }
  }
}

#if QRLOSS_ISA_LEVEL >= 1
/// Writes the transpose of an 8 x 8 block of floats:
/// dst[j * dst_stride + k] = src[k * src_stride + j]. Forced inline,
/// since GCC otherwise kept it as a call with the rows in memory.
[[gnu::always_inline]] inline void transpose_block(const float* src,
                                                   Index src_stride,
                                                   float* dst,
                                                   Index dst_stride) {
  __m256 row[8];
  for (int k = 0; k < 8; ++k) row[k] = _mm256_loadu_ps(src + k * src_stride);
  // Interleave pairs of rows, then pairs of pairs, then the 128-bit halves.
  __m256 pair[8];
  for (int k = 0; k < 8; k += 2) {
    pair[k] = _mm256_unpacklo_ps(row[k], row[k + 1]);
    pair[k + 1] = _mm256_unpackhi_ps(row[k], row[k + 1]);
  }
  __m256 quad[8];
  for (int k = 0; k < 8; k += 4) {
    quad[k] = _mm256_shuffle_ps(pair[k], pair[k + 2], 0x44);
    quad[k + 1] = _mm256_shuffle_ps(pair[k], pair[k + 2], 0xEE);
    quad[k + 2] = _mm256_shuffle_ps(pair[k + 1], pair[k + 3], 0x44);
    quad[k + 3] = _mm256_shuffle_ps(pair[k + 1], pair[k + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * dst_stride,
                     _mm256_permute2f128_ps(quad[j], quad[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * dst_stride,
                     _mm256_permute2f128_ps(quad[j], quad[j + 4], 0x31));
  }
}

/// The same for a 4 x 4 block of doubles.
[[gnu::always_inline]] inline void transpose_block(const double* src,
                                                   Index src_stride,
                                                   double* dst,
                                                   Index dst_stride) {
  __m256d row[4];
  for (int k = 0; k < 4; ++k) row[k] = _mm256_loadu_pd(src + k * src_stride);
  const __m256d low01 = _mm256_unpacklo_pd(row[0], row[1]);
  const __m256d high01 = _mm256_unpackhi_pd(row[0], row[1]);
  const __m256d low23 = _mm256_unpacklo_pd(row[2], row[3]);
  const __m256d high23 = _mm256_unpackhi_pd(row[2], row[3]);
  _mm256_storeu_pd(dst, _mm256_permute2f128_pd(low01, low23, 0x20));
  _mm256_storeu_pd(dst + dst_stride,
                   _mm256_permute2f128_pd(high01, high23, 0x20));
  _mm256_storeu_pd(dst + 2 * dst_stride,
                   _mm256_permute2f128_pd(low01, low23, 0x31));
  _mm256_storeu_pd(dst + 3 * dst_stride,
                   _mm256_permute2f128_pd(high01, high23, 0x31));
}
#endif

/// Copies items [b0, b_end) of a B x C tensor (P = 1) to or from its
/// transpose; at most kMaxItems items. With AVX2, square blocks go through
/// registers. Where C or the items are not a whole number of blocks, the
/// last block starts one block before the end and copies some values a
/// second time, so that no scalar loop is left over. Both copies write the
/// same value. Packing goes through a buffer of kMaxItems
/// items per class, so that each row of the packed layout is then written
/// in one run. Rows of B floats lie a multiple of 4 KiB apart whenever B
/// is a multiple of 1024, and stores to 8 such rows at once made a
/// 65536 x 10 copy slower than the scalar loop. The scalar loop of
/// repack_item_block remains for fewer than a block of classes or items,
/// and in the baseline variant.
template <bool kUnpack, Index kMaxItems, typename T>
inline void repack_single_pixels(const T* src, T* dst, Index B, Index C,
                                 Index b0, Index b_end) {
#if QRLOSS_ISA_LEVEL >= 1
  constexpr Index kBlock = 32 / static_cast<Index>(sizeof(T));
  const Index items = b_end - b0;
  if (C >= kBlock && items >= kBlock) {
    alignas(64) T buffer[kBlock * kMaxItems];
    for (Index c_next = 0; c_next < C; c_next += kBlock) {
      const Index c = std::min(c_next, C - kBlock);
      for (Index b_next = b0; b_next < b_end; b_next += kBlock) {
        const Index b = std::min(b_next, b_end - kBlock);
        if constexpr (kUnpack) {
          transpose_block(src + c * B + b, B, dst + b * C + c, C);
        } else {
          transpose_block(src + b * C + c, C, buffer + (b - b0), kMaxItems);
        }
      }
      if constexpr (!kUnpack) {
        for (Index j = 0; j < kBlock; ++j) {
          std::copy(buffer + j * kMaxItems, buffer + j * kMaxItems + items,
                    dst + (c + j) * B + b0);
        }
      }
    }
    return;
  }
#endif
  repack_item_block<kUnpack, 1>(src, dst, B, C, 1, b0, b_end);
}

/// Items per block of the repacking copies.
inline constexpr Index kRepackItems = 64;

template <bool kUnpack, typename T>
inline void repack_item_block(const T* src, T* dst, Index B, Index C,
                              Index P, Index b0, Index b_end) {
  if (P == 1) {
    repack_single_pixels<kUnpack, kRepackItems>(src, dst, B, C, b0, b_end);
  } else {
    repack_item_block<kUnpack, 0>(src, dst, B, C, P, b0, b_end);
  }
}

/// Copies a tensor of the given geometry to its repacked layout, where row
/// c contains class c of every pixel: a transpose of B x C runs of P
/// pixels. With `unpack`, copies back instead. Threads share the blocks of
/// 64 items. With a `rule`, each block of items (one contiguous range of
/// the item layout) is also checked just before it is copied, so the
/// caller's tensor is read from memory once. The result is whether every
/// value satisfies the rule. After a bad value the caller scans the tensor
/// again, only to locate it.
template <typename T>
bool repack_items(const Geometry& geometry, const T* src, T* dst, int threads,
                  bool unpack, const ValueRule* rule = nullptr) {
  constexpr Index kItems = kRepackItems;
  const Index B = geometry.B;
  const Index C = geometry.C;
  const Index P = geometry.P;
  const Index item_blocks = (B + kItems - 1) / kItems;
  [[maybe_unused]] const int team = static_cast<int>(
      std::min<Index>(static_cast<Index>(threads), item_blocks));
  Flag<T> bad = 0;
#pragma omp parallel for schedule(static) num_threads(team) reduction(|:bad)
  for (Index k = 0; k < item_blocks; ++k) {
    const Index b0 = k * kItems;
    const Index b_end = std::min(B, b0 + kItems);
    if (unpack) {
      repack_item_block<true>(src, dst, B, C, P, b0, b_end);
      continue;
    }
    if (rule != nullptr) {
      const T* first = src + b0 * C * P;
      const Index count = (b_end - b0) * C * P;
      bad |= all_valid(first, count, *rule) ? 0 : 1;
    }
    repack_item_block<false>(src, dst, B, C, P, b0, b_end);
  }
  return bad == 0;
}

/// Repacked copies of `copies` tensors of `geometry` in one allocation,
/// where copy(k) points to copy k. With glibc, a block freed by one
/// call raises the size below which later blocks come from the heap, and
/// the heap keeps one such block instead of returning it to the system.
/// So later calls reuse pages that are already mapped. Three separate
/// blocks were returned and faulted in again on every call: 64 x 1000
/// floats took 620 us against 120 us for the kernel on the merged tensor.
template <typename T>
struct RepackBuffers {
  RepackBuffers(const Geometry& geometry, int copies)
      : count(geometry.num_elements()), data(allocate(count, copies)) {}
  T* copy(int k) const { return data.get() + k * count; }

  Index count;
  std::unique_ptr<T[]> data;

 private:
  static T* allocate(Index count, int copies) {
    const auto limit = std::numeric_limits<std::size_t>::max() / sizeof(T);
    if (static_cast<std::size_t>(count) > limit / copies) {
      throw std::bad_alloc();
    }
    return new T[static_cast<std::size_t>(count) * copies];
  }
};

/// Runs a loss kernel on repacked copies of the inputs and unpacks the
/// gradient. The values are checked as they are copied, and a bad one is
/// then located in the caller's buffer, so that an error names the
/// caller's position.
template <bool kFromLogits, typename T>
double run_repacked(const CallSetup& call, const T* input, const T* target,
                    T* grad, const LossOptions& options,
                    double (*kernel)(const char*, const T*, const T*, T*,
                                     const Shape&, const LossOptions&)) {
  const ValueRule input_rule =
      kFromLogits ? ValueRule::kFinite : ValueRule::kNonNegative;
  const ValueRule target_rule = ValueRule::kNonNegative;
  const Geometry& geometry = call.geometry;
  const RepackBuffers<T> packed(geometry, grad != nullptr ? 3 : 2);
  T* packed_grad = grad != nullptr ? packed.copy(2) : nullptr;
  const bool input_ok =
      repack_items(geometry, input, packed.copy(0), call.threads, false,
                   call.check ? &input_rule : nullptr);
  const bool target_ok =
      repack_items(geometry, target, packed.copy(1), call.threads, false,
                   call.check ? &target_rule : nullptr);
  // Each scan throws, naming the first bad value in the caller's tensor.
  if (!input_ok) {
    check_values(call.function, call.input_name, input, geometry, call.shape,
                 input_rule, call.threads);
  }
  if (!target_ok) {
    check_values(call.function, "target", target, geometry, call.shape,
                 target_rule, call.threads);
  }
  // The copies are checked above, so the kernel's own checks find nothing.
  // They stay on (options.check_finite as given) so that its messages know
  // whether the inputs were checked.
  const double loss = kernel(call.function, packed.copy(0), packed.copy(1),
                             packed_grad, repacked_shape(geometry), options);
  if (grad != nullptr) {
    repack_items(geometry, packed_grad, grad, call.threads, true);
  }
  return loss;
}

/// Rows of q for one tile: row c starts at base + c * stride.
template <typename T>
struct Rows {
  const T* base;
  Index stride;
  const T* row(Index c) const { return base + c * stride; }
};

/// Provides q for a tile: the caller's probs, or the softmax of the logits
/// computed into the thread's scratch. Scans logits when `log` is set;
/// probs are checked by the pass's own sums (ChunkSums::add_streamed).
template <typename T, bool kFromLogits>
Rows<T> load_probs(const Geometry& geometry, const T* input, Index b, Index p0,
                   Index n, Index tile, Workspace<T>& space, Index chunk,
                   BadIndexLog* log) {
  const T* first = input + geometry.offset(b, 0, p0);
  if constexpr (!kFromLogits) {
    return {first, geometry.P};
  } else {
    const Flag<T> bad =
        softmax_tile(first, geometry.P, geometry.C, n, space.q.data(), tile,
                     space.pixel.data());
    if (log != nullptr && bad != 0) {
      for (Index c = 0; c < geometry.C; ++c) {
        const Index row = geometry.offset(b, c, p0);
        log_first_invalid(input + row, n, ValueRule::kFinite, row, chunk,
                          *log);
      }
    }
    return {space.q.data(), tile};
  }
}

/// From logits, the first pass keeps q = softmax(x) in the caller's
/// gradient buffer, which a later pass overwrites tile by tile after
/// reading it back. Reading q costs one more stream of memory traffic. The
/// softmax it replaces costs an exp per element and two sweeps over the
/// classes, which is more on any machine whose cores are not starved of
/// bandwidth.
template <typename T>
void cache_probs(const Geometry& geometry, const Rows<T>& probs, Index b,
                 Index p0, Index n, T* grad) {
  for (Index c = 0; c < geometry.C; ++c) {
    stream_store(grad + geometry.offset(b, c, p0), probs.row(c), n);
  }
}

/// The rows of q that cache_probs left in the gradient buffer.
template <typename T>
Rows<T> cached_probs(const Geometry& geometry, const T* grad, Index b,
                     Index p0) {
  return {grad + geometry.offset(b, 0, p0), geometry.P};
}

/// Adds a tile row of q to sum k. When q is the caller's probs and `log` is
/// set, it also checks the row in the same loop.
template <typename T, bool kFromLogits>
void add_probs_row(ChunkSums& sums, Index k, const T* q, Index n,
                   Index row_offset, Index chunk, BadIndexLog* log) {
  constexpr ValueRule kRule = ValueRule::kNonNegative;
  if (kFromLogits) {
    sums.add(k, q, n);
  } else if (!sums.add_streamed(k, q, n, log != nullptr ? &kRule : nullptr)) {
    log_first_invalid(q, n, ValueRule::kNonNegative, row_offset, chunk, *log);
  }
}

/// Runs tile_fn(b, p0, n) over the tiles of one chunk. With a tile
/// length of plan.chunk_pixels, the tiles are the runs of the chunk's
/// pixels that lie in one batch item: the longest rows a pass can take
/// when it works on each class row by itself.
template <typename TileFn>
void for_each_tile_of_chunk(const CallSetup& call, Index chunk,
                            TileFn&& tile_fn, Index tile_length = 0) {
  const Index begin = chunk * call.plan.chunk_pixels;
  const Index end =
      std::min(begin + call.plan.chunk_pixels, call.geometry.num_pixels());
  for_each_tile(call.geometry, begin, end,
                tile_length > 0 ? tile_length : call.tile, tile_fn);
}

/// Sums and checks the caller's probs for the first pass when it only
/// sums S_c. Each class row of a run of pixels takes one call, so the fixed
/// cost of a call and of a row's tail is paid once per chunk instead of
/// once per tile. The hardware prefetcher follows rows this long.
template <typename T>
void sum_probs_rows(const CallSetup& call, const T* probs, ChunkSums& sums,
                    Index chunk, BadIndexLog* log) {
  const auto sum_run = [&](Index b, Index p0, Index n) {
    for (Index c = 0; c < call.geometry.C; ++c) {
      const Index offset = call.geometry.offset(b, c, p0);
      add_probs_row<T, false>(sums, c, probs + offset, n, offset, chunk, log);
    }
  };
  for_each_tile_of_chunk(call, chunk, sum_run, call.plan.chunk_pixels);
}

template <typename T>
void raise_if_bad(const CallSetup& call, const char* tensor, const T* data,
                  const BadIndexLog& log) {
  const Index bad = log.first();
  if (bad >= 0) {
    throw_bad_value(call.function, tensor, data, bad, call.geometry,
                    call.shape);
  }
}

/// Final guard: valid input never gives NaN, but values near the top of the
/// float range can overflow intermediate products.
void raise_if_nan(const CallSetup& call, double value, const char* quantity) {
  if (!std::isnan(value)) return;
  const std::string start = std::string(call.function) +
                            ": non-finite result: " + quantity + " is NaN";
  if (!call.check) {
    throw invalid_argument(start + unchecked_hint(false));
  }
  throw invalid_argument(start +
                         " although the inputs passed validation; input "
                         "magnitudes overflow the arithmetic, so rescale "
                         "probs and target (or use a larger eps)");
}

/// Throws for a QR loss of -inf. Only inputs that the scan rejects give
/// it, for example an infinite target.
void raise_if_minus_infinity(const CallSetup& call, double loss) {
  if (loss != -std::numeric_limits<double>::infinity()) return;
  throw invalid_argument(std::string(call.function) +
                         ": non-finite result: the loss is -inf" +
                         unchecked_hint(call.check));
}

/// Writes the gradient rows of a tile, computed in the thread's scratch, to
/// the caller's buffer; from logits, chains them through eq. 7 first. From
/// probs the rows go out with streaming stores, which skip the
/// read-for-ownership of lines that nothing reads again in this pass. From
/// logits the tile has just read q from the same lines (cache_probs), so
/// they are in cache. The VJP then writes dL/dx over q with plain stores:
/// 35 ms for QR on the Intel Xeon of earlier measurements, against 39 ms
/// with streaming stores from scratch.
template <typename T, bool kFromLogits>
void store_gradient_tile(const Geometry& geometry, const Rows<T>& probs,
                         Workspace<T>& space, Index L, Index b, Index p0,
                         Index n, T* grad) {
  T* rows = space.grad.data();
  if constexpr (kFromLogits) {
    // dL/dx goes straight to the caller's rows, where q was read from: the
    // VJP reads every q of a pixel before it writes that pixel.
    softmax_vjp_tile(probs.base, probs.stride, rows, L,
                     grad + geometry.offset(b, 0, p0), geometry.P, geometry.C,
                     n, space.sum.data(), space.pixel.data());
  } else {
    for (Index c = 0; c < geometry.C; ++c) {
      stream_store(grad + geometry.offset(b, c, p0), rows + c * L, n);
    }
  }
}

// ---------------------------------------------------------------------------
// QR
// ---------------------------------------------------------------------------

/// Adds sum_i q[i] log(p[i] + eps) over a row to sum k, where log_p contains
/// log(p + eps). The products are formed in double, and with eps = 0,
/// 0 * log(0) counts as 0. With eps > 0 the log is finite anyway.
template <typename T>
void add_cross_terms(ChunkSums& sums, Index k, const T* q, const T* log_p,
                     Index n, bool eps_zero) {
  if (eps_zero) {
    sums.add_each<T>(k, n, [&](Index i, Flag<T>&) {
      return q[i] > T(0) ? static_cast<double>(q[i]) *
                               static_cast<double>(log_p[i])
                         : 0.0;
    });
  } else {
    sums.add_products(k, q, log_p, n);
  }
}

/// Runs one class row of QR's gradient pass in one loop. On entry g
/// contains log(p + eps). The loop adds q log(p + eps) to the cross term
/// (sum 0 of `sums`), overwrites g with dL/dq = h - log(p + eps) / N [eq. 2] and
/// flags bad targets. With kDot it also adds g q to the per-pixel dot
/// products of eq. 7, in class order as softmax_vjp_tile does. With
/// kEpsZero, 0 * log(0) counts as 0 in the cross term, and dL/dq is +inf
/// where p = 0, since the loss is then +inf for any q > 0. Returns the
/// flags of p.
template <bool kDot, bool kEpsZero, typename T>
Flag<T> qr_gradient_row(ChunkSums& sums, const T* q, const T* p, T* g,
                        double* dot, Index n, T h, T inv_pixels) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  return sums.add_each<T>(0, n, [&](Index i, Flag<T>& bad) {
    const T log_p = g[i];
    // In double, because in float a q near its largest values times a log
    // overflows.
    double product = static_cast<double>(q[i]) * static_cast<double>(log_p);
    T gi = h - inv_pixels * log_p;
    if constexpr (kEpsZero) {
      product = q[i] > T(0) ? product : 0.0;
      gi = p[i] > T(0) ? gi : kInf;
    }
    g[i] = gi;
    if constexpr (kDot) {
      double term = static_cast<double>(gi) * static_cast<double>(q[i]);
      // With eps = 0, g is -inf for a class whose mean q is 0 and +inf
      // where p = 0. There q = 0, the underflow of a positive q, and
      // q g -> 0 as q -> 0+ (q log q -> 0), so the term counts as 0.
      if constexpr (kEpsZero) term = q[i] > T(0) ? term : 0.0;
      dot[i] += term;
    }
    bad |= invalid_flag(p[i], ValueRule::kNonNegative);
    return product;
  });
}

/// Largest sum of probs over a batch that QR takes. Below it, q log(p + eps)
/// (|log| <= 745 in double) and qbar log(qbar + eps) cannot overflow.
inline constexpr double kMaxQrTotal = 1e300;

/// Computes the QR loss of eq. 1 from the class sums S_c and the cross
/// term sum_n sum_c q log(p + eps).
inline double qr_loss_value(const CallSetup& call,
                            const std::vector<double>& sum_q, double cross) {
  const double num_pixels = static_cast<double>(call.geometry.num_pixels());
  // 0 - x rather than -x, so that all-zero probs give +0, not -0.
  double loss = 0.0 - cross / num_pixels;
  for (const double S : sum_q) {
    const double qbar = S / num_pixels;
    if (qbar > 0.0) loss += qbar * std::log(qbar + call.eps);
  }
  return loss;
}

/// Returns h_c / N for every class [eq. 2], the batch-wide part of QR's
/// gradient, from the class sums S_c.
template <typename T>
std::vector<T> qr_class_terms(const CallSetup& call,
                              const std::vector<double>& sum_q) {
  const double num_pixels = static_cast<double>(call.geometry.num_pixels());
  std::vector<T> class_term;
  class_term.reserve(sum_q.size());
  for (const double S : sum_q) {
    const double qbar = S / num_pixels;
    double h = std::log(call.eps);  // limit of h as qbar -> 0+ [eq. 2]
    if (qbar > 0.0) h = std::log(qbar + call.eps) + qbar / (qbar + call.eps);
    class_term.push_back(static_cast<T>(call.inv_pixels * h));
  }
  return class_term;
}

/// Computes QR with one log per element. Without a gradient, one pass reads
/// q and p and sums S_c and the cross term. With a gradient, pass 1 sums
/// only S_c, which gives h_c. Pass 2 then takes log(p + eps) once for both
/// the cross term and dL/dq. Summing the cross term in pass 1 instead moves
/// as many bytes (q and p, then p) but takes every log twice.
template <typename T, bool kFromLogits>
double qr_impl(const char* function, const T* input, const T* target, T* grad,
               const Shape& shape, const LossOptions& options) {
  const CallSetup call = setup_call<T, kFromLogits>(function, input, target,
                                                    grad, shape, options);
  if (should_repack(call.geometry)) {
    return run_repacked<kFromLogits>(call, input, target, grad, options,
                                     &qr_impl<T, kFromLogits>);
  }
  const Geometry& geometry = call.geometry;
  const Index C = geometry.C;
  const Index L = call.tile;
  const bool eps_zero = call.eps == 0.0;
  const bool want_grad = grad != nullptr;
  const T eps = static_cast<T>(call.eps);
  WorkspaceNeeds needs;
  needs.softmax = kFromLogits;
  needs.grad_tile = want_grad;
  Workspaces<T> spaces(call.threads, C, L, needs);

  // Pass 1: per-class sums of q, plus the cross term of eq. 1 when no
  // gradient is wanted.
  const Index pass1_width = want_grad ? C : C + 1;
  PartialSums partial(call.plan.num_chunks, pass1_width);
  BadIndexLog bad_input(call.plan.num_chunks);
  BadIndexLog bad_target(call.plan.num_chunks);
  run_chunks(call.plan, call.threads, [&](Index chunk, int thread) {
    Workspace<T>& space = spaces[static_cast<std::size_t>(thread)];
    ChunkSums sums(space.lanes.data(), pass1_width, partial.chunk(chunk));
    if (!kFromLogits && want_grad) {
      sum_probs_rows(call, input, sums, chunk,
                     call.check ? &bad_input : nullptr);
      sums.finish();
      return;
    }
    for_each_tile_of_chunk(call, chunk, [&](Index b, Index p0, Index n) {
      const Rows<T> probs =
          load_probs<T, kFromLogits>(geometry, input, b, p0, n, L, space, chunk,
                                     call.check ? &bad_input : nullptr);
      if (kFromLogits && want_grad) {
        cache_probs(geometry, probs, b, p0, n, grad);
      }
      T* log_p = space.tmp1.data();
      for (Index c = 0; c < C; ++c) {
        const T* q = probs.row(c);
        const Index offset = geometry.offset(b, c, p0);
        add_probs_row<T, kFromLogits>(sums, c, q, n, offset, chunk,
                                      call.check ? &bad_input : nullptr);
        if (want_grad) continue;
        const T* p = target + offset;
        if (call.check) {
          scan_row(p, n, ValueRule::kNonNegative, offset, chunk, bad_target);
        }
        // From logits q lies in the softmax scratch, so only p is
        // prefetched.
        log_shifted_prefetching(p, eps, log_p, n, p, kFromLogits ? nullptr : q);
        add_cross_terms(sums, C, q, log_p, n, eps_zero);
      }
    });
    sums.finish();
    finish_streaming_stores();
  });
  raise_if_bad(call, call.input_name, input, bad_input);

  const std::vector<double> totals = partial.total();
  ClassStats stats;
  stats.sum_q.assign(totals.begin(), totals.begin() + C);
  stats.num_pixels = static_cast<double>(geometry.num_pixels());
  check_class_totals(function, kProbsName<kFromLogits>, stats.sum_q,
                     kMaxQrTotal, call.check);
  if (!want_grad) {
    raise_if_bad(call, "target", target, bad_target);
    const double loss = qr_loss_value(call, stats.sum_q, totals.back());
    raise_if_nan(call, loss, "the loss");
    raise_if_minus_infinity(call, loss);
    return loss;
  }
  // h_c needs only S_c, so the cross term can wait for pass 2.
  const std::vector<T> class_term = qr_class_terms<T>(call, stats.sum_q);

  // Pass 2: the cross term of eq. 1 and dL/dq = (1/N) (h_c - log(p + eps))
  // [eq. 2], chained to the logits per tile when the input is logits
  // [eq. 7].
  PartialSums cross(call.plan.num_chunks, 1);
  const T inv_pixels = static_cast<T>(call.inv_pixels);
  run_chunks(call.plan, call.threads, [&](Index chunk, int thread) {
    Workspace<T>& space = spaces[static_cast<std::size_t>(thread)];
    ChunkSums sums(space.lanes.data(), 1, cross.chunk(chunk));
    for_each_tile_of_chunk(call, chunk, [&](Index b, Index p0, Index n) {
      const Rows<T> probs =
          kFromLogits ? cached_probs(geometry, grad, b, p0)
                      : load_probs<T, false>(geometry, input, b, p0, n, L,
                                             space, chunk, nullptr);
      double* dot = space.sum.data();
      if constexpr (kFromLogits) std::fill(dot, dot + n, 0.0);
      for (Index c = 0; c < C; ++c) {
        const Index offset = geometry.offset(b, c, p0);
        const T* q = probs.row(c);
        const T* p = target + offset;
        T* out = space.grad.data() + c * L;
        log_shifted_prefetching(p, eps, out, n, p, q);
        const T h = class_term[static_cast<std::size_t>(c)];
        const Flag<T> bad =
            eps_zero ? qr_gradient_row<kFromLogits, true>(sums, q, p, out,
                                                          dot, n, h, inv_pixels)
                     : qr_gradient_row<kFromLogits, false>(
                           sums, q, p, out, dot, n, h, inv_pixels);
        if (call.check && bad != 0) {
          log_first_invalid(p, n, ValueRule::kNonNegative, offset, chunk,
                            bad_target);
        }
      }
      if constexpr (kFromLogits) {
        // The dot products of eq. 7 are complete, so dL/dx goes straight to
        // the rows that q was read from, as in store_gradient_tile.
        T* dx = grad + geometry.offset(b, 0, p0);
        if (eps_zero) {
          softmax_vjp_apply<true>(probs.base, probs.stride, space.grad.data(),
                                  L, dx, geometry.P, C, n, dot,
                                  space.pixel.data());
        } else {
          softmax_vjp_apply(probs.base, probs.stride, space.grad.data(), L, dx,
                            geometry.P, C, n, dot, space.pixel.data());
        }
      } else {
        store_gradient_tile<T, false>(geometry, probs, space, L, b, p0, n,
                                      grad);
      }
    });
    sums.finish();
    finish_streaming_stores();
  });
  raise_if_bad(call, "target", target, bad_target);

  const double loss = qr_loss_value(call, stats.sum_q, cross.total()[0]);
  raise_if_nan(call, loss, "the loss");
  raise_if_minus_infinity(call, loss);
  if (kFromLogits && std::isinf(loss)) {
    // Every q = softmax(x) is > 0 in exact arithmetic, so the loss is +inf
    // near x and eq. 7 would give inf - inf. With eps > 0 only an unchecked
    // target of -eps gets here.
    const std::string start = std::string(function) + ": infinite loss: ";
    if (eps_zero) {
      throw invalid_argument(start +
                             "target is 0 where probs > 0 and eps = 0, so the "
                             "gradient with respect to logits is undefined; "
                             "use eps > 0");
    }
    throw invalid_argument(start +
                           "a target of -eps makes log(p + eps) = -inf, so "
                           "the gradient with respect to logits is undefined" +
                           unchecked_hint(call.check));
  }
  return loss;
}

// ---------------------------------------------------------------------------
// RQ
// ---------------------------------------------------------------------------

template <typename T, bool kFromLogits>
double rq_impl(const char* function, const T* input, const T* target, T* grad,
               const Shape& shape, const LossOptions& options);

/// Returns 2 where u > 0 and divide_exactly gave r = u / t outside its
/// range (u too small, or r too small to be exact), else 0: bit 1 of a
/// flag whose bit 0 marks invalid input. Without FMA, divide_exactly
/// divides, so nothing is out of range.
template <typename T>
inline Flag<T> outside_exact_quotient(T u, T r) {
  if constexpr (QRLOSS_ISA_LEVEL == 0) {
    return 0;
  } else {
    const bool small = (u < kExactDividendMin<T>) | (r < kExactQuotientMin<T>);
    return static_cast<Flag<T>>((u > T(0)) & small) << 1;
  }
}

/// Returns 2 for a divisor above divide_exactly's range (or NaN), else 0.
template <typename T>
inline Flag<T> above_exact_divisor(T t) {
  if constexpr (QRLOSS_ISA_LEVEL == 0) {
    return 0;
  } else {
    return static_cast<Flag<T>>(!(t <= kExactDivisorMax<T>)) << 1;
  }
}

/// Redoes a float RQ call in double and rounds dL/dq (or dL/dx) to float.
/// It serves calls beyond float's arithmetic although the results fit:
/// 1 / s_c or a pixel sum outside float's normal range, or, with eps = 0
/// and a class total near float's smallest normal value, w = p / (s_c t)
/// or the per-pixel part of dL/dq beyond float's range (the class term
/// -G_c / s_c cancels most of the latter). The copies take three double
/// tensors; only such calls come here. raise_overflow throws for an entry
/// beyond float's range.
template <bool kFromLogits, typename RaiseOverflow>
double rq_in_double(const CallSetup& call, const float* input,
                    const float* target, float* grad,
                    const LossOptions& options,
                    const RaiseOverflow& raise_overflow) {
  const auto count = static_cast<std::size_t>(call.geometry.num_elements());
  const std::vector<double> input64(input, input + count);
  const std::vector<double> target64(target, target + count);
  std::vector<double> grad64(grad != nullptr ? count : 0);
  const double loss = rq_impl<double, kFromLogits>(
      call.function, input64.data(), target64.data(),
      grad != nullptr ? grad64.data() : nullptr, call.shape, options);
  if (grad == nullptr) return loss;
  Flag<float> bad = 0;
  QRLOSS_SIMD_LOOP_FLAGS
  for (std::size_t i = 0; i < count; ++i) {
    grad[i] = static_cast<float>(grad64[i]);
    bad |= invalid_flag(grad[i], ValueRule::kFinite);
  }
  if (bad != 0) raise_overflow();
  return loss;
}

template <typename T, bool kFromLogits>
double rq_impl(const char* function, const T* input, const T* target, T* grad,
               const Shape& shape, const LossOptions& options) {
  const CallSetup call = setup_call<T, kFromLogits>(function, input, target,
                                                    grad, shape, options);
  if (should_repack(call.geometry)) {
    return run_repacked<kFromLogits>(call, input, target, grad, options,
                                     &rq_impl<T, kFromLogits>);
  }
  const Geometry& geometry = call.geometry;
  const Index C = geometry.C;
  const Index L = call.tile;
  const bool eps_zero = call.eps == 0.0;
  const bool want_grad = grad != nullptr;
  const T eps = static_cast<T>(call.eps);
  WorkspaceNeeds needs;
  needs.softmax = kFromLogits;
  needs.grad_tile = want_grad;
  needs.rq_rows = true;
  Workspaces<T> spaces(call.threads, C, L, needs);

  // Pass 1: per-class sums S_c of q.
  PartialSums class_sums(call.plan.num_chunks, C);
  BadIndexLog bad_input(call.plan.num_chunks);
  run_chunks(call.plan, call.threads, [&](Index chunk, int thread) {
    Workspace<T>& space = spaces[static_cast<std::size_t>(thread)];
    ChunkSums sums(space.lanes.data(), C, class_sums.chunk(chunk));
    if (!kFromLogits) {
      sum_probs_rows(call, input, sums, chunk,
                     call.check ? &bad_input : nullptr);
      sums.finish();
      return;
    }
    for_each_tile_of_chunk(call, chunk, [&](Index b, Index p0, Index n) {
      const Rows<T> probs =
          load_probs<T, kFromLogits>(geometry, input, b, p0, n, L, space, chunk,
                                     call.check ? &bad_input : nullptr);
      if (kFromLogits && want_grad) {
        cache_probs(geometry, probs, b, p0, n, grad);
      }
      for (Index c = 0; c < C; ++c) {
        const T* q = probs.row(c);
        const Index offset = geometry.offset(b, c, p0);
        add_probs_row<T, kFromLogits>(sums, c, q, n, offset, chunk,
                                      call.check ? &bad_input : nullptr);
      }
    });
    sums.finish();
    finish_streaming_stores();
  });
  raise_if_bad(call, call.input_name, input, bad_input);

  ClassStats stats;
  stats.sum_q = class_sums.total();
  stats.num_pixels = static_cast<double>(geometry.num_pixels());
  check_class_totals(function, kProbsName<kFromLogits>, stats.sum_q,
                     std::numeric_limits<double>::infinity(), call.check);
  std::vector<double> inv_s(static_cast<std::size_t>(C));
  std::vector<T> inv_s_t(static_cast<std::size_t>(C));
  std::vector<char> s_clamped(static_cast<std::size_t>(C));
  const char* dtype = type_name<T>();
  Index smallest_class = 0;  // named when the gradient overflows
  const auto raise_overflow = [&] {
    throw_gradient_overflow(
        function, dtype, call.eps, smallest_class,
        stats.sum_q[static_cast<std::size_t>(smallest_class)], call.check);
  };
  // Where float cannot represent an intermediate, a float call is redone
  // in double (rq_in_double). A double call runs `fail`, which throws the
  // error for the case; the logic_error below is never reached.
  const auto redo_or_throw = [&](const auto& fail) -> double {
    if constexpr (std::is_same_v<T, float>) {
      return rq_in_double<kFromLogits>(call, input, target, grad, options,
                                       raise_overflow);
    } else {
      fail();
      throw std::logic_error("rq_impl: an error callback returned");
    }
  };
  bool beyond_float = false;  // 1 / s_c overflows or is subnormal in float
  for (Index c = 0; c < C; ++c) {
    const double S = stats.sum_q[static_cast<std::size_t>(c)];
    if (S < stats.sum_q[static_cast<std::size_t>(smallest_class)]) {
      smallest_class = c;
    }
    if (eps_zero && S == 0.0) {
      // From logits every q is positive in exact arithmetic, and a float
      // softmax that underflowed to 0 may not in double: such a call falls
      // through to the redo in double below (1 / s_c is inf).
      if constexpr (!(std::is_same_v<T, float> && kFromLogits)) {
        throw invalid_argument(
            std::string(function) + ": undefined loss: class " +
            std::to_string(c) + (kFromLogits ? " of softmax(logits)" : "") +
            " has zero total probability over the batch and eps = 0, so "
            "z = q / s_c is 0/0; use eps > 0" +
            unchecked_hint(call.check));
      }
    }
    const double s = std::max(S, call.eps);
    // With eps > 0, s >= 1e-20 and 1 / s fits in float. A subnormal 1 / s
    // has fewer digits, so z = q / s_c would lose them.
    const T inverse = static_cast<T>(1.0 / s);
    if (!std::isfinite(inverse) || inverse < std::numeric_limits<T>::min()) {
      if constexpr (std::is_same_v<T, float>) {
        beyond_float = true;
      } else if (!std::isfinite(inverse)) {
        throw_tiny_class_total(function, c, S, dtype, call.check);
      } else {
        throw_large_class_total(function, c, S, dtype, call.check);
      }
    }
    s_clamped[static_cast<std::size_t>(c)] = S < call.eps;
    inv_s[static_cast<std::size_t>(c)] = 1.0 / s;
    inv_s_t[static_cast<std::size_t>(c)] = inverse;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (beyond_float) {
      return rq_in_double<kFromLogits>(call, input, target, grad, options,
                                       raise_overflow);
    }
  }

  // Pass 2: per pixel t, r, a and abar; the loss and G_c; the per-pixel
  // part of the gradient [eq. 3, eq. 4].
  PartialSums partial(call.plan.num_chunks, C + 1);
  BadIndexLog bad_target(call.plan.num_chunks);
  // Chunks whose per-pixel part of dL/dq has an entry beyond a quarter of
  // T's range (or not finite), one byte each, because threads writing a
  // std::vector<bool> would share words. Only then can pass 3 overflow.
  std::vector<unsigned char> large_part(
      static_cast<std::size_t>(call.plan.num_chunks), 0);
  std::vector<unsigned char> sum_overflowed(large_part.size(), 0);
  const T inv_pixels = static_cast<T>(call.inv_pixels);
  run_chunks(call.plan, call.threads, [&](Index chunk, int thread) {
    Workspace<T>& space = spaces[static_cast<std::size_t>(thread)];
    ChunkSums sums(space.lanes.data(), C + 1, partial.chunk(chunk));
    for_each_tile_of_chunk(call, chunk, [&](Index b, Index p0, Index n) {
      const Rows<T> probs =
          kFromLogits && want_grad
              ? cached_probs(geometry, grad, b, p0)
              : load_probs<T, kFromLogits>(geometry, input, b, p0, n, L, space,
                                           chunk, nullptr);
      double* pixel_sum = space.sum.data();
      double* abar = space.abar.data();
      double* loss_sum = space.loss_sum.data();  // sum_c of the loss terms
      T* clamped_sum = space.pixel.data();
      T* inv_t = space.pixel_inverse.data();

      // Per-pixel sum of u = (q / s_c) p, then its clamp. z = q / s_c is
      // formed first, as the loss defines it, because in float q p of a
      // tiny q can be subnormal and lose digits that z p keeps. With
      // q = 1.4e-45 and a clamped s_c = 1e-8, q p first gave a gradient
      // 22 % off the double one.
      // The first class starts the sums from 0.0 + u, the same value as
      // adding to a zeroed row, without zeroing it first (GCC turns such a
      // fill into a memset call: 5 % of the samples of in-cache RQ).
      for (Index c = 0; c < C; ++c) {
        const T* q = probs.row(c);
        const Index offset = geometry.offset(b, c, p0);
        const T* p = target + offset;
        const T scale = inv_s_t[static_cast<std::size_t>(c)];
        Flag<T> bad = 0;
        if (c == 0) {
          QRLOSS_SIMD_LOOP_FLAGS
          for (Index i = 0; i < n; ++i) {
            pixel_sum[i] = 0.0 + static_cast<double>(q[i] * scale * p[i]);
            bad |= invalid_flag(p[i], ValueRule::kNonNegative);
          }
        } else {
          QRLOSS_SIMD_LOOP_FLAGS
          for (Index i = 0; i < n; ++i) {
            pixel_sum[i] += static_cast<double>(q[i] * scale * p[i]);
            bad |= invalid_flag(p[i], ValueRule::kNonNegative);
          }
        }
        if (call.check && bad != 0) {
          log_first_invalid(p, n, ValueRule::kNonNegative, offset, chunk,
                            bad_target);
        }
      }
      // w multiplies by 1/t; r is u / t correctly rounded (divide_exactly,
      // or the division in a tile outside its range), so that a pixel with
      // one nonzero u gets r = 1 exactly and its class terms cancel
      // exactly.
      // (GCC 12 leaves a loop scalar when it mixes a select with a
      // double-to-float conversion, so the clamp has a loop of its own.)
      QRLOSS_SIMD_LOOP
      for (Index i = 0; i < n; ++i) {
        abar[i] = pixel_sum[i] < kPixelSumFloor ? kPixelSumFloor : pixel_sum[i];
      }
      // A pixel sum beyond T's range would make r = u / t zero (NaN
      // through divide_exactly), so such a call is redone in double or
      // throws. 1 / t is divided in T: a division in double per pixel cost
      // 5 % of in-cache RQ in float, and w = p / (s_c t) needs no more than
      // T's precision. Bit 1 marks a t above divide_exactly's range.
      Flag<T> bad = 0;
      QRLOSS_SIMD_LOOP_FLAGS
      for (Index i = 0; i < n; ++i) {
        clamped_sum[i] = static_cast<T>(abar[i]);
        inv_t[i] = T(1) / clamped_sum[i];
        abar[i] = 0.0;
        loss_sum[i] = 0.0;
        bad |= invalid_flag(clamped_sum[i], ValueRule::kFinite) |
               above_exact_divisor(clamped_sum[i]);
      }
      if ((bad & 1) != 0) sum_overflowed[static_cast<std::size_t>(chunk)] = 1;
      // Some t above divide_exactly's range: the tile divides.
      const bool divide_tile = (bad & 2) != 0;

      // r, the loss terms and abar = sum_c a_c r_c.
      for (Index c = 0; c < C; ++c) {
        const T* q = probs.row(c);
        const T* p = target + geometry.offset(b, c, p0);
        // The rows to prefetch: q only where it lies in a tensor (probs, or
        // the gradient buffer from logits), not in the softmax scratch.
        const T* q_ahead = kFromLogits && !want_grad ? nullptr : q;
        T* r = space.r.data() + c * L;
        T* a = space.a.data() + c * L;
        T* q_share = space.q_share.data() + c * L;
        const T scale = inv_s_t[static_cast<std::size_t>(c)];
        if (!eps_zero) {
          // log(r + eps) - log(q + eps) = log1p(d), d = (r - q) / (q + eps).
          // Where d >= -1/2 it is log(x) with x = fl(1 + d), plus the
          // rounding error of x: log1p(d) = log(x) + (d - (x - 1)) / x,
          // where x - 1 and d - (x - 1) are exact. That is exactly 0 at
          // r = q and keeps the difference when r and q both lie far
          // below eps. Where d < -1/2, 1 + d may round to 0, so x is the
          // ratio (r + eps) / (q + eps) itself. One log per element.
          T* x = space.tmp1.data();
          T* log_x = space.tmp2.data();
          T* d = a;  // d is kept in a until the loop below overwrites it
          // Returns 2 where some u or r lay outside divide_exactly's
          // range, and the row is then formed again by division.
          const auto form_r = [&](auto use_reciprocal) {
            Flag<T> bad = 0;
            QRLOSS_SIMD_LOOP_FLAGS
            for (Index i = 0; i < n; ++i) {
              const T u = q[i] * scale * p[i];
              const T ri = quotient<decltype(use_reciprocal)::value>(
                  u, clamped_sum[i], inv_t[i]);
              const T inverse = T(1) / (q[i] + eps);
              const T di = (ri - q[i]) * inverse;
              r[i] = ri;
              q_share[i] = q[i] * inverse;  // dL/dq's q / (q + eps)
              d[i] = di;
              x[i] = di >= T(-0.5) ? T(1) + di : (ri + eps) * inverse;
              bad |= outside_exact_quotient(u, ri);
            }
            return bad;
          };
          if (divide_tile || form_r(std::true_type{}) != 0) {
            form_r(std::false_type{});
          }
          log_to_prefetching(x, log_x, n, p, q_ahead);
          QRLOSS_SIMD_LOOP
          for (Index i = 0; i < n; ++i) {
            const T inverse_r = T(1) / (r[i] + eps);
            const T di = d[i];
            // 1 / x = (q + eps) / (r + eps) to a few ulp; the correction
            // itself is below one ulp of log(x), so that is ample.
            const T correction = (di - (x[i] - T(1))) * (q[i] + eps) * inverse_r;
            const T ratio =
                di >= T(-0.5) ? log_x[i] + correction : log_x[i];
            const T ai = ratio + r[i] * inverse_r;
            a[i] = ai;
            abar[i] += static_cast<double>(ai * r[i]);
            loss_sum[i] += static_cast<double>(r[i] * ratio);
          }
        } else {
          // With eps = 0, r log(r / q) = r log k with k = w, which stays
          // finite as q -> 0; `a` stores log k here.
          T* w = space.w.data() + c * L;
          T* term = space.tmp2.data();
          T* d_share = space.tmp1.data();  // r (log k + 1), or 0 where r = 0
          const auto form_r = [&](auto use_reciprocal) {
            Flag<T> bad = 0;
            QRLOSS_SIMD_LOOP_FLAGS
            for (Index i = 0; i < n; ++i) {
              const T u = q[i] * scale * p[i];
              w[i] = p[i] * scale * inv_t[i];
              r[i] = quotient<decltype(use_reciprocal)::value>(
                  u, clamped_sum[i], inv_t[i]);
              bad |= outside_exact_quotient(u, r[i]);
            }
            return bad;
          };
          if (divide_tile || form_r(std::true_type{}) != 0) {
            form_r(std::false_type{});
          }
          log_to_prefetching(w, a, n, p, q_ahead);
          QRLOSS_SIMD_LOOP
          for (Index i = 0; i < n; ++i) {
            const bool live = r[i] > T(0);
            term[i] = live ? r[i] * a[i] : T(0);
            d_share[i] = live ? r[i] * (a[i] + T(1)) : T(0);
          }
          QRLOSS_SIMD_LOOP
          for (Index i = 0; i < n; ++i) {
            loss_sum[i] += static_cast<double>(term[i]);
            abar[i] += static_cast<double>(d_share[i]);
          }
        }
      }
      sums.add(0, loss_sum, n);
      if (!want_grad) return;

      // A clamped pixel sum is a constant, so no abar term flows through it.
      T* abar_t = space.tmp1.data();
      QRLOSS_SIMD_LOOP
      for (Index i = 0; i < n; ++i) {
        abar[i] = pixel_sum[i] < kPixelSumFloor ? 0.0 : abar[i];
      }
      QRLOSS_SIMD_LOOP
      for (Index i = 0; i < n; ++i) abar_t[i] = static_cast<T>(abar[i]);

      // G_c partial sums and the per-pixel gradient part [eq. 4].
      for (Index c = 0; c < C; ++c) {
        const T* r = space.r.data() + c * L;
        const T* a = space.a.data() + c * L;
        const T* q_share = space.q_share.data() + c * L;
        T* out = space.grad.data() + c * L;
        T* term = space.tmp2.data();
        if (!eps_zero) {
          // w = p / (s_c t) is formed here, from the target row still in
          // cache, instead of going through scratch.
          const T* p = target + geometry.offset(b, c, p0);
          const T scale = inv_s_t[static_cast<std::size_t>(c)];
          Flag<T> bad = 0;
          QRLOSS_SIMD_LOOP_FLAGS
          for (Index i = 0; i < n; ++i) {
            const T centred = a[i] - abar_t[i];
            const T wi = p[i] * scale * inv_t[i];
            term[i] = r[i] * centred;
            out[i] = inv_pixels * wi * (centred - q_share[i]);
            bad |= beyond_quarter_range(out[i]);
          }
          if (bad != 0) large_part[static_cast<std::size_t>(chunk)] = 1;
        } else {
          const T* w = space.w.data() + c * L;
          Flag<T> bad = 0;
          QRLOSS_SIMD_LOOP_FLAGS
          for (Index i = 0; i < n; ++i) {
            const T centred = a[i] - abar_t[i];
            term[i] = r[i] > T(0) ? r[i] * (centred + T(1)) : T(0);
            out[i] = w[i] > T(0) ? inv_pixels * w[i] * centred : T(0);
            bad |= beyond_quarter_range(out[i]);
          }
          if (bad != 0) large_part[static_cast<std::size_t>(chunk)] = 1;
        }
        sums.add(1 + c, term, n);
      }
      store_gradient_tile<T, kFromLogits>(geometry, probs, space, L, b, p0, n,
                                          grad);
    });
    sums.finish();
    finish_streaming_stores();
  });
  raise_if_bad(call, "target", target, bad_target);
  if (std::find(sum_overflowed.begin(), sum_overflowed.end(), 1) !=
      sum_overflowed.end()) {
    return redo_or_throw(
        [&] { throw_pixel_sum_overflow(function, dtype, call.check); });
  }

  const std::vector<double> totals = partial.total();
  const double loss = call.inv_pixels * totals[0];
  raise_if_nan(call, loss, "the loss");
  if (std::isinf(loss)) {
    return redo_or_throw(
        [&] { throw_loss_overflow(function, dtype, call.check); });
  }
  if (!want_grad) return loss;

  // Pass 3: the batch-wide term -G_c / s_c, which is 0 for a clamped s_c.
  std::vector<T> class_term(static_cast<std::size_t>(C));
  bool check_sums =
      std::find(large_part.begin(), large_part.end(), 1) != large_part.end();
  for (Index c = 0; c < C; ++c) {
    const auto k = static_cast<std::size_t>(c);
    const double G = call.inv_pixels * totals[k + 1];
    raise_if_nan(call, G, "a class term of the gradient");
    class_term[k] = s_clamped[k] ? T(0) : static_cast<T>(G * inv_s[k]);
    if (!std::isfinite(class_term[k])) return redo_or_throw(raise_overflow);
    check_sums = check_sums || beyond_quarter_range(class_term[k]) != 0;
  }
  // The two parts of dL/dq can have opposite signs, so where either is
  // large their sum is checked (and a non-finite per-pixel part is caught).
  std::vector<unsigned char> overflowed(large_part.size(), 0);
  run_chunks(call.plan, call.threads, [&](Index chunk, int thread) {
    Workspace<T>& space = spaces[static_cast<std::size_t>(thread)];
    Flag<T> bad = 0;
    for_each_tile_of_chunk(call, chunk, [&](Index b, Index p0, Index n) {
      if constexpr (!kFromLogits) {
        for (Index c = 0; c < C; ++c) {
          T* out = grad + geometry.offset(b, c, p0);
          const T term = class_term[static_cast<std::size_t>(c)];
          if (!check_sums) {
            for (Index i = 0; i < n; ++i) out[i] -= term;
            continue;
          }
          Flag<T> row_bad = 0;
          QRLOSS_SIMD_LOOP_FLAGS
          for (Index i = 0; i < n; ++i) {
            out[i] -= term;
            row_bad |= invalid_flag(out[i], ValueRule::kFinite);
          }
          bad |= row_bad;
        }
      } else {
        // eq. 7 is linear in g, so the class term is chained separately:
        // dx_c -= q_c (term_c - sum_k term_k q_k).
        const Rows<T> probs = load_probs<T, true>(geometry, input, b, p0, n, L,
                                                  space, chunk, nullptr);
        T* dot_t = space.pixel.data();
        const T* terms = class_term.data();
        sum_over_classes(
            C, n,
            [&](Index c, Index i) {
              return static_cast<double>(terms[c]) *
                     static_cast<double>(probs.row(c)[i]);
            },
            [&](Index i, double total) { dot_t[i] = static_cast<T>(total); });
        for (Index c = 0; c < C; ++c) {
          const T* q = probs.row(c);
          T* out = grad + geometry.offset(b, c, p0);
          const T term = class_term[static_cast<std::size_t>(c)];
          prefetch_ahead(out, n);
          if (!check_sums) {
            for (Index i = 0; i < n; ++i) out[i] -= q[i] * (term - dot_t[i]);
            continue;
          }
          Flag<T> row_bad = 0;
          QRLOSS_SIMD_LOOP_FLAGS
          for (Index i = 0; i < n; ++i) {
            out[i] -= q[i] * (term - dot_t[i]);
            row_bad |= invalid_flag(out[i], ValueRule::kFinite);
          }
          bad |= row_bad;
        }
      }
    });
    if (bad != 0) overflowed[static_cast<std::size_t>(chunk)] = 1;
  });
  if (std::find(overflowed.begin(), overflowed.end(), 1) != overflowed.end()) {
    return redo_or_throw(raise_overflow);
  }
  return loss;
}

// ---------------------------------------------------------------------------
// Softmax and its vector-Jacobian product over whole tensors
// ---------------------------------------------------------------------------

/// Runs tile_fn(chunk, b, p0, n, L, space) over every tile of the tensor
/// in parallel. Per-pixel work only, so any schedule gives the same bits.
template <typename T, typename TileFn>
void for_each_pixel_tile(const Geometry& geometry, const ChunkPlan& plan,
                         int threads, WorkspaceNeeds needs, TileFn&& tile_fn) {
  const Index L = tile_pixels(geometry.C);
  const int team = static_cast<int>(std::min<Index>(threads, plan.num_chunks));
  Workspaces<T> spaces(team, geometry.C, L, needs);
  run_chunks(plan, team, [&](Index chunk, int thread) {
    const Index begin = chunk * plan.chunk_pixels;
    const Index end =
        std::min(begin + plan.chunk_pixels, geometry.num_pixels());
    for_each_tile(geometry, begin, end, L, [&](Index b, Index p0, Index n) {
      tile_fn(chunk, b, p0, n, L, spaces[static_cast<std::size_t>(thread)]);
    });
  });
}

/// Logs the first element of each class row of a tile that breaks the
/// rule. Called for a tile whose fused loop has raised a flag.
template <typename T>
void log_tile_rows(const Geometry& geometry, const T* data, Index b,
                   Index p0, Index n, ValueRule rule, Index chunk,
                   BadIndexLog& log) {
  for (Index c = 0; c < geometry.C; ++c) {
    const Index row = geometry.offset(b, c, p0);
    log_first_invalid(data + row, n, rule, row, chunk, log);
  }
}

/// The logits are checked in the softmax's first loop over them, so they
/// are read once.
template <typename T>
void softmax_impl(const char* function, const T* logits, T* probs,
                  const Geometry& geometry, const Shape& shape, int threads) {
  if (should_repack(geometry)) {
    const RepackBuffers<T> packed(geometry, 2);
    const ValueRule rule = ValueRule::kFinite;
    if (!repack_items(geometry, logits, packed.copy(0), threads, false,
                      &rule)) {
      check_values(function, "logits", logits, geometry, shape, rule,
                   threads);
    }
    softmax_impl(function, packed.copy(0), packed.copy(1),
                 repacked_geometry(geometry), repacked_shape(geometry),
                 threads);
    repack_items(geometry, packed.copy(1), probs, threads, true);
    return;
  }
  const ChunkPlan plan = plan_chunks(geometry.num_pixels());
  BadIndexLog bad_logits(plan.num_chunks);
  WorkspaceNeeds needs;
  needs.softmax = true;
  for_each_pixel_tile<T>(
      geometry, plan, threads, needs,
      [&](Index chunk, Index b, Index p0, Index n, Index L,
          Workspace<T>& space) {
        const Index offset = geometry.offset(b, 0, p0);
        const Flag<T> bad = softmax_tile(
            logits + offset, geometry.P, geometry.C, n, space.q.data(), L,
            space.pixel.data());
        if (bad != 0) {
          log_tile_rows(geometry, logits, b, p0, n, ValueRule::kFinite, chunk,
                        bad_logits);
        }
        for (Index c = 0; c < geometry.C; ++c) {
          std::copy(space.q.data() + c * L, space.q.data() + c * L + n,
                    probs + offset + c * geometry.P);
        }
      });
  const Index first_bad = bad_logits.first();
  if (first_bad >= 0) {
    throw_bad_value(function, "logits", logits, first_bad, geometry, shape);
  }
}

/// Ends the error for an infinite dL_dq, whose usual source is QR with
/// eps = 0.
inline constexpr char kInfiniteGradientHint[] =
    "qr_loss_grad with eps = 0 writes inf where target is 0 and -inf for a "
    "class whose probs are all 0, so use eps > 0";

/// Unless dL_dx is dL_dq, probs and dL_dq are checked in the VJP's first
/// loop over them, so they are read once. In place, a bad value found late
/// would leave dL_dq partly overwritten, so both are scanned first.
template <typename T>
void softmax_vjp_impl(const char* function, const T* probs, const T* dL_dq,
                      T* dL_dx, const Geometry& geometry, const Shape& shape,
                      int threads) {
  const bool in_place = dL_dx == dL_dq;
  if (should_repack(geometry)) {
    // The copies are checked as they are made. dL_dx is written only after
    // the VJP of the copies, so in place a bad value still leaves dL_dq
    // unchanged.
    const RepackBuffers<T> packed(geometry, 3);
    const ValueRule probs_rule = ValueRule::kNonNegative;
    const ValueRule grad_rule = ValueRule::kFinite;
    const bool probs_ok = repack_items(geometry, probs, packed.copy(0),
                                       threads, false, &probs_rule);
    const bool grad_ok = repack_items(geometry, dL_dq, packed.copy(1),
                                      threads, false, &grad_rule);
    if (!probs_ok) {
      check_values(function, "probs", probs, geometry, shape, probs_rule,
                   threads);
    }
    if (!grad_ok) {
      check_values(function, "dL_dq", dL_dq, geometry, shape, grad_rule,
                   threads, kInfiniteGradientHint);
    }
    softmax_vjp_impl(function, packed.copy(0), packed.copy(1), packed.copy(2),
                     repacked_geometry(geometry), repacked_shape(geometry),
                     threads);
    repack_items(geometry, packed.copy(2), dL_dx, threads, true);
    return;
  }
  if (in_place) {
    check_values(function, "probs", probs, geometry, shape,
                 ValueRule::kNonNegative, threads);
    check_values(function, "dL_dq", dL_dq, geometry, shape,
                 ValueRule::kFinite, threads, kInfiniteGradientHint);
  }
  const ChunkPlan plan = plan_chunks(geometry.num_pixels());
  BadIndexLog bad_probs(plan.num_chunks);
  BadIndexLog bad_grad(plan.num_chunks);
  // Chunks with an entry of dL_dx that is not finite, one byte each.
  std::vector<unsigned char> overflowed(
      static_cast<std::size_t>(plan.num_chunks), 0);
  for_each_pixel_tile<T>(
      geometry, plan, threads, WorkspaceNeeds{},
      [&](Index chunk, Index b, Index p0, Index n, Index,
          Workspace<T>& space) {
        const Index offset = geometry.offset(b, 0, p0);
        const Flag<T> bad = softmax_vjp_tile<true>(
            probs + offset, geometry.P, dL_dq + offset, geometry.P,
            dL_dx + offset, geometry.P, geometry.C, n, space.sum.data(),
            space.pixel.data());
        if ((bad & 1) != 0) {
          log_tile_rows(geometry, probs, b, p0, n, ValueRule::kNonNegative,
                        chunk, bad_probs);
          log_tile_rows(geometry, dL_dq, b, p0, n, ValueRule::kFinite, chunk,
                        bad_grad);
        }
        if ((bad & 2) != 0) overflowed[static_cast<std::size_t>(chunk)] = 1;
      });
  // probs is reported first, as a scan of probs before dL_dq would.
  const Index first_bad_probs = bad_probs.first();
  if (first_bad_probs >= 0) {
    throw_bad_value(function, "probs", probs, first_bad_probs, geometry,
                    shape);
  }
  const Index first_bad_grad = bad_grad.first();
  if (first_bad_grad >= 0) {
    throw_bad_value(function, "dL_dq", dL_dq, first_bad_grad, geometry,
                    shape, kInfiniteGradientHint);
  }
  if (std::find(overflowed.begin(), overflowed.end(), 1) != overflowed.end()) {
    throw invalid_argument(
        std::string(function) + ": non-finite result: dL_dx overflows " +
        type_name<T>() +
        " although probs and dL_dq are finite; rescale dL_dq");
  }
}

#define QRLOSS_INSTANTIATE_KERNELS_(T)                                       \
  template double qr_impl<T, false>(const char*, const T*, const T*, T*,    \
                                    const Shape&, const LossOptions&);      \
  template double qr_impl<T, true>(const char*, const T*, const T*, T*,     \
                                   const Shape&, const LossOptions&);       \
  template double rq_impl<T, false>(const char*, const T*, const T*, T*,    \
                                    const Shape&, const LossOptions&);      \
  template double rq_impl<T, true>(const char*, const T*, const T*, T*,     \
                                   const Shape&, const LossOptions&);       \
  template void softmax_impl<T>(const char*, const T*, T*, const Geometry&, \
                                const Shape&, int);                         \
  template void softmax_vjp_impl<T>(const char*, const T*, const T*, T*,    \
                                    const Geometry&, const Shape&, int);

QRLOSS_INSTANTIATE_KERNELS_(float)
QRLOSS_INSTANTIATE_KERNELS_(double)

#undef QRLOSS_INSTANTIATE_KERNELS_

}  // namespace qrloss::detail::QRLOSS_ISA
