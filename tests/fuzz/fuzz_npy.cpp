// libFuzzer target for qrloss::npy::read.
//
// read() takes a path and has no public entry point that parses memory, so
// every input is written to a scratch file first (one per process, under
// $TMPDIR or /tmp) and read from there.
//
// Contract checked on every input:
// - read() returns, or throws npy::format_error whose message starts with
//   "npy::read: " and names the path. io_error is a failure here, since the
//   scratch file is a readable regular file, and so is any other exception
//   (libFuzzer reports an uncaught exception as a crash).
// - A returned array has a rank of at most kMaxRank, its element vector of
//   the declared dtype contains exactly the product of the extents, the other
//   vector is empty, and its bytes are the last bytes of the file.
// - npy::write() of the returned array followed by read() gives back the
//   same dtype, shape and bytes.

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "qrloss/npy.hpp"

namespace {

namespace npy = qrloss::npy;

[[noreturn]] void fail(const std::string& details) {
  std::fprintf(stderr, "fuzz_npy: contract violated: %s\n", details.c_str());
  std::abort();
}

std::string scratch_path(const char* suffix) {
  const char* dir = std::getenv("TMPDIR");
  std::string path = dir != nullptr && dir[0] != '\0' ? dir : "/tmp";
  path += "/qrloss-fuzz-npy-" + std::to_string(::getpid()) + suffix;
  return path;
}

const std::string& input_path() {
  static const std::string path = scratch_path("-input.npy");
  return path;
}

const std::string& round_trip_path() {
  static const std::string path = scratch_path("-round-trip.npy");
  return path;
}

void remove_scratch_files() {
  std::remove(input_path().c_str());
  std::remove(round_trip_path().c_str());
}

void write_bytes(const std::string& path, const std::uint8_t* data,
                 std::size_t size) {
  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (file == nullptr) fail("cannot create scratch file " + path);
  const bool ok = (size == 0 || std::fwrite(data, 1, size, file) == size);
  if (std::fclose(file) != 0 || !ok) fail("cannot write " + path);
}

const void* array_bytes(const npy::Array& array) {
  return array.dtype == npy::DType::kFloat32
             ? static_cast<const void*>(array.f32.data())
             : static_cast<const void*>(array.f64.data());
}

std::size_t array_byte_count(const npy::Array& array) {
  return array.dtype == npy::DType::kFloat32
             ? array.f32.size() * sizeof(float)
             : array.f64.size() * sizeof(double);
}

void check_array(const npy::Array& array, const std::uint8_t* data,
                 std::size_t size) {
  if (array.shape.size() > static_cast<std::size_t>(npy::kMaxRank)) {
    fail("read() returned rank " + std::to_string(array.shape.size()));
  }
  const std::int64_t count = array.size();
  const bool is_f32 = array.dtype == npy::DType::kFloat32;
  const std::size_t stored = is_f32 ? array.f32.size() : array.f64.size();
  const std::size_t other = is_f32 ? array.f64.size() : array.f32.size();
  if (static_cast<std::int64_t>(stored) != count || other != 0) {
    fail("element vectors do not match shape " +
         qrloss::format_shape(array.shape));
  }
  const std::size_t bytes = array_byte_count(array);
  if (bytes > size ||
      (bytes > 0 &&
       std::memcmp(array_bytes(array), data + size - bytes, bytes) != 0)) {
    fail("the data is not the last " + std::to_string(bytes) +
         " bytes of the file");
  }
}

void check_round_trip(const npy::Array& array) {
  const std::string& path = round_trip_path();
  if (array.dtype == npy::DType::kFloat32) {
    npy::write(path, array.f32.data(), array.shape);
  } else {
    npy::write(path, array.f64.data(), array.shape);
  }
  const npy::Array again = npy::read(path);
  if (again.dtype != array.dtype || again.shape != array.shape ||
      array_byte_count(again) != array_byte_count(array) ||
      (array_byte_count(array) > 0 &&
       std::memcmp(array_bytes(again), array_bytes(array),
                   array_byte_count(array)) != 0)) {
    fail("write() then read() changed the array of shape " +
         qrloss::format_shape(array.shape));
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::atexit(remove_scratch_files);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  const std::string& path = input_path();
  write_bytes(path, data, size);

  npy::Array array;
  try {
    array = npy::read(path);
  } catch (const npy::format_error& error) {
    const std::string message = error.what();
    if (message.rfind("npy::read: ", 0) != 0 ||
        message.find(path) == std::string::npos) {
      fail("format_error message without 'npy::read: ' and the path: " +
           message);
    }
    return 0;
  } catch (const npy::io_error& error) {
    fail(std::string("io_error on a readable regular file: ") + error.what());
  }

  check_array(array, data, size);
  check_round_trip(array);
  return 0;
}
