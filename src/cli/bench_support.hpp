#pragma once
// Timing of the loss kernels against a memory-traffic floor, shared by
// `qrloss bench` and the Google Benchmark programs in bench/.

#include <cstdint>
#include <string>

#include "qrloss/losses.hpp"

namespace qrloss::bench {

/// One configuration to time.
struct Workload {
  LossKind kind = LossKind::kQR;
  bool from_logits = false;
  bool with_grad = true;
  Shape shape;  // B,C,H,W or B,C; every caller sets it
  bool float32 = true;
  int threads = 0;  // 0: OpenMP default
  int repeat = 5;
};

/// Medians over the repeats. The floor is a STREAM-style triad
/// a[i] = b[i] + s * c[i] over as many elements of the same type, on the
/// threads that the loss call runs on (call_threads). Each repeat runs the
/// triad right before the kernel, so both see the same machine load.
struct Timing {
  double median_s = 0.0;
  double min_s = 0.0;
  double floor_s = 0.0;
  double ratio_to_floor = 0.0;
  /// 3 tensors (probs or logits, target, gradient) over median_s, in GB/s.
  double effective_gbytes_per_s = 0.0;
  double floor_gbytes_per_s = 0.0;
  double pixels_per_s = 0.0;
  double loss = 0.0;
  int threads = 0;       // threads requested, 0 resolved to OpenMP's default
  int call_threads = 0;  // threads that the loss call and the triad ran on
};

/// Times a workload on synthetic inputs: per-pixel probabilities and a
/// prior drawn from a fixed seed, logits in [-2, 2].
/// @throws qrloss::invalid_argument on a bad shape or repeat < 1.
Timing time_workload(const Workload& workload);

/// The instruction set the loss kernels run with (qrloss::kernel_isa).
const char* simd_level();

}  // namespace qrloss::bench
