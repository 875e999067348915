// ThreadSanitizer probe. Every loss entry point, softmax and softmax_vjp
// run at the same time from several std::threads and from inside a
// caller's OpenMP parallel region, in float and double. All callers read
// the same probs, logits and target buffers, and each writes its own
// outputs. The program exits 1 if any result differs from a serial call.
// .ci/tsan builds and runs it, and docs/reliability.md describes what
// ThreadSanitizer reports.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "qrloss/qrloss.hpp"

namespace {

using qrloss::LossKind;
using qrloss::Shape;

// 3 * 4500 = 13500 pixels: 7 chunks, so every call starts a team.
const Shape kShape = {3, 5, 45, 100};
constexpr int kCallers = 4;

template <typename T>
struct Inputs {
  std::vector<T> probs;
  std::vector<T> logits;
  std::vector<T> target;
};

template <typename T>
Inputs<T> make_inputs() {
  std::int64_t n = 1;
  for (std::int64_t extent : kShape) n *= extent;
  Inputs<T> in;
  in.probs.resize(static_cast<std::size_t>(n));
  in.logits.resize(static_cast<std::size_t>(n));
  in.target.resize(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    in.logits[i] = static_cast<T>(std::sin(0.37 * static_cast<double>(i)));
    in.target[i] = static_cast<T>(0.1 + 0.8 * ((i * 7919) % 101) / 100.0);
  }
  qrloss::softmax(in.logits.data(), in.probs.data(), kShape, 1);
  return in;
}

/// Calls every loss entry point (through compute_loss and
/// compute_loss_from_logits, with and without a gradient), softmax and
/// softmax_vjp. Returns the sum of the losses and writes every output
/// buffer, one after another, into `outputs`.
template <typename T>
double run_all(const Inputs<T>& in, std::vector<T>& outputs, int threads) {
  const std::size_t n = in.probs.size();
  outputs.assign(6 * n, T(0));
  qrloss::LossOptions options;
  options.num_threads = threads;
  double total = 0.0;
  std::size_t slot = 0;
  for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
    total += qrloss::compute_loss<T>(kind, in.probs.data(), in.target.data(),
                                     nullptr, kShape, options);
    total += qrloss::compute_loss<T>(kind, in.probs.data(), in.target.data(),
                                     outputs.data() + n * slot++, kShape,
                                     options);
    total += qrloss::compute_loss_from_logits<T>(
        kind, in.logits.data(), in.target.data(), nullptr, kShape, options);
    total += qrloss::compute_loss_from_logits<T>(
        kind, in.logits.data(), in.target.data(), outputs.data() + n * slot++,
        kShape, options);
  }
  T* probs = outputs.data() + n * slot++;
  qrloss::softmax(in.logits.data(), probs, kShape, threads);
  qrloss::softmax_vjp(in.probs.data(), in.target.data(),
                      outputs.data() + n * slot++, kShape, threads);
  return total;
}

template <typename T>
bool same(double a, double b, const std::vector<T>& x,
          const std::vector<T>& y) {
  return std::memcmp(&a, &b, sizeof a) == 0 && x.size() == y.size() &&
         std::memcmp(x.data(), y.data(), x.size() * sizeof(T)) == 0;
}

/// Returns how many concurrent results differ from a serial call. Inside
/// the caller's OpenMP region, nested parallelism is off (inner calls run on
/// one thread) and, when `nested` is set, on as well.
template <typename T>
int count_mismatches(bool nested) {
  const Inputs<T> in = make_inputs<T>();
  std::vector<T> serial_outputs;
  const double serial = run_all(in, serial_outputs, 1);
  int mismatches = 0;

  // std::threads, each starting its own OpenMP team of 2 threads.
  {
    std::vector<std::vector<T>> outputs(kCallers);
    std::vector<double> losses(kCallers);
    std::vector<std::thread> callers;
    for (int c = 0; c < kCallers; ++c) {
      callers.emplace_back(
          [&, c] { losses[c] = run_all(in, outputs[c], 2); });
    }
    for (std::thread& caller : callers) caller.join();
    for (int c = 0; c < kCallers; ++c) {
      mismatches += same(losses[c], serial, outputs[c], serial_outputs) ? 0 : 1;
    }
  }

  const int saved_levels = omp_get_max_active_levels();
  for (int levels : {1, 2}) {
    if (levels > 1 && !nested) continue;
    omp_set_max_active_levels(levels);
    std::vector<std::vector<T>> outputs(kCallers);
    std::vector<double> losses(kCallers);
#pragma omp parallel num_threads(kCallers)
    {
      const int c = omp_get_thread_num();
      losses[c] = run_all(in, outputs[c], 0);
    }
    for (int c = 0; c < kCallers; ++c) {
      mismatches += same(losses[c], serial, outputs[c], serial_outputs) ? 0 : 1;
    }
  }
  omp_set_max_active_levels(saved_levels);
  return mismatches;
}

}  // namespace

int main(int argc, char** argv) {
  // --no-nested leaves out nested parallel regions. docs/reliability.md
  // explains why .ci/tsan passes it.
  const bool nested = !(argc > 1 && std::strcmp(argv[1], "--no-nested") == 0);
  const int mismatches =
      count_mismatches<float>(nested) + count_mismatches<double>(nested);
  std::printf("concurrent_calls: %d concurrent results differ from the "
              "serial call\n",
              mismatches);
  return mismatches == 0 ? 0 : 1;
}
