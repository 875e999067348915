// Runs the built `qrloss` executable (path in QRLOSS_EXE) on the golden
// cases and on bad input, with stdout and stderr captured to files.

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <limits>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "qrloss/losses.hpp"
#include "qrloss/npy.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
namespace npy = qrloss::npy;
namespace testing = qrloss::testing;

namespace {

// Golden tolerances: relative loss error, and the gradient rules of
// golden_f64_ratio (float64) and max_error_over_max (float32).
constexpr double kLossRtolFloat64 = 1e-10;
constexpr double kLossRtolFloat32 = 1e-6;
constexpr double kGradRatioFloat64 = 1.0;
constexpr double kGradRtolFloat32 = 1e-5;

// Exit status for bad usage or bad input, as documented by `qrloss --help`.
constexpr int kExitUsage = 2;


std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in),
                     std::istreambuf_iterator<char>());
}

// Quotes `text` for /bin/sh.
std::string shell_quote(const std::string& text) {
  std::string quoted = "'";
  for (const char c : text) {
    if (c == '\'') {
      quoted += "'\\''";
    } else {
      quoted += c;
    }
  }
  return quoted + "'";
}

std::string format_double(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.17g", value);
  return text;
}

// The `threads` that eval and bench print for N threads requested: N, or
// 1 in a build without OpenMP.
int printed_threads(int requested) {
#ifdef _OPENMP
  return requested;
#else
  static_cast<void>(requested);
  return 1;
#endif
}

// Path of the executable under test, or "" when QRLOSS_EXE is unset.
std::string qrloss_exe() {
  const char* path = std::getenv("QRLOSS_EXE");
  return path != nullptr ? path : "";
}

struct RunResult {
  int status = -1;  // exit status, or -1 if the process did not exit
  std::string out;
  std::string err;
};

// Runs qrloss with `args`, capturing stdout and stderr in files of `dir`.
// `environment` is prepended to the command, e.g. "QRLOSS_ISA=avx2 ".
RunResult run_qrloss(const testing::TempDir& dir,
                     const std::vector<std::string>& args,
                     const std::string& environment = "") {
  const std::string out_path = dir.file("stdout.txt");
  const std::string err_path = dir.file("stderr.txt");
  std::string command = environment + shell_quote(qrloss_exe());
  for (const std::string& arg : args) {
    command += " " + shell_quote(arg);
  }
  command += " >" + shell_quote(out_path) + " 2>" + shell_quote(err_path) +
             " </dev/null";

  RunResult result;
  const int raw_status = std::system(command.c_str());
  if (raw_status != -1 && WIFEXITED(raw_status)) {
    result.status = WEXITSTATUS(raw_status);
  }
  result.out = read_text(out_path);
  result.err = read_text(err_path);
  return result;
}

// Reads a golden or produced gradient as doubles.
std::vector<double> read_as_double(const std::string& path,
                                   qrloss::Shape* shape) {
  const npy::Array array = npy::read(path);
  *shape = array.shape;
  if (array.dtype == npy::DType::kFloat32) {
    return std::vector<double>(array.f32.begin(), array.f32.end());
  }
  return array.f64;
}

// Writes a small float64 array of `shape` filled with `value`.
void write_filled(const std::string& path, const qrloss::Shape& shape,
                  double value) {
  const std::vector<double> data(
      static_cast<std::size_t>(qrloss::testing::count(shape)), value);
  npy::write(path, data.data(), shape);
}

// A temporary directory with 2x3 probs and target files for eval, and the
// paths of its gradient and stderr files, for the stdout failure tests.
struct SmallEvalFiles {
  testing::TempDir dir{"qrloss_test_cli_"};
  std::string probs = dir.file("probs.npy");
  std::string target = dir.file("target.npy");
  std::string grad = dir.file("grad.npy");
  std::string err = dir.file("stderr.txt");

  SmallEvalFiles() {
    write_filled(probs, {2, 3}, 1.0 / 3.0);
    write_filled(target, {2, 3}, 0.5);
  }
};

#define QRLOSS_REQUIRE_EXE_()                                       \
  if (qrloss_exe().empty()) {                                       \
    MESSAGE("skipped: QRLOSS_EXE is not set (meson test sets it)"); \
    return;                                                         \
  }

}  // namespace

TEST_SUITE("cli") {
  TEST_CASE("eval matches golden cases") {
    QRLOSS_REQUIRE_EXE_();
    const fs::path golden = qrloss::testing::golden_dir();
    const fs::path cases_path = golden / "cases.json";
    if (!fs::exists(cases_path)) {
      MESSAGE("skipped: golden cases not found at "
              << cases_path.string() << " (set QRLOSS_GOLDEN_DIR)");
      return;
    }
    std::ifstream cases_file(cases_path);
    const nlohmann::json cases = nlohmann::json::parse(cases_file);
    REQUIRE(cases.is_array());
    REQUIRE(!cases.empty());

    testing::TempDir dir("qrloss_test_cli_");
    const std::string grad_path = dir.file("grad.npy");
    int runs = 0;
    for (const nlohmann::json& test_case : cases) {
      const std::string name = test_case.at("name").get<std::string>();
      const fs::path case_dir = golden / name;
      const bool is_float32 = test_case.at("dtype") == "float32";
      const double eps = test_case.at("eps").get<double>();

      for (const std::string loss : {"qr", "rq"}) {
        for (const std::string input : {"probs", "logits"}) {
          const fs::path input_path = case_dir / (input + ".npy");
          if (!fs::exists(input_path)) {
            continue;
          }
          const std::string loss_key =
              "loss_" + loss + (input == "logits" ? "_from_logits" : "");
          const std::string grad_ref_path =
              (case_dir / ("grad_" + loss + "_" + input + ".npy")).string();
          CAPTURE(name);
          CAPTURE(loss);
          CAPTURE(input);
          REQUIRE(test_case.contains(loss_key));

          fs::remove(grad_path);
          const RunResult run = run_qrloss(
              dir, {"eval", "--loss", loss, "--" + input, input_path.string(),
                    "--target", (case_dir / "target.npy").string(), "--eps",
                    format_double(eps), "--grad-out", grad_path});
          ++runs;
          INFO("stderr: " << run.err);
          REQUIRE(run.status == 0);
          CHECK(run.err.empty());

          const nlohmann::json output = nlohmann::json::parse(run.out);
          const double expected = test_case.at(loss_key).get<double>();
          const double loss_value = output.at("loss").get<double>();
          const double rtol = is_float32 ? kLossRtolFloat32 : kLossRtolFloat64;
          CHECK(std::abs(loss_value - expected) <= rtol * std::abs(expected));
          CHECK(output.at("loss_name") == loss);
          CHECK(output.at("input") == input);
          CHECK(output.at("dtype") == test_case.at("dtype"));
          CHECK(output.at("shape") == test_case.at("shape"));
          CHECK(output.at("eps").get<double>() == eps);
          CHECK(output.at("grad_out") == grad_path);

          qrloss::Shape grad_shape;
          qrloss::Shape ref_shape;
          const npy::Array grad_array = npy::read(grad_path);
          CHECK(npy::dtype_name(grad_array.dtype) == test_case.at("dtype"));
          const std::vector<double> grad =
              read_as_double(grad_path, &grad_shape);
          const std::vector<double> ref =
              read_as_double(grad_ref_path, &ref_shape);
          REQUIRE(grad_shape == ref_shape);
          if (is_float32) {
            const double error = qrloss::testing::max_error_over_max(grad, ref);
            INFO("max|g - g_ref| / max|g_ref| = " << error);
            CHECK(error <= kGradRtolFloat32);
          } else {
            const double ratio = qrloss::testing::golden_f64_ratio(grad, ref);
            INFO("worst |g - g_ref| / (1e-10 * (|g_ref| + median|g_ref|)) = "
                 << ratio);
            CHECK(ratio <= kGradRatioFloat64);
          }
        }
      }
    }
    CHECK(runs > 0);
  }

  TEST_CASE("eval output fields") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");
    const std::string probs = dir.file("probs.npy");
    const std::string target = dir.file("target.npy");
    const std::vector<float> probs_data = {0.2f, 0.3f, 0.5f, 0.6f, 0.3f, 0.1f};
    const std::vector<float> target_data = {0.1f, 0.1f, 0.8f, 0.7f, 0.2f, 0.1f};
    npy::write(probs, probs_data.data(), {2, 3});
    npy::write(target, target_data.data(), {2, 3});

    const RunResult run =
        run_qrloss(dir, {"eval", "--loss", "rq", "--probs", probs, "--target",
                         target, "--threads", "2"});
    INFO("stderr: " << run.err);
    REQUIRE(run.status == 0);
    CHECK(run.err.empty());
    // Exactly one JSON object on one line.
    REQUIRE(!run.out.empty());
    CHECK(run.out.find('\n') == run.out.size() - 1);

    const nlohmann::json output = nlohmann::json::parse(run.out);
    CHECK(output.at("loss").is_number_float());
    CHECK(output.at("loss_name") == "rq");
    CHECK(output.at("input") == "probs");
    CHECK(output.at("input_file") == probs);
    CHECK(output.at("target_file") == target);
    CHECK(output.at("shape") == nlohmann::json::array({2, 3}));
    CHECK(output.at("dtype") == "float32");
    CHECK(output.at("eps").get<double>() == 1e-8);
    CHECK(output.at("threads") == printed_threads(2));
    CHECK(output.at("grad_out").is_null());

    // The JSON number and the 17-digit text are the same double.
    const double from_number = output.at("loss").get<double>();
    const double from_text =
        std::strtod(output.at("loss_text").get<std::string>().c_str(), nullptr);
    CHECK(from_number == from_text);
  }

  TEST_CASE("eval prints non-UTF-8 file names") {
    // A JSON string must be UTF-8, and the strict default of the JSON
    // library threw after the gradient file was written: exit 1 with the
    // file replaced. Bytes that are not UTF-8 now print as U+FFFD, and the
    // output is ASCII, so a C1 control (U+009B) is escaped too.
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");
    const std::string probs = dir.file("probs.npy");
    write_filled(probs, {2, 3}, 1.0 / 3.0);
    const std::string grad = dir.file("g\xff\xc2\x9b.npy");

    const RunResult run = run_qrloss(
        dir, {"eval", "--loss", "qr", "--probs", probs, "--target", probs,
              "--grad-out", grad});
    INFO("stderr: " << run.err);
    CHECK(run.status == 0);
    CHECK(run.err.empty());
    CHECK(std::all_of(run.out.begin(), run.out.end(), [](char character) {
      return static_cast<unsigned char>(character) < 0x80;
    }));
    CHECK(run.out.find("\\ufffd\\u009b.npy\"") != std::string::npos);
    const nlohmann::json output = nlohmann::json::parse(run.out);
    CHECK(output.at("grad_out") == dir.file("g\xef\xbf\xbd\xc2\x9b.npy"));
    CHECK(fs::exists(grad));
  }

  TEST_CASE("eval prints infinite loss as null") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");
    // With eps = 0, q > 0 where p = 0 makes the QR loss +inf.
    const std::vector<double> probs = {0.5, 0.5};
    const std::vector<double> target = {1.0, 0.0};
    npy::write(dir.file("probs.npy"), probs.data(), {1, 2});
    npy::write(dir.file("target.npy"), target.data(), {1, 2});

    const RunResult run = run_qrloss(
        dir, {"eval", "--loss", "qr", "--probs", dir.file("probs.npy"),
              "--target", dir.file("target.npy"), "--eps", "0"});
    INFO("stderr: " << run.err);
    REQUIRE(run.status == 0);
    const nlohmann::json output = nlohmann::json::parse(run.out);
    CHECK(output.at("loss").is_null());
    CHECK(output.at("loss_text") == "inf");
    CHECK(output.at("eps").get<double>() == 0.0);

    // "-0" is accepted as eps = +0.
    const RunResult negative_zero = run_qrloss(
        dir, {"eval", "--loss", "qr", "--probs", dir.file("probs.npy"),
              "--target", dir.file("target.npy"), "--eps", "-0"});
    REQUIRE(negative_zero.status == 0);
    const double eps =
        nlohmann::json::parse(negative_zero.out).at("eps").get<double>();
    CHECK(eps == 0.0);
    CHECK_FALSE(std::signbit(eps));
  }

  TEST_CASE("eval is independent of thread count") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");
    const qrloss::Shape shape = {3, 4, 17, 9};
    const std::vector<double> logits =
        qrloss::testing::random_logits<double>(shape, 7);
    const std::vector<double> target =
        qrloss::testing::random_simplex<double>(shape, 11);
    npy::write(dir.file("logits.npy"), logits.data(), shape);
    npy::write(dir.file("target.npy"), target.data(), shape);

    std::vector<std::string> outputs;
    std::vector<std::string> gradients;
    for (const char* threads : {"1", "3", "0"}) {
      const std::string grad_path = dir.file(std::string("grad_") + threads);
      const RunResult run = run_qrloss(
          dir, {"eval", "--loss", "qr", "--logits", dir.file("logits.npy"),
                "--target", dir.file("target.npy"), "--threads", threads,
                "--grad-out", grad_path});
      INFO("stderr: " << run.err);
      REQUIRE(run.status == 0);
      outputs.push_back(
          nlohmann::json::parse(run.out).at("loss_text").get<std::string>());
      gradients.push_back(read_text(grad_path));
    }
    CHECK(outputs[1] == outputs[0]);
    CHECK(outputs[2] == outputs[0]);
    CHECK(gradients[1] == gradients[0]);
    CHECK(gradients[2] == gradients[0]);
  }

  TEST_CASE("a bad QRLOSS_ISA is reported") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");
    const std::string probs = dir.file("probs.npy");
    write_filled(probs, {2, 3}, 1.0 / 3.0);
    const RunResult run =
        run_qrloss(dir, {"eval", "--loss", "rq", "--probs", probs, "--target",
                         probs},
                   "QRLOSS_ISA=sse9 ");
    CHECK(run.status != 0);
    CHECK(run.err.find("QRLOSS_ISA") != std::string::npos);
    CHECK(run.err.find("'sse9'") != std::string::npos);
    CHECK(run.out.empty());

    // Checked before any file is read: a missing input does not hide it,
    // and the message carries no file names.
    const RunResult missing =
        run_qrloss(dir, {"eval", "--loss", "rq", "--probs",
                         dir.file("missing.npy"), "--target", probs},
                   "QRLOSS_ISA=sse9 ");
    CHECK(missing.status == 2);
    CHECK(missing.err.find("QRLOSS_ISA") != std::string::npos);
    CHECK(missing.err.find("missing.npy") == std::string::npos);
    CHECK(missing.err.find("--target") == std::string::npos);
  }

  TEST_CASE("eval reports threads and variant") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");
    const std::string probs = dir.file("probs.npy");
    write_filled(probs, {2, 3}, 1.0 / 3.0);
    const std::vector<std::string> args = {"eval", "--loss", "qr", "--probs",
                                           probs, "--target", probs};
    // --threads 0 (the default) resolves to OMP_NUM_THREADS, or to 1 in a
    // build without OpenMP.
    const RunResult by_default = run_qrloss(dir, args, "OMP_NUM_THREADS=3 ");
    INFO("stderr: " << by_default.err);
    REQUIRE(by_default.status == 0);
    const nlohmann::json output = nlohmann::json::parse(by_default.out);
    CHECK(output.at("threads") == printed_threads(3));
    // The child inherits this process's environment, so it runs the same
    // variant of the same library.
    CHECK(output.at("simd") == qrloss::kernel_isa());

    const RunResult given =
        run_qrloss(dir, {"eval", "--loss", "qr", "--probs", probs, "--target",
                         probs, "--threads", "2"},
                   "OMP_NUM_THREADS=3 ");
    REQUIRE(given.status == 0);
    CHECK(nlohmann::json::parse(given.out).at("threads") ==
          printed_threads(2));

    // The largest accepted count. The library runs a call this small on
    // one thread (one per 2048 pixels), so no 4096 threads start.
    const RunResult largest =
        run_qrloss(dir, {"eval", "--loss", "qr", "--probs", probs, "--target",
                         probs, "--threads", "4096"});
    INFO("stderr: " << largest.err);
    REQUIRE(largest.status == 0);
    CHECK(nlohmann::json::parse(largest.out).at("threads") ==
          printed_threads(4096));
  }

  TEST_CASE("eval rejects bad input") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");
    const std::string probs = dir.file("probs.npy");
    const std::string target = dir.file("target.npy");
    const std::string target_wide = dir.file("target_wide.npy");
    const std::string target_f32 = dir.file("target_f32.npy");
    const std::string probs_rank3 = dir.file("probs_rank3.npy");
    const std::string probs_negative = dir.file("probs_negative.npy");
    const std::string probs_empty = dir.file("probs_empty.npy");
    const std::string not_npy = dir.file("not_npy.npy");
    const std::string missing = dir.file("missing.npy");
    const std::string grad = dir.file("grad.npy");
    write_filled(probs, {2, 3}, 1.0 / 3.0);
    write_filled(target, {2, 3}, 1.0 / 3.0);
    write_filled(target_wide, {2, 4}, 0.25);
    write_filled(probs_rank3, {2, 3, 1}, 1.0 / 3.0);
    write_filled(probs_negative, {2, 3}, -0.5);
    write_filled(probs_empty, {0, 3}, 0.0);
    const std::string probs_rank0 = dir.file("probs_rank0.npy");
    const std::string probs_rank1 = dir.file("probs_rank1.npy");
    const std::string probs_rank5 = dir.file("probs_rank5.npy");
    const std::string probs_nan = dir.file("probs_nan.npy");
    const std::string target_inf = dir.file("target_inf.npy");
    const std::string logits_nan = dir.file("logits_nan.npy");
    write_filled(probs_rank0, {}, 0.5);
    write_filled(probs_rank1, {3}, 1.0 / 3.0);
    write_filled(probs_rank5, {2, 3, 1, 1, 1}, 1.0 / 3.0);
    const double kNaN = std::numeric_limits<double>::quiet_NaN();
    const double kInf = std::numeric_limits<double>::infinity();
    const std::vector<double> with_nan = {0.2, 0.3, 0.5, 0.2, kNaN, 0.5};
    npy::write(probs_nan, with_nan.data(), {2, 3});
    npy::write(logits_nan, with_nan.data(), {2, 3});
    const std::vector<double> with_inf = {0.2, 0.3, 0.5, kInf, 0.3, 0.5};
    npy::write(target_inf, with_inf.data(), {2, 3});
    const std::vector<float> target_f32_data(6, 1.0f / 3.0f);
    npy::write(target_f32, target_f32_data.data(), {2, 3});
    std::ofstream(not_npy) << "probs,target\n0.5,0.5\n";

    struct Case {
      const char* name;
      std::vector<std::string> args;
      const char* message;
    };
    // A write error names the option and the requested file.
    const std::string missing_dir_message =
        "--grad-out: npy::write: cannot write " +
        dir.file("no_such_dir/grad.npy") + ": cannot create the temporary file";
    const std::vector<Case> cases = {
        {"missing file",
         {"--loss", "qr", "--probs", missing, "--target", target},
         "--probs: npy::read: cannot open"},
        {"not an npy file",
         {"--loss", "qr", "--probs", probs, "--target", not_npy},
         "--target: npy::read: bad magic"},
        {"shape mismatch",
         {"--loss", "qr", "--probs", probs, "--target", target_wide},
         "shape mismatch"},
        {"dtype mismatch",
         {"--loss", "rq", "--probs", probs, "--target", target_f32},
         "dtype mismatch"},
        {"rank 3",
         {"--loss", "qr", "--probs", probs_rank3, "--target", probs_rank3},
         "unsupported rank"},
        {"rank 0",
         {"--loss", "qr", "--probs", probs_rank0, "--target", probs_rank0},
         "unsupported rank"},
        {"rank 1",
         {"--loss", "rq", "--probs", probs_rank1, "--target", probs_rank1},
         "unsupported rank"},
        {"rank 5",
         {"--loss", "qr", "--probs", probs_rank5, "--target", probs_rank5},
         "unsupported rank"},
        {"nan in probs",
         {"--loss", "rq", "--probs", probs_nan, "--target", target},
         "qrloss eval: non-finite input: probs is nan at (b=1,c=1)"},
        {"inf in target",
         {"--loss", "qr", "--probs", probs, "--target", target_inf},
         "qrloss eval: non-finite input: target is inf at (b=1,c=0)"},
        {"nan in logits",
         {"--loss", "qr", "--logits", logits_nan, "--target", target},
         "qrloss eval: non-finite input: logits is nan at (b=1,c=1)"},
        {"negative probs",
         {"--loss", "qr", "--probs", probs_negative, "--target", target},
         "probs"},
        {"empty probs",
         {"--loss", "qr", "--probs", probs_empty, "--target", probs_empty},
         "empty input"},
        {"bad loss",
         {"--loss", "qx", "--probs", probs, "--target", target},
         "--loss"},
        {"missing loss", {"--probs", probs, "--target", target}, "--loss"},
        {"missing target", {"--loss", "qr", "--probs", probs}, "--target"},
        {"negative eps",
         {"--loss", "qr", "--probs", probs, "--target", target, "--eps", "-1"},
         "--eps"},
        {"nan eps",
         {"--loss", "qr", "--probs", probs, "--target", target, "--eps", "nan"},
         "--eps"},
        {"infinite eps",
         {"--loss", "qr", "--probs", probs, "--target", target, "--eps", "inf"},
         "--eps"},
        {"eps not a number",
         {"--loss", "qr", "--probs", probs, "--target", target, "--eps", "abc"},
         "--eps"},
        {"eps in hexadecimal",
         {"--loss", "qr", "--probs", probs, "--target", target, "--eps",
          "0x10"},
         "--eps: expected a decimal number, got '0x10'"},
        {"eps with trailing text",
         {"--loss", "qr", "--probs", probs, "--target", target, "--eps",
          "1e-8x"},
         "--eps"},
        {"negative threads",
         {"--loss", "qr", "--probs", probs, "--target", target, "--threads",
          "-1"},
         "--threads: expected an integer from 0 to 4096, got '-1'"},
        {"threads above the limit",
         {"--loss", "qr", "--probs", probs, "--target", target, "--threads",
          "4097"},
         "--threads: expected an integer from 0 to 4096, got '4097'"},
        {"threads beyond int",
         {"--loss", "qr", "--probs", probs, "--target", target, "--threads",
          "99999999999"},
         "--threads: expected an integer from 0 to 4096, got "
         "'99999999999'"},
        {"both probs and logits",
         {"--loss", "qr", "--probs", probs, "--logits", probs, "--target",
          target},
         "excludes"},
        {"neither probs nor logits",
         {"--loss", "qr", "--target", target},
         "missing input: give --probs FILE or --logits FILE (run 'qrloss "
         "eval --help' for usage)"},
        {"empty grad-out",
         {"--loss", "qr", "--probs", probs, "--target", target, "--grad-out",
          ""},
         "--grad-out: expected a file path, got an empty string"},
        {"empty probs path",
         {"--loss", "qr", "--probs", "", "--target", target},
         "--probs: expected a file path, got an empty string"},
        {"empty logits path",
         {"--loss", "qr", "--logits", "", "--target", target},
         "--logits: expected a file path, got an empty string"},
        {"empty target path",
         {"--loss", "qr", "--probs", probs, "--target", ""},
         "--target: expected a file path, got an empty string"},
        // CLI11 takes "--name=" as "--name" and the next argument as its
        // value, which would blame that argument.
        {"empty value after equals",
         {"--loss", "qr", "--grad-out=", "--probs", probs, "--target",
          target},
         "--grad-out: expected a file path, got an empty string"},
        {"unknown loss quoted",
         {"--loss=", "--probs", probs, "--target", target},
         "--loss: expected qr or rq, got ''"},
        {"threads with a space",
         {"--loss", "qr", "--probs", probs, "--target", target, "--threads",
          " 2"},
         "--threads: expected an integer from 0 to 4096, got ' 2'"},
        {"eps without value",
         {"--loss", "qr", "--probs", probs, "--target", target, "--grad-out",
          grad, "--eps"},
         "--eps: missing value: give --eps X"},
        // Control characters, line breaks included, are escaped, so the
        // message stays one line and cannot drive the terminal.
        {"control characters escaped",
         {"--loss", "qr", "--probs", dir.file("a\nb\x1b[2J.npy"),
          "--target", target},
         "a\\x0ab\\x1b[2J.npy"},
        // So are bytes that are not UTF-8 and the C1 control U+009B, while
        // a well-formed character such as U+00E9 passes through.
        {"bytes outside UTF-8 escaped",
         {"--loss", "qr", "--probs", dir.file("c\xff\xc2\x9b\xc3\xa9.npy"),
          "--target", target},
         "c\\xff\\xc2\\x9b\xc3\xa9.npy"},
        {"grad-out in missing directory",
         {"--loss", "qr", "--probs", probs, "--target", target, "--grad-out",
          dir.file("no_such_dir/grad.npy")},
         missing_dir_message.c_str()},
    };

    for (const Case& test : cases) {
      CAPTURE(test.name);
      std::vector<std::string> args = {"eval"};
      args.insert(args.end(), test.args.begin(), test.args.end());
      bool has_grad_out = false;
      for (const std::string& arg : test.args) {
        has_grad_out = has_grad_out || arg == "--grad-out";
      }
      if (!has_grad_out) {
        args.push_back("--grad-out");
        args.push_back(grad);
      }

      const RunResult run = run_qrloss(dir, args);
      INFO("stderr: " << run.err);
      CHECK(run.status == kExitUsage);
      CHECK(run.out.empty());
      CHECK(run.err.rfind("qrloss", 0) == 0);
      CHECK(run.err.find(test.message) != std::string::npos);
      // One line: the only line break ends the message.
      CHECK(run.err.find('\n') == run.err.size() - 1);
      CHECK_FALSE(fs::exists(grad));
      CHECK_FALSE(fs::exists(dir.file("no_such_dir")));
    }

    // A value error from the library names the files behind its tensors.
    const RunResult nan_run = run_qrloss(
        dir, {"eval", "--loss", "qr", "--probs", probs_nan, "--target", target});
    INFO("stderr: " << nan_run.err);
    CHECK(nan_run.status == kExitUsage);
    CHECK(nan_run.err.find("probs is nan at") != std::string::npos);
    CHECK(nan_run.err.find("(--probs " + probs_nan + ", --target " + target +
                           ")") != std::string::npos);
  }

  TEST_CASE("eval one class and 4096 classes") {
    // Uniform probs equal to a uniform target make both losses 0: QR's two
    // terms are the same log, and RQ's r equals q.
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");
    for (const qrloss::Shape& shape :
         {qrloss::Shape{2, 1, 3, 3}, qrloss::Shape{1, 4096, 2, 2}}) {
      CAPTURE(qrloss::format_shape(shape));
      const std::string probs = dir.file("probs.npy");
      const std::string grad = dir.file("grad.npy");
      write_filled(probs, shape, 1.0 / static_cast<double>(shape[1]));
      for (const char* loss : {"qr", "rq"}) {
        CAPTURE(loss);
        const RunResult run =
            run_qrloss(dir, {"eval", "--loss", loss, "--probs", probs,
                             "--target", probs, "--grad-out", grad});
        INFO("stderr: " << run.err);
        REQUIRE(run.status == 0);
        const nlohmann::json output = nlohmann::json::parse(run.out);
        CHECK(std::abs(output["loss"].get<double>()) <= 1e-9);
        CHECK(output["shape"].get<qrloss::Shape>() == shape);
        CHECK(npy::read(grad).shape == shape);
      }
    }
  }

  TEST_CASE("eval keeps existing grad-out on error") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");
    const std::string probs = dir.file("probs.npy");
    const std::string target = dir.file("target_wide.npy");
    const std::string grad = dir.file("grad.npy");
    write_filled(probs, {2, 3}, 1.0 / 3.0);
    write_filled(target, {2, 4}, 0.25);
    std::ofstream(grad) << "previous content";

    const RunResult run =
        run_qrloss(dir, {"eval", "--loss", "qr", "--probs", probs, "--target",
                         target, "--grad-out", grad});
    CHECK(run.status == kExitUsage);
    CHECK(run.out.empty());
    CHECK(read_text(grad) == "previous content");
    // No temporary file is left next to the output.
    int entries = 0;
    for (const auto& entry :
         fs::directory_iterator(fs::path(grad).parent_path())) {
      CAPTURE(entry.path().string());
      CHECK(entry.path().filename().string().find(".tmp-") ==
            std::string::npos);
      ++entries;
    }
    CHECK(entries == 5);  // probs, target, grad, stdout.txt, stderr.txt
  }

  TEST_CASE("eval rejects grad-out naming an input") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");
    const std::string probs = dir.file("probs.npy");
    const std::string target = dir.file("target.npy");
    const std::string link = dir.file("link.npy");
    write_filled(probs, {2, 3}, 1.0 / 3.0);
    write_filled(target, {2, 3}, 0.5);
    fs::create_symlink(fs::path(probs).filename(), link);
    const std::string probs_bytes = read_text(probs);
    const std::string target_bytes = read_text(target);

    struct Case {
      std::string grad_out;
      std::string expected;
    };
    const std::vector<Case> cases = {
        {probs, "bad --grad-out: " + probs + " is the same file as --probs " +
                    probs},
        {target, "bad --grad-out: " + target +
                     " is the same file as --target " + target},
        {link, "bad --grad-out: " + link + " is the same file as --probs " +
                   probs},
    };
    for (const Case& item : cases) {
      CAPTURE(item.grad_out);
      const RunResult run =
          run_qrloss(dir, {"eval", "--loss", "rq", "--probs", probs,
                           "--target", target, "--grad-out", item.grad_out});
      CHECK(run.status == kExitUsage);
      CHECK(run.out.empty());
      CHECK(run.err.find(item.expected) != std::string::npos);
      CHECK(read_text(probs) == probs_bytes);
      CHECK(read_text(target) == target_bytes);
    }
  }

  TEST_CASE("full stdout fails both commands") {
    // /dev/full takes no bytes, so printing the JSON fails. Both commands
    // must then exit 1 with a message. The gradient file is complete by
    // then, and eval keeps it, since it may have replaced a file of the
    // caller's.
    QRLOSS_REQUIRE_EXE_();
    REQUIRE(fs::exists("/dev/full"));

    const SmallEvalFiles files;
    const std::string& probs = files.probs;
    const std::string& target = files.target;
    const std::string& grad = files.grad;
    const std::string& err = files.err;

    const std::vector<std::vector<std::string>> commands = {
        {"eval", "--loss", "qr", "--probs", probs, "--target", target,
         "--grad-out", grad},
        {"bench", "--loss", "qr", "--shape", "2,3,8,8", "--repeat", "1"},
    };
    for (const std::vector<std::string>& args : commands) {
      CAPTURE(args[0]);
      std::string command = shell_quote(qrloss_exe());
      for (const std::string& arg : args) command += " " + shell_quote(arg);
      command += " >/dev/full 2>" + shell_quote(err) + " </dev/null";

      const int raw_status = std::system(command.c_str());
      REQUIRE(WIFEXITED(raw_status));
      CHECK(WEXITSTATUS(raw_status) == 1);
      CHECK(read_text(err).find("cannot write the result to stdout: No "
                                "space left on device") != std::string::npos);
      if (args[0] == "eval") {
        CHECK(read_text(err).find("the gradient was written to " + grad) !=
              std::string::npos);
      }
    }
    CHECK(npy::read(grad).shape == qrloss::Shape{2, 3});
  }

  TEST_CASE("closed stdout pipe fails eval") {
    // The pipe's read end is closed before qrloss starts, so printing the
    // JSON meets EPIPE. qrloss ignores SIGPIPE: it must exit 1 with the
    // stdout message instead of dying on the signal without one. The child
    // restores the default action first, since an ignored signal would be
    // inherited and hide a qrloss that does not ignore it itself.
    QRLOSS_REQUIRE_EXE_();
    const SmallEvalFiles files;
    const std::string& grad = files.grad;
    const std::string& err = files.err;
    const std::string exe = qrloss_exe();
    std::vector<std::string> args = {exe,      "eval",       "--loss",
                                     "qr",     "--probs",    files.probs,
                                     "--target", files.target, "--grad-out",
                                     grad};
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);

    int fds[2];
    REQUIRE(pipe(fds) == 0);
    close(fds[0]);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      std::signal(SIGPIPE, SIG_DFL);
      const int err_fd = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (err_fd < 0 || dup2(fds[1], 1) < 0 || dup2(err_fd, 2) < 0) _exit(99);
      execv(exe.c_str(), argv.data());
      _exit(98);
    }
    close(fds[1]);
    int raw_status = 0;
    REQUIRE(waitpid(pid, &raw_status, 0) == pid);
    REQUIRE(WIFEXITED(raw_status));
    CHECK(WEXITSTATUS(raw_status) == 1);
    CHECK(read_text(err).find("cannot write the result to stdout: Broken "
                              "pipe (the gradient was written to " + grad +
                              ")") != std::string::npos);
    CHECK(npy::read(grad).shape == qrloss::Shape{2, 3});
  }

  TEST_CASE("bench prints timing JSON") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");

    struct BenchCase {
      std::vector<std::string> args;
      const char* loss;
      const char* input;
      const char* dtype;
    };
    const std::vector<BenchCase> cases = {
        {{"--loss", "qr", "--dtype", "float32"}, "qr", "probs", "float32"},
        {{"--loss", "rq", "--from-logits", "--dtype", "float64"},
         "rq",
         "logits",
         "float64"},
    };
    for (const BenchCase& bench_case : cases) {
      std::vector<std::string> args = {"bench", "--shape", "2,3,5,7",
                                        "--threads", "1", "--repeat", "3"};
      args.insert(args.end(), bench_case.args.begin(), bench_case.args.end());
      const RunResult run = run_qrloss(dir, args);
      CAPTURE(run.err);
      REQUIRE(run.status == 0);
      const nlohmann::json output = nlohmann::json::parse(run.out);
      CHECK(output.at("loss_name") == bench_case.loss);
      CHECK(output.at("input") == bench_case.input);
      CHECK(output.at("dtype") == bench_case.dtype);
      CHECK(output.at("shape") == std::vector<int>{2, 3, 5, 7});
      CHECK(output.at("threads") == 1);
      CHECK(output.at("repeat") == 3);
      CHECK(output.at("gradient") == true);
      const std::string simd = output.at("simd");
      CHECK((simd == "baseline" || simd == "avx2" || simd == "avx512"));

      const double median = output.at("median_s");
      const double floor = output.at("floor_s");
      CHECK(median > 0.0);
      CHECK(floor > 0.0);
      CHECK(output.at("min_s").get<double>() <= median);
      CHECK(output.at("ratio_to_floor").get<double>() ==
            doctest::Approx(median / floor).epsilon(1e-12));
      CHECK(std::isfinite(output.at("loss").get<double>()));
    }

    // The loss call runs on one thread per 2048 pixels at most, and
    // call_threads reports that team, which the floor shares: 4160 pixels
    // make three chunks, so three of four requested threads run.
    const RunResult team = run_qrloss(dir, {"bench", "--shape", "1,3,64,65",
                                            "--threads", "4", "--repeat", "1"});
    REQUIRE(team.status == 0);
    const nlohmann::json team_output = nlohmann::json::parse(team.out);
    CHECK(team_output.at("threads") == printed_threads(4));
    CHECK(team_output.at("call_threads") == printed_threads(3));
  }

  TEST_CASE("help lists every option") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");

    const RunResult top = run_qrloss(dir, {"--help"});
    CHECK(top.status == 0);
    CHECK(top.err.empty());
    for (const char* text : {"eval", "bench", "--version", "Exit status"}) {
      CAPTURE(text);
      CHECK(top.out.find(text) != std::string::npos);
    }

    const RunResult eval = run_qrloss(dir, {"eval", "--help"});
    CHECK(eval.status == 0);
    for (const char* text :
         {"--loss", "--probs", "--logits", "--target", "--eps", "--grad-out",
          "--threads", "1e-08", "loss_text"}) {
      CAPTURE(text);
      CHECK(eval.out.find(text) != std::string::npos);
    }

    const RunResult bench = run_qrloss(dir, {"bench", "--help"});
    CHECK(bench.status == 0);
    for (const char* text : {"--loss", "--from-logits", "--shape", "--dtype",
                             "--threads", "--repeat"}) {
      CAPTURE(text);
      CHECK(bench.out.find(text) != std::string::npos);
    }
  }

  TEST_CASE("version and usage errors") {
    QRLOSS_REQUIRE_EXE_();
    testing::TempDir dir("qrloss_test_cli_");

    const RunResult version = run_qrloss(dir, {"--version"});
    CHECK(version.status == 0);
    CHECK(!version.out.empty());
    CHECK(version.out.find("unknown") == std::string::npos);

    const RunResult no_command = run_qrloss(dir, {});
    CHECK(no_command.status == kExitUsage);
    CHECK(no_command.out.empty());
    CHECK(no_command.err.rfind("qrloss: ", 0) == 0);

    CHECK(no_command.err.find("missing command") != std::string::npos);

    const RunResult unknown = run_qrloss(dir, {"evaluate"});
    CHECK(unknown.status == kExitUsage);
    CHECK(unknown.out.empty());
    CHECK(unknown.err.rfind("qrloss: ", 0) == 0);
    CHECK(unknown.err.find("evaluate") != std::string::npos);

    CHECK(unknown.err.rfind(
              "qrloss: unknown command 'evaluate': give eval or bench", 0) ==
          0);

    // Leftover arguments are quoted in command-line order. They come before
    // a missing required option, since a misspelt option causes both.
    const RunResult extra =
        run_qrloss(dir, {"bench", "--shape", "1,2,3,4", "extra", "-x"});
    CHECK(extra.status == kExitUsage);
    CHECK(extra.err.rfind(
              "qrloss bench: unexpected arguments 'extra', '-x' (run", 0) ==
          0);
    const RunResult misspelt =
        run_qrloss(dir, {"eval", "--los", "qr", "--target", "t.npy"});
    CHECK(misspelt.status == kExitUsage);
    CHECK(misspelt.err.rfind("qrloss eval: unexpected arguments '--los', "
                             "'qr'; --loss is required (run",
                             0) == 0);

    // Options of a command given before it are reported as such.
    const RunResult early =
        run_qrloss(dir, {"--threads", "3", "eval", "--loss", "qr"});
    CHECK(early.status == kExitUsage);
    CHECK(early.err.rfind("qrloss eval: unexpected arguments '--threads', "
                          "'3' before the command: options go after 'eval'",
                          0) == 0);
    const RunResult after_dashes = run_qrloss(
        dir, {"bench", "--shape", "1,2,3,4", "--", "extra", "more"});
    CHECK(after_dashes.err.rfind(
              "qrloss bench: unexpected arguments 'extra', 'more' (run", 0) ==
          0);

    // A value outside a list is quoted.
    const RunResult dtype = run_qrloss(dir, {"bench", "--dtype", "float16"});
    CHECK(dtype.status == kExitUsage);
    CHECK(dtype.err.rfind("qrloss bench: --dtype: expected float32 or "
                          "float64, got 'float16' (run",
                          0) == 0);

    // An option given twice names the option and the count.
    const RunResult twice =
        run_qrloss(dir, {"eval", "--eps", "1e-8", "--eps", "0"});
    CHECK(twice.status == kExitUsage);
    CHECK(twice.err.rfind(
              "qrloss eval: --eps: given 2 times; give it once (run", 0) ==
          0);

    const RunResult bench = run_qrloss(dir, {"bench", "--repeat", "0"});
    CHECK(bench.status == kExitUsage);
    CHECK(bench.out.empty());
    CHECK(bench.err.find("--repeat") != std::string::npos);
    // Its message starts with the command, as the command's own errors do.
    CHECK(bench.err.rfind("qrloss bench: --repeat: ", 0) == 0);
    // A usage error inside a command points to that command's help.
    CHECK(bench.err.find("(run 'qrloss bench --help' for usage)") !=
          std::string::npos);
    CHECK(unknown.err.find("(run 'qrloss --help' for usage)") !=
          std::string::npos);

    // Upper limits catch typing mistakes before any tensor is allocated.
    const RunResult repeat = run_qrloss(
        dir, {"bench", "--shape", "1,2,3,4", "--repeat", "10001"});
    CHECK(repeat.status == kExitUsage);
    CHECK(repeat.out.empty());
    CHECK(repeat.err.rfind("qrloss bench: --repeat: expected an integer from "
                           "1 to 10000, got '10001'",
                           0) == 0);
    const RunResult threads = run_qrloss(
        dir, {"bench", "--shape", "1,2,3,4", "--threads", "4097"});
    CHECK(threads.status == kExitUsage);
    CHECK(threads.err.rfind("qrloss bench: --threads: expected an integer "
                            "from 0 to 4096, got '4097'",
                            0) == 0);
    // The limits themselves are accepted. A 4x5 batch runs on one thread
    // for any --threads, and so do the fill and the triad of bench.
    const RunResult at_limit = run_qrloss(
        dir,
        {"bench", "--shape", "4,5", "--threads", "4096", "--repeat", "10000"});
    INFO("stderr: " << at_limit.err);
    REQUIRE(at_limit.status == 0);
    CHECK(at_limit.err.empty());
    const nlohmann::json limit_output = nlohmann::json::parse(at_limit.out);
    CHECK(limit_output.at("threads") == printed_threads(4096));
    CHECK(limit_output.at("call_threads") == 1);

    // An empty item or a space is an error too, and the message quotes the
    // text as typed.
    for (const std::string text :
         {"4,six", "2,,64,64", "2,6,64,64,", "2, 6,64,64"}) {
      CAPTURE(text);
      const RunResult shape = run_qrloss(dir, {"bench", "--shape", text});
      CHECK(shape.status == kExitUsage);
      CHECK(shape.out.empty());
      CHECK(shape.err.rfind("qrloss bench: --shape: expected whole-number "
                            "extents such as 16,6,512,512, got '" +
                                text + "'",
                            0) == 0);
    }

    // A wrong count of extents, or a zero extent, reads the same way.
    const RunResult rank = run_qrloss(dir, {"bench", "--shape", "1,2,3"});
    CHECK(rank.status == kExitUsage);
    CHECK(rank.err.rfind(
              "qrloss bench: --shape: expected B,C or B,C,H,W, got '1,2,3'",
              0) == 0);
    const RunResult zero = run_qrloss(dir, {"bench", "--shape", "0,1,2,3"});
    CHECK(zero.status == kExitUsage);
    CHECK(zero.err.rfind("qrloss bench: --shape: expected positive extents",
                         0) == 0);
    CHECK(zero.err.find("got '0,1,2,3'") != std::string::npos);
  }

}  // TEST_SUITE("cli")
