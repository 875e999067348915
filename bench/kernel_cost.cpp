// Single-thread cost per element of each kernel with all data in L2
// (shape 2x6x128x128, float32): the arithmetic cost, without memory
// traffic. Prints the kernel variant that ran (QRLOSS_ISA lowers it), then
// the minimum over 41 calls of each kernel, in ns per element.
//
//   [QRLOSS_ISA=baseline|avx2|avx512] kernel_cost

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

#include "qrloss/qrloss.hpp"

namespace {

void print_costs() {
  using Clock = std::chrono::steady_clock;
  const qrloss::Shape shape = {2, 6, 128, 128};
  const std::size_t n = 2 * 6 * 128 * 128;
  std::vector<float> probs(n), target(n), grad(n);
  // Values in [0.05, 0.35]: fixed, spread, and away from every clamp.
  for (std::size_t i = 0; i < n; ++i) {
    probs[i] =
        0.05f + 0.3f * static_cast<float>((i * 2654435761u) % 1000) / 1000.f;
    target[i] = 0.05f + 0.3f * static_cast<float>((i * 40503u) % 1000) / 1000.f;
  }
  qrloss::LossOptions options;
  options.num_threads = 1;
  const char* names[] = {"QR loss",          "QR loss + gradient",
                         "RQ loss",          "RQ loss + gradient",
                         "QR logits + grad", "RQ logits + grad",
                         "softmax",          "softmax_vjp"};
  constexpr int kKernels = sizeof(names) / sizeof(names[0]);
  for (int kernel = 0; kernel < kKernels; ++kernel) {
    double best = 1e30;
    for (int run = 0; run < 41; ++run) {
      const auto start = Clock::now();
      const float* x = probs.data();
      const float* p = target.data();
      switch (kernel) {
        case 0:
          qrloss::qr_loss(x, p, shape, options);
          break;
        case 1:
          qrloss::qr_loss_grad(x, p, grad.data(), shape, options);
          break;
        case 2:
          qrloss::rq_loss(x, p, shape, options);
          break;
        case 3:
          qrloss::rq_loss_grad(x, p, grad.data(), shape, options);
          break;
        case 4:
          qrloss::qr_loss_grad_from_logits(x, p, grad.data(), shape, options);
          break;
        case 5:
          qrloss::rq_loss_grad_from_logits(x, p, grad.data(), shape, options);
          break;
        case 6:
          qrloss::softmax(x, grad.data(), shape, options.num_threads);
          break;
        default:
          // probs serve as q and target as dL/dq, since any finite g will do.
          qrloss::softmax_vjp(x, p, grad.data(), shape, options.num_threads);
      }
      best = std::min(
          best, std::chrono::duration<double>(Clock::now() - start).count());
    }
    std::printf("%-20s %.3f ns/element\n", names[kernel],
                best / static_cast<double>(n) * 1e9);
  }
}

}  // namespace

int main(int argc, char** argv) {
  constexpr char kUsage[] =
      "usage: [QRLOSS_ISA=baseline|avx2|avx512] kernel_cost (no arguments)\n";
  if (argc > 1) {
    const bool help =
        std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0;
    std::fputs(kUsage, help ? stdout : stderr);
    return help ? 0 : 2;
  }
  try {
    std::printf("variant %s, 1 thread, float32 2x6x128x128\n",
                qrloss::kernel_isa());
    print_costs();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "kernel_cost: %s\n", error.what());
    return 2;
  }
  return 0;
}
