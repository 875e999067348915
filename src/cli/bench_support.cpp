// Timing of the loss kernels against a STREAM-style triad floor.

#include "bench_support.hpp"

#include <algorithm>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "detail/openmp.hpp"
#include "detail/passes.hpp"
#include "qrloss/error.hpp"
#include "timing.hpp"

namespace qrloss::bench {
namespace {

/// Uniform double in [0, 1) from a 64-bit counter (splitmix64), so that
/// inputs can be filled in parallel and still be the same for any thread
/// count.
double uniform_at(std::uint64_t counter) {
  std::uint64_t z = counter + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

/// Allocates on 64-byte boundaries, as tensor libraries do (PyTorch's CPU
/// allocator uses c10::gAlignment = 64 outside mobile builds), so that the
/// rows of a tile start where they would in a training loop.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(
        ::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, std::size_t) {
    ::operator delete(p, std::align_val_t{64});
  }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

template <typename T>
struct Buffers {
  AlignedVector<T> input;
  AlignedVector<T> target;
  AlignedVector<T> grad;
  AlignedVector<T> triad_b;
  AlignedVector<T> triad_c;
};

/// Fills probs (or logits) and a prior on the call's threads, so that on
/// a NUMA machine the pages lie near them (first touch). The split is by
/// pixel, while the triad splits by element and the kernel hands out
/// chunks dynamically, so each thread reads some pages that another
/// wrote.
template <typename T>
Buffers<T> make_buffers(const Shape& shape, bool from_logits,
                        [[maybe_unused]] int threads) {
  std::int64_t n = 1;
  for (std::int64_t extent : shape) n *= extent;
  const std::int64_t C = shape[1];
  const std::int64_t P = n / (shape[0] * C);
  Buffers<T> buffers;
  const auto size = static_cast<std::size_t>(n);
  buffers.input.resize(size);
  buffers.target.resize(size);
  buffers.grad.resize(size);
  buffers.triad_b.resize(size);
  buffers.triad_c.resize(size);
  const std::int64_t pixels = shape[0] * P;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (std::int64_t pixel = 0; pixel < pixels; ++pixel) {
    const std::int64_t b = pixel / P;
    const std::int64_t p = pixel % P;
    double q_sum = 0.0;
    double prior_sum = 0.0;
    for (std::int64_t c = 0; c < C; ++c) {
      const auto k = static_cast<std::uint64_t>((b * C + c) * P + p);
      q_sum += 0.05 + uniform_at(3 * k);
      prior_sum += 0.05 + uniform_at(3 * k + 1);
    }
    for (std::int64_t c = 0; c < C; ++c) {
      const std::int64_t flat = (b * C + c) * P + p;
      const auto k = static_cast<std::uint64_t>(flat);
      const double q = (0.05 + uniform_at(3 * k)) / q_sum;
      buffers.input[flat] =
          static_cast<T>(from_logits ? 4.0 * uniform_at(3 * k + 2) - 2.0 : q);
      buffers.target[flat] =
          static_cast<T>((0.05 + uniform_at(3 * k + 1)) / prior_sum);
      buffers.grad[flat] = T(0);
      buffers.triad_b[flat] = static_cast<T>(q);
      buffers.triad_c[flat] = buffers.target[flat];
    }
  }
  return buffers;
}

template <typename T>
double run_kernel(const Workload& workload, Buffers<T>& buffers,
                  const LossOptions& options) {
  T* grad = workload.with_grad ? buffers.grad.data() : nullptr;
  if (workload.from_logits) {
    return compute_loss_from_logits<T>(workload.kind, buffers.input.data(),
                                       buffers.target.data(), grad,
                                       workload.shape, options);
  }
  return compute_loss<T>(workload.kind, buffers.input.data(),
                         buffers.target.data(), grad, workload.shape, options);
}

template <typename T>
void run_triad(AlignedVector<T>& a, const AlignedVector<T>& b,
               const AlignedVector<T>& c, [[maybe_unused]] int threads) {
  const auto n = static_cast<std::int64_t>(a.size());
  const T scale = T(0.5);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (std::int64_t i = 0; i < n; ++i) a[i] = b[i] + scale * c[i];
}

/// Returns the number of threads that a loss call over `shape` runs on
/// when given `requested`: one per 2048 pixels (rounded up), at most 256.
/// The pixels are counted by the library's own geometry (B*H*W, or B for
/// B x C). A 4x5 batch runs on one thread, and a triad on two threads would
/// mostly time the start of the second.
template <typename T>
int call_threads_for_shape(const Shape& shape, int requested) {
  const qrloss::detail::Geometry geometry =
      qrloss::detail::make_geometry("qrloss bench", "probs", shape, sizeof(T));
  return qrloss::detail::call_threads(
      qrloss::detail::plan_chunks(geometry.num_pixels()), requested);
}

template <typename T>
Timing time_typed(const Workload& workload) {
  const int requested = qrloss::detail::resolve_threads(workload.threads);
  const int team = call_threads_for_shape<T>(workload.shape, requested);
  Buffers<T> buffers =
      make_buffers<T>(workload.shape, workload.from_logits, team);
  LossOptions options;
  options.num_threads = requested;

  // One untimed run of each warms caches, page tables and the thread pool.
  Timing timing;
  timing.loss = run_kernel(workload, buffers, options);
  run_triad(buffers.grad, buffers.triad_b, buffers.triad_c, team);

  std::vector<double> kernel_s;
  std::vector<double> floor_s;
  for (int r = 0; r < workload.repeat; ++r) {
    floor_s.push_back(seconds([&] {
      run_triad(buffers.grad, buffers.triad_b, buffers.triad_c, team);
    }));
    kernel_s.push_back(
        seconds([&] { run_kernel(workload, buffers, options); }));
  }
  const double elements = static_cast<double>(buffers.input.size());
  const double bytes = 3.0 * elements * sizeof(T);
  timing.threads = requested;
  timing.call_threads = team;
  timing.median_s = median(kernel_s);
  timing.min_s = *std::min_element(kernel_s.begin(), kernel_s.end());
  timing.floor_s = median(floor_s);
  timing.ratio_to_floor = timing.median_s / timing.floor_s;
  timing.effective_gbytes_per_s = bytes / timing.median_s * 1e-9;
  timing.floor_gbytes_per_s = bytes / timing.floor_s * 1e-9;
  timing.pixels_per_s =
      elements / static_cast<double>(workload.shape[1]) / timing.median_s;
  return timing;
}

}  // namespace

Timing time_workload(const Workload& workload) {
  if (workload.repeat < 1) {
    throw invalid_argument("time_workload: bad repeat: expected >= 1, got " +
                           std::to_string(workload.repeat));
  }
  if (workload.shape.size() != 2 && workload.shape.size() != 4) {
    throw invalid_argument(
        "time_workload: bad rank: expected shape B,C or B,C,H,W, got " +
        format_shape(workload.shape));
  }
  for (std::int64_t extent : workload.shape) {
    if (extent <= 0) {
      throw invalid_argument("time_workload: empty tensor: shape " +
                             format_shape(workload.shape) +
                             ", expected every extent >= 1");
    }
  }
  return workload.float32 ? time_typed<float>(workload)
                          : time_typed<double>(workload);
}

const char* simd_level() { return kernel_isa(); }

}  // namespace qrloss::bench
