// The `qrloss bench` subcommand: times the loss and gradient on synthetic
// inputs against a STREAM-style triad floor and prints one JSON object.

#include <CLI/CLI.hpp>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <new>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench_support.hpp"
#include "commands.hpp"
#include "qrloss/error.hpp"
#include "qrloss/losses.hpp"

namespace qrloss::cli {
namespace {

// Option values of one `qrloss bench` run.
struct BenchSettings {
  std::string loss = "qr";
  bool from_logits = false;
  std::string shape_text = "8,19,512,512";
  std::vector<std::int64_t> shape;
  std::string dtype = "float32";
  int threads = 0;
  int repeat = 5;
  bool loss_only = false;
};

// Largest element count that bench allocates: five tensors of this size
// (input, target, gradient and two triad arrays) must fit in memory.
constexpr std::int64_t kMaxBenchElements = std::int64_t{1} << 31;

// Largest --repeat: catches typing mistakes such as 150000 for 15, which at
// 16x6x512x512 would time the kernel and its floor for over an hour.
constexpr int kMaxRepeat = 10000;

// Reads comma-separated whole numbers such as "16,6,512,512" into
// `extents`. Every item must be a number (digits, with an optional leading
// '+' or '-'), so an empty item ("2,,64" or a trailing comma) or a space is
// an error too. Returns the error message, or "".
std::string parse_extents(const std::string& text,
                          std::vector<std::int64_t>* extents) {
  extents->clear();
  const char* item = text.data();
  const char* const text_end = text.data() + text.size();
  for (;;) {
    const char* first = item;
    if (first != text_end && *first == '+') ++first;  // as --eps accepts
    std::int64_t value = 0;
    const auto [stop, error] = std::from_chars(first, text_end, value);
    const bool at_end = stop == text_end;
    if (error != std::errc() || (!at_end && *stop != ',')) {
      return "expected whole-number extents such as 16,6,512,512, got '" +
             text + "'";
    }
    extents->push_back(value);
    if (at_end) return {};
    item = stop + 1;
  }
}

// Reads a --shape text into `shape`: two or four positive extents with at
// most kMaxBenchElements elements in all. Returns the error message, or "".
std::string parse_shape(const std::string& text,
                        std::vector<std::int64_t>* shape) {
  const std::string error = parse_extents(text, shape);
  if (!error.empty()) return error;
  if (shape->size() != 2 && shape->size() != 4) {
    return "expected B,C or B,C,H,W, got '" + text + "'";
  }
  std::int64_t elements = 1;
  for (std::int64_t extent : *shape) {
    if (extent <= 0 || elements > kMaxBenchElements / extent) {
      return "expected positive extents with at most " +
             std::to_string(kMaxBenchElements) + " elements in all, got '" +
             text + "'";
    }
    elements *= extent;
  }
  return {};
}

void run_bench(BenchSettings& settings) {
  // The validator of --shape has accepted the text already.
  parse_shape(settings.shape_text, &settings.shape);

  bench::Workload workload;
  workload.kind = settings.loss == "qr" ? LossKind::kQR : LossKind::kRQ;
  workload.from_logits = settings.from_logits;
  workload.with_grad = !settings.loss_only;
  workload.shape = settings.shape;
  workload.float32 = settings.dtype == "float32";
  workload.threads = settings.threads;
  workload.repeat = settings.repeat;

  bench::Timing timing;
  try {
    timing = bench::time_workload(workload);
  } catch (const qrloss::invalid_argument& error) {
    fail_command("bench", kExitUsage, error.what());
  } catch (const std::bad_alloc&) {
    fail_command("bench", kExitInternal,
                 "internal error: out of memory for shape " +
                     qrloss::format_shape(settings.shape));
  }

  nlohmann::ordered_json output;
  output["loss_name"] = settings.loss;
  output["input"] = settings.from_logits ? "logits" : "probs";
  output["gradient"] = !settings.loss_only;
  output["shape"] = settings.shape;
  output["dtype"] = settings.dtype;
  output["threads"] = timing.threads;
  output["call_threads"] = timing.call_threads;
  output["repeat"] = settings.repeat;
  output["simd"] = bench::simd_level();
  output["median_s"] = timing.median_s;
  output["min_s"] = timing.min_s;
  output["floor_s"] = timing.floor_s;
  output["ratio_to_floor"] = timing.ratio_to_floor;
  output["gbytes_per_s"] = timing.effective_gbytes_per_s;
  output["floor_gbytes_per_s"] = timing.floor_gbytes_per_s;
  output["pixels_per_s"] = timing.pixels_per_s;
  output["loss"] = timing.loss;
  print_result("bench", output.dump());
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto settings = std::make_shared<BenchSettings>();
  CLI::App* bench = app.add_subcommand(
      "bench", "Time the loss and its gradient on synthetic inputs.");
  bench->footer(
      "Prints one JSON object: median_s (median time of loss plus gradient,\n"
      "or of the loss alone with --loss-only), floor_s (a STREAM triad over\n"
      "as many elements, from cache for shapes that fit), ratio_to_floor,\n"
      "gbytes_per_s, call_threads (the threads of the loss call and of the\n"
      "triad: the requested count, but at most one per 2048 pixels, rounded\n"
      "up, and at most 256), simd (the kernel variant that ran), the loss\n"
      "and the settings. The environment variable\n"
      "QRLOSS_ISA=baseline|avx2|avx512 lowers the kernel variant.");

  bench
      ->add_option("--loss", settings->loss,
                   "Loss to time: qr (QR loss) or rq (RQ loss)")
      ->check(one_of({"qr", "rq"}))
      ->capture_default_str();
  bench->add_flag("--from-logits", settings->from_logits,
                  "Time the logits entry points (softmax over C included) "
                  "instead of the probs entry points");
  bench
      ->add_option("--shape", settings->shape_text,
                   "Input shape B,C,H,W (or B,C), comma-separated")
      ->check(CLI::Validator(
          [](std::string& text) {
            // CLI11's own message for a failed conversion names neither
            // the format nor the value's role.
            std::vector<std::int64_t> shape;
            return parse_shape(text, &shape);
          },
          ""))
      ->type_name("B,C,H,W")
      ->capture_default_str();
  bench
      ->add_option("--dtype", settings->dtype,
                   "Element type of the synthetic inputs: float32 or "
                   "float64")
      ->check(one_of({"float32", "float64"}))
      ->capture_default_str();
  bench
      ->add_option("--threads", settings->threads,
                   "OpenMP threads, from 0 to " + std::to_string(kMaxThreads) +
                       "; 0 uses the OpenMP default (OMP_NUM_THREADS, else "
                       "one per core). A build without OpenMP runs on 1 "
                       "thread")
      ->type_name("N")
      ->check(int_in_range(0, kMaxThreads))
      ->capture_default_str();
  bench
      ->add_option("--repeat", settings->repeat,
                   "Number of timed runs, from 1 to " +
                       std::to_string(kMaxRepeat) + "; the median is reported")
      ->type_name("R")
      ->check(int_in_range(1, kMaxRepeat))
      ->capture_default_str();

  bench->add_flag("--loss-only", settings->loss_only,
                  "Time the loss alone, without the gradient");

  bench->callback([settings] { run_bench(*settings); });
}

}  // namespace qrloss::cli
