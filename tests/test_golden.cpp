// Conformance with the golden cases (PyTorch autograd of the reference
// formulas in float64) and with the project's own reference data
// (tests/reference/make_reference.py, NumPy in float64).

#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
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

  const npy::Array input = npy::read((dir / input_file).string());
  const npy::Array target = npy::read((dir / "target.npy").string());
  const std::vector<T>& x = [&]() -> const std::vector<T>& {
    if constexpr (std::is_same_v<T, float>) return input.f32;
    else return input.f64;
  }();
  const std::vector<T>& p = [&]() -> const std::vector<T>& {
    if constexpr (std::is_same_v<T, float>) return target.f32;
    else return target.f64;
  }();
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
