// Google Benchmark driver: loss + gradient time against a STREAM-style
// triad floor measured in the same process. Each benchmark runs one
// qrloss::bench::time_workload (median of `kRepeat` runs) and reports it as
// the iteration time, with counters:
//   ratio_to_floor  median kernel time / median triad time
//   GB/s            3 tensors (input, target, gradient) / median time
//   floor_GB/s      the same bytes / median triad time
//   Mpixels/s       pixels (B*H*W) per second

#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bench_support.hpp"

namespace {

using qrloss::LossKind;
using qrloss::Shape;
using qrloss::bench::Workload;

constexpr int kRepeat = 5;

void run(benchmark::State& state, Workload workload) {
  workload.threads = static_cast<int>(state.range(0));
  workload.repeat = kRepeat;
  for (auto _ : state) {
    const qrloss::bench::Timing timing = qrloss::bench::time_workload(workload);
    state.SetIterationTime(timing.median_s);
    state.counters["ratio_to_floor"] = timing.ratio_to_floor;
    state.counters["GB/s"] = timing.effective_gbytes_per_s;
    state.counters["floor_GB/s"] = timing.floor_gbytes_per_s;
    state.counters["Mpixels/s"] = timing.pixels_per_s * 1e-6;
    state.counters["threads"] = timing.threads;
    benchmark::DoNotOptimize(timing.loss);
  }
}

std::string name_of(const Workload& w) {
  std::string name = std::string(qrloss::loss_name(w.kind)) +
                     (w.from_logits ? "/logits" : "/probs") +
                     (w.float32 ? "/f32/" : "/f64/");
  for (std::size_t d = 0; d < w.shape.size(); ++d) {
    name += (d ? "x" : "") + std::to_string(w.shape[d]);
  }
  return name;
}

void add(const Workload& workload, const std::vector<int>& thread_counts) {
  auto* bench = benchmark::RegisterBenchmark(
      name_of(workload).c_str(),
      [workload](benchmark::State& state) { run(state, workload); });
  for (int threads : thread_counts) bench->Arg(threads);
  bench->ArgName("threads")->Iterations(1)->UseManualTime()->Unit(
      benchmark::kMillisecond);
}

void register_all() {
  const std::vector<int> all_cores = {0};  // 0: OpenMP default
  const std::vector<int> scaling = {1, 0};
  const std::vector<Shape> main_shapes = {
      {16, 6, 512, 512},  // 100 MB per float32 tensor: beyond any cache
      {8, 5, 256, 256},   // 10 MB per float32 tensor
  };
  for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
    for (bool from_logits : {false, true}) {
      for (bool float32 : {true, false}) {
        for (const Shape& shape : main_shapes) {
          Workload w;
          w.kind = kind;
          w.from_logits = from_logits;
          w.float32 = float32;
          w.shape = shape;
          add(w, float32 && shape == main_shapes[0] ? scaling : all_cores);
        }
      }
    }
  }
  // Linear cost in C and in H*W (float32, probs and logits).
  for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
    for (bool from_logits : {false, true}) {
      for (std::int64_t C : {2, 4, 8, 16, 32, 64}) {
        Workload w;
        w.kind = kind;
        w.from_logits = from_logits;
        w.shape = Shape{4, C, 256, 256};
        add(w, all_cores);
      }
      for (std::int64_t side : {64, 256, 1024, 2048}) {
        Workload w;
        w.kind = kind;
        w.from_logits = from_logits;
        w.shape = Shape{1, 6, side, side};
        add(w, all_cores);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("simd", qrloss::bench::simd_level());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
