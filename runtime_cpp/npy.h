// Minimal .npy reader/writer: format v1.0/v2.0, little-endian, C order, six dtypes.
//
// Header-only on purpose: the generated inference app ships its sources in the bundle and
// should rebuild from them with nothing but the TVM wheel. POSIX (open/fstat/pread), to tell a
// regular file from a folder or a device before reading. Every read error throws npy::Error
// (a std::runtime_error) naming the file and what is wrong with it.
#ifndef ONNX2DEPLOY_NPY_H_
#define ONNX2DEPLOY_NPY_H_

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

/*! \brief A malformed, unsupported or unreadable .npy file. */
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class DType { kFloat32, kFloat16, kInt8, kUInt8, kInt32, kInt64 };

struct DTypeInfo {
  DType dtype;
  const char* name;   // numpy's name, also used in the model's io spec
  const char* descr;  // the header's 'descr' as numpy writes it
  size_t itemsize;
};

inline const std::vector<DTypeInfo>& dtype_table() {
  static const std::vector<DTypeInfo> table = {
      {DType::kFloat32, "float32", "<f4", 4}, {DType::kFloat16, "float16", "<f2", 2},
      {DType::kInt8, "int8", "|i1", 1},       {DType::kUInt8, "uint8", "|u1", 1},
      {DType::kInt32, "int32", "<i4", 4},     {DType::kInt64, "int64", "<i8", 8},
  };
  return table;
}

inline const DTypeInfo& info(DType dtype) {
  for (const DTypeInfo& row : dtype_table()) {
    if (row.dtype == dtype) return row;
  }
  throw std::logic_error("npy: unknown DType enumerator");
}

inline const char* dtype_name(DType dtype) { return info(dtype).name; }
inline size_t itemsize(DType dtype) { return info(dtype).itemsize; }

inline std::string supported_dtypes() {
  std::string out;
  for (const DTypeInfo& row : dtype_table()) out += (out.empty() ? "" : ", ") + std::string(row.name);
  return out;
}

/*! \brief Look a dtype up by numpy name ("float32"); throws npy::Error if unsupported. */
inline DType dtype_from_name(const std::string& name) {
  for (const DTypeInfo& row : dtype_table()) {
    if (name == row.name) return row.dtype;
  }
  throw Error("unsupported dtype '" + name + "'; supported: " + supported_dtypes());
}

/*! \brief "(1,3,224,224)"; a 1-d shape prints as "(10,)" like Python. */
inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

/*! \brief An n-d array in C order; data holds exactly numel() * itemsize bytes. */
struct Array {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<char> data;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t nbytes() const { return static_cast<size_t>(numel()) * itemsize(dtype); }
};

namespace detail {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;

// A cursor over the header text, a Python dict literal such as
// {'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 8, 8), }
class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

  void parse(std::string* descr, bool* fortran_order, std::vector<int64_t>* shape) {
    bool have_descr = false, have_order = false, have_shape = false;
    expect('{');
    while (true) {
      skip_ws();
      if (peek() == '}') break;
      std::string key = parse_string();
      expect(':');
      if (key == "descr") {
        *descr = parse_string();
        have_descr = true;
      } else if (key == "fortran_order") {
        *fortran_order = parse_bool();
        have_order = true;
      } else if (key == "shape") {
        *shape = parse_shape();
        have_shape = true;
      } else {
        fail("unexpected key '" + key + "'");
      }
      skip_ws();
      if (peek() == ',') ++pos_;
    }
    if (!have_descr || !have_order || !have_shape) {
      fail("header must hold the keys 'descr', 'fortran_order' and 'shape'");
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error("npy file '" + path_ + "': malformed header (" + what + "): " + s_);
  }
  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n')) ++pos_;
  }
  char peek() {
    skip_ws();
    if (pos_ >= s_.size()) fail("unexpected end");
    return s_[pos_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "' at offset " + std::to_string(pos_));
    ++pos_;
  }
  std::string parse_string() {
    char quote = peek();
    if (quote != '\'' && quote != '"') fail("expected a quoted string at offset " + std::to_string(pos_));
    size_t end = s_.find(quote, pos_ + 1);
    if (end == std::string::npos) fail("unterminated string");
    std::string out = s_.substr(pos_ + 1, end - pos_ - 1);
    pos_ = end + 1;
    return out;
  }
  bool parse_bool() {
    skip_ws();
    if (s_.compare(pos_, 4, "True") == 0) {
      pos_ += 4;
      return true;
    }
    if (s_.compare(pos_, 5, "False") == 0) {
      pos_ += 5;
      return false;
    }
    fail("expected True or False at offset " + std::to_string(pos_));
  }
  std::vector<int64_t> parse_shape() {
    std::vector<int64_t> shape;
    expect('(');
    while (peek() != ')') {
      size_t start = pos_;
      int64_t dim = 0;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
        if (dim > (std::numeric_limits<int64_t>::max() - 9) / 10) fail("dimension too large");
        dim = dim * 10 + (s_[pos_++] - '0');
      }
      // numpy may write 2L on files from Python 2
      if (pos_ < s_.size() && s_[pos_] == 'L') ++pos_;
      if (pos_ == start) fail("expected a non-negative integer in shape at offset " + std::to_string(pos_));
      shape.push_back(dim);
      if (peek() == ',') ++pos_;
    }
    ++pos_;
    return shape;
  }

  const std::string& s_;
  const std::string& path_;
  size_t pos_ = 0;
};

inline uint32_t read_le(const unsigned char* p, size_t n) {
  uint32_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

}  // namespace detail

namespace detail {

/*!
 * \brief Where the data starts and how it is laid out, from the first bytes of a file.
 *
 * `bytes` holds the start of the file (`available` bytes of it, all of it or at least the
 * whole header) and `file_size` the length of the whole file, so a header that promises more
 * data than the file holds is caught before anything is allocated for it.
 */
struct Layout {
  Array array;  // dtype and shape; data left empty
  size_t data_offset = 0, data_bytes = 0;
};

// numpy writes headers of a few hundred bytes and refuses to read ones over 10000 by default;
// anything larger is corrupt, and must not make us allocate the length it claims.
constexpr size_t kMaxHeaderLen = 65536;
// magic, version, and the header length (2 bytes in v1.0, 4 in v2.0 and v3.0)
constexpr size_t kMaxPrefix = kMagicLen + 2 + 4;

/*! \brief Offsets of the header text: [prefix, end); checks magic, version and length. */
struct HeaderSpan {
  size_t prefix, end;
};

inline HeaderSpan header_span(const unsigned char* u, size_t available, size_t file_size, const std::string& where) {
  if (file_size < kMagicLen + 2 || available < kMagicLen + 2 || std::memcmp(u, kMagic, kMagicLen) != 0) {
    throw Error(where + "not a .npy file (missing the \\x93NUMPY magic)");
  }
  const int major = u[6], minor = u[7];
  // v3.0 differs from v2.0 only in allowing a UTF-8 header, which the parser accepts.
  if (major < 1 || major > 3) {
    throw Error(where + "unsupported format version " + std::to_string(major) + "." +
                std::to_string(minor) + " (supported: 1.0, 2.0, 3.0)");
  }
  const size_t len_size = major == 1 ? 2 : 4;
  const size_t prefix = kMagicLen + 2 + len_size;
  if (file_size < prefix || available < prefix) throw Error(where + "truncated header");
  const size_t header_len = read_le(u + kMagicLen + 2, len_size);
  if (header_len > kMaxHeaderLen) {
    throw Error(where + "header length " + std::to_string(header_len) + " bytes is over the limit of " +
                std::to_string(kMaxHeaderLen) + " (numpy writes a few hundred); the file is corrupt, save it again");
  }
  if (file_size < prefix + header_len) {
    throw Error(where + "truncated header: " + std::to_string(header_len) + " bytes declared, " +
                std::to_string(file_size - prefix) + " present");
  }
  return {prefix, prefix + header_len};
}

/*! \brief Parse the header text bytes[span) and check it against the file's size. */
inline Layout parse_layout(const char* bytes, HeaderSpan span, size_t file_size, const std::string& path,
                           const std::string& where) {
  const std::string header(bytes + span.prefix, span.end - span.prefix);
  const size_t end = span.end;

  std::string descr;
  bool fortran_order = false;
  Layout layout;
  Array& array = layout.array;
  HeaderParser(header, path).parse(&descr, &fortran_order, &array.shape);

  bool known = false;
  for (const DTypeInfo& row : dtype_table()) {
    // '=' (native) equals '<' on the little-endian hosts we build for; single bytes have no order.
    std::string native = row.descr;
    native[0] = '=';
    if (descr == row.descr || descr == native || (row.itemsize == 1 && descr.substr(1) == row.descr + 1)) {
      array.dtype = row.dtype;
      known = true;
      break;
    }
  }
  if (!known) {
    if (!descr.empty() && descr[0] == '>') {
      throw Error(where + "big-endian data ('" + descr + "') is not supported; save it little-endian");
    }
    throw Error(where + "dtype '" + descr + "' is not supported; supported: " + supported_dtypes());
  }
  if (fortran_order && array.shape.size() > 1) {
    throw Error(where + "Fortran-ordered data is not supported; save a C-contiguous array "
                "(numpy.ascontiguousarray)");
  }

  // Guard the size computation: a corrupt header must not wrap around.
  size_t expected = itemsize(array.dtype);
  for (int64_t d : array.shape) {
    if (d != 0 && expected > std::numeric_limits<size_t>::max() / static_cast<size_t>(d)) {
      throw Error(where + "shape " + shape_str(array.shape) + " is too large");
    }
    expected *= static_cast<size_t>(d);
  }
  const size_t present = file_size - end;
  if (present < expected) {
    throw Error(where + "truncated data: shape " + shape_str(array.shape) + " " +
                dtype_name(array.dtype) + " needs " + std::to_string(expected) + " bytes, file has " +
                std::to_string(present));
  }
  if (present > expected) {
    throw Error(where + std::to_string(present - expected) +
                " unexpected bytes after the data (several arrays in one file?)");
  }
  layout.data_offset = end;
  layout.data_bytes = expected;
  return layout;
}

/*! \brief Read exactly n bytes at `offset`; false (and errno in *err, 0 at end of file) if short. */
inline bool read_at(int fd, size_t offset, char* out, size_t n, int* err) {
  while (n > 0) {
    const ssize_t got = ::pread(fd, out, n, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      *err = got < 0 ? errno : 0;
      return false;
    }
    out += got;
    offset += static_cast<size_t>(got);
    n -= static_cast<size_t>(got);
  }
  return true;
}

/*! \brief Closes a file descriptor when it goes out of scope. */
struct Fd {
  int fd;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace detail

/*! \brief Parse an in-memory .npy image; `path` only names it in error messages. */
inline Array parse(const std::vector<char>& bytes, const std::string& path) {
  const std::string where = "npy file '" + path + "': ";
  const detail::HeaderSpan span = detail::header_span(reinterpret_cast<const unsigned char*>(bytes.data()),
                                                      bytes.size(), bytes.size(), where);
  detail::Layout layout = detail::parse_layout(bytes.data(), span, bytes.size(), path, where);
  layout.array.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(span.end), bytes.end());
  return layout.array;
}

/*!
 * \brief Read a .npy file; throws npy::Error naming the file on any problem.
 *
 * Only a regular file is read: a folder, a pipe or a device such as /dev/zero is refused
 * before reading, and the header is checked against the file's size before the data is
 * read, so a corrupt or hostile file costs no more memory than its own size.
 */
inline Array load(const std::string& path) {
  const std::string where = "npy file '" + path + "': ";
  // O_NONBLOCK: opening a FIFO would otherwise wait for a writer before fstat could refuse it.
  detail::Fd file{::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  if (file.fd < 0) throw Error(where + "cannot open (" + std::strerror(errno) + ")");
  struct stat st;
  if (::fstat(file.fd, &st) != 0) throw Error(where + "cannot stat (" + std::strerror(errno) + ")");
  if (S_ISDIR(st.st_mode)) throw Error(where + "is a directory; pass the path of a .npy file");
  if (!S_ISREG(st.st_mode)) {
    throw Error(where + "is not a regular file (a device, pipe or socket); save the array to a .npy file "
                "and pass its path");
  }
  const size_t file_size = static_cast<size_t>(st.st_size);
  int err = 0;
  auto short_read = [&]() {
    return Error(where + (err ? std::string("read error (") + std::strerror(err) + ")"
                              : std::string("file shrank while being read")));
  };
  std::vector<char> head(std::min(file_size, detail::kMaxPrefix));
  if (!detail::read_at(file.fd, 0, head.data(), head.size(), &err)) throw short_read();
  const detail::HeaderSpan span = detail::header_span(reinterpret_cast<const unsigned char*>(head.data()),
                                                      head.size(), file_size, where);
  head.resize(span.end);
  if (!detail::read_at(file.fd, 0, head.data(), span.end, &err)) throw short_read();
  detail::Layout layout = detail::parse_layout(head.data(), span, file_size, path, where);
  layout.array.data.resize(layout.data_bytes);
  if (!detail::read_at(file.fd, span.end, layout.array.data.data(), layout.data_bytes, &err)) throw short_read();
  return layout.array;
}

/*! \brief Serialize to .npy bytes (v1.0, or v2.0 when the header needs it), numpy's layout. */
inline std::vector<char> serialize(const Array& array) {
  if (array.data.size() != array.nbytes()) {
    throw Error("npy: array holds " + std::to_string(array.data.size()) + " bytes, shape " +
                shape_str(array.shape) + " " + dtype_name(array.dtype) + " needs " +
                std::to_string(array.nbytes()));
  }
  std::string shape = "(";
  for (size_t i = 0; i < array.shape.size(); ++i) {
    shape += (i ? ", " : "") + std::to_string(array.shape[i]);
  }
  shape += array.shape.size() == 1 ? ",)" : ")";
  std::string header = std::string("{'descr': '") + info(array.dtype).descr +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  // numpy pads with spaces so that the data starts on a 64-byte boundary, then a newline.
  size_t len_size = 2;
  if (header.size() + 1 + detail::kMagicLen + 2 + len_size > 65535) len_size = 4;
  const size_t prefix = detail::kMagicLen + 2 + len_size;
  const size_t total = ((prefix + header.size() + 1 + 63) / 64) * 64;
  header.append(total - prefix - header.size() - 1, ' ');
  header.push_back('\n');

  std::vector<char> out(detail::kMagic, detail::kMagic + detail::kMagicLen);
  out.push_back(static_cast<char>(len_size == 2 ? 1 : 2));
  out.push_back(0);
  for (size_t i = 0; i < len_size; ++i) out.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), array.data.begin(), array.data.end());
  return out;
}

/*! \brief Write a .npy file through a temporary name, so a crash leaves no half-written file. */
inline void save(const std::string& path, const Array& array) {
  const std::vector<char> bytes = serialize(array);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("npy file '" + path + "': cannot open for writing (" + std::strerror(errno) + ")");
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw Error("npy file '" + path + "': write error");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error("npy file '" + path + "': cannot rename into place (" + std::strerror(errno) + ")");
  }
}

}  // namespace npy

#endif  // ONNX2DEPLOY_NPY_H_
