#pragma once
// Helpers shared by the test files: random inputs, tolerances, file
// locations, golden-case loading and checks of rejected input.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "qrloss/qrloss.hpp"

namespace qrloss::testing {

/// Element count of a shape.
inline std::int64_t count(const Shape& shape) {
  std::int64_t n = 1;
  for (std::int64_t extent : shape) n *= extent;
  return n;
}

/// Directory from an environment variable set by tests/meson.build, or
/// `fallback` when unset.
inline std::filesystem::path env_dir(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value != nullptr ? std::filesystem::path(value)
                          : std::filesystem::path(fallback);
}

inline std::filesystem::path golden_dir() {
  return env_dir("QRLOSS_GOLDEN_DIR", "../shared/golden");
}
inline std::filesystem::path reference_dir() {
  return env_dir("QRLOSS_REFERENCE_DIR", "tests/data/reference");
}
inline std::filesystem::path shared_data_dir() {
  return env_dir("QRLOSS_DATA_DIR", "../shared/data");
}

/// Random probabilities per pixel over C (Dirichlet(1) via normalised
/// exponentials), kept inside [lo, 1] before normalising so that central
/// differences stay away from the q = 0 kink.
template <typename T>
std::vector<T> random_simplex(const Shape& shape, std::uint64_t seed,
                              double lo = 0.05) {
  std::mt19937_64 engine(seed);
  std::uniform_real_distribution<double> uniform(lo, 1.0);
  const std::int64_t B = shape[0];
  const std::int64_t C = shape[1];
  const std::int64_t P = count(shape) / (B * C);
  std::vector<T> out(static_cast<std::size_t>(count(shape)));
  std::vector<double> column(static_cast<std::size_t>(C));
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t p = 0; p < P; ++p) {
      double sum = 0.0;
      for (std::int64_t c = 0; c < C; ++c) {
        column[c] = uniform(engine);
        sum += column[c];
      }
      for (std::int64_t c = 0; c < C; ++c) {
        out[(b * C + c) * P + p] = static_cast<T>(column[c] / sum);
      }
    }
  }
  return out;
}

/// Random normal logits scaled by `scale`.
template <typename T>
std::vector<T> random_logits(const Shape& shape, std::uint64_t seed,
                             double scale = 2.0) {
  std::mt19937_64 engine(seed);
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<T> out(static_cast<std::size_t>(count(shape)));
  for (T& x : out) x = static_cast<T>(normal(engine));
  return out;
}

/// One-hot target: class (b + 3p) mod C at every pixel.
template <typename T>
std::vector<T> one_hot(const Shape& shape) {
  const std::int64_t B = shape[0];
  const std::int64_t C = shape[1];
  const std::int64_t P = count(shape) / (B * C);
  std::vector<T> out(static_cast<std::size_t>(count(shape)), T(0));
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t p = 0; p < P; ++p) {
      out[(b * C + (b + 3 * p) % C) * P + p] = T(1);
    }
  }
  return out;
}

template <typename T>
std::vector<double> to_double(const std::vector<T>& values) {
  return std::vector<double>(values.begin(), values.end());
}

/// Median of |values|.
inline double median_abs(const std::vector<double>& values) {
  std::vector<double> a(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) a[i] = std::abs(values[i]);
  std::nth_element(a.begin(), a.begin() + a.size() / 2, a.end());
  return a[a.size() / 2];
}

inline double max_abs(const std::vector<double>& values) {
  double m = 0.0;
  for (double v : values) m = std::max(m, std::abs(v));
  return m;
}

/// Worst ratio of |got - ref| to the float64 golden tolerance
/// 1e-10 * (|ref| + median|ref|) + 4 * DBL_EPSILON * max|ref|: at most 1
/// passes. The last term is a few units of rounding of the largest entry.
/// It matters only where the exact gradient is 0 but the reference holds
/// autograd's rounding residue. With one-hot targets, RQ's class term G_c is
/// exactly 0 and the reference stores values near 5e-19 there. Those are
/// most entries, so the median itself is rounding residue.
template <typename T>
double golden_f64_ratio(const std::vector<T>& got,
                        const std::vector<double>& ref) {
  const double median = median_abs(ref);
  const double floor = 4.0 * 2.220446049250313e-16 * max_abs(ref);
  double worst = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double error = std::abs(static_cast<double>(got[i]) - ref[i]);
    // An exact match passes even where the tolerance is 0 (all-zero ref).
    const double ratio =
        error == 0.0 ? 0.0
                     : error / (1e-10 * (std::abs(ref[i]) + median) + floor);
    if (!(ratio <= worst)) worst = ratio;  // keeps NaN
  }
  return worst;
}

/// max |got - ref| / max |ref|: at most 1e-5 passes the float32 rule.
template <typename T>
double max_error_over_max(const std::vector<T>& got,
                          const std::vector<double>& ref) {
  double worst = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double error = std::abs(static_cast<double>(got[i]) - ref[i]);
    if (!(error <= worst)) worst = error;
  }
  return worst / std::max(max_abs(ref), 1e-300);
}

/// Independent uniform values in [lo, hi] per entry, not normalised over C.
/// The losses accept any probs >= 0, so gradient checks may use these to
/// keep every entry far from the q = 0 kink.
template <typename T>
std::vector<T> random_uniform(const Shape& shape, std::uint64_t seed,
                              double lo, double hi) {
  std::mt19937_64 engine(seed);
  std::uniform_real_distribution<double> uniform(lo, hi);
  std::vector<T> out(static_cast<std::size_t>(count(shape)));
  for (T& x : out) x = static_cast<T>(uniform(engine));
  return out;
}

/// Moves a (B, C, P) tensor to shape (1, C, B * P), where row c contains
/// class c of every pixel, item by item. Calls whose items have few pixels
/// run on this layout internally, so their results must match those of a
/// call on the merged tensor bit for bit.
template <typename T>
std::vector<T> merge_items(const std::vector<T>& values, const Shape& shape) {
  const std::int64_t B = shape[0];
  const std::int64_t C = shape[1];
  const std::int64_t P = count(shape) / (B * C);
  std::vector<T> out(values.size());
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t c = 0; c < C; ++c) {
      for (std::int64_t p = 0; p < P; ++p) {
        out[static_cast<std::size_t>((c * B + b) * P + p)] =
            values[static_cast<std::size_t>((b * C + c) * P + p)];
      }
    }
  }
  return out;
}

/// Returns the shape of merge_items' result.
inline Shape merged_shape(const Shape& shape) {
  return {1, shape[1], count(shape) / shape[1], 1};
}

/// True when both vectors have the same size and the same bytes.
template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) ==
                           0);
}

/// True when both doubles have the same bytes (also for NaN and -0.0).
inline bool same_bits(double a, double b) {
  return std::memcmp(&a, &b, sizeof(double)) == 0;
}

template <typename T>
bool any_nan(const std::vector<T>& values) {
  return std::any_of(values.begin(), values.end(),
                     [](T v) { return std::isnan(v); });
}

template <typename T>
bool all_finite(const std::vector<T>& values) {
  return std::all_of(values.begin(), values.end(),
                     [](T v) { return std::isfinite(v); });
}

/// What a call that should fail threw. The call is caught as
/// std::invalid_argument, the base class, and the dynamic type is then
/// checked, so a test can assert both with one call.
struct ThrownError {
  bool threw_std_invalid_argument = false;
  bool threw_qrloss_invalid_argument = false;
  bool threw_other = false;
  std::string message;

  bool contains(const std::string& text) const {
    return message.find(text) != std::string::npos;
  }
};

template <typename Fn>
ThrownError catch_invalid_argument(Fn&& fn) {
  ThrownError error;
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    error.threw_std_invalid_argument = true;
    error.threw_qrloss_invalid_argument =
        dynamic_cast<const qrloss::invalid_argument*>(&e) != nullptr;
    error.message = e.what();
  } catch (const std::exception& e) {
    error.threw_other = true;
    error.message = e.what();
  }
  return error;
}

/// Checks that fn throws a qrloss::invalid_argument, caught as its base
/// std::invalid_argument, whose message contains `text`. The caller's
/// CAPTURE context is printed on failure, together with the message.
template <typename Fn>
void check_invalid_argument(Fn&& fn, const std::string& text) {
  const ThrownError error = catch_invalid_argument(std::forward<Fn>(fn));
  INFO("expected message containing: " << text);
  INFO("got message: " << error.message);
  CHECK(error.threw_std_invalid_argument);
  CHECK(error.threw_qrloss_invalid_argument);
  CHECK(error.contains(text));
}

/// A fresh directory under the system temp directory, removed with its
/// contents when the object goes out of scope.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix) {
    std::random_device device;
    const std::filesystem::path base = std::filesystem::temp_directory_path();
    for (int attempt = 0; attempt < 100; ++attempt) {
      path_ = base / (prefix + std::to_string(device()));
      if (std::filesystem::create_directory(path_)) {
        return;
      }
    }
    FAIL("cannot create a temporary directory under " << base.string());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string file(const std::string& name) const {
    return (path_ / name).string();
  }
  const std::filesystem::path& path() const { return path_; }

  /// Returns the names of all entries, to spot leftover temporary files.
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path_)) {
      names.push_back(entry.path().filename().string());
    }
    return names;
  }

 private:
  std::filesystem::path path_;
};

}  // namespace qrloss::testing
