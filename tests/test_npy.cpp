#include "qrloss/npy.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_support.hpp"

namespace fs = std::filesystem;
namespace npy = qrloss::npy;
namespace testing = qrloss::testing;

namespace {


void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in),
                     std::istreambuf_iterator<char>());
}

// Magic string, version and a header length field holding `header_length`
// (2 bytes for version 1.x, 4 bytes otherwise), little-endian.
std::string preamble(int major, int minor, std::uint32_t header_length) {
  std::string bytes = "\x93NUMPY";
  bytes += static_cast<char>(major);
  bytes += static_cast<char>(minor);
  const int length_bytes = major == 1 ? 2 : 4;
  for (int i = 0; i < length_bytes; ++i) {
    bytes += static_cast<char>((header_length >> (8 * i)) & 0xff);
  }
  return bytes;
}

// A complete file: preamble with the correct length, header, data.
std::string npy_file(int major, const std::string& header,
                     const std::string& data = "") {
  return preamble(major, 0, static_cast<std::uint32_t>(header.size())) +
         header + data;
}

template <typename T>
std::string raw_bytes(const std::vector<T>& values) {
  std::string bytes(values.size() * sizeof(T), '\0');
  if (!values.empty()) {
    std::memcpy(bytes.data(), values.data(), bytes.size());
  }
  return bytes;
}

std::string header_for(const std::string& descr, const std::string& shape,
                       const std::string& fortran_order = "False") {
  return "{'descr': '" + descr + "', 'fortran_order': " + fortran_order +
         ", 'shape': " + shape + ", }\n";
}

// Writes `bytes` to a file in `dir` and checks that read() rejects it with
// a format_error whose message contains `problem` and the path.
void check_rejected(const testing::TempDir& dir, const std::string& bytes,
                    const std::string& problem) {
  const std::string path = dir.file("hostile.npy");
  write_bytes(path, bytes);
  CAPTURE(problem);
  CHECK_THROWS_AS(npy::read(path), npy::format_error);
  CHECK_THROWS_WITH_AS(npy::read(path), doctest::Contains(problem.c_str()),
                       npy::format_error);
  CHECK_THROWS_WITH_AS(npy::read(path), doctest::Contains(path.c_str()),
                       npy::format_error);
}

template <typename T>
npy::DType dtype_of();
template <>
npy::DType dtype_of<float>() {
  return npy::DType::kFloat32;
}
template <>
npy::DType dtype_of<double>() {
  return npy::DType::kFloat64;
}

fs::path golden_dir() {
  if (const char* dir = std::getenv("QRLOSS_GOLDEN_DIR")) {
    return dir;
  }
  const char* root = std::getenv("QRLOSS_SOURCE_ROOT");
  return fs::path(root != nullptr ? root : ".") / ".." / "shared" / "golden";
}

constexpr std::int64_t kPreambleBytesV1 = 10;
constexpr std::int64_t kDataAlignment = 64;

}  // namespace

TEST_SUITE("npy") {
  TEST_CASE("dtype_name returns numpy names") {
    CHECK(std::string(npy::dtype_name(npy::DType::kFloat32)) == "float32");
    CHECK(std::string(npy::dtype_name(npy::DType::kFloat64)) == "float64");
  }

  TEST_CASE_TEMPLATE("round trip keeps values", T, float, double) {
    testing::TempDir dir("qrloss_test_npy_");
    const std::vector<qrloss::Shape> shapes = {{3, 5}, {2, 5, 3, 4}, {1, 1},
                                               {4, 0}, {5},          {}};
    std::mt19937 generator(12345);
    std::uniform_real_distribution<double> uniform(-10.0, 10.0);

    for (const qrloss::Shape& shape : shapes) {
      CAPTURE(qrloss::format_shape(shape));
      std::int64_t count = 1;
      for (const std::int64_t extent : shape) count *= extent;
      std::vector<T> values(static_cast<std::size_t>(count));
      for (T& value : values) value = static_cast<T>(uniform(generator));
      if (count >= 4) {
        values[0] = T(-0.0);
        values[1] = std::numeric_limits<T>::infinity();
        values[2] = std::numeric_limits<T>::quiet_NaN();
        values[3] = std::numeric_limits<T>::denorm_min();
      }

      const std::string path = dir.file("round_trip.npy");
      npy::write(path, values.data(), shape);
      npy::Array array = npy::read(path);

      CHECK(array.dtype == dtype_of<T>());
      CHECK(array.shape == shape);
      CHECK(array.size() == count);
      std::vector<T>& data = array.values<T>();
      REQUIRE(data.size() == values.size());
      CHECK(raw_bytes(data) == raw_bytes(values));
      if (std::is_same<T, float>::value) {
        CHECK(array.f64.empty());
      } else {
        CHECK(array.f32.empty());
      }

      // The data starts at a multiple of 64 bytes, after a '\n'-terminated
      // header, and the file ends with the data.
      const std::string bytes = read_bytes(path);
      REQUIRE(bytes.size() >= static_cast<std::size_t>(kPreambleBytesV1));
      CHECK(bytes.compare(0, 8, std::string("\x93NUMPY\x01\x00", 8)) == 0);
      const std::int64_t header_length =
          static_cast<unsigned char>(bytes[8]) |
          (static_cast<unsigned char>(bytes[9]) << 8);
      const std::int64_t data_offset = kPreambleBytesV1 + header_length;
      CHECK(data_offset % kDataAlignment == 0);
      CHECK(bytes[static_cast<std::size_t>(data_offset - 1)] == '\n');
      CHECK(static_cast<std::int64_t>(bytes.size()) ==
            data_offset + count * static_cast<std::int64_t>(sizeof(T)));
    }
  }

  TEST_CASE("round trip of empty huge shape") {
    // The element count is 0, but the extents before the 0 multiply to
    // 3.9e18, and times the item size to more than int64 can count. The
    // writer once rejected that shape, although the reader accepts it.
    testing::TempDir dir("qrloss_test_npy_");
    const qrloss::Shape shape = {500000300, 80000, 615, 160, 0, 16};
    const std::string path = dir.file("empty.npy");
    npy::write(path, static_cast<const double*>(nullptr), shape);
    const npy::Array array = npy::read(path);
    CHECK(array.dtype == npy::DType::kFloat64);
    CHECK(array.shape == shape);
    CHECK(array.size() == 0);
    CHECK(array.f64.empty());
  }

  TEST_CASE("write formats the header like numpy") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::string path = dir.file("header.npy");
    const std::vector<double> values(2 * 4 * 10 * 10, 0.5);
    npy::write(path, values.data(), {2, 4, 10, 10});
    const std::string bytes = read_bytes(path);
    const std::string dict =
        "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 4, 10, 10), }";
    CHECK(bytes.compare(kPreambleBytesV1, dict.size(), dict) == 0);

    const std::vector<float> one(3, 1.0f);
    npy::write(path, one.data(), {3});
    const std::string one_dim =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
    CHECK(read_bytes(path).compare(kPreambleBytesV1, one_dim.size(), one_dim) ==
          0);
  }

  TEST_CASE("write replaces file without leftovers") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::string path = dir.file("out.npy");
    const std::vector<double> first = {1.0, 2.0};
    const std::vector<double> second = {3.0, 4.0, 5.0};
    npy::write(path, first.data(), {2});
    npy::write(path, second.data(), {3});

    const npy::Array array = npy::read(path);
    CHECK(array.f64 == second);
    CHECK(dir.entries() == std::vector<std::string>{"out.npy"});
  }

  TEST_CASE("write through a link keeps the link") {
    // A new file renamed over the link would replace the link itself.
    testing::TempDir dir("qrloss_test_npy_");
    const std::string target = dir.file("target.npy");
    const std::string link = dir.file("link.npy");
    const std::vector<float> first = {1.0f, 2.0f};
    const std::vector<float> second = {3.0f, 4.0f, 5.0f};
    npy::write(target, first.data(), {2});
    fs::permissions(target, fs::perms::owner_read | fs::perms::owner_write);
    fs::create_symlink("target.npy", link);
    npy::write(link, second.data(), {3});
    CHECK(fs::is_symlink(fs::symlink_status(link)));
    CHECK(npy::read(target).f32 == second);
    // The replacement keeps the permissions of the file it replaced.
    CHECK(fs::status(target).permissions() ==
          (fs::perms::owner_read | fs::perms::owner_write));
    std::vector<std::string> names = dir.entries();
    std::sort(names.begin(), names.end());
    CHECK(names == std::vector<std::string>{"link.npy", "target.npy"});
  }

  TEST_CASE("write keeps a replaced file's owner") {
    if (::geteuid() != 0) {
      MESSAGE("skipped: only root may give a file to another user");
      return;
    }
    testing::TempDir dir("qrloss_test_npy_");
    const std::string path = dir.file("out.npy");
    const std::vector<float> data = {1.0f, 2.0f};
    npy::write(path, data.data(), {2});
    // The ids of Debian's nobody and nogroup. Any ids other than 0 would do.
    constexpr uid_t kOwner = 65534;
    constexpr gid_t kGroup = 65534;
    REQUIRE(::chown(path.c_str(), kOwner, kGroup) == 0);
    npy::write(path, data.data(), {2});
    struct stat written;
    REQUIRE(::stat(path.c_str(), &written) == 0);
    CHECK(written.st_uid == kOwner);
    CHECK(written.st_gid == kGroup);
  }

  TEST_CASE("write keeps a read-only file") {
    // Renaming over the file needs only a writable directory, so a user
    // could replace a file it may not write. As root the check runs in a
    // child process that switches to the user nobody.
    testing::TempDir dir("qrloss_test_npy_");
    fs::permissions(dir.path(), fs::perms::all);
    const std::string path = dir.file("out.npy");
    const std::vector<float> first = {1.0f, 2.0f};
    const std::vector<float> second = {3.0f, 4.0f};
    npy::write(path, first.data(), {2});
    fs::permissions(path, fs::perms::owner_read | fs::perms::group_read |
                              fs::perms::others_read);

    const auto rejected = [&] {
      try {
        npy::write(path, second.data(), {2});
      } catch (const npy::io_error& error) {
        return std::string(error.what()).find("Permission denied") !=
               std::string::npos;
      }
      return false;
    };

    if (::geteuid() == 0) {
      const pid_t child = ::fork();
      REQUIRE(child >= 0);
      if (child == 0) {
        const bool dropped = ::setgid(65534) == 0 && ::setuid(65534) == 0;
        ::_exit(dropped && rejected() ? 0 : 1);
      }
      int status = 0;
      REQUIRE(::waitpid(child, &status, 0) == child);
      CHECK(WIFEXITED(status));
      CHECK(WEXITSTATUS(status) == 0);
    } else {
      CHECK(rejected());
    }

    CHECK(npy::read(path).f32 == first);
  }

  TEST_CASE("write through a dangling link creates its target") {
    // A link to a file that does not exist yet, through a second link in
    // a subfolder: the chain is followed to the missing file, which is
    // created, and both links stay.
    testing::TempDir dir("qrloss_test_npy_");
    fs::create_directory(dir.file("sub"));
    const std::string outer = dir.file("outer.npy");
    const std::string inner = dir.file("sub/inner.npy");
    fs::create_symlink("sub/inner.npy", outer);
    fs::create_symlink("../new.npy", inner);
    const std::vector<float> values = {1.5f, 2.5f};
    npy::write(outer, values.data(), {2});
    CHECK(fs::is_symlink(fs::symlink_status(outer)));
    CHECK(fs::is_symlink(fs::symlink_status(inner)));
    CHECK(npy::read(dir.file("new.npy")).f32 == values);
  }

  TEST_CASE("write to a named pipe writes in place") {
    // A device or a pipe is written in place. Renaming a new file over it,
    // as for a regular file, would replace the pipe (or, as root, a
    // device such as /dev/null) with a plain file. The read end is opened
    // first without blocking, and the array fits in the pipe's buffer, so
    // the write cannot block and a regression fails instead of hanging.
    testing::TempDir dir("qrloss_test_npy_");
    const std::string pipe = dir.file("pipe.npy");
    REQUIRE(::mkfifo(pipe.c_str(), 0600) == 0);
    const int reader = ::open(pipe.c_str(), O_RDONLY | O_NONBLOCK);
    REQUIRE(reader >= 0);
    const std::vector<double> values = {0.5, -1.5, 2.25};
    npy::write(pipe, values.data(), {3});
    std::string received;
    char buffer[4096];
    for (;;) {
      const ssize_t count = ::read(reader, buffer, sizeof buffer);
      if (count <= 0) break;
      received.append(buffer, static_cast<std::size_t>(count));
    }
    ::close(reader);
    CHECK(fs::is_fifo(fs::symlink_status(pipe)));
    const std::string copy = dir.file("copy.npy");
    write_bytes(copy, received);
    CHECK(npy::read(copy).f64 == values);
  }

  TEST_CASE("write failure leaves no file") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::vector<float> values = {1.0f, 2.0f};

    SUBCASE("missing directory") {
      const std::string path = dir.file("no_such_dir/out.npy");
      // The message names the requested file, and then the temporary file
      // that could not be created next to it.
      CHECK_THROWS_WITH_AS(
          npy::write(path, values.data(), {2}),
          doctest::Contains(("npy::write: cannot write " + path +
                             ": cannot create the temporary file " +
                             dir.file("no_such_dir/.out.npy.tmp-"))
                                .c_str()),
          npy::io_error);
      CHECK_FALSE(fs::exists(path));
      CHECK(dir.entries().empty());
    }

    SUBCASE("target is a directory") {
      const std::string path = dir.file("a_directory");
      fs::create_directory(path);
      CHECK_THROWS_WITH_AS(npy::write(path, values.data(), {2}),
                           doctest::Contains("cannot replace output file"),
                           npy::io_error);
      CHECK(fs::is_directory(path));
      CHECK(dir.entries() == std::vector<std::string>{"a_directory"});
    }
  }

  TEST_CASE("write rejects bad arguments") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::string path = dir.file("out.npy");
    const std::vector<double> values(4, 1.0);

    CHECK_THROWS_WITH_AS(npy::write(path, values.data(), {2, -2}),
                         doctest::Contains("negative extent"),
                         qrloss::invalid_argument);
    CHECK_THROWS_WITH_AS(
        npy::write(path, static_cast<const double*>(nullptr), {2, 2}),
        doctest::Contains("null data"), qrloss::invalid_argument);
    CHECK_THROWS_WITH_AS(
        npy::write(path, values.data(), qrloss::Shape(npy::kMaxRank + 1, 1)),
        doctest::Contains("rank too high"), qrloss::invalid_argument);
    CHECK_THROWS_WITH_AS(
        npy::write(path, values.data(),
                   {std::int64_t{1} << 32, std::int64_t{1} << 32}),
        doctest::Contains("size overflow"), qrloss::invalid_argument);
    CHECK(dir.entries().empty());
  }

  TEST_CASE("read of golden probs file") {
    const fs::path path = golden_dir() / "basic_f64" / "probs.npy";
    if (!fs::exists(path)) {
      MESSAGE("skipped: golden file not found at "
              << path.string() << " (set QRLOSS_GOLDEN_DIR)");
      return;
    }
    const npy::Array array = npy::read(path.string());
    CHECK(array.dtype == npy::DType::kFloat64);
    CHECK(array.shape == qrloss::Shape{2, 4, 10, 10});
    REQUIRE(array.f64.size() == 800);

    // The probs are a softmax over C, so every pixel sums to 1.
    const std::int64_t channels = 4;
    const std::int64_t pixels_per_image = 100;
    for (std::int64_t b = 0; b < 2; ++b) {
      for (std::int64_t pixel = 0; pixel < pixels_per_image; ++pixel) {
        double sum = 0.0;
        for (std::int64_t c = 0; c < channels; ++c) {
          const double q = array.f64[static_cast<std::size_t>(
              (b * channels + c) * pixels_per_image + pixel)];
          CHECK(q >= 0.0);
          sum += q;
        }
        CHECK(sum == doctest::Approx(1.0).epsilon(1e-12));
      }
    }
  }

  TEST_CASE("read accepts header variants") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::string path = dir.file("variant.npy");
    const std::vector<double> values = {1.5, -2.5, 3.25, 4.0, 0.0, 6.5};
    const std::string data = raw_bytes(values);

    struct Variant {
      const char* name;
      std::string bytes;
      qrloss::Shape shape;
    };
    const std::vector<Variant> variants = {
        {"version 2.0", npy_file(2, header_for("<f8", "(2, 3)"), data), {2, 3}},
        {"version 3.0", npy_file(3, header_for("<f8", "(2, 3)"), data), {2, 3}},
        {"native byte order",
         npy_file(1, header_for("=f8", "(6,)"), data),
         {6}},
        {"double quotes and other key order",
         npy_file(1,
                  "{\"shape\": (3, 2), \"fortran_order\": False, "
                  "\"descr\": \"<f8\"}",
                  data),
         {3, 2}},
        {"no trailing comma or newline, no padding",
         npy_file(1, "{'descr':'<f8','fortran_order':False,'shape':(1,2,3)}",
                  data),
         {1, 2, 3}},
        {"trailing comma in shape",
         npy_file(1, header_for("<f8", "(2, 3,)"), data),
         {2, 3}},
        {"tabs and newlines",
         npy_file(1,
                  "{\n\t'descr' : '<f8' ,\n\t'fortran_order' : False ,\n\t"
                  "'shape' : ( 6 , ) ,\n}\n",
                  data),
         {6}},
    };
    for (const Variant& variant : variants) {
      CAPTURE(variant.name);
      write_bytes(path, variant.bytes);
      const npy::Array array = npy::read(path);
      CHECK(array.dtype == npy::DType::kFloat64);
      CHECK(array.shape == variant.shape);
      CHECK(array.f64 == values);
    }

    SUBCASE("rank 0") {
      write_bytes(path, npy_file(1, header_for("<f4", "()"),
                                 raw_bytes(std::vector<float>{7.0f})));
      const npy::Array array = npy::read(path);
      CHECK(array.dtype == npy::DType::kFloat32);
      CHECK(array.shape.empty());
      CHECK(array.size() == 1);
      CHECK(array.f32 == std::vector<float>{7.0f});
    }

    SUBCASE("zero extent") {
      write_bytes(path, npy_file(1, header_for("<f4", "(3, 0)")));
      const npy::Array array = npy::read(path);
      CHECK(array.shape == qrloss::Shape{3, 0});
      CHECK(array.size() == 0);
      CHECK(array.f32.empty());
    }

    SUBCASE("rank 8") {
      write_bytes(
          path,
          npy_file(1, header_for("<f8", "(1, 1, 1, 1, 1, 1, 2, 3)"), data));
      const npy::Array array = npy::read(path);
      CHECK(array.shape == qrloss::Shape{1, 1, 1, 1, 1, 1, 2, 3});
      CHECK(array.f64 == values);
    }
  }

  TEST_CASE("read reports missing or odd paths") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::string missing = dir.file("missing.npy");
    CHECK_THROWS_WITH_AS(npy::read(missing), doctest::Contains("cannot open"),
                         npy::io_error);
    CHECK_THROWS_WITH_AS(npy::read(missing), doctest::Contains(missing.c_str()),
                         npy::io_error);
    CHECK_THROWS_WITH_AS(npy::read(dir.path().string()),
                         doctest::Contains("not a regular file"),
                         npy::io_error);
  }

  TEST_CASE("read rejects bad preamble") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::string data = raw_bytes(std::vector<double>{1.0, 2.0});
    const std::string header = header_for("<f8", "(2,)");

    SUBCASE("bad magic") {
      std::string bytes = npy_file(1, header, data);
      bytes[1] = 'X';
      check_rejected(dir, bytes, "bad magic");
      check_rejected(dir, "PK\x03\x04 a zip file, not an npy", "bad magic");
      check_rejected(dir, std::string("\x93NUM", 4), "truncated header");
    }

    SUBCASE("truncated header") {
      check_rejected(dir, "", "truncated header");
      check_rejected(dir, std::string("\x93NUMPY\x01", 7), "truncated header");
      check_rejected(dir, std::string("\x93NUMPY\x01\x00\x76", 9),
                     "truncated header");
      check_rejected(dir, preamble(2, 0, 100).substr(0, 11),
                     "truncated header");
    }

    SUBCASE("unsupported format version") {
      check_rejected(dir,
                     preamble(4, 0, static_cast<std::uint32_t>(header.size())) +
                         header + data,
                     "unsupported format version");
      check_rejected(dir,
                     preamble(1, 1, static_cast<std::uint32_t>(header.size())) +
                         header + data,
                     "unsupported format version");
      check_rejected(dir,
                     preamble(0, 0, static_cast<std::uint32_t>(header.size())) +
                         header + data,
                     "unsupported format version");
    }

    SUBCASE("header too long") {
      check_rejected(dir, preamble(2, 0, 0xffffffffu) + header + data,
                     "header too long");
      const auto over_cap =
          static_cast<std::uint32_t>(npy::kMaxHeaderBytes + 1);
      check_rejected(dir, preamble(3, 0, over_cap) + header + data,
                     "header too long");
    }

    SUBCASE("header length past end of file") {
      check_rejected(dir, preamble(1, 0, 0xffff) + header + data,
                     "header length past end of file");
      const auto one_more = static_cast<std::uint32_t>(header.size() + 1);
      check_rejected(dir, preamble(2, 0, one_more) + header,
                     "header length past end of file");
    }
  }

  TEST_CASE("read rejects malformed header") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::string data = raw_bytes(std::vector<double>{1.0, 2.0});

    struct Case {
      const char* name;
      std::string header;
    };
    const std::vector<Case> cases = {
        {"empty header", ""},
        {"only whitespace", "   \n"},
        {"no opening brace", "'descr': '<f8', 'fortran_order': False}"},
        {"no closing brace",
         "{'descr': '<f8', 'fortran_order': False, "
         "'shape': (2,)"},
        {"missing key", "{'descr': '<f8', 'shape': (2,)}"},
        {"duplicate key",
         "{'descr': '<f8', 'descr': '<f8', 'fortran_order': False, "
         "'shape': (2,)}"},
        {"unexpected key",
         "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), 'x': 1}"},
        {"unquoted key",
         "{descr: '<f8', 'fortran_order': False, 'shape': (2,)}"},
        {"unterminated string", "{'descr': '<f8"},
        {"escape in string",
         "{'descr': '<f\\x38', 'fortran_order': False, 'shape': (2,)}"},
        {"control byte in string",
         std::string("{'descr': '<f8\x01', 'fortran_order': False, "
                     "'shape': (2,)}")},
        {"missing colon",
         "{'descr' '<f8', 'fortran_order': False, 'shape': (2,)}"},
        {"missing comma",
         "{'descr': '<f8' 'fortran_order': False, 'shape': (2,)}"},
        {"lowercase bool",
         "{'descr': '<f8', 'fortran_order': false, "
         "'shape': (2,)}"},
        {"integer bool", "{'descr': '<f8', 'fortran_order': 0, 'shape': (2,)}"},
        {"shape is an integer",
         "{'descr': '<f8', 'fortran_order': False, 'shape': (2)}"},
        {"shape is a list",
         "{'descr': '<f8', 'fortran_order': False, 'shape': [2]}"},
        {"float extent",
         "{'descr': '<f8', 'fortran_order': False, 'shape': (2.0,)}"},
        {"negative extent",
         "{'descr': '<f8', 'fortran_order': False, 'shape': (-2,)}"},
        {"double comma in shape",
         "{'descr': '<f8', 'fortran_order': False, 'shape': (2,,)}"},
        {"text after the dict",
         "{'descr': '<f8', 'fortran_order': False, 'shape': (2,)} x"},
        {"nul padding",
         "{'descr': '<f8', 'fortran_order': False, 'shape': (2,)}" +
             std::string(2, '\0')},
    };
    for (const Case& test : cases) {
      CAPTURE(test.name);
      check_rejected(dir, npy_file(1, test.header, data), "malformed header");
    }
  }

  TEST_CASE("read rejects unsupported content") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::string data = raw_bytes(std::vector<double>{1.0, 2.0});

    SUBCASE("dtype") {
      for (const char* descr :
           {"<i4", "<f2", "<c16", "|u1", "|b1", "<i8", "O", "<U4"}) {
        CAPTURE(descr);
        const std::string bytes = npy_file(1, header_for(descr, "(2,)"), data);
        check_rejected(dir, bytes, "unsupported dtype");
        check_rejected(dir, bytes, std::string("'") + descr + "'");
      }
      check_rejected(dir,
                     npy_file(1,
                              "{'descr': [('a', '<f8')], 'fortran_order': "
                              "False, 'shape': (2,)}",
                              data),
                     "unsupported dtype");
    }

    SUBCASE("big-endian") {
      check_rejected(dir, npy_file(1, header_for(">f8", "(2,)"), data),
                     "big-endian");
      check_rejected(dir, npy_file(1, header_for(">f4", "(4,)"), data),
                     "big-endian");
    }

    SUBCASE("Fortran order") {
      check_rejected(dir,
                     npy_file(1, header_for("<f8", "(1, 2)", "True"), data),
                     "Fortran order");
    }

    SUBCASE("rank above the maximum") {
      check_rejected(
          dir,
          npy_file(1, header_for("<f8", "(1, 1, 1, 1, 1, 1, 1, 1, 2)"), data),
          "rank too high");
    }
  }

  TEST_CASE("read rejects sizes that overflow") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::string data = raw_bytes(std::vector<double>{1.0, 2.0});

    // An extent above int64.
    check_rejected(
        dir, npy_file(1, header_for("<f8", "(99999999999999999999,)"), data),
        "size overflow");
    // 2^32 * 2^32 elements overflow the element count.
    check_rejected(
        dir, npy_file(1, header_for("<f8", "(4294967296, 4294967296)"), data),
        "size overflow");
    // 2^62 float64 elements fit in int64, but their byte count does not.
    check_rejected(
        dir, npy_file(1, header_for("<f8", "(4611686018427387904,)"), data),
        "size overflow");
    // A zero extent makes the product 0 even after a huge extent.
    const std::string path = dir.file("zero.npy");
    write_bytes(path,
                npy_file(1, header_for("<f8", "(0, 9223372036854775807)")));
    CHECK(npy::read(path).size() == 0);
  }

  TEST_CASE("read rejects data of wrong size") {
    testing::TempDir dir("qrloss_test_npy_");
    const std::string header = header_for("<f8", "(2, 3)");
    const std::string data = raw_bytes(std::vector<double>(6, 1.0));

    check_rejected(dir, npy_file(1, header, data.substr(0, data.size() - 1)),
                   "truncated data");
    check_rejected(dir, npy_file(1, header), "truncated data");
    check_rejected(dir, npy_file(1, header, data + "x"), "trailing bytes");
    check_rejected(dir, npy_file(1, header, data + data), "trailing bytes");
    // A large declared size with a short file is rejected before anything
    // is allocated.
    check_rejected(dir,
                   npy_file(1, header_for("<f4", "(1000000000000,)"), data),
                   "truncated data");
    // A float32 header with float64-sized data.
    check_rejected(dir, npy_file(1, header_for("<f4", "(2, 3)"), data),
                   "trailing bytes");
  }

}  // TEST_SUITE("npy")
