// Argument checks and error messages shared by every entry point.

#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

#include "detail/lanes.hpp"
#include "detail/passes.hpp"
#include "qrloss/error.hpp"
#include "qrloss/losses.hpp"
#include "qrloss/tensor.hpp"

namespace qrloss {

std::string format_shape(const Shape& shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (d > 0) out << ',';
    out << shape[d];
  }
  out << ']';
  return out.str();
}

const char* loss_name(LossKind kind) {
  switch (kind) {
    case LossKind::kQR:
      return "qr";
    case LossKind::kRQ:
      return "rq";
  }
  return "invalid";
}

namespace detail {

namespace {

/// Formats a value with the fewest digits that read back as the same
/// double, and no '+' in the exponent: 1e-30 (not 1.0000000000000001e-30)
/// and 1e20, as the command line and the docs write them.
std::string format_double(double value) {
  // The sign of a NaN means nothing, and to_chars would print "-nan".
  if (std::isnan(value)) return "nan";
  char text[32];
  const std::to_chars_result result =
      std::to_chars(text, text + sizeof text, value);
  std::string formatted(text, result.ptr);
  const std::size_t plus = formatted.find("e+");
  if (plus != std::string::npos) formatted.erase(plus + 1, 1);
  return formatted;
}

}  // namespace

void check_same_shape(const char* function, const char* tensor,
                      const Shape& expected, const Shape& actual) {
  if (expected == actual) return;
  throw invalid_argument(std::string(function) + ": shape mismatch: expected " +
                         tensor + " " + format_shape(expected) + ", got " +
                         format_shape(actual));
}

std::string Geometry::position(Index flat, const Shape& shape) const {
  const Index pixel = flat % P;
  const Index c = (flat / P) % C;
  const Index b = flat / (P * C);
  std::ostringstream out;
  out << "(b=" << b << ",c=" << c;
  if (shape.size() == 4) {
    const Index W = shape[3];
    out << ",h=" << pixel / W << ",w=" << pixel % W;
  }
  out << ')';
  return out.str();
}

Geometry make_geometry(const char* function, const char* tensor,
                       const Shape& shape, std::size_t element_size) {
  const std::string prefix = std::string(function) + ": ";
  if (shape.size() != 2 && shape.size() != 4) {
    throw invalid_argument(prefix + "bad rank: expected " + tensor +
                           " of rank 2 (B,C) or 4 (B,C,H,W), got rank " +
                           std::to_string(shape.size()) + " " +
                           format_shape(shape));
  }
  for (std::int64_t extent : shape) {
    if (extent <= 0) {
      const char* problem = extent == 0 ? "empty tensor: " : "bad shape: ";
      throw invalid_argument(prefix + problem + tensor + " has shape " +
                             format_shape(shape) +
                             ", expected every extent >= 1");
    }
  }
  // Checked products: an overflowing count must be an error, not a wrapped
  // size that allocates or indexes the wrong amount of memory.
  const std::int64_t max_elements = std::numeric_limits<std::int64_t>::max() /
                                    static_cast<std::int64_t>(element_size);
  std::int64_t count = 1;
  for (std::int64_t extent : shape) {
    if (count > max_elements / extent) {
      throw invalid_argument(prefix + "size overflow: " + tensor + " shape " +
                             format_shape(shape) +
                             " has more bytes than fit in int64");
    }
    count *= extent;
  }
  Geometry geometry;
  geometry.rank = static_cast<int>(shape.size());
  geometry.B = shape[0];
  geometry.C = shape[1];
  geometry.P = shape.size() == 4 ? shape[2] * shape[3] : 1;
  return geometry;
}

void check_eps(const char* function, double eps) {
  // NaN fails every comparison, so it takes the error branch too.
  const bool valid =
      eps == 0.0 || (eps >= kMinPositiveEps && eps <= kMaxEps);
  if (!valid) {
    throw invalid_argument(
        std::string(function) + ": bad eps: expected 0 or a value in [" +
        format_double(kMinPositiveEps) + ", " + format_double(kMaxEps) +
        "], got " + format_double(eps));
  }
}

void check_not_null(const char* function, const char* tensor,
                    const void* data) {
  if (data != nullptr) return;
  throw invalid_argument(std::string(function) + ": null data: " + tensor +
                         " is a null pointer");
}

void check_no_overlap(const char* function, const char* output_name,
                      const void* output, const char* input_name,
                      const void* input, const Shape& shape,
                      std::size_t element_size) {
  std::int64_t count = 1;
  for (std::int64_t extent : shape) count *= extent;
  const std::size_t bytes = static_cast<std::size_t>(count) * element_size;
  const auto out_begin = reinterpret_cast<std::uintptr_t>(output);
  const auto in_begin = reinterpret_cast<std::uintptr_t>(input);
  const bool disjoint =
      out_begin + bytes <= in_begin || in_begin + bytes <= out_begin;
  if (disjoint) return;
  // A shape larger than the caller's buffers also makes them overlap, so
  // the message gives the extent that the check assumed.
  throw invalid_argument(
      std::string(function) + ": overlapping buffers: " + output_name +
      " overlaps " + input_name + ", as each spans " + std::to_string(count) +
      " elements for shape " + format_shape(shape) +
      "; pass a separate output buffer, or fix the shape if the buffers "
      "hold fewer elements");
}

void throw_tiny_class_total(const char* function, Index c, double total,
                            const char* dtype, bool inputs_checked) {
  const std::string start = std::string(function) +
                            ": non-finite result: class " + std::to_string(c) +
                            " has total probability " + format_double(total) +
                            " over the batch";
  if (total < 0.0) {
    // Only negative probs, which the scan rejects, give a negative total.
    throw invalid_argument(start +
                           ", which eps = 0 clamps to 0, so the factor 1 / "
                           "s_c is infinite" +
                           unchecked_hint(inputs_checked));
  }
  throw invalid_argument(start +
                         ", so with eps = 0 the factor 1 / s_c overflows " +
                         dtype + "; use eps > 0" +
                         unchecked_hint(inputs_checked));
}

void throw_large_class_total(const char* function, Index c, double total,
                             const char* dtype, bool inputs_checked) {
  throw invalid_argument(
      std::string(function) + ": probs too large: class " + std::to_string(c) +
      " has total probability " + format_double(total) +
      " over the batch, so 1 / s_c lies below the normal range of " + dtype +
      " and z = q / s_c would lose digits; scale probs down" +
      unchecked_hint(inputs_checked));
}

void throw_pixel_sum_overflow(const char* function, const char* dtype,
                              bool inputs_checked) {
  if (!inputs_checked) {
    // Unchecked, a NaN or infinite target also makes the sum non-finite, so
    // a large target is only one of the causes.
    throw invalid_argument(
        std::string(function) +
        ": non-finite result: at some pixel the sum over classes of "
        "q p / s_c overflows " +
        dtype + " or is NaN, which would make r zero or NaN; rescale the "
        "target if it is large" + unchecked_hint(false));
  }
  throw invalid_argument(
      std::string(function) +
      ": target too large: at some pixel the sum over classes of "
      "q p / s_c overflows " +
      dtype + ", which would make r = 0; rescale the target");
}

void check_class_totals(const char* function, const char* probs_name,
                        const std::vector<double>& sum_q, double max_total,
                        bool inputs_checked) {
  double total = 0.0;
  for (std::size_t c = 0; c < sum_q.size(); ++c) {
    if (std::isfinite(sum_q[c])) {
      total += sum_q[c];
      continue;
    }
    const std::string start = std::string(function) +
                              ": non-finite result: the total of class " +
                              std::to_string(c) + " of " + probs_name +
                              " over the batch ";
    if (!inputs_checked) {
      throw invalid_argument(start + "is " + format_double(sum_q[c]) +
                             unchecked_hint(false));
    }
    throw invalid_argument(start + "overflows float64; scale probs down");
  }
  if (!(total <= max_total)) {
    const std::string sum =
        std::isfinite(total) ? format_double(total) : "more than 1.8e308";
    throw invalid_argument(
        std::string(function) + ": probs too large: they sum to " + sum +
        " over the batch, above the largest total accepted, " +
        format_double(max_total) +
        ", below which no term of the loss can overflow float64; scale "
        "probs down");
  }
}

void throw_loss_overflow(const char* function, const char* dtype,
                         bool inputs_checked) {
  throw invalid_argument(
      std::string(function) + ": non-finite result: the loss overflows " +
      dtype +
      " although it is finite in exact arithmetic. With eps = 0 it is formed "
      "from log(r / q), and r / q = p / (s_c t) exceeds the range of " +
      dtype + " where q is subnormal; use eps > 0" +
      unchecked_hint(inputs_checked));
}

void throw_gradient_overflow(const char* function, const char* dtype,
                             double eps, Index c, double total,
                             bool inputs_checked) {
  std::string reason;
  if (eps == 0.0) {
    // A large target overflows it as well as a small total, so both are
    // named.
    reason = "with eps = 0 it scales with p / s_c, so a large target or a "
             "small class total overflows it (class " +
             std::to_string(c) + " has the smallest total, " +
             format_double(total) + "); rescale the target or use eps > 0";
  } else {
    reason = "it scales with p / s_c, so rescale the target (or use a "
             "larger eps)";
  }
  throw invalid_argument(std::string(function) +
                         ": non-finite result: the gradient overflows " +
                         dtype + " although the loss is finite; " + reason +
                         unchecked_hint(inputs_checked));
}

template <typename T>
void throw_bad_value(const char* function, const char* tensor, const T* data,
                     Index flat, const Geometry& geometry, const Shape& shape,
                     const char* infinite_hint) {
  const T value = data[flat];
  const char* problem =
      std::isfinite(value) ? "negative input" : "non-finite input";
  std::string message = std::string(function) + ": " + problem + ": " +
                        tensor + " is " + format_double(value) + " at " +
                        geometry.position(flat, shape);
  if (std::isfinite(value)) message += ", expected >= 0";
  if (std::isinf(value) && infinite_hint != nullptr) {
    message += std::string("; ") + infinite_hint;
  }
  throw invalid_argument(message);
}

template <typename T>
void check_values(const char* function, const char* tensor, const T* data,
                  const Geometry& geometry, const Shape& shape, ValueRule rule,
                  int threads, const char* infinite_hint) {
  // Only the first bad value in memory order is reported, so the scan runs
  // over flat ranges of elements whatever the shape: the plan's "pixels"
  // are elements here.
  const ChunkPlan plan = plan_chunks(geometry.num_elements());
  BadIndexLog log(plan.num_chunks);
  const Index count = geometry.num_elements();
  QRLOSS_ISA::run_chunks(plan, threads, [&](Index chunk, int) {
    const Index begin = chunk * plan.chunk_pixels;
    const Index length = std::min(plan.chunk_pixels, count - begin);
    QRLOSS_ISA::scan_row(data + begin, length, rule, begin, chunk, log);
  });
  const Index bad = log.first();
  if (bad >= 0) {
    throw_bad_value(function, tensor, data, bad, geometry, shape,
                    infinite_hint);
  }
}

template void throw_bad_value<float>(const char*, const char*, const float*,
                                     Index, const Geometry&, const Shape&,
                                     const char*);
template void throw_bad_value<double>(const char*, const char*, const double*,
                                      Index, const Geometry&, const Shape&,
                                      const char*);
template void check_values<float>(const char*, const char*, const float*,
                                  const Geometry&, const Shape&, ValueRule,
                                  int, const char*);
template void check_values<double>(const char*, const char*, const double*,
                                   const Geometry&, const Shape&, ValueRule,
                                   int, const char*);

}  // namespace detail
}  // namespace qrloss
