#pragma once
// Vectorised log and exp over arrays, through SLEEF (libsleef-dev).
//
// SLEEF rather than Eigen's packet math, because log dominates the losses
// and SLEEF's is faster. With AVX-512, Eigen 3.4's float log took 0.85 ns
// per element against 0.21 ns for SLEEF's 3.5-ulp log on an Intel Xeon,
// and 0.72 against 0.22 ns on the AMD EPYC of docs/performance.md.
// Every element, the tail included, goes through the same packet function
// (the tail is padded), so a value never depends on its position.
// Accuracy: log within 3.5 ulp, exp within 1.0 ulp, in float and double;
// both return exact 0, subnormals and infinities where std:: does.

#include <immintrin.h>
#include <sleef.h>

#include <algorithm>
#include <cstdint>

#include "detail/isa.hpp"
#include "detail/passes.hpp"

// sleef.h declares each function only when the compiler flags enable its
// instruction set, and a `#pragma GCC target` region does not signal that
// to the preprocessor. So the variants declare what they call themselves.
extern "C" {
#if QRLOSS_ISA_LEVEL >= 2 && !defined(__AVX512F__)
__m512 Sleef_logf16_u35avx512f(__m512);
__m512 Sleef_expf16_u10avx512f(__m512);
__m512d Sleef_logd8_u35avx512f(__m512d);
__m512d Sleef_expd8_u10avx512f(__m512d);
#elif QRLOSS_ISA_LEVEL == 1 && !defined(__AVX2__)
__m256 Sleef_logf8_u35avx2(__m256);
__m256 Sleef_expf8_u10avx2(__m256);
__m256d Sleef_logd4_u35avx2(__m256d);
__m256d Sleef_expd4_u10avx2(__m256d);
#endif
}

namespace qrloss::detail::QRLOSS_ISA {

#if QRLOSS_ISA_LEVEL >= 2
inline __m512 vlog_packet(__m512 x) { return Sleef_logf16_u35avx512f(x); }
inline __m512 vexp_packet(__m512 x) { return Sleef_expf16_u10avx512f(x); }
inline __m512d vlog_packet(__m512d x) { return Sleef_logd8_u35avx512f(x); }
inline __m512d vexp_packet(__m512d x) { return Sleef_expd8_u10avx512f(x); }
inline __m512 vload(const float* p) { return _mm512_loadu_ps(p); }
inline __m512d vload(const double* p) { return _mm512_loadu_pd(p); }
inline void vstore(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void vstore(double* p, __m512d x) { _mm512_storeu_pd(p, x); }
inline constexpr Index kVectorBytes = 64;
#elif QRLOSS_ISA_LEVEL == 1
inline __m256 vlog_packet(__m256 x) { return Sleef_logf8_u35avx2(x); }
inline __m256 vexp_packet(__m256 x) { return Sleef_expf8_u10avx2(x); }
inline __m256d vlog_packet(__m256d x) { return Sleef_logd4_u35avx2(x); }
inline __m256d vexp_packet(__m256d x) { return Sleef_expd4_u10avx2(x); }
inline __m256 vload(const float* p) { return _mm256_loadu_ps(p); }
inline __m256d vload(const double* p) { return _mm256_loadu_pd(p); }
inline void vstore(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
inline void vstore(double* p, __m256d x) { _mm256_storeu_pd(p, x); }
inline constexpr Index kVectorBytes = 32;
#else
// The baseline build calls SLEEF's dispatchers, which pick SSE2, SSE4.1 or
// 128-bit AVX2 code at run time.
inline __m128 vlog_packet(__m128 x) { return Sleef_logf4_u35(x); }
inline __m128 vexp_packet(__m128 x) { return Sleef_expf4_u10(x); }
inline __m128d vlog_packet(__m128d x) { return Sleef_logd2_u35(x); }
inline __m128d vexp_packet(__m128d x) { return Sleef_expd2_u10(x); }
inline __m128 vload(const float* p) { return _mm_loadu_ps(p); }
inline __m128d vload(const double* p) { return _mm_loadu_pd(p); }
inline void vstore(float* p, __m128 x) { _mm_storeu_ps(p, x); }
inline void vstore(double* p, __m128d x) { _mm_storeu_pd(p, x); }
inline constexpr Index kVectorBytes = 16;
#endif

#if QRLOSS_ISA_LEVEL >= 2
inline void vstream(float* p, __m512 x) { _mm512_stream_ps(p, x); }
inline void vstream(double* p, __m512d x) { _mm512_stream_pd(p, x); }
#elif QRLOSS_ISA_LEVEL == 1
inline void vstream(float* p, __m256 x) { _mm256_stream_ps(p, x); }
inline void vstream(double* p, __m256d x) { _mm256_stream_pd(p, x); }
#else
inline void vstream(float* p, __m128 x) { _mm_stream_ps(p, x); }
inline void vstream(double* p, __m128d x) { _mm_stream_pd(p, x); }
#endif

/// Copies src[0, n) to dst with non-temporal stores where dst is aligned
/// to a vector and plain stores for the unaligned head and the tail. A
/// thread must call finish_streaming_stores() before others read dst.
template <typename T>
inline void stream_store(T* dst, const T* src, Index n) {
  constexpr Index kWidth = kVectorBytes / static_cast<Index>(sizeof(T));
  Index i = 0;
  while (i < n && reinterpret_cast<std::uintptr_t>(dst + i) % kVectorBytes) {
    dst[i] = src[i];
    ++i;
  }
  for (; i + kWidth <= n; i += kWidth) vstream(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

/// How far ahead prefetch_stream requests a row that a loop reads once.
inline constexpr std::uintptr_t kStreamAheadBytes = 2048;

/// Requests into L1 the lines of x[0, kStep) shifted kStreamAheadBytes
/// ahead, for a loop that reads a long row kStep elements per step. On the
/// Intel guest of docs/performance.md, a standalone two-thread sum of
/// 100 MB took 1.9 ms with it and 2.6 to 3.5 ms without. For rows that the
/// loop also writes, it was slower (RQ's third pass, in the same
/// document). As in prefetch_ahead, addresses past the row's end are
/// formed as integers.
template <typename T, int kStep>
inline void prefetch_stream(const T* x) {
  const std::uintptr_t first =
      reinterpret_cast<std::uintptr_t>(x) + kStreamAheadBytes;
  for (std::uintptr_t offset = 0; offset < kStep * sizeof(T); offset += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(first + offset), _MM_HINT_T0);
  }
}

/// Requests the cache lines of x[2n, 3n) (the same row two tiles ahead)
/// into L2, so that they arrive while this tile and the next compute.
/// Without it, the cores waited for memory and computed in turn. On the
/// AMD EPYC (Zen 4) of docs/performance.md, prefetching one tile ahead
/// into L1 stalled on the prefetches themselves: QR took 24 ms against 18
/// ms into L2 and 17.5 ms into L2 two tiles ahead. On the Intel Xeon of
/// earlier runs, L2 or two tiles ahead measured the same as L1 one tile
/// ahead, or worse.
template <typename T>
inline void prefetch_ahead(const T* x, Index n) {
  // Addresses past the end of the row's buffer are harmless to prefetch
  // (a prefetch never faults) but not to form as pointers, so the
  // arithmetic is on integers.
  const auto bytes = static_cast<std::uintptr_t>(n) * sizeof(T);
  const std::uintptr_t first = reinterpret_cast<std::uintptr_t>(x) + 2 * bytes;
  for (std::uintptr_t line = first; line < first + bytes; line += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T1);
  }
}

/// Orders this thread's streaming stores before its later stores, so that
/// the barrier after a parallel region publishes them.
inline void finish_streaming_stores() { _mm_sfence(); }

/// Writes packet_fn(x[i]) to y[i] for i < n, in packets; the tail is
/// padded with `pad` and computed as one more packet. y may be x.
template <typename T, typename PacketFn>
inline void apply_packets(const T* x, T* y, Index n, T pad,
                          PacketFn packet_fn) {
  constexpr Index kWidth = kVectorBytes / static_cast<Index>(sizeof(T));
  Index i = 0;
  for (; i + kWidth <= n; i += kWidth) {
    vstore(y + i, packet_fn(vload(x + i)));
  }
  if (i == n) return;
  alignas(64) T tail[kWidth];
  std::fill(tail, tail + kWidth, pad);
  std::copy(x + i, x + n, tail);
  vstore(tail, packet_fn(vload(tail)));
  std::copy(tail, tail + (n - i), y + i);
}

/// Writes packet_fn(x[i], z[i]) to y[i] for i < n, in packets, as
/// apply_packets does; the tail of x is padded with `pad_x` and that of z
/// with `pad_z`.
template <typename T, typename PacketFn>
inline void apply_packets2(const T* x, const T* z, T* y, Index n, T pad_x,
                           T pad_z, PacketFn packet_fn) {
  constexpr Index kWidth = kVectorBytes / static_cast<Index>(sizeof(T));
  Index i = 0;
  for (; i + kWidth <= n; i += kWidth) {
    vstore(y + i, packet_fn(vload(x + i), vload(z + i)));
  }
  if (i == n) return;
  alignas(64) T tail_x[kWidth];
  alignas(64) T tail_z[kWidth];
  std::fill(tail_x, tail_x + kWidth, pad_x);
  std::fill(tail_z, tail_z + kWidth, pad_z);
  std::copy(x + i, x + n, tail_x);
  std::copy(z + i, z + n, tail_z);
  vstore(tail_x, packet_fn(vload(tail_x), vload(tail_z)));
  std::copy(tail_x, tail_x + (n - i), y + i);
}

/// y[i] = log(x[i]) for i < n.
template <typename T>
inline void log_to(const T* x, T* y, Index n) {
  apply_packets(x, y, n, T(1), [](auto v) { return vlog_packet(v); });
}

/// Calls packet_at(i) for i = 0, kWidth, ... while a whole packet fits in
/// n. Meanwhile it requests into L2 the lines that prefetch_ahead would
/// request for the rows a and b (b may be null): n elements each, two row
/// lengths ahead. It issues one line per stream for each 64 bytes of
/// progress instead of all of them at once. Issued at once, they stalled
/// the core: on the Intel Xeon guest of docs/performance.md, 17 % of RQ's
/// second-pass samples sat on them. Spreading them took 4 to 13 % off
/// each float32 loss with AVX-512, and 23 % off float64 QR from logits.
/// Returns the first index that no packet covered.
template <typename T, typename PacketAt>
inline Index for_each_packet_prefetching(Index n, const T* a, const T* b,
                                         PacketAt&& packet_at) {
  constexpr Index kWidth = kVectorBytes / static_cast<Index>(sizeof(T));
  constexpr Index kPerLine = 64 / static_cast<Index>(sizeof(T));
  const auto bytes = static_cast<std::uintptr_t>(n) * sizeof(T);
  // Integers, as in prefetch_ahead: the lines can lie past the buffers.
  std::uintptr_t line_a = reinterpret_cast<std::uintptr_t>(a) + 2 * bytes;
  std::uintptr_t line_b =
      b != nullptr ? reinterpret_cast<std::uintptr_t>(b) + 2 * bytes : 0;
  const std::uintptr_t end_a = line_a + bytes;
  const auto request = [&] {
    _mm_prefetch(reinterpret_cast<const char*>(line_a), _MM_HINT_T1);
    if (b != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(line_b), _MM_HINT_T1);
    }
    line_a += 64;
    line_b += 64;
  };
  Index i = 0;
  for (; i + kPerLine <= n; i += kPerLine) {
    for (Index k = 0; k < kPerLine; k += kWidth) packet_at(i + k);
    request();
  }
  for (; i + kWidth <= n; i += kWidth) packet_at(i);
  while (line_a < end_a) request();
  return i;
}

/// Writes log(x[i]) to y[i] as log_to does, and prefetches the rows a and
/// b (b may be null) as for_each_packet_prefetching does.
template <typename T>
inline void log_to_prefetching(const T* x, T* y, Index n, const T* a,
                               const T* b) {
  const Index done = for_each_packet_prefetching(
      n, a, b, [&](Index i) { vstore(y + i, vlog_packet(vload(x + i))); });
  if (done < n) log_to(x + done, y + done, n - done);
}

/// y[i] = log(x[i] + shift) for i < n. The add happens in the packet, with
/// the same rounding as a scalar add, and saves a pass over y.
template <typename T>
inline void log_shifted(const T* x, T shift, T* y, Index n) {
  apply_packets(x, y, n, T(1),
                [shift](auto v) { return vlog_packet(v + shift); });
}

/// Writes log(x[i] + shift) to y[i] as log_shifted does, and prefetches
/// the rows a and b (b may be null) as for_each_packet_prefetching does.
template <typename T>
inline void log_shifted_prefetching(const T* x, T shift, T* y, Index n,
                                    const T* a, const T* b) {
  const Index done = for_each_packet_prefetching(n, a, b, [&](Index i) {
    vstore(y + i, vlog_packet(vload(x + i) + shift));
  });
  if (done < n) log_shifted(x + done, shift, y + done, n - done);
}

/// y[i] = exp(x[i] - z[i]) for i < n, with the subtraction in the packet.
template <typename T>
inline void exp_difference(const T* x, const T* z, T* y, Index n) {
  apply_packets2(x, z, y, n, T(0), T(0),
                 [](auto a, auto b) { return vexp_packet(a - b); });
}

/// Writes exp(x[i] - z[i]) to y[i] as exp_difference does, and prefetches
/// the rows a and b (b may be null) as for_each_packet_prefetching does.
template <typename T>
inline void exp_difference_prefetching(const T* x, const T* z, T* y, Index n,
                                       const T* a, const T* b = nullptr) {
  const Index done = for_each_packet_prefetching(n, a, b, [&](Index i) {
    vstore(y + i, vexp_packet(vload(x + i) - vload(z + i)));
  });
  if (done < n) exp_difference(x + done, z + done, y + done, n - done);
}

}  // namespace qrloss::detail::QRLOSS_ISA
