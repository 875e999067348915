// Times the memory traffic of each kernel's passes without their
// arithmetic, which estimates the fastest that any implementation with
// the same passes can run. Each pattern reads and writes float32 tensors
// of 16x6x512x512 elements (100 MB each) as the pass table of
// docs/performance.md lists. It adds two numbers per element in place of
// the kernel's arithmetic. Runs alternate with the triad floor of
// `qrloss bench`, and one JSON object per pattern gives median_s, floor_s
// and ratio_to_floor.
//
//   traffic_bound [THREADS]   (default: OpenMP's default thread count)

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::int64_t kElements = 16LL * 6 * 512 * 512;
constexpr int kRepeat = 15;
// Rejects typing mistakes such as 20000. Raise it for a larger machine.
constexpr long kMaxThreads = 1024;

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float[], FreeDeleter>;

Buffer make_buffer(float value) {
  auto* data = static_cast<float*>(std::aligned_alloc(
      64, static_cast<std::size_t>(kElements) * sizeof(float)));
  if (data == nullptr) {
    std::fprintf(stderr, "traffic_bound: cannot allocate 100 MB\n");
    std::exit(1);
  }
  for (std::int64_t i = 0; i < kElements; ++i) data[i] = value;
  return Buffer(data);
}

volatile float g_sink = 0.0f;  // keeps the sums of read-only passes alive

// Reads a once, as the first pass over probs does for the class sums.
void read_pass(const float* a, [[maybe_unused]] int threads) {
  float total = 0.0f;
#pragma omp parallel for simd schedule(static) num_threads(threads) \
    reduction(+ : total)
  for (std::int64_t i = 0; i < kElements; ++i) total += a[i];
  g_sink = total;
}

// out = a + b with streaming stores, as the passes that write the gradient
// buffer first (QR's gradient pass, RQ's second pass, the softmax pass).
// A null b gives out = a + 1.
void streaming_pass(const float* a, const float* b, float* out,
                    [[maybe_unused]] int threads) {
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (std::int64_t i = 0; i < kElements; i += 4) {
#if defined(__SSE2__)
      const __m128 x = _mm_load_ps(a + i);
      const __m128 y = b != nullptr ? _mm_load_ps(b + i) : _mm_set1_ps(1.0f);
      _mm_stream_ps(out + i, _mm_add_ps(x, y));
#else
      for (std::int64_t j = i; j < i + 4; ++j) {
        out[j] = a[j] + (b != nullptr ? b[j] : 1.0f);
      }
#endif
    }
#if defined(__SSE2__)
    _mm_sfence();
#endif
  }
}

// out = out + a with plain stores, as RQ's third pass (a null) and the
// logits paths' later passes (a = p or x). A null a gives out = out - 1.
void update_pass(const float* a, float* out, [[maybe_unused]] int threads) {
#pragma omp parallel for simd schedule(static) num_threads(threads)
  for (std::int64_t i = 0; i < kElements; ++i) {
    out[i] += a != nullptr ? a[i] : -1.0f;
  }
}

void triad(float* a, const float* b, const float* c,
           [[maybe_unused]] int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (std::int64_t i = 0; i < kElements; ++i) a[i] = b[i] + 0.5f * c[i];
}

template <typename F>
double seconds(F&& f) {
  const auto start = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

struct Pattern {
  const char* kernel;
  const char* passes;
  std::function<void()> run;
};

// Returns THREADS from the command line, or 0 where it is not an integer
// from 1 to kMaxThreads.
int parse_threads(const char* text) {
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || value < 1 ||
      value > kMaxThreads) {
    return 0;
  }
  return static_cast<int>(value);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
#if defined(_OPENMP)
  threads = omp_get_max_threads();
#endif
  if (argc > 2) {
    std::fprintf(stderr,
                 "traffic_bound: expected at most one argument, THREADS, "
                 "got %d\n",
                 argc - 1);
    return 2;
  }
  if (argc == 2 && parse_threads(argv[1]) == 0) {
    std::fprintf(stderr,
                 "traffic_bound: invalid THREADS '%s': expected an integer "
                 "from 1 to %ld\n",
                 argv[1], kMaxThreads);
    return 2;
  }
  if (argc == 2) threads = parse_threads(argv[1]);
#if !defined(_OPENMP)
  threads = 1;  // a build without OpenMP runs one thread
#endif

  const Buffer x = make_buffer(0.5f);  // probs or logits
  const Buffer p = make_buffer(0.25f);
  const Buffer g = make_buffer(0.0f);
  const Buffer b = make_buffer(1.0f);  // triad operands
  const Buffer c = make_buffer(2.0f);
  const std::vector<Pattern> patterns = {
      {"qr", "read q | read q, p; stream g",
       [&] {
         read_pass(x.get(), threads);
         streaming_pass(x.get(), p.get(), g.get(), threads);
       }},
      {"qr_logits", "read x; stream g | read g, p; write g",
       [&] {
         streaming_pass(x.get(), nullptr, g.get(), threads);
         update_pass(p.get(), g.get(), threads);
       }},
      {"rq", "read q | read q, p; stream g | read g; write g",
       [&] {
         read_pass(x.get(), threads);
         streaming_pass(x.get(), p.get(), g.get(), threads);
         update_pass(nullptr, g.get(), threads);
       }},
      {"rq_logits",
       "read x; stream g | read g, p; write g | read x, g; write g",
       [&] {
         streaming_pass(x.get(), nullptr, g.get(), threads);
         update_pass(p.get(), g.get(), threads);
         update_pass(x.get(), g.get(), threads);
       }},
  };
  for (const Pattern& pattern : patterns) {
    pattern.run();  // untimed: page tables and the thread pool
    triad(g.get(), b.get(), c.get(), threads);
    std::vector<double> times;
    std::vector<double> floors;
    for (int r = 0; r < kRepeat; ++r) {
      floors.push_back(
          seconds([&] { triad(g.get(), b.get(), c.get(), threads); }));
      times.push_back(seconds(pattern.run));
    }
    const double time = median(times);
    const double floor = median(floors);
    std::printf(
        "{\"kernel\": \"%s\", \"passes\": \"%s\", \"threads\": %d, "
        "\"median_s\": %.6g, \"floor_s\": %.6g, \"ratio_to_floor\": %.3f}\n",
        pattern.kernel, pattern.passes, threads, time, floor, time / floor);
  }
  return 0;
}
