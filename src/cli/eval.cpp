// The `qrloss eval` subcommand: computes the QR or RQ loss of .npy inputs,
// optionally writes the gradient, and prints the result as JSON.

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "detail/openmp.hpp"
#include "qrloss/error.hpp"
#include "qrloss/losses.hpp"
#include "qrloss/npy.hpp"

namespace qrloss::cli {
namespace {

// Option values of one `qrloss eval` run.
struct EvalSettings {
  std::string loss;
  std::string probs_path;
  std::string logits_path;
  std::string target_path;
  std::string grad_out_path;
  double eps = kDefaultEps;
  int threads = 0;
};

// Result of one evaluation, before it is printed.
struct EvalResult {
  double loss = 0.0;
  Shape shape;
  npy::DType dtype = npy::DType::kFloat64;
  int threads = 0;   // --threads, or the OpenMP default for 0
  std::string simd;  // the kernel variant, as bench reports it
};

// Accepts a decimal number, read whole, that is 0 or lies in
// [kMinPositiveEps, kMaxEps], the range the library accepts; NaN and inf
// are rejected here because they would pass a range check.
std::string check_eps_text(const std::string& text) {
  // from_chars with chars_format::general reads decimal and exponent
  // notation only, where strtod would also take hexadecimal ("0x10" = 16).
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  if (begin != end && *begin == '+') ++begin;  // accepted by strtod too
  double value = 0.0;
  const auto [stop, error] =
      std::from_chars(begin, end, value, std::chars_format::general);
  if (stop == begin || stop != end ||
      (error != std::errc() && error != std::errc::result_out_of_range)) {
    return "expected a decimal number, got '" + text + "'";
  }
  const bool in_range =
      value == 0.0 || (value >= kMinPositiveEps && value <= kMaxEps);
  if (error == std::errc::result_out_of_range || !std::isfinite(value) ||
      !in_range) {
    return "expected 0 or a number in [1e-20, 1e20], got '" + text + "'";
  }
  return {};
}

// Throws qrloss::invalid_argument unless input and target can go to the
// loss together: rank 2 or 4, equal dtype, equal shape.
void check_inputs(const std::string& input_option,
                  const std::string& input_path, const npy::Array& input,
                  const std::string& target_path, const npy::Array& target) {
  const std::string input_name = input_option + " " + input_path;
  const std::string target_name = "--target " + target_path;
  for (const auto& [name, array] : {std::make_pair(input_name, &input),
                                    std::make_pair(target_name, &target)}) {
    if (array->shape.size() != 2 && array->shape.size() != 4) {
      throw qrloss::invalid_argument(
          "unsupported rank: " + name + " has shape " +
          format_shape(array->shape) +
          "; expected rank 2 (B,C) or rank 4 (B,C,H,W)");
    }
    if (array->size() == 0) {
      throw qrloss::invalid_argument("empty input: " + name + " has shape " +
                                     format_shape(array->shape) +
                                     "; every extent must be at least 1");
    }
  }
  if (input.dtype != target.dtype) {
    throw qrloss::invalid_argument(
        std::string("dtype mismatch: ") + input_name + " is " +
        npy::dtype_name(input.dtype) + ", " + target_name + " is " +
        npy::dtype_name(target.dtype) + "; convert one with numpy astype");
  }
  if (input.shape != target.shape) {
    throw qrloss::invalid_argument("shape mismatch: " + input_name +
                                   " has shape " + format_shape(input.shape) +
                                   ", " + target_name + " has shape " +
                                   format_shape(target.shape));
  }
}

// Throws qrloss::invalid_argument when --grad-out names the input or the
// target file (also through a link), since writing the gradient would
// replace data that the user passed in.
void check_grad_out(const EvalSettings& settings,
                    const std::string& input_option,
                    const std::string& input_path) {
  if (settings.grad_out_path.empty()) return;
  for (const auto& [option, path] :
       {std::make_pair(input_option, input_path),
        std::make_pair(std::string("--target"), settings.target_path)}) {
    std::error_code error;  // a --grad-out that does not exist yet differs
    if (std::filesystem::equivalent(settings.grad_out_path, path, error)) {
      throw qrloss::invalid_argument(
          "bad --grad-out: " + settings.grad_out_path +
          " is the same file as " + option + " " + path +
          "; write the gradient to another path");
    }
  }
}

// Reads the .npy file given to `option`. A read error names the option,
// because the reader's message names only the file.
npy::Array read_option(const std::string& option, const std::string& path) {
  try {
    return npy::read(path);
  } catch (const npy::format_error& error) {
    throw npy::format_error(option + ": " + error.what());
  } catch (const npy::io_error& error) {
    throw npy::io_error(option + ": " + error.what());
  }
}

// Computes the loss in the input's precision and writes the gradient when
// grad_out_path is set.
template <typename T>
double evaluate(const EvalSettings& settings, LossKind kind, bool from_logits,
                npy::Array& input, npy::Array& target) {
  LossOptions options;
  options.eps = settings.eps;
  options.num_threads = settings.threads;

  const std::vector<T>& input_data = input.values<T>();
  const std::vector<T>& target_data = target.values<T>();
  std::vector<T> gradient;
  T* gradient_data = nullptr;
  if (!settings.grad_out_path.empty()) {
    gradient.resize(input_data.size());
    gradient_data = gradient.data();
  }

  const double loss =
      from_logits ? compute_loss_from_logits<T>(
                        kind, input_data.data(), target_data.data(),
                        gradient_data, input.shape, options)
                  : compute_loss<T>(kind, input_data.data(), target_data.data(),
                                    gradient_data, input.shape, options);

  if (gradient_data != nullptr) {
    try {
      npy::write(settings.grad_out_path, gradient_data, input.shape);
    } catch (const npy::io_error& error) {
      throw npy::io_error(std::string("--grad-out: ") + error.what());
    }
  }
  return loss;
}

EvalResult run_eval(const EvalSettings& settings) {
  const LossKind kind = settings.loss == "qr" ? LossKind::kQR : LossKind::kRQ;
  const bool from_logits = !settings.logits_path.empty();
  const std::string input_option = from_logits ? "--logits" : "--probs";
  const std::string& input_path =
      from_logits ? settings.logits_path : settings.probs_path;

  // A bad QRLOSS_ISA is reported before any file is read, and without
  // the file names that input errors carry.
  EvalResult result;
  result.simd = qrloss::kernel_isa();
  result.threads = qrloss::detail::resolve_threads(settings.threads);

  check_grad_out(settings, input_option, input_path);
  npy::Array input = read_option(input_option, input_path);
  npy::Array target = read_option("--target", settings.target_path);
  check_inputs(input_option, input_path, input, settings.target_path, target);

  result.shape = input.shape;
  result.dtype = input.dtype;
  try {
    result.loss =
        input.dtype == npy::DType::kFloat32
            ? evaluate<float>(settings, kind, from_logits, input, target)
            : evaluate<double>(settings, kind, from_logits, input, target);
  } catch (const qrloss::invalid_argument& error) {
    // The library names its tensors (probs, logits, target), but the user
    // gave files, so the message names those too. It also starts with the
    // library function that eval calls, which means nothing to a user of
    // the command line, so that name is dropped.
    std::string message = error.what();
    for (const char* function :
         {"compute_loss_from_logits: ", "compute_loss: "}) {
      if (message.rfind(function, 0) == 0) {
        message.erase(0, std::string(function).size());
        break;
      }
    }
    throw qrloss::invalid_argument(message + " (" + input_option + " " +
                                   input_path + ", --target " +
                                   settings.target_path + ")");
  }
  return result;
}

// Formats a double with 17 significant digits, enough to restore it
// exactly; "inf", "-inf" or "nan" for non-finite values.
std::string format_loss(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.17g", value);
  return text;
}

nlohmann::ordered_json to_json(const EvalSettings& settings,
                               const EvalResult& result) {
  const bool from_logits = !settings.logits_path.empty();
  nlohmann::ordered_json output;
  // JSON has no inf or NaN, so a non-finite loss (possible with eps = 0)
  // is null here and spelled out in loss_text.
  if (std::isfinite(result.loss)) {
    output["loss"] = result.loss;
  } else {
    output["loss"] = nullptr;
  }
  output["loss_text"] = format_loss(result.loss);
  output["loss_name"] = settings.loss;
  output["input"] = from_logits ? "logits" : "probs";
  output["input_file"] =
      from_logits ? settings.logits_path : settings.probs_path;
  output["target_file"] = settings.target_path;
  output["shape"] = result.shape;
  output["dtype"] = npy::dtype_name(result.dtype);
  output["eps"] = settings.eps;
  output["simd"] = result.simd;
  output["threads"] = result.threads;
  if (settings.grad_out_path.empty()) {
    output["grad_out"] = nullptr;
  } else {
    output["grad_out"] = settings.grad_out_path;
  }
  return output;
}

// Runs the command and prints its JSON. Every failure ends in
// fail_command. Only a failure to print comes after the gradient file.
void run_and_print(const EvalSettings& settings) {
  if (settings.probs_path.empty() && settings.logits_path.empty()) {
    fail_command("eval", kExitUsage,
                 "missing input: give --probs FILE or --logits FILE (run "
                 "'qrloss eval --help' for usage)");
  }

  std::optional<EvalResult> result;
  try {
    result = run_eval(settings);
  } catch (const qrloss::invalid_argument& error) {
    fail_command("eval", kExitUsage, error.what());
  } catch (const npy::io_error& error) {
    fail_command("eval", kExitUsage, error.what());
  } catch (const std::bad_alloc&) {
    fail_command("eval", kExitInternal, "internal error: out of memory");
  } catch (const std::exception& error) {
    fail_command("eval", kExitInternal,
                 std::string("internal error: ") + error.what());
  }

  // File names need not be UTF-8, which a JSON string must be: a byte that
  // is not becomes U+FFFD, where the strict default threw after the
  // gradient file was written. ASCII output also keeps control characters
  // of any kind away from the terminal.
  // The gradient file is complete by now, and it may have replaced a file
  // of the caller's, so it stays if printing fails: removing it would lose
  // both.
  print_result("eval",
               to_json(settings, *result)
                   .dump(-1, ' ', true,
                         nlohmann::ordered_json::error_handler_t::replace),
               settings.grad_out_path.empty()
                   ? ""
                   : " (the gradient was written to " +
                         settings.grad_out_path + ")");
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto settings = std::make_shared<EvalSettings>();
  CLI::App* eval = app.add_subcommand(
      "eval",
      "Compute the QR or RQ loss (and optionally its gradient) of arrays "
      "stored as .npy files, and print the result as one JSON object on "
      "stdout.");
  eval->footer(
      "Input files: .npy, float32 or float64, C order, little-endian, rank 2 "
      "(B,C) or rank 4 (B,C,H,W). The input (--probs or --logits) and "
      "--target must have the same dtype and shape. The loss is computed "
      "with double accumulation in either dtype.\n"
      "Output: one JSON object with the keys loss (a number, or null when "
      "not finite), loss_text (the loss with 17 significant digits, or inf "
      "or nan), loss_name, input ('probs' or 'logits'), input_file, "
      "target_file, shape, dtype, eps, simd (the kernel variant), threads "
      "(the count given to the library: --threads, or the OpenMP default "
      "for 0, or 1 in a build without OpenMP; small inputs run on fewer) "
      "and grad_out (a path or null). "
      "The JSON is ASCII; in file names, bytes that are not UTF-8 become "
      "U+FFFD.\n"
      "Errors: one line on stderr, nothing on stdout, no --grad-out file, "
      "exit status 2 for bad usage or input and 1 for internal errors.");

  eval->add_option("--loss", settings->loss,
                   "Loss to compute: qr (QR loss) or rq (RQ loss)")
      ->required()
      ->check(one_of({"qr", "rq"}));

  CLI::Option* probs = eval->add_option(
      "--probs", settings->probs_path,
      "Class probabilities q as .npy, values >= 0; the gradient is dL/dq");
  CLI::Option* logits = eval->add_option(
      "--logits", settings->logits_path,
      "Logits x as .npy; the loss is taken of q = softmax(x) over the class "
      "axis C and the gradient is dL/dx");
  probs->type_name("FILE")->excludes(logits)->check(file_path());
  logits->type_name("FILE")->excludes(probs)->check(file_path());

  eval->add_option("--target", settings->target_path,
                   "Per-pixel prior p as .npy, values >= 0, same dtype and "
                   "shape as the input; rows need not sum to 1")
      ->required()
      ->type_name("FILE")
      ->check(file_path());

  eval->add_option("--eps", settings->eps,
                   "Constant added inside every log; 0 or a number in [1e-20, 1e20]. "
                   "With 0, QR with a zero target where the probability is "
                   "positive gives an infinite loss (\"loss\": null) and +inf "
                   "gradient entries, and a class whose probabilities are all "
                   "0 gets -inf entries; from --logits with --grad-out that "
                   "is an error, since the gradient is undefined")
      ->type_name("X")
      ->check(CLI::Validator(
          [](std::string& text) { return check_eps_text(text); }, ""))
      ->capture_default_str();

  eval->add_option("--grad-out", settings->grad_out_path,
                   "Write the gradient of the loss with respect to the input "
                   "(--probs or --logits) to FILE as .npy of the input's "
                   "dtype and shape. A file is written to a temporary name "
                   "and renamed, so it is complete or absent; a link is "
                   "followed, and a device or named pipe is written in place")
      ->type_name("FILE")
      ->check(file_path());

  eval->add_option("--threads", settings->threads,
                   "OpenMP threads, from 0 to " + std::to_string(kMaxThreads) +
                       "; 0 uses the OpenMP default (OMP_NUM_THREADS, else "
                       "one per core). The result is bitwise the same for "
                       "any thread count")
      ->type_name("N")
      ->check(int_in_range(0, kMaxThreads))
      ->capture_default_str();

  eval->callback([settings] {
    EvalSettings resolved = *settings;
    // "--eps -0" passes the >= 0 check; use and report it as +0.
    if (resolved.eps == 0.0) {
      resolved.eps = 0.0;
    }
    run_and_print(resolved);
  });
}

}  // namespace qrloss::cli
