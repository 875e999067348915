// Times the memory traffic of each kernel's passes without their
// arithmetic: an estimate of the fastest that any implementation with the
// same passes can run. Each pattern reads and writes float32 tensors of
// 16x6x512x512 elements (100 MB each) as the pass table of
// docs/performance.md lists, and adds two numbers per element in place of
// the kernel's arithmetic. One more pattern times RQ from logits with the
// softmax computed again in its second pass instead of stored. The loops
// use AVX-512, AVX2 or SSE2, whichever is the widest the CPU has, with
// four independent sums. Each pattern runs with and without software
// prefetching, and the faster variant is printed. Runs alternate with
// the triad floor of `qrloss bench`, and one JSON object per pattern
// gives median_s, floor_s and ratio_to_floor.
//
//   traffic_bound [THREADS]   (default: OpenMP's default thread count)

#include <immintrin.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "timing.hpp"

namespace {

using qrloss::bench::median;
using qrloss::bench::seconds;

constexpr std::int64_t kElements = 16LL * 6 * 512 * 512;
// Floats per loop step (four AVX-512 vectors). Thread shares are whole
// steps.
constexpr std::int64_t kStep = 64;
static_assert(kElements % kStep == 0, "loops have no tail");
constexpr int kRepeat = 15;
// Rejects typing mistakes such as 20000, with the same limit as --threads
// of qrloss bench.
constexpr long kMaxThreads = 4096;
// Prefetch distance into L2 for the variant with prefetching. By
// estimate, a thread streaming 20 GB/s with 100 ns of memory latency has
// 2 KB in flight, and 8 KB ahead covers that with room to spare.
constexpr std::uintptr_t kPrefetchBytes = 8192;

struct FreeDeleter {
  void operator()(float* data) const { std::free(data); }
};
using Buffer = std::unique_ptr<float[], FreeDeleter>;

Buffer make_buffer(float value) {
  const std::size_t bytes = static_cast<std::size_t>(kElements) * sizeof(float);
  auto* data = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (data == nullptr) {
    std::fprintf(stderr,
                 "traffic_bound: allocation failed: 5 buffers of %zu bytes "
                 "are needed\n",
                 bytes);
    std::exit(1);
  }
  std::fill(data, data + kElements, value);
  return Buffer(data);
}

// Requests the line kPrefetchBytes past x into L2. The address is formed
// as an integer because it can lie past the end of the buffer.
inline void prefetch(const float* x) {
  _mm_prefetch(reinterpret_cast<const char*>(
                   reinterpret_cast<std::uintptr_t>(x) + kPrefetchBytes),
               _MM_HINT_T1);
}

// The three loops of a pass, over one thread's share [begin, end) of the
// elements, both multiples of kStep. `read` returns the sum of a.
// `stream` writes out = a + b with streaming stores, or a + 1 for a null
// b. `update` writes out = out + a with plain stores, or out - 1 for a
// null a.
struct Loops {
  const char* isa;
  float (*read)(const float* a, std::int64_t begin, std::int64_t end,
                bool ahead);
  void (*stream)(const float* a, const float* b, float* out, std::int64_t begin,
                 std::int64_t end, bool ahead);
  void (*update)(const float* a, float* out, std::int64_t begin,
                 std::int64_t end, bool ahead);
};

__attribute__((target("avx512f"))) float read_avx512(const float* a,
                                                     std::int64_t begin,
                                                     std::int64_t end,
                                                     bool ahead) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (std::int64_t i = begin; i < end; i += kStep) {
    if (ahead) prefetch(a + i);
    s0 = _mm512_add_ps(s0, _mm512_load_ps(a + i));
    s1 = _mm512_add_ps(s1, _mm512_load_ps(a + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_load_ps(a + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_load_ps(a + i + 48));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes,
                  _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  float total = 0.0f;
  for (float lane : lanes) total += lane;
  return total;
}

__attribute__((target("avx512f"))) void stream_avx512(
    const float* a, const float* b, float* out, std::int64_t begin,
    std::int64_t end, bool ahead) {
  const __m512 ones = _mm512_set1_ps(1.0f);
  for (std::int64_t i = begin; i < end; i += kStep) {
    if (ahead) {
      prefetch(a + i);
      if (b != nullptr) prefetch(b + i);
    }
    for (std::int64_t k = 0; k < kStep; k += 16) {
      const __m512 y = b != nullptr ? _mm512_load_ps(b + i + k) : ones;
      _mm512_stream_ps(out + i + k,
                       _mm512_add_ps(_mm512_load_ps(a + i + k), y));
    }
  }
}

__attribute__((target("avx512f"))) void update_avx512(const float* a,
                                                      float* out,
                                                      std::int64_t begin,
                                                      std::int64_t end,
                                                      bool ahead) {
  const __m512 minus_one = _mm512_set1_ps(-1.0f);
  for (std::int64_t i = begin; i < end; i += kStep) {
    if (ahead) {
      prefetch(out + i);
      if (a != nullptr) prefetch(a + i);
    }
    for (std::int64_t k = 0; k < kStep; k += 16) {
      const __m512 y = a != nullptr ? _mm512_load_ps(a + i + k) : minus_one;
      _mm512_store_ps(out + i + k,
                      _mm512_add_ps(_mm512_load_ps(out + i + k), y));
    }
  }
}

__attribute__((target("avx2"))) float read_avx2(const float* a,
                                                std::int64_t begin,
                                                std::int64_t end, bool ahead) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (std::int64_t i = begin; i < end; i += 32) {
    if (ahead && i % kStep == 0) prefetch(a + i);
    s0 = _mm256_add_ps(s0, _mm256_load_ps(a + i));
    s1 = _mm256_add_ps(s1, _mm256_load_ps(a + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_load_ps(a + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_load_ps(a + i + 24));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes,
                  _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  float total = 0.0f;
  for (float lane : lanes) total += lane;
  return total;
}

__attribute__((target("avx2"))) void stream_avx2(const float* a, const float* b,
                                                 float* out, std::int64_t begin,
                                                 std::int64_t end, bool ahead) {
  const __m256 ones = _mm256_set1_ps(1.0f);
  for (std::int64_t i = begin; i < end; i += kStep) {
    if (ahead) {
      prefetch(a + i);
      if (b != nullptr) prefetch(b + i);
    }
    for (std::int64_t k = 0; k < kStep; k += 8) {
      const __m256 y = b != nullptr ? _mm256_load_ps(b + i + k) : ones;
      _mm256_stream_ps(out + i + k,
                       _mm256_add_ps(_mm256_load_ps(a + i + k), y));
    }
  }
}

__attribute__((target("avx2"))) void update_avx2(const float* a, float* out,
                                                 std::int64_t begin,
                                                 std::int64_t end, bool ahead) {
  const __m256 minus_one = _mm256_set1_ps(-1.0f);
  for (std::int64_t i = begin; i < end; i += kStep) {
    if (ahead) {
      prefetch(out + i);
      if (a != nullptr) prefetch(a + i);
    }
    for (std::int64_t k = 0; k < kStep; k += 8) {
      const __m256 y = a != nullptr ? _mm256_load_ps(a + i + k) : minus_one;
      _mm256_store_ps(out + i + k,
                      _mm256_add_ps(_mm256_load_ps(out + i + k), y));
    }
  }
}

// NOTE: SSE2's 16-byte streaming stores moved RQ's data about 25 % slower
// than the AVX-512 loops on the same CPU, so on a CPU with neither AVX2
// nor AVX-512 the times are loose estimates.
float read_sse2(const float* a, std::int64_t begin, std::int64_t end,
                bool ahead) {
  __m128 s0 = _mm_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (std::int64_t i = begin; i < end; i += 16) {
    if (ahead && i % kStep == 0) prefetch(a + i);
    s0 = _mm_add_ps(s0, _mm_load_ps(a + i));
    s1 = _mm_add_ps(s1, _mm_load_ps(a + i + 4));
    s2 = _mm_add_ps(s2, _mm_load_ps(a + i + 8));
    s3 = _mm_add_ps(s3, _mm_load_ps(a + i + 12));
  }
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, _mm_add_ps(_mm_add_ps(s0, s1), _mm_add_ps(s2, s3)));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

void stream_sse2(const float* a, const float* b, float* out, std::int64_t begin,
                 std::int64_t end, bool ahead) {
  const __m128 ones = _mm_set1_ps(1.0f);
  for (std::int64_t i = begin; i < end; i += 4) {
    if (ahead && i % kStep == 0) {
      prefetch(a + i);
      if (b != nullptr) prefetch(b + i);
    }
    const __m128 y = b != nullptr ? _mm_load_ps(b + i) : ones;
    _mm_stream_ps(out + i, _mm_add_ps(_mm_load_ps(a + i), y));
  }
}

void update_sse2(const float* a, float* out, std::int64_t begin,
                 std::int64_t end, bool ahead) {
  const __m128 minus_one = _mm_set1_ps(-1.0f);
  for (std::int64_t i = begin; i < end; i += 4) {
    if (ahead && i % kStep == 0) {
      prefetch(out + i);
      if (a != nullptr) prefetch(a + i);
    }
    const __m128 y = a != nullptr ? _mm_load_ps(a + i) : minus_one;
    _mm_store_ps(out + i, _mm_add_ps(_mm_load_ps(out + i), y));
  }
}

Loops select_loops() {
  if (__builtin_cpu_supports("avx512f")) {
    return {"avx512", read_avx512, stream_avx512, update_avx512};
  }
  if (__builtin_cpu_supports("avx2")) {
    return {"avx2", read_avx2, stream_avx2, update_avx2};
  }
  return {"sse2", read_sse2, stream_sse2, update_sse2};
}

// Calls body(begin, end) on each thread with its static share of the
// elements, in whole steps: about the shares of `omp for schedule(static)`,
// and the same ones where the thread count divides the number of steps.
template <typename Body>
void for_each_share([[maybe_unused]] int threads, Body&& body) {
  constexpr std::int64_t kSteps = kElements / kStep;
#pragma omp parallel num_threads(threads)
  {
    std::int64_t thread = 0;
    std::int64_t count = 1;
#if defined(_OPENMP)
    thread = omp_get_thread_num();
    count = omp_get_num_threads();
#endif
    body(kSteps * thread / count * kStep,
         kSteps * (thread + 1) / count * kStep);
  }
}

volatile float g_sink = 0.0f;  // keeps the sums of read-only passes alive

void read_pass(const Loops& loops, const float* a, int threads, bool ahead) {
  std::vector<float> sums(static_cast<std::size_t>(threads), 0.0f);
  for_each_share(threads, [&](std::int64_t begin, std::int64_t end) {
    const float sum = loops.read(a, begin, end, ahead);
#if defined(_OPENMP)
    sums[static_cast<std::size_t>(omp_get_thread_num())] = sum;
#else
    sums[0] = sum;
#endif
  });
  float total = 0.0f;
  for (float sum : sums) total += sum;
  g_sink = total;
}

void streaming_pass(const Loops& loops, const float* a, const float* b,
                    float* out, int threads, bool ahead) {
  for_each_share(threads, [&](std::int64_t begin, std::int64_t end) {
    loops.stream(a, b, out, begin, end, ahead);
    _mm_sfence();  // orders the streaming stores before the region ends
  });
}

void update_pass(const Loops& loops, const float* a, float* out, int threads,
                 bool ahead) {
  for_each_share(threads, [&](std::int64_t begin, std::int64_t end) {
    loops.update(a, out, begin, end, ahead);
  });
}

// The floor of `qrloss bench`: the same loop as its run_triad.
void triad(float* a, const float* b, const float* c,
           [[maybe_unused]] int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (std::int64_t i = 0; i < kElements; ++i) a[i] = b[i] + 0.5f * c[i];
}

struct Pattern {
  const char* kernel;
  const char* passes;
  bool as_built;  // whether qrloss runs these passes
  std::function<void(bool ahead)> run;
};

struct Timing {
  double median_s;
  double floor_s;
};

#if defined(__clang__)
constexpr char kCompiler[] = "clang " __clang_version__;
#else
constexpr char kCompiler[] = "GCC " __VERSION__;
#endif

// Returns text without the quotes, backslashes and control characters
// that a JSON string cannot hold unescaped.
std::string json_safe(std::string text) {
  text.erase(std::remove_if(text.begin(), text.end(),
                            [](char ch) {
                              return ch == '"' || ch == '\\' ||
                                     static_cast<unsigned char>(ch) < 0x20;
                            }),
             text.end());
  return text;
}

// Returns the CPU's model name from /proc/cpuinfo, or "unknown".
std::string cpu_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    const std::size_t colon = line.find(':');
    if (colon == std::string::npos || colon + 2 > line.size()) break;
    return json_safe(line.substr(colon + 2));
  }
  return "unknown";
}

// Returns THREADS from the command line, or 0 where it is not an integer
// from 1 to kMaxThreads.
int parse_threads(const char* text) {
  // strtol alone would also take leading spaces and a sign.
  if (text[0] < '0' || text[0] > '9') return 0;
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
  if (argc == 2 && (std::strcmp(argv[1], "--help") == 0 ||
                    std::strcmp(argv[1], "-h") == 0)) {
    std::printf(
        "usage: traffic_bound [THREADS]\n"
        "Times the memory traffic of each kernel's passes, float32 "
        "16x6x512x512, next to the triad floor of qrloss bench.\n"
        "THREADS: OpenMP threads, an integer from 1 to %ld (default: the "
        "OpenMP default).\n",
        kMaxThreads);
    return 0;
  }
  if (argc > 2) {
    std::fprintf(stderr,
                 "traffic_bound: expected at most one argument, THREADS, "
                 "got %d\n",
                 argc - 1);
    return 2;
  }
  if (argc == 2 && parse_threads(argv[1]) == 0) {
    std::fprintf(stderr,
                 "traffic_bound: invalid THREADS '%s': expected a number of "
                 "OpenMP threads from 1 to %ld\n",
                 argv[1], kMaxThreads);
    return 2;
  }
  int threads = 1;
#if defined(_OPENMP)
  threads = argc == 2 ? parse_threads(argv[1]) : omp_get_max_threads();
#else
  if (argc == 2 && parse_threads(argv[1]) != 1) {
    std::fprintf(stderr,
                 "traffic_bound: this build has no OpenMP and runs 1 "
                 "thread, not %s\n",
                 argv[1]);
  }
#endif

  const Loops loops = select_loops();
  const std::string cpu = cpu_name();
  const char* omp_env = std::getenv("OMP_NUM_THREADS");
  // OMP_NUM_THREADS as a JSON value: a string, or null where it is unset.
  const std::string omp_setting =
      omp_env != nullptr ? "\"" + json_safe(omp_env) + "\"" : "null";
  const Buffer x = make_buffer(0.5f);  // probs or logits
  const Buffer p = make_buffer(0.25f);
  const Buffer g = make_buffer(0.0f);
  const Buffer b = make_buffer(1.0f);  // triad operands
  const Buffer c = make_buffer(2.0f);
  const auto read = [&](const Buffer& a, bool ahead) {
    read_pass(loops, a.get(), threads, ahead);
  };
  const auto stream = [&](const Buffer& a, const float* second, bool ahead) {
    streaming_pass(loops, a.get(), second, g.get(), threads, ahead);
  };
  const auto update = [&](const float* a, bool ahead) {
    update_pass(loops, a, g.get(), threads, ahead);
  };
  const std::vector<Pattern> patterns = {
      {"qr", "read q | read q, p; stream g", true,
       [&](bool ahead) {
         read(x, ahead);
         stream(x, p.get(), ahead);
       }},
      {"qr_logits", "read x; stream g | read g, p; write g", true,
       [&](bool ahead) {
         stream(x, nullptr, ahead);
         update(p.get(), ahead);
       }},
      {"rq", "read q | read q, p; stream g | read g; write g", true,
       [&](bool ahead) {
         read(x, ahead);
         stream(x, p.get(), ahead);
         update(nullptr, ahead);
       }},
      {"rq_logits",
       "read x; stream g | read g, p; write g | read x, g; write g", true,
       [&](bool ahead) {
         stream(x, nullptr, ahead);
         update(p.get(), ahead);
         update(x.get(), ahead);
       }},
      {"rq_logits", "read x | read x, p; stream g | read x, g; write g", false,
       [&](bool ahead) {
         read(x, ahead);
         stream(x, p.get(), ahead);
         update(x.get(), ahead);
       }},
  };
  for (const Pattern& pattern : patterns) {
    Timing best = {0.0, 0.0};
    bool best_ahead = false;
    for (const bool ahead : {false, true}) {
      pattern.run(ahead);  // untimed: page tables and the thread pool
      triad(g.get(), b.get(), c.get(), threads);
      std::vector<double> times;
      std::vector<double> floors;
      for (int r = 0; r < kRepeat; ++r) {
        floors.push_back(
            seconds([&] { triad(g.get(), b.get(), c.get(), threads); }));
        times.push_back(seconds([&] { pattern.run(ahead); }));
      }
      const Timing timing = {median(times), median(floors)};
      if (best.median_s == 0.0 || timing.median_s < best.median_s) {
        best = timing;
        best_ahead = ahead;
      }
    }
    std::printf(
        "{\"kernel\": \"%s\", \"passes\": \"%s\", \"as_built\": %s, "
        "\"loops\": \"%s\", \"prefetch\": %s, \"threads\": %d, "
        "\"omp_num_threads\": %s, \"shape\": [16, 6, 512, 512], "
        "\"dtype\": \"float32\", \"median_s\": %.6g, \"floor_s\": %.6g, "
        "\"ratio_to_floor\": %.3f, \"cpu\": \"%s\", \"compiler\": \"%s\"}\n",
        pattern.kernel, pattern.passes, pattern.as_built ? "true" : "false",
        loops.isa, best_ahead ? "true" : "false", threads, omp_setting.c_str(),
        best.median_s, best.floor_s, best.median_s / best.floor_s, cpu.c_str(),
        kCompiler);
  }
  return 0;
}
