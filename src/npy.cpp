#include "qrloss/npy.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

// The data is copied byte for byte between memory and the little-endian
// file, which is only correct on a little-endian host.
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "qrloss::npy supports little-endian hosts only"
#endif
#endif

static_assert(sizeof(float) == 4 && sizeof(double) == 8,
              "qrloss::npy maps float to '<f4' and double to '<f8'");

namespace qrloss::npy {
namespace {

// "\x93NUMPY", then one byte each for the major and minor version.
constexpr char kMagic[] = "\x93NUMPY";
constexpr std::int64_t kMagicBytes = 6;
constexpr std::int64_t kVersionBytes = 2;

// The header length field is a little-endian uint16 in version 1.0 and a
// uint32 in versions 2.0 and 3.0.
constexpr std::int64_t kLengthFieldBytesV1 = 2;
constexpr std::int64_t kLengthFieldBytesV2 = 4;

// NumPy pads the header so that the data starts at a multiple of 64 bytes,
// which lets readers map the data with any alignment up to 64.
constexpr std::int64_t kDataAlignment = 64;

// A version 1.0 header length must fit its uint16 field.
constexpr std::int64_t kMaxHeaderBytesV1 = 65535;

// Maximum length of a descr quoted in an error message, because a hostile
// header may contain a string of up to kMaxHeaderBytes.
constexpr std::size_t kMaxQuotedChars = 40;

constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

[[noreturn]] void throw_format(const std::string& path,
                               const std::string& problem,
                               const std::string& details) {
  throw format_error("npy::read: " + problem + ": " + path + ": " + details);
}

// Throws "function: problem: path: reason", or "function: problem:
// reason" when the problem text already names the path.
[[noreturn]] void throw_io(const char* function, const std::string& problem,
                           const std::string& path, int error_number) {
  std::string message = std::string(function) + ": " + problem + ": ";
  if (!path.empty()) message += path + ": ";
  throw io_error(message + std::generic_category().message(error_number));
}

// Returns a * b, or false when the product overflows int64. Both are >= 0.
bool checked_multiply(std::int64_t a, std::int64_t b, std::int64_t* product) {
  if (a != 0 && b > kInt64Max / a) {
    return false;
  }
  *product = a * b;
  return true;
}

std::int64_t item_bytes(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : 8;
}

// Shortens a header string for an error message.
std::string quote_for_message(const std::string& text) {
  if (text.size() <= kMaxQuotedChars) {
    return "'" + text + "'";
  }
  return "'" + text.substr(0, kMaxQuotedChars) + "...'";
}

// ---------------------------------------------------------------------------
// Header dict parser
// ---------------------------------------------------------------------------

// The fields of a header dict, before their values are checked.
struct HeaderFields {
  std::string descr;
  bool fortran_order = false;
  Shape shape;
};

// Parses the Python dict literal of an .npy header, for example
//   {'descr': '<f8', 'fortran_order': False, 'shape': (2, 4), }
// The keys must be exactly descr, fortran_order and shape, each once. Their
// values are a string, a bool and a tuple of non-negative integers, and only
// whitespace may follow the closing brace. The parser never recurses, so
// deeply nested brackets in a hostile header cannot overflow the stack.
class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& path)
      : text_(text), path_(path) {}

  HeaderFields parse() {
    HeaderFields fields;
    bool has_descr = false;
    bool has_fortran_order = false;
    bool has_shape = false;

    skip_whitespace();
    expect('{', "'{' at the start of the header dict");
    skip_whitespace();
    while (!at('}')) {
      const std::string key = parse_string("a quoted key");
      skip_whitespace();
      expect(':', "':' after key " + quote_for_message(key));
      skip_whitespace();
      if (key == "descr") {
        mark_seen(key, &has_descr);
        fields.descr = parse_descr();
      } else if (key == "fortran_order") {
        mark_seen(key, &has_fortran_order);
        fields.fortran_order = parse_bool(key);
      } else if (key == "shape") {
        mark_seen(key, &has_shape);
        fields.shape = parse_shape();
      } else {
        fail("unexpected key " + quote_for_message(key) +
             "; expected only 'descr', 'fortran_order' and 'shape'");
      }
      skip_whitespace();
      if (at(',')) {
        ++pos_;
        skip_whitespace();
      } else if (!at('}')) {
        fail("expected ',' or '}' after the value of " +
             quote_for_message(key));
      }
    }
    ++pos_;  // the closing brace
    skip_whitespace();
    if (pos_ != text_.size()) {
      fail("unexpected text after the closing '}'");
    }

    if (!has_descr) fail("missing key 'descr'");
    if (!has_fortran_order) fail("missing key 'fortran_order'");
    if (!has_shape) fail("missing key 'shape'");
    return fields;
  }

 private:
  [[noreturn]] void fail(const std::string& details) const {
    throw_format(path_, "malformed header",
                 details + " (at header byte " + std::to_string(pos_) + ")");
  }

  bool at(char c) const { return pos_ < text_.size() && text_[pos_] == c; }

  void expect(char c, const std::string& what) {
    if (!at(c)) {
      fail("expected " + what);
    }
    ++pos_;
  }

  void skip_whitespace() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' ||
            text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  void mark_seen(const std::string& key, bool* seen) {
    if (*seen) {
      fail("duplicate key " + quote_for_message(key));
    }
    *seen = true;
  }

  // A single- or double-quoted string of printable ASCII without escapes,
  // which covers every key and simple descr NumPy writes.
  std::string parse_string(const std::string& what) {
    if (!at('\'') && !at('"')) {
      fail("expected " + what);
    }
    const char quote = text_[pos_++];
    const std::size_t start = pos_;
    while (pos_ < text_.size() && text_[pos_] != quote) {
      const unsigned char c = static_cast<unsigned char>(text_[pos_]);
      if (c == '\\') {
        fail("escape sequences in header strings are not supported");
      }
      if (c < 0x20 || c > 0x7e) {
        fail("non-printable or non-ASCII byte in a header string");
      }
      ++pos_;
    }
    if (pos_ == text_.size()) {
      fail("unterminated string");
    }
    std::string value = text_.substr(start, pos_ - start);
    ++pos_;  // the closing quote
    return value;
  }

  std::string parse_descr() {
    if (at('[')) {
      throw_format(path_, "unsupported dtype",
                   "structured dtypes (a list descr) are not supported; "
                   "expected '<f4' (float32) or '<f8' (float64)");
    }
    return parse_string("a quoted descr string such as '<f8'");
  }

  bool parse_bool(const std::string& key) {
    if (text_.compare(pos_, 4, "True") == 0) {
      pos_ += 4;
      return true;
    }
    if (text_.compare(pos_, 5, "False") == 0) {
      pos_ += 5;
      return false;
    }
    fail("expected True or False as the value of " + quote_for_message(key));
  }

  // A tuple of integers: (), (5,), (2, 3) or (2, 3,).
  Shape parse_shape() {
    expect('(', "a tuple such as (2, 4) as the value of 'shape'");
    Shape shape;
    bool trailing_comma = false;
    skip_whitespace();
    while (!at(')')) {
      if (shape.size() == static_cast<std::size_t>(kMaxRank)) {
        throw_format(path_, "rank too high",
                     "the shape has more than " + std::to_string(kMaxRank) +
                         " extents; at most " + std::to_string(kMaxRank) +
                         " are supported");
      }
      shape.push_back(parse_extent());
      skip_whitespace();
      trailing_comma = at(',');
      if (trailing_comma) {
        ++pos_;
        skip_whitespace();
      } else if (!at(')')) {
        fail("expected ',' or ')' in the shape tuple");
      }
    }
    ++pos_;  // the closing parenthesis
    if (shape.size() == 1 && !trailing_comma) {
      fail("the shape (n) is an integer, not a tuple; write (n,)");
    }
    return shape;
  }

  std::int64_t parse_extent() {
    if (at('-')) {
      throw_format(path_, "malformed header",
                   "negative extent in the shape (at header byte " +
                       std::to_string(pos_) + ")");
    }
    if (pos_ >= text_.size() || text_[pos_] < '0' || text_[pos_] > '9') {
      fail("expected a non-negative integer in the shape tuple");
    }
    std::int64_t value = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      const std::int64_t digit = text_[pos_] - '0';
      if (value > (kInt64Max - digit) / 10) {
        throw_format(path_, "size overflow",
                     "an extent in the shape does not fit in int64");
      }
      value = value * 10 + digit;
      ++pos_;
    }
    return value;
  }

  const std::string& text_;
  const std::string& path_;
  std::size_t pos_ = 0;
};

// Maps a descr to a dtype, rejecting everything but little-endian or native
// float32 and float64.
DType parse_dtype(const std::string& descr, const std::string& path) {
  if (descr == "<f4" || descr == "=f4") return DType::kFloat32;
  if (descr == "<f8" || descr == "=f8") return DType::kFloat64;
  if (descr == ">f4" || descr == ">f8") {
    throw_format(path, "big-endian data",
                 "descr '" + descr +
                     "' is big-endian, which is not supported; convert it "
                     "with numpy, e.g. a.astype('<" +
                     descr.substr(1) + "')");
  }
  throw_format(path, "unsupported dtype",
               "descr " + quote_for_message(descr) +
                   "; expected '<f4' (float32) or '<f8' (float64)");
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

// Reads exactly `bytes` bytes. The caller has checked that the file is long
// enough, so a short read is an I/O error or a file that shrank meanwhile.
void read_exact(std::FILE* file, void* buffer, std::size_t bytes,
                const std::string& path) {
  if (bytes == 0) {
    return;
  }
  if (std::fread(buffer, 1, bytes, file) != bytes) {
    const int error_number = std::ferror(file) ? errno : EIO;
    throw_io("npy::read", "read failed", path, error_number);
  }
}

std::int64_t file_size_of(const std::string& path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec) {
    throw_io("npy::read", "cannot open", path, ec.value());
  }
  if (!std::filesystem::is_regular_file(status)) {
    throw io_error("npy::read: not a regular file: " + path);
  }
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) {
    throw_io("npy::read", "cannot open", path, ec.value());
  }
  if (size > static_cast<std::uintmax_t>(kInt64Max)) {
    throw_format(path, "size overflow", "the file size does not fit in int64");
  }
  return static_cast<std::int64_t>(size);
}

// Reads the magic string, version and header length field, and returns the
// header length; *preamble_bytes is set to the number of bytes consumed.
std::int64_t read_preamble(std::FILE* file, std::int64_t file_size,
                           const std::string& path,
                           std::int64_t* preamble_bytes) {
  unsigned char start[kMagicBytes + kVersionBytes] = {};
  const std::int64_t available =
      std::min<std::int64_t>(file_size, kMagicBytes + kVersionBytes);
  read_exact(file, start, static_cast<std::size_t>(available), path);

  const std::int64_t magic_available = std::min(available, kMagicBytes);
  if (std::memcmp(start, kMagic, static_cast<std::size_t>(magic_available)) !=
      0) {
    throw_format(path, "bad magic",
                 "the file does not start with \\x93NUMPY, so it is not an "
                 ".npy file");
  }
  if (available < kMagicBytes + kVersionBytes) {
    throw_format(path, "truncated header",
                 "the file ends after " + std::to_string(file_size) +
                     " bytes, inside the magic string and version");
  }

  const int major = start[kMagicBytes];
  const int minor = start[kMagicBytes + 1];
  if (minor != 0 || major < 1 || major > 3) {
    throw_format(path, "unsupported format version",
                 "got " + std::to_string(major) + "." + std::to_string(minor) +
                     "; supported are 1.0, 2.0 and 3.0");
  }

  const std::int64_t length_bytes =
      major == 1 ? kLengthFieldBytesV1 : kLengthFieldBytesV2;
  *preamble_bytes = kMagicBytes + kVersionBytes + length_bytes;
  if (file_size < *preamble_bytes) {
    throw_format(path, "truncated header",
                 "the file ends after " + std::to_string(file_size) +
                     " bytes, inside the " + std::to_string(length_bytes) +
                     "-byte header length field");
  }
  unsigned char field[kLengthFieldBytesV2] = {};
  read_exact(file, field, static_cast<std::size_t>(length_bytes), path);
  std::int64_t header_bytes = 0;
  for (std::int64_t i = length_bytes - 1; i >= 0; --i) {
    header_bytes = (header_bytes << 8) | field[i];
  }

  if (header_bytes > kMaxHeaderBytes) {
    throw_format(path, "header too long",
                 "the header length field is " + std::to_string(header_bytes) +
                     " bytes; at most " + std::to_string(kMaxHeaderBytes) +
                     " are accepted");
  }
  if (header_bytes > file_size - *preamble_bytes) {
    throw_format(path, "header length past end of file",
                 "the header length field is " + std::to_string(header_bytes) +
                     " bytes but only " +
                     std::to_string(file_size - *preamble_bytes) +
                     " bytes follow it");
  }
  return header_bytes;
}

template <typename T>
void read_data(std::FILE* file, std::int64_t count, std::vector<T>* data,
               const std::string& path) {
  data->resize(static_cast<std::size_t>(count));
  read_exact(file, data->data(), static_cast<std::size_t>(count) * sizeof(T),
             path);
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

// Returns the byte count of a C-order array of `shape`, after checking the
// shape; `function` names the caller in messages.
std::int64_t checked_byte_count(const char* function, const Shape& shape,
                                std::int64_t item_size) {
  if (shape.size() > static_cast<std::size_t>(kMaxRank)) {
    throw qrloss::invalid_argument(
        std::string(function) + ": rank too high: shape " +
        format_shape(shape) + " has rank " + std::to_string(shape.size()) +
        "; at most " + std::to_string(kMaxRank) + " is supported");
  }
  // The element count comes first, in the reader's order, so that every
  // shape the reader accepts can be written back. A zero extent then makes
  // the byte count 0 even after huge extents.
  std::int64_t count = 1;
  for (const std::int64_t extent : shape) {
    if (extent < 0) {
      throw qrloss::invalid_argument(std::string(function) +
                                     ": negative extent: shape " +
                                     format_shape(shape));
    }
    if (!checked_multiply(count, extent, &count)) {
      throw qrloss::invalid_argument(
          std::string(function) + ": size overflow: the element count of "
          "shape " + format_shape(shape) + " does not fit in int64");
    }
  }
  std::int64_t bytes = 0;
  if (!checked_multiply(count, item_size, &bytes)) {
    throw qrloss::invalid_argument(
        std::string(function) + ": size overflow: shape " +
        format_shape(shape) + " has more bytes than int64 can count");
  }
  return bytes;
}

std::string header_text(const char* descr, const Shape& shape) {
  std::string dict = std::string("{'descr': '") + descr +
                     "', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) dict += ", ";
    dict += std::to_string(shape[i]);
  }
  if (shape.size() == 1) dict += ",";
  dict += "), }";

  // Pad with spaces and end with '\n' so the data starts at a multiple of
  // kDataAlignment.
  const std::int64_t preamble =
      kMagicBytes + kVersionBytes + kLengthFieldBytesV1;
  const std::int64_t unpadded =
      preamble + static_cast<std::int64_t>(dict.size()) + 1;
  const std::int64_t padding =
      (kDataAlignment - unpadded % kDataAlignment) % kDataAlignment;
  dict.append(static_cast<std::size_t>(padding), ' ');
  dict += '\n';
  return dict;
}

// Returns a temporary file name next to `path` that is unlikely to exist;
// the caller creates it exclusively and retries on a clash.
std::string temporary_name(const std::filesystem::path& path) {
  static const std::uint64_t seed = [] {
    std::random_device device;
    return (static_cast<std::uint64_t>(device()) << 32) ^ device() ^
           static_cast<std::uint64_t>(
               std::chrono::steady_clock::now().time_since_epoch().count());
  }();
  static std::atomic<std::uint64_t> counter{0};
  std::mt19937_64 generator(seed + counter.fetch_add(1));
  char suffix[17];
  std::snprintf(suffix, sizeof suffix, "%016llx",
                static_cast<unsigned long long>(generator()));

  std::filesystem::path name = path.parent_path();
  name /= "." + path.filename().string() + ".tmp-" + suffix;
  return name.string();
}

// Creates a new temporary file next to `path` and opens it for writing.
FilePtr create_temporary(const std::string& path, std::string* temp_path) {
  // NOTE: a name clash needs two identical 64-bit suffixes; the retries only
  // guard against a stale file left by a killed process.
  constexpr int kMaxAttempts = 16;
  int error_number = 0;
  for (int attempt = 0; attempt < kMaxAttempts; ++attempt) {
    *temp_path = temporary_name(path);
    // "x" (C11, exclusive creation) fails if the name exists, so the file
    // of another writer is never truncated.
    std::FILE* file = std::fopen(temp_path->c_str(), "wbx");
    if (file != nullptr) {
      return FilePtr(file);
    }
    error_number = errno;
    if (error_number != EEXIST) {
      break;
    }
  }
  throw_io("npy::write",
           "cannot write " + path + ": cannot create the temporary file " +
               *temp_path + " next to it",
           "", error_number);
}

// Writes the preamble, the header and the data to `file` and closes it.
// Returns 0, or the errno of the first failure.
int write_contents(FilePtr file, const std::string& header, const void* data,
                   std::size_t data_size) {
  unsigned char preamble[kMagicBytes + kVersionBytes + kLengthFieldBytesV1];
  std::memcpy(preamble, kMagic, kMagicBytes);
  preamble[kMagicBytes] = 1;  // version 1.0
  preamble[kMagicBytes + 1] = 0;
  preamble[kMagicBytes + 2] = static_cast<unsigned char>(header.size() & 0xff);
  preamble[kMagicBytes + 3] = static_cast<unsigned char>(header.size() >> 8);

  const bool ok = std::fwrite(preamble, 1, sizeof preamble, file.get()) ==
                      sizeof preamble &&
                  std::fwrite(header.data(), 1, header.size(), file.get()) ==
                      header.size() &&
                  (data_size == 0 ||
                   std::fwrite(data, 1, data_size, file.get()) == data_size) &&
                  std::fflush(file.get()) == 0;
  int error_number = ok ? 0 : (errno != 0 ? errno : EIO);
  // fclose reports errors of the final flush, such as a full disk.
  if (std::fclose(file.release()) != 0 && error_number == 0) {
    error_number = errno != 0 ? errno : EIO;
  }
  return error_number;
}

void write_file(const std::string& path, const void* data, const Shape& shape,
                const char* descr, std::int64_t item_size) {
  namespace fs = std::filesystem;
  const std::int64_t data_bytes =
      checked_byte_count("npy::write", shape, item_size);
  if (data == nullptr && data_bytes > 0) {
    throw qrloss::invalid_argument("npy::write: null data: shape " +
                                   format_shape(shape) + " for " + path);
  }
  const std::string header = header_text(descr, shape);
  if (static_cast<std::int64_t>(header.size()) > kMaxHeaderBytesV1) {
    throw qrloss::invalid_argument("npy::write: header too long: " + path);
  }
  const auto data_size = static_cast<std::size_t>(data_bytes);

  // A new file renamed over a link would replace the link, so the file it
  // points to is written instead, and the link is kept. The chain is
  // followed by hand, since a link to a file that does not exist yet has no
  // canonical path.
  constexpr int kMaxLinks = 40;  // so that a loop of links ends in ELOOP
  fs::path target = path;
  std::error_code ec;
  for (int links = 0; fs::is_symlink(fs::symlink_status(target, ec));
       ++links) {
    const fs::path next = fs::read_symlink(target, ec);
    if (ec || links == kMaxLinks) {
      throw_io("npy::write",
               "cannot write " + path + ": cannot resolve the link", "",
               ec ? ec.value() : ELOOP);
    }
    target = next.is_absolute() ? next : target.parent_path() / next;
  }
  // A device or a named pipe is written in place: renaming over it would
  // replace the device file or pipe itself.
  const fs::file_status status = fs::status(target, ec);
  if (fs::exists(status) && !fs::is_regular_file(status) &&
      !fs::is_directory(status)) {
    std::FILE* file = std::fopen(target.string().c_str(), "wb");
    if (file == nullptr) {
      throw_io("npy::write", "cannot open " + path + " for writing", "",
               errno);
    }
    const int error_number =
        write_contents(FilePtr(file), header, data, data_size);
    if (error_number != 0) {
      throw_io("npy::write", "cannot write " + path, "", error_number);
    }
    return;
  }

  // The rename needs only a writable directory. A file the process may
  // not write is kept, as a plain write would keep it.
  if (fs::is_regular_file(status) &&
      ::faccessat(AT_FDCWD, target.c_str(), W_OK, AT_EACCESS) != 0) {
    throw_io("npy::write", "cannot write " + path, "", errno);
  }

  std::string temp_path;
  FilePtr file = create_temporary(target.string(), &temp_path);
  const int error_number =
      write_contents(std::move(file), header, data, data_size);
  if (error_number == 0 && fs::is_regular_file(status)) {
    // The replacement keeps the owner, group and permissions of the file it
    // replaces. chown comes first because it may clear the set-user-ID bit.
    struct stat old_file;
    if (::stat(target.c_str(), &old_file) == 0 &&
        ::chown(temp_path.c_str(), old_file.st_uid, old_file.st_gid) != 0) {
      // Only root may give a file to another user. Without that right the
      // new file stays the writer's, as a newly created file would.
    }
    fs::permissions(temp_path, status.permissions(), ec);
  }
  if (error_number != 0) {
    std::remove(temp_path.c_str());
    throw_io("npy::write",
             "cannot write " + path + ": writing its temporary file " +
                 temp_path + " failed",
             "", error_number);
  }

  fs::rename(temp_path, target, ec);
  if (ec) {
    std::remove(temp_path.c_str());
    throw_io("npy::write", "cannot replace output file", path, ec.value());
  }
}

}  // namespace

const char* dtype_name(DType dtype) {
  return dtype == DType::kFloat32 ? "float32" : "float64";
}

std::int64_t Array::size() const {
  std::int64_t count = 1;
  for (const std::int64_t extent : shape) {
    if (extent < 0 || !checked_multiply(count, extent, &count)) {
      throw qrloss::invalid_argument("npy::Array::size: bad shape: " +
                                     format_shape(shape));
    }
  }
  return count;
}

Array read(const std::string& path) {
  const std::int64_t file_size = file_size_of(path);
  FilePtr file(std::fopen(path.c_str(), "rb"));
  if (!file) {
    throw_io("npy::read", "cannot open", path, errno);
  }

  std::int64_t preamble_bytes = 0;
  const std::int64_t header_bytes =
      read_preamble(file.get(), file_size, path, &preamble_bytes);
  std::string header(static_cast<std::size_t>(header_bytes), '\0');
  read_exact(file.get(), header.data(), header.size(), path);
  const HeaderFields fields = HeaderParser(header, path).parse();

  Array array;
  array.dtype = parse_dtype(fields.descr, path);
  if (fields.fortran_order) {
    throw_format(path, "Fortran order",
                 "'fortran_order' is True, which is not supported; save a "
                 "C-order array, e.g. np.save(f, np.ascontiguousarray(a))");
  }
  array.shape = fields.shape;

  std::int64_t count = 1;
  std::int64_t data_bytes = 0;
  for (const std::int64_t extent : array.shape) {
    if (!checked_multiply(count, extent, &count)) {
      throw_format(path, "size overflow",
                   "the element count of shape " + format_shape(array.shape) +
                       " does not fit in int64");
    }
  }
  if (!checked_multiply(count, item_bytes(array.dtype), &data_bytes)) {
    throw_format(path, "size overflow",
                 "the byte count of shape " + format_shape(array.shape) +
                     " does not fit in int64");
  }

  const std::int64_t data_offset = preamble_bytes + header_bytes;
  const std::int64_t stored_bytes = file_size - data_offset;
  const std::string declared =
      "shape " + format_shape(array.shape) + " " + dtype_name(array.dtype) +
      " needs " + std::to_string(data_bytes) + " bytes of data, the file has " +
      std::to_string(stored_bytes);
  if (stored_bytes < data_bytes) {
    throw_format(path, "truncated data", declared);
  }
  if (stored_bytes > data_bytes) {
    throw_format(path, "trailing bytes", declared);
  }

  if (array.dtype == DType::kFloat32) {
    read_data(file.get(), count, &array.f32, path);
  } else {
    read_data(file.get(), count, &array.f64, path);
  }
  // Catches a file that grew after its size was taken.
  if (std::fgetc(file.get()) != EOF) {
    throw_format(path, "trailing bytes",
                 "the file grew while it was read; expected it to end after " +
                     std::to_string(file_size) + " bytes");
  }
  return array;
}

void write(const std::string& path, const float* data, const Shape& shape) {
  write_file(path, data, shape, "<f4", sizeof(float));
}

void write(const std::string& path, const double* data, const Shape& shape) {
  write_file(path, data, shape, "<f8", sizeof(double));
}

}  // namespace qrloss::npy
