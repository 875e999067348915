// libFuzzer target for every loss entry point, softmax and softmax_vjp.
//
// Input layout (tests/fuzz/README.md has examples):
//   byte 0   flags: bit 0 double (else float), bit 1 rank 4 (else rank 2),
//            bit 2 check_finite = false, bit 3 an invalid shape
//   byte 1   thread count of the first run, 1 + byte % 4; a second run uses
//            another count and must give the same bits
//   byte 2   eps: a code of kEpsTable, or 255 for the next 8 bytes as a
//            raw double
//   next     one byte per extent: B, C, then H, W for rank 4, or the kind
//            of invalid shape and its parameter when bit 3 is set
//   rest     value codes (see decode_value), read cyclically to fill probs,
//            target, logits and dL/dq in that order
//
// Contract checked for every call:
// - It returns, or throws qrloss::invalid_argument with a message that
//   starts with "<function>: ". An invalid shape must throw. Any other
//   exception escapes and libFuzzer reports it as a crash.
// - A returned loss is neither NaN nor -inf. Take eps > 0 (in float, eps >= 1e-15),
//   every input finite, target in [0, 1e6] and probs (not logits) in
//   [0, 1e6]: then the loss and every element of the gradient are finite,
//   and no call throws "non-finite result".
// - Inputs are not modified, and on success every gradient element is
//   written (checked with check_finite on, where no NaN payload can come
//   from the inputs).
// - Two thread counts give bitwise identical losses and gradients, or the
//   same error message. compute_loss, compute_loss_from_logits and the
//   Eigen::TensorMap overloads give the same bits as the pointer functions,
//   and the same messages, except that the dispatchers name themselves.
// - softmax rows are in [0, 1] and sum to 1; softmax_vjp of bounded inputs
//   is finite, and in place it equals the out-of-place result.
// - For float inputs, the QR and RQ gradients from probs agree with the
//   double gradients of the same values within 1e-2 * max |double
//   gradient| + 1e-3 / N, for eps in [1e-15, 1e6] and bounded inputs whose
//   class sums and pixel sums are not within 0.1% of the clamps (there the
//   two types may take different branches).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "qrloss/qrloss.hpp"

namespace {

using qrloss::LossKind;
using qrloss::LossOptions;
using qrloss::Shape;

// Caps the element count so that one input runs in milliseconds, while
// 16384 pixels (B * H * W with C = 1) still span 8 chunks of 2048 pixels.
constexpr std::int64_t kMaxElements = 16384;
constexpr std::int64_t kMaxB = 4;
constexpr std::int64_t kMaxC = 8;
constexpr std::int64_t kMaxHW = 64;
constexpr int kMaxThreads = 4;

// Largest input value for which every result must be finite.
constexpr double kBoundedInput = 1e6;
// Smallest eps for which float results of bounded inputs must be finite.
constexpr double kMinStrictFloatEps = 1e-15;

constexpr std::uint8_t kFlagDouble = 1;
constexpr std::uint8_t kFlagRank4 = 2;
constexpr std::uint8_t kFlagNoCheck = 4;
constexpr std::uint8_t kFlagBadShape = 8;
constexpr std::uint8_t kRawEps = 255;

const double kEpsTable[] = {
    0.0,
    qrloss::kDefaultEps,
    1e-300,                                    // tiny, normal in double
    std::numeric_limits<double>::denorm_min(),  // smallest subnormal
    1e-45,                                      // float subnormal range
    1e-30,
    std::numeric_limits<double>::quiet_NaN(),
    -1e-7,
    -0.0,
    1e300,
    std::numeric_limits<double>::infinity(),
    1.0,
    1e6,
    static_cast<double>(std::numeric_limits<float>::max()) * 2.0,
};
constexpr std::size_t kEpsCodes = sizeof(kEpsTable) / sizeof(kEpsTable[0]);

[[noreturn]] void fail(const std::string& details) {
  std::fprintf(stderr, "fuzz_losses: contract violated: %s\n", details.c_str());
  std::abort();
}

/// Reads the header bytes in order. Reads past the end return 0.
class HeaderReader {
 public:
  HeaderReader(const std::uint8_t* data, std::size_t size)
      : data_(data), size_(size) {}
  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  double raw_double() {
    std::uint8_t bytes[8];
    for (std::uint8_t& b : bytes) b = byte();
    double value;
    std::memcpy(&value, bytes, sizeof value);
    return value;
  }
  std::size_t position() const { return pos_; }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

/// Reads the value bytes cyclically. Without value bytes, the values come
/// from a fixed pattern.
class ValueStream {
 public:
  ValueStream(const std::uint8_t* data, std::size_t size)
      : data_(data), size_(size) {}
  std::uint8_t byte() {
    const std::uint8_t b = size_ > 0 ? data_[pos_ % size_]
                                     : static_cast<std::uint8_t>(pos_ * 37);
    ++pos_;
    return b;
  }
  template <typename Bits>
  Bits raw() {
    std::uint8_t bytes[sizeof(Bits)];
    for (std::uint8_t& b : bytes) b = byte();
    Bits value;
    std::memcpy(&value, bytes, sizeof value);
    return value;
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

enum class Scale { kProbability, kLogit };

// Codes 0..191 are a grid: [0, 1] for probabilities, [-24, 23.75] for
// logits and gradients. Codes 192 and up are special values, and the
// codes after the table map back onto the grid.
constexpr int kGridCodes = 192;

template <typename T>
T decode_value(ValueStream& stream, Scale scale) {
  using Limits = std::numeric_limits<T>;
  const int code = stream.byte();
  if (code < kGridCodes) {
    return scale == Scale::kProbability
               ? static_cast<T>(code / double(kGridCodes - 1))
               : static_cast<T>((code - kGridCodes / 2) / 4.0);
  }
  switch (code) {
    case 192: return T(0);
    case 193: return T(1);
    case 194: return Limits::quiet_NaN();
    case 195: return Limits::infinity();
    case 196: return -Limits::infinity();
    case 197: return T(-1);
    case 198: return T(-0.0);
    case 199: return Limits::denorm_min();
    case 200: return Limits::min();
    case 201: return static_cast<T>(qrloss::kPixelSumFloor);
    case 202: return static_cast<T>(qrloss::kDefaultEps);
    case 203: return static_cast<T>(kBoundedInput);
    case 204: return static_cast<T>(1e30);
    case 205: return Limits::max();
    case 206: return T(-1e4);  // saturates the softmax
    case 207: return T(100);
    case 208: return static_cast<T>(stream.raw<float>());
    case 209: return static_cast<T>(stream.raw<double>());
    default:
      return static_cast<T>(((code * 7) % kGridCodes) /
                            double(kGridCodes - 1));
  }
}

/// Everything decoded from one input.
struct Case {
  bool use_double = false;
  bool bad_shape = false;
  LossOptions options;
  int threads_a = 1;
  int threads_b = 2;
  Shape shape;
  std::int64_t elements = 1;
};

std::int64_t extent_from(std::uint8_t byte, std::int64_t max_extent) {
  return 1 + byte % max_extent;
}

/// Shapes that every entry point must reject before touching the data.
Shape invalid_shape(std::uint8_t kind, std::uint8_t parameter) {
  constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();
  const std::int64_t small = 1 + parameter % 4;
  switch (kind % 8) {
    case 0: return {small, small, small};
    case 1: return {small};
    case 2: return {};
    case 3: return {1, small, 1, 1, 1};
    case 4: {
      Shape shape = {small, small, small, small};
      shape[parameter % 4] = 0;
      return shape;
    }
    case 5: {
      Shape shape = {small, small, small, small};
      shape[parameter % 4] = -1 - parameter / 4;
      return shape;
    }
    case 6: return {kInt64Max / 2, 3, 1, 1};  // element count overflows
    default: return {std::int64_t{1} << 61, 1};  // byte count overflows
  }
}

Case decode_case(HeaderReader& reader) {
  Case in;
  const std::uint8_t flags = reader.byte();
  in.use_double = (flags & kFlagDouble) != 0;
  in.bad_shape = (flags & kFlagBadShape) != 0;
  in.options.check_finite = (flags & kFlagNoCheck) == 0;
  in.threads_a = 1 + reader.byte() % kMaxThreads;
  in.threads_b = 1 + in.threads_a % kMaxThreads;

  const std::uint8_t eps_code = reader.byte();
  in.options.eps = eps_code == kRawEps ? reader.raw_double()
                                       : kEpsTable[eps_code % kEpsCodes];

  if (in.bad_shape) {
    const std::uint8_t kind = reader.byte();
    in.shape = invalid_shape(kind, reader.byte());
    return in;
  }
  const std::int64_t B = extent_from(reader.byte(), kMaxB);
  const std::int64_t C = extent_from(reader.byte(), kMaxC);
  if ((flags & kFlagRank4) == 0) {
    in.shape = {B, C};
  } else {
    std::int64_t H = extent_from(reader.byte(), kMaxHW);
    std::int64_t W = extent_from(reader.byte(), kMaxHW);
    // Halve the larger spatial extent until the product fits the cap.
    while (B * C * H * W > kMaxElements) {
      (H >= W ? H : W) = std::max<std::int64_t>(1, (H >= W ? H : W) / 2);
    }
    in.shape = {B, C, H, W};
  }
  in.elements = 1;
  for (std::int64_t extent : in.shape) in.elements *= extent;
  return in;
}

template <typename T>
struct Tensors {
  std::vector<T> probs;
  std::vector<T> target;
  std::vector<T> logits;
  std::vector<T> dL_dq;
};

template <typename T>
std::vector<T> decode_tensor(ValueStream& stream, std::int64_t n,
                             Scale scale) {
  std::vector<T> values(static_cast<std::size_t>(n));
  for (T& v : values) v = decode_value<T>(stream, scale);
  return values;
}

template <typename T>
bool all_bounded(const std::vector<T>& values, bool non_negative) {
  return std::all_of(values.begin(), values.end(), [&](T v) {
    return std::isfinite(v) &&
           (non_negative ? v >= T(0) && v <= T(kBoundedInput)
                         : std::abs(v) <= T(kBoundedInput));
  });
}

template <typename T>
bool all_finite(const std::vector<T>& values) {
  return std::all_of(values.begin(), values.end(),
                     [](T v) { return std::isfinite(v); });
}

template <typename T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() ||
          std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

bool same_bits(double a, double b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

/// Returns a NaN with a payload that no arithmetic on finite inputs
/// produces. An element that still contains it after a successful call was
/// never written.
template <typename T>
T unwritten_marker() {
  if constexpr (sizeof(T) == 4) {
    const std::uint32_t bits = 0x7fa1b2c3u;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  } else {
    const std::uint64_t bits = 0x7ff4a1b2c3d4e5f6ull;
    double value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
}

template <typename T>
bool is_marker(T v) {
  const T marker = unwritten_marker<T>();
  return std::memcmp(&v, &marker, sizeof v) == 0;
}

/// The result of one call: a loss and gradient, or an error message.
template <typename T>
struct Outcome {
  bool threw = false;
  std::string message;
  double loss = 0.0;
  std::vector<T> grad;
};

template <typename T, typename Call>
Outcome<T> run(std::int64_t grad_size, Call&& call) {
  Outcome<T> out;
  out.grad.assign(static_cast<std::size_t>(grad_size), unwritten_marker<T>());
  try {
    out.loss = call(out.grad.data());
  } catch (const qrloss::invalid_argument& error) {
    out.threw = true;
    out.message = error.what();
  }
  return out;
}

std::string describe(const Case& in, const char* function) {
  char eps[40];
  std::snprintf(eps, sizeof eps, "%.17g", in.options.eps);
  return std::string(function) + " (" + (in.use_double ? "double" : "float") +
         ", shape " + qrloss::format_shape(in.shape) + ", eps " + eps +
         ", check_finite " + (in.options.check_finite ? "on" : "off") + ")";
}

template <typename T>
void check_same(const Outcome<T>& a, const Outcome<T>& b,
                const std::string& context) {
  if (a.threw != b.threw || a.message != b.message) {
    fail(context + ": outcomes differ: '" + a.message + "' vs '" + b.message +
         "'");
  }
  if (!a.threw && (!same_bits(a.loss, b.loss) || !same_bytes(a.grad, b.grad))) {
    fail(context + ": losses or gradients differ in their bits");
  }
}

/// Checks the contract of one outcome of `function`.
template <typename T>
void check_outcome(const Case& in, const char* function,
                   const Outcome<T>& out, bool with_grad, bool bounded) {
  const std::string context = describe(in, function);
  // In float, RQ's dL/dq scales with p / (eps * 1e-12), which for eps
  // near 1e-20 and p near 1e6 exceeds the float range, so tiny eps is
  // exempt there.
  const bool strict =
      bounded && in.options.eps > 0.0 && std::isfinite(in.options.eps) &&
      (in.use_double || in.options.eps >= kMinStrictFloatEps);
  if (out.threw) {
    if (out.message.rfind(std::string(function) + ": ", 0) != 0) {
      fail(context + ": message does not start with the function name: " +
           out.message);
    }
    // The library throws "non-finite result" for a NaN loss or an RQ
    // gradient entry that overflows, which these inputs must not give.
    if (strict && out.message.find("non-finite result") != std::string::npos) {
      fail(context + ": non-finite result for eps > 0 and bounded inputs: " +
           out.message);
    }
    return;
  }
  if (in.bad_shape) fail(context + ": accepted an invalid shape");
  if (std::isnan(out.loss)) fail(context + ": returned a NaN loss");
  // Only inputs that the scan rejects give a loss of -inf, and those throw.
  if (out.loss == -std::numeric_limits<double>::infinity()) {
    fail(context + ": returned a loss of -inf");
  }
  if (strict && !std::isfinite(out.loss)) {
    fail(context + ": loss " + std::to_string(out.loss) +
         " is not finite for eps > 0 and bounded inputs");
  }
  if (!with_grad) return;
  for (std::size_t i = 0; i < out.grad.size(); ++i) {
    const T g = out.grad[i];
    if (in.options.check_finite && is_marker(g)) {
      fail(context + ": gradient element " + std::to_string(i) +
           " was not written");
    }
    if (strict && !std::isfinite(g)) {
      fail(context + ": gradient element " + std::to_string(i) + " is " +
           std::to_string(static_cast<double>(g)) +
           " for eps > 0 and bounded inputs");
    }
  }
}

template <typename T>
using LossFn = double (*)(const T*, const T*, const Shape&,
                          const LossOptions&);
template <typename T>
using GradFn = double (*)(const T*, const T*, T*, const Shape&,
                          const LossOptions&);

template <typename T>
struct Entry {
  const char* name;
  LossKind kind;
  bool from_logits;
  LossFn<T> loss;  // null for the gradient entry points
  GradFn<T> grad;  // null for the loss-only entry points
};

template <typename T>
std::vector<Entry<T>> entries() {
  return {
      {"qr_loss", LossKind::kQR, false, &qrloss::qr_loss<T>, nullptr},
      {"qr_loss_grad", LossKind::kQR, false, nullptr, &qrloss::qr_loss_grad<T>},
      {"rq_loss", LossKind::kRQ, false, &qrloss::rq_loss<T>, nullptr},
      {"rq_loss_grad", LossKind::kRQ, false, nullptr, &qrloss::rq_loss_grad<T>},
      {"qr_loss_from_logits", LossKind::kQR, true,
       &qrloss::qr_loss_from_logits<T>, nullptr},
      {"qr_loss_grad_from_logits", LossKind::kQR, true, nullptr,
       &qrloss::qr_loss_grad_from_logits<T>},
      {"rq_loss_from_logits", LossKind::kRQ, true,
       &qrloss::rq_loss_from_logits<T>, nullptr},
      {"rq_loss_grad_from_logits", LossKind::kRQ, true, nullptr,
       &qrloss::rq_loss_grad_from_logits<T>},
  };
}

/// Calls an entry point through its Eigen::TensorMap overload.
template <typename T, int Rank>
Outcome<T> run_tensor_map(const Entry<T>& entry, const T* input,
                          const T* target, const Shape& shape,
                          const LossOptions& options) {
  Eigen::array<Eigen::Index, Rank> dims;
  for (int d = 0; d < Rank; ++d) dims[d] = static_cast<Eigen::Index>(shape[d]);
  const qrloss::ConstTensorView<T, Rank> input_map(input, dims);
  const qrloss::ConstTensorView<T, Rank> target_map(target, dims);
  std::int64_t n = 1;
  for (std::int64_t extent : shape) n *= extent;
  return run<T>(n, [&](T* grad) {
    qrloss::TensorView<T, Rank> grad_map(grad, dims);
    const bool qr = entry.kind == LossKind::kQR;
    if (!entry.from_logits) {
      if (entry.loss != nullptr) {
        return qr ? qrloss::qr_loss(input_map, target_map, options)
                  : qrloss::rq_loss(input_map, target_map, options);
      }
      return qr ? qrloss::qr_loss_grad(input_map, target_map, grad_map, options)
                : qrloss::rq_loss_grad(input_map, target_map, grad_map,
                                       options);
    }
    if (entry.loss != nullptr) {
      return qr ? qrloss::qr_loss_from_logits(input_map, target_map, options)
                : qrloss::rq_loss_from_logits(input_map, target_map, options);
    }
    return qr ? qrloss::qr_loss_grad_from_logits(input_map, target_map,
                                                 grad_map, options)
              : qrloss::rq_loss_grad_from_logits(input_map, target_map,
                                                 grad_map, options);
  });
}

template <typename T>
void check_losses(const Case& in, const Tensors<T>& tensors) {
  const Tensors<T> original = tensors;
  const bool target_bounded = all_bounded(tensors.target, true);
  const bool probs_bounded = all_bounded(tensors.probs, true) && target_bounded;
  const bool logits_bounded = all_finite(tensors.logits) && target_bounded;

  for (const Entry<T>& entry : entries<T>()) {
    const T* input =
        entry.from_logits ? tensors.logits.data() : tensors.probs.data();
    const bool with_grad = entry.grad != nullptr;
    const auto call_with = [&](int threads) {
      LossOptions options = in.options;
      options.num_threads = threads;
      return run<T>(in.elements, [&](T* grad) {
        return with_grad
                   ? entry.grad(input, tensors.target.data(), grad, in.shape,
                                options)
                   : entry.loss(input, tensors.target.data(), in.shape,
                                options);
      });
    };
    const Outcome<T> first = call_with(in.threads_a);
    check_outcome(in, entry.name, first, with_grad,
                  entry.from_logits ? logits_bounded : probs_bounded);
    const std::string context = describe(in, entry.name);
    check_same(first, call_with(in.threads_b), context + " with " +
               std::to_string(in.threads_a) + " and " +
               std::to_string(in.threads_b) + " threads");

    LossOptions options = in.options;
    options.num_threads = in.threads_a;
    Outcome<T> dispatched = run<T>(in.elements, [&](T* grad) {
      T* out = with_grad ? grad : nullptr;
      return entry.from_logits
                 ? qrloss::compute_loss_from_logits<T>(
                       entry.kind, input, tensors.target.data(), out,
                       in.shape, options)
                 : qrloss::compute_loss<T>(entry.kind, input,
                                           tensors.target.data(), out,
                                           in.shape, options);
    });
    // The dispatcher names itself; the rest of its message is the entry's.
    const std::string dispatcher = entry.from_logits
                                       ? "compute_loss_from_logits: "
                                       : "compute_loss: ";
    if (dispatched.threw) {
      if (dispatched.message.rfind(dispatcher, 0) != 0) {
        fail(context + " through compute_loss: message does not start with " +
             dispatcher + dispatched.message);
      }
      dispatched.message = std::string(entry.name) + ": " +
                           dispatched.message.substr(dispatcher.size());
    }
    check_same(first, dispatched, context + " through compute_loss");

    if (!in.bad_shape) {
      const Outcome<T> mapped =
          in.shape.size() == 4
              ? run_tensor_map<T, 4>(entry, input, tensors.target.data(),
                                     in.shape, options)
              : run_tensor_map<T, 2>(entry, input, tensors.target.data(),
                                     in.shape, options);
      check_same(first, mapped, context + " through its TensorMap overload");
    }

    if (!same_bytes(tensors.probs, original.probs) ||
        !same_bytes(tensors.target, original.target) ||
        !same_bytes(tensors.logits, original.logits)) {
      fail(context + ": modified an input");
    }
  }
}

template <typename T>
void check_softmax(const Case& in, const Tensors<T>& tensors) {
  const std::string context = describe(in, "softmax");
  std::vector<T> probs(static_cast<std::size_t>(in.elements));
  const auto softmax_with = [&](int threads) {
    return run<T>(0, [&](T*) {
      qrloss::softmax(tensors.logits.data(), probs.data(), in.shape, threads);
      return 0.0;
    });
  };
  const Outcome<T> first = softmax_with(in.threads_a);
  if (first.threw) {
    if (first.message.rfind("softmax: ", 0) != 0) {
      fail(context + ": message does not start with 'softmax: ': " +
           first.message);
    }
  } else {
    if (in.bad_shape) fail(context + ": accepted an invalid shape");
    const std::vector<T> probs_a = probs;
    softmax_with(in.threads_b);
    if (!same_bytes(probs, probs_a)) fail(context + ": thread counts differ");

    // Sum over C in double: each of at most kMaxC terms is rounded once,
    // and so is the reciprocal of the sum.
    const double tolerance = sizeof(T) == 4 ? 1e-5 : 1e-13;
    const std::int64_t B = in.shape[0];
    const std::int64_t C = in.shape[1];
    const std::int64_t P = in.elements / (B * C);
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t p = 0; p < P; ++p) {
        double sum = 0.0;
        for (std::int64_t c = 0; c < C; ++c) {
          const T q = probs[static_cast<std::size_t>((b * C + c) * P + p)];
          if (!(q >= T(0) && q <= T(1))) fail(context + ": value outside [0, 1]");
          sum += static_cast<double>(q);
        }
        if (std::abs(sum - 1.0) > tolerance) {
          fail(context + ": a row sums to " + std::to_string(sum));
        }
      }
    }
  }

  const std::string vjp_context = describe(in, "softmax_vjp");
  std::vector<T> dL_dx(static_cast<std::size_t>(in.elements));
  const auto vjp_with = [&](int threads) {
    return run<T>(0, [&](T*) {
      qrloss::softmax_vjp(tensors.probs.data(), tensors.dL_dq.data(),
                          dL_dx.data(), in.shape, threads);
      return 0.0;
    });
  };
  const Outcome<T> vjp = vjp_with(in.threads_a);
  if (vjp.threw) {
    if (vjp.message.rfind("softmax_vjp: ", 0) != 0) {
      fail(vjp_context + ": message does not start with 'softmax_vjp: ': " +
           vjp.message);
    }
    return;
  }
  if (in.bad_shape) fail(vjp_context + ": accepted an invalid shape");
  if (all_bounded(tensors.probs, true) && all_bounded(tensors.dL_dq, false) &&
      !all_finite(dL_dx)) {
    fail(vjp_context + ": non-finite result for bounded inputs");
  }
  const std::vector<T> dL_dx_a = dL_dx;
  vjp_with(in.threads_b);
  if (!same_bytes(dL_dx, dL_dx_a)) fail(vjp_context + ": thread counts differ");

  // dL_dx may be the dL_dq buffer itself.
  std::vector<T> in_place = tensors.dL_dq;
  qrloss::softmax_vjp(tensors.probs.data(), in_place.data(), in_place.data(),
                      in.shape, in.threads_a);
  if (!same_bytes(in_place, dL_dx_a)) {
    fail(vjp_context + ": in place differs from out of place");
  }
}

// The float-against-double comparison. Its eps range keeps eps, 1/eps and
// p / (eps * 1e-12) well inside the float range for inputs up to 1e6. An
// element passes when |g32 - g64| <= rtol * max |g64| + atol / N. The rtol
// term is far above float rounding relative to the gradient's size (a worst
// case of about 3e-3, from RQ's class terms summed over 16384 pixels). The
// atol term covers gradients that cancel to nearly 0 everywhere: QR's
// entries (h_c - log(p + eps)) / N then keep a float rounding error of at
// most about 1.5e-5 / N, since |log| <= 35 for these eps and inputs.
constexpr double kMinComparedEps = 1e-15;
constexpr double kMaxComparedEps = 1e6;
constexpr double kClampMargin = 1e-3;
constexpr double kFloatGradientRtol = 1e-2;
constexpr double kFloatGradientAtolTimesN = 1e-3;

bool near_clamp(double value, double clamp) {
  return std::abs(value - clamp) <= kClampMargin * clamp;
}

/// True when no class sum is near eps and no RQ pixel sum is near its floor.
bool clamps_are_clear(const Case& in, const std::vector<float>& probs,
                      const std::vector<float>& target) {
  const std::int64_t B = in.shape[0];
  const std::int64_t C = in.shape[1];
  const std::int64_t P = in.elements / (B * C);
  const double eps = in.options.eps;
  std::vector<double> class_sums(static_cast<std::size_t>(C), 0.0);
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t c = 0; c < C; ++c) {
      for (std::int64_t p = 0; p < P; ++p) {
        class_sums[c] += probs[static_cast<std::size_t>((b * C + c) * P + p)];
      }
    }
  }
  for (double sum : class_sums) {
    if (near_clamp(sum, eps)) return false;
  }
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t p = 0; p < P; ++p) {
      double pixel_sum = 0.0;
      for (std::int64_t c = 0; c < C; ++c) {
        const auto k = static_cast<std::size_t>((b * C + c) * P + p);
        pixel_sum += double(probs[k]) * double(target[k]) /
                     std::max(class_sums[c], eps);
      }
      if (near_clamp(pixel_sum, qrloss::kPixelSumFloor)) return false;
    }
  }
  return true;
}

void check_float_against_double(const Case& in, const Tensors<float>& tensors) {
  const double eps = in.options.eps;
  if (in.bad_shape || !in.options.check_finite ||
      !(eps >= kMinComparedEps && eps <= kMaxComparedEps) ||
      !all_bounded(tensors.probs, true) || !all_bounded(tensors.target, true) ||
      !clamps_are_clear(in, tensors.probs, tensors.target)) {
    return;
  }
  const std::vector<double> probs(tensors.probs.begin(), tensors.probs.end());
  const std::vector<double> target(tensors.target.begin(),
                                   tensors.target.end());
  LossOptions options = in.options;
  options.num_threads = in.threads_a;
  for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
    const Outcome<float> single = run<float>(in.elements, [&](float* grad) {
      return qrloss::compute_loss<float>(kind, tensors.probs.data(),
                                         tensors.target.data(), grad,
                                         in.shape, options);
    });
    const Outcome<double> reference = run<double>(in.elements, [&](double* grad) {
      return qrloss::compute_loss<double>(kind, probs.data(), target.data(),
                                          grad, in.shape, options);
    });
    if (single.threw || reference.threw || !all_finite(reference.grad)) {
      continue;
    }
    double max_reference = 0.0;
    double max_error = 0.0;
    std::size_t worst = 0;
    for (std::size_t i = 0; i < reference.grad.size(); ++i) {
      max_reference = std::max(max_reference, std::abs(reference.grad[i]));
      const double error = std::abs(double(single.grad[i]) - reference.grad[i]);
      if (!(error <= max_error)) {
        max_error = error;
        worst = i;
      }
    }
    const double tolerance =
        kFloatGradientRtol * max_reference +
        kFloatGradientAtolTimesN * double(in.shape[1]) /
            static_cast<double>(in.elements);
    if (!(max_error <= tolerance)) {
      const char* name = kind == LossKind::kQR ? "qr_loss_grad" : "rq_loss_grad";
      char numbers[160];
      std::snprintf(numbers, sizeof numbers,
                    " is %.9g, double gives %.17g (max |double gradient| "
                    "%.9g, tolerance %.3g)",
                    double(single.grad[worst]), reference.grad[worst],
                    max_reference, tolerance);
      fail(describe(in, name) + ": float gradient element " +
           std::to_string(worst) + numbers);
    }
  }
}

template <typename T>
void check_all(const Case& in, ValueStream& stream) {
  Tensors<T> tensors;
  // An invalid shape gets small non-null buffers, which must never be read.
  const std::int64_t n = in.bad_shape ? 16 : in.elements;
  tensors.probs = decode_tensor<T>(stream, n, Scale::kProbability);
  tensors.target = decode_tensor<T>(stream, n, Scale::kProbability);
  tensors.logits = decode_tensor<T>(stream, n, Scale::kLogit);
  tensors.dL_dq = decode_tensor<T>(stream, n, Scale::kLogit);
  Case sized = in;
  sized.elements = n;
  check_losses(sized, tensors);
  check_softmax(sized, tensors);
  if constexpr (std::is_same_v<T, float>) {
    check_float_against_double(sized, tensors);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  HeaderReader reader(data, size);
  const Case in = decode_case(reader);
  const std::size_t used = std::min(reader.position(), size);
  ValueStream stream(data + used, size - used);
  if (in.use_double) {
    check_all<double>(in, stream);
  } else {
    check_all<float>(in, stream);
  }
  return 0;
}
