// Conformance with the golden cases (PyTorch autograd of the reference
// formulas in float64) and with the project's own reference data
// (tests/reference/make_reference.py, NumPy in float64).

#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qrloss/npy.hpp"
#include "qrloss/qrloss.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
using qrloss::LossKind;
using qrloss::Shape;
namespace npy = qrloss::npy;
namespace testing = qrloss::testing;

namespace {

std::vector<double> read_as_double(const fs::path& path) {
  const npy::Array array = npy::read(path.string());
  if (array.dtype == npy::DType::kFloat32) {
    return std::vector<double>(array.f32.begin(), array.f32.end());
  }
  return array.f64;
}

/// Runs one loss through one input path of a case and checks the loss and
/// the gradient against the stored references.
template <typename T>
void check_case(const fs::path& dir, const nlohmann::json& spec,
                LossKind kind, bool from_logits) {
  const std::string name = spec["name"];
  const std::string loss = qrloss::loss_name(kind);
  const std::string input_file = from_logits ? "logits.npy" : "probs.npy";
  const std::string loss_key =
      "loss_" + loss + (from_logits ? "_from_logits" : "");
  const std::string grad_file =
      "grad_" + loss + (from_logits ? "_logits.npy" : "_probs.npy");
  CAPTURE(name);
  CAPTURE(loss_key);

  npy::Array input = npy::read((dir / input_file).string());
  npy::Array target = npy::read((dir / "target.npy").string());
  const std::vector<T>& x = input.values<T>();
  const std::vector<T>& p = target.values<T>();
  REQUIRE(input.shape == target.shape);
  const Shape shape = input.shape;

  qrloss::LossOptions options;
  options.eps = spec["eps"].get<double>();
  std::vector<T> grad(x.size());
  const double value =
      from_logits ? qrloss::compute_loss_from_logits<T>(
                        kind, x.data(), p.data(), grad.data(), shape, options)
                  : qrloss::compute_loss<T>(kind, x.data(), p.data(),
                                            grad.data(), shape, options);
  const double value_only =
      from_logits ? qrloss::compute_loss_from_logits<T>(
                        kind, x.data(), p.data(), nullptr, shape, options)
                  : qrloss::compute_loss<T>(kind, x.data(), p.data(), nullptr,
                                            shape, options);
  const double expected = spec[loss_key].get<double>();
  const std::vector<double> grad_ref = read_as_double(dir / grad_file);
  REQUIRE(grad_ref.size() == grad.size());

  const double loss_rtol = std::is_same_v<T, float> ? 1e-6 : 1e-10;
  CHECK(std::abs(value - expected) <= loss_rtol * std::abs(expected));
  CHECK(value_only == value);
  if constexpr (std::is_same_v<T, float>) {
    CHECK(testing::max_error_over_max(grad, grad_ref) <= 1e-5);
  } else {
    CHECK(testing::golden_f64_ratio(grad, grad_ref) <= 1.0);
  }
}

/// Runs every case listed in dir/cases.json; returns how many ran.
int run_case_folder(const fs::path& dir) {
  std::ifstream file(dir / "cases.json");
  const nlohmann::json cases = nlohmann::json::parse(file);
  int ran = 0;
  for (const nlohmann::json& spec : cases) {
    const fs::path case_dir = dir / spec["name"].get<std::string>();
    const bool has_logits =
        spec.contains("loss_qr_from_logits") &&
        fs::exists(case_dir / "logits.npy");
    for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
      for (bool from_logits : {false, true}) {
        if (from_logits && !has_logits) continue;
        if (spec["dtype"] == "float32") {
          check_case<float>(case_dir, spec, kind, from_logits);
        } else {
          check_case<double>(case_dir, spec, kind, from_logits);
        }
        ++ran;
      }
    }
  }
  return ran;
}

}  // namespace

TEST_SUITE("golden") {
  TEST_CASE("golden cases from PyTorch autograd") {
    const fs::path dir = testing::golden_dir();
    if (!fs::exists(dir / "cases.json")) {
      MESSAGE("skipped: no golden cases at " << dir.string());
      return;
    }
    // 9 cases, 8 of them with logits: 2 losses x (9 + 8) runs.
    CHECK(run_case_folder(dir) == 34);
  }

  TEST_CASE("project reference cases from NumPy") {
    const fs::path dir = testing::reference_dir();
    REQUIRE_MESSAGE(fs::exists(dir / "cases.json"),
                    "missing " << (dir / "cases.json").string());
    CHECK(run_case_folder(dir) > 0);
  }
}

namespace {

/// Builds a target in which each pixel takes column j of the co-occurrence
/// matrix, whose rows are 11 fine classes and columns 17 coarse NLCD
/// classes. j is drawn per 2x2 block from the columns that are not
/// placeholders. A placeholder column puts all mass on row 0.
std::vector<double> prior_batch(const npy::Array& matrix, std::uint64_t seed,
                                const Shape& shape) {
  const std::int64_t rows = matrix.shape[0];
  const std::int64_t cols = matrix.shape[1];
  std::vector<std::int64_t> usable;
  for (std::int64_t j = 0; j < cols; ++j) {
    if (matrix.f64[static_cast<std::size_t>(j)] != 1.0) usable.push_back(j);
  }
  REQUIRE(!usable.empty());
  std::mt19937_64 engine(seed);
  std::uniform_int_distribution<std::size_t> pick(0, usable.size() - 1);
  const std::int64_t B = shape[0], H = shape[2], W = shape[3];
  std::vector<double> target(static_cast<std::size_t>(testing::count(shape)));
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; h += 2) {
      for (std::int64_t w = 0; w < W; w += 2) {
        const std::int64_t j = usable[pick(engine)];
        for (std::int64_t dh = 0; dh < 2; ++dh) {
          for (std::int64_t dw = 0; dw < 2; ++dw) {
            for (std::int64_t c = 0; c < rows; ++c) {
              target[((b * rows + c) * H + h + dh) * W + w + dw] =
                  matrix.f64[static_cast<std::size_t>(c * cols + j)];
            }
          }
        }
      }
    }
  }
  return target;
}

}  // namespace

TEST_SUITE("golden") {
  TEST_CASE("EnviroAtlas priors from shared data") {
    const fs::path dir = testing::shared_data_dir() / "enviroatlas_cooccurrence";
    if (!fs::exists(dir)) {
      MESSAGE("skipped: no co-occurrence matrices at " << dir.string());
      return;
    }
    int matrices = 0;
    for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
      if (entry.path().extension() != ".npy") continue;
      CAPTURE(entry.path().string());
      const npy::Array matrix = npy::read(entry.path().string());
      REQUIRE(matrix.dtype == npy::DType::kFloat64);
      REQUIRE(matrix.shape == Shape{11, 17});
      ++matrices;

      const Shape shape = {2, 11, 8, 8};
      const std::vector<double> target = prior_batch(matrix, 7, shape);
      const std::vector<double> logits = testing::random_logits<double>(shape, 11);
      const std::vector<float> target32(target.begin(), target.end());
      const std::vector<float> logits32(logits.begin(), logits.end());
      const std::vector<double> logits_rounded(logits32.begin(), logits32.end());
      const std::vector<double> target_rounded(target32.begin(), target32.end());

      for (LossKind kind : {LossKind::kQR, LossKind::kRQ}) {
        CAPTURE(qrloss::loss_name(kind));
        std::vector<double> grad(logits.size());
        const double loss = qrloss::compute_loss_from_logits<double>(
            kind, logits.data(), target.data(), grad.data(), shape);
        CHECK(std::isfinite(loss));

        // Central differences in double on a spread of entries.
        qrloss::GradientCheckOptions check;
        check.max_elements = 96;
        check.seed = 3;
        check.shape = shape;
        const auto f = [&](const Eigen::VectorXd& x) {
          return qrloss::compute_loss_from_logits<double>(
              kind, x.data(), target.data(), nullptr, shape);
        };
        const Eigen::VectorXd x =
            Eigen::Map<const Eigen::VectorXd>(logits.data(), logits.size());
        const Eigen::VectorXd g =
            Eigen::Map<const Eigen::VectorXd>(grad.data(), grad.size());
        const qrloss::GradientCheckReport report =
            qrloss::check_gradient(f, x, g, check);
        CAPTURE(report.summary());
        CHECK(report.passed);

        // float32 against float64 on the same rounded inputs.
        std::vector<double> grad64(logits.size());
        const double loss64 = qrloss::compute_loss_from_logits<double>(
            kind, logits_rounded.data(), target_rounded.data(), grad64.data(),
            shape);
        std::vector<float> grad32(logits.size());
        const double loss32 = qrloss::compute_loss_from_logits<float>(
            kind, logits32.data(), target32.data(), grad32.data(), shape);
        CHECK(std::abs(loss32 - loss64) <= 1e-6 * std::abs(loss64));
        CHECK(testing::max_error_over_max(grad32, grad64) <= 1e-5);
      }
    }
    CHECK(matrices == 4);
  }
}
