#pragma once
/// Reading and writing NumPy .npy files of float32 or float64 arrays.
///
/// The reader checks every field of an untrusted file before it allocates
/// or reads the data, so a damaged or hostile file gives an exception, never
/// a crash or an over-read. The writer replaces its output atomically.
/// Both assume a little-endian host (checked at compile time in npy.cpp).

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "qrloss/error.hpp"
#include "qrloss/tensor.hpp"

namespace qrloss::npy {

/// A file whose content is not an .npy array that read() accepts: bad magic,
/// unsupported version, malformed or oversized header, unsupported dtype,
/// Fortran order, or data whose size does not match the declared shape.
/// Messages read `npy::read: <problem>: <path>: <details>`.
class format_error : public qrloss::invalid_argument {
 public:
  using qrloss::invalid_argument::invalid_argument;
};

/// An operating-system failure: a file that cannot be opened, read, created,
/// written or renamed. The message names the path and the system error.
class io_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Element types that read() and write() support.
enum class DType { kFloat32, kFloat64 };

/// Returns "float32" or "float64", the NumPy name of the dtype.
const char* dtype_name(DType dtype);

/// Largest header (the dict after the length field) that read() accepts, in
/// bytes. A float array of rank <= kMaxRank needs under 200 bytes; the cap
/// stops a hostile length field from making the reader allocate and scan
/// megabytes of text. NumPy's own reader uses a 10000-byte default limit.
inline constexpr std::int64_t kMaxHeaderBytes = std::int64_t{1} << 20;

/// Largest rank that read() and write() accept. The loss code uses rank 2
/// or 4; callers check the rank they need.
inline constexpr int kMaxRank = 8;

/// A C-order array loaded from an .npy file. The vector that matches dtype
/// (f32 or f64) contains the data, and the other one is empty.
struct Array {
  DType dtype = DType::kFloat64;
  /// Extents in C order (last axis fastest); empty for a rank-0 array.
  qrloss::Shape shape;
  std::vector<float> f32;
  std::vector<double> f64;

  /// Returns the number of elements, the product of the extents (1 for
  /// rank 0).
  /// @throws qrloss::invalid_argument on a negative extent or a product
  ///   that overflows int64, which read() never returns.
  std::int64_t size() const;

  /// Returns f32 for T = float and f64 for T = double.
  template <typename T>
  std::vector<T>& values() {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
    if constexpr (std::is_same_v<T, float>) {
      return f32;
    } else {
      return f64;
    }
  }
};

/// Reads a float32 or float64 array from an .npy file.
///
/// Accepts format versions 1.0, 2.0 and 3.0; descr '<f4' or '<f8' ('=f4'
/// and '=f8' too, since '=' means native order and the host is
/// little-endian); 'fortran_order': False; a shape of rank 0..kMaxRank with
/// non-negative extents. The file must end exactly where the declared data
/// ends.
/// @throws io_error if the path is not a regular file or cannot be opened or
///   read.
/// @throws format_error (a qrloss::invalid_argument) for anything else
///   wrong with the file. The message names the path and one of these
///   problems: bad magic, truncated header, unsupported format version,
///   header too long, header length past end of file, malformed header,
///   unsupported dtype, big-endian data, Fortran order, rank too high, size
///   overflow, truncated data or trailing bytes.
Array read(const std::string& path);

/// Writes a C-order float32 array as an .npy file (format version 1.0,
/// header padded with spaces so the data starts at a multiple of 64 bytes,
/// as NumPy writes it).
///
/// The data goes to a new temporary file in the same directory, which is
/// then renamed over `path`. On failure the temporary file is removed and
/// any existing file at `path` is left unchanged. A replaced file's
/// permissions carry over, and so do its owner and group where the process
/// may set them (as root, or for its own files). A file that the process
/// may not write is not replaced, and other hard links to a replaced file
/// keep the old contents. Where `path` is a symbolic link (or a chain of
/// them), the file it points to is replaced or created this way and the
/// links are kept. A device or a named pipe at `path` is written in place,
/// with no temporary file, since a rename would replace the device file or
/// pipe.
/// NOTE: the file is not fsync'ed. An exception never leaves a partial file
/// at `path`, but a killed process may leave a hidden `.NAME.tmp-*` file,
/// and after a power loss or OS crash `path` may be empty.
/// @throws qrloss::invalid_argument on a negative extent, rank above
///   kMaxRank, a byte count that overflows, or null data with a non-zero
///   element count.
/// @throws io_error if an existing file at `path` is not writable, the
///   temporary file cannot be created, written or renamed, or a device or
///   pipe at `path` cannot be opened or written.
void write(const std::string& path, const float* data,
           const qrloss::Shape& shape);

/// Writes a C-order float64 array; otherwise the same as the float overload.
void write(const std::string& path, const double* data,
           const qrloss::Shape& shape);

}  // namespace qrloss::npy
