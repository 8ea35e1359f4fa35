// qkv/npy.cc: reads and writes NumPy .npy files.
//
// Layout of a .npy file (numpy/lib/format.py):
//   bytes 0..5   magic "\x93NUMPY"
//   bytes 6..7   version major, minor: 1.0, 2.0 or 3.0
//   then         header length: uint16 LE (1.0) or uint32 LE (2.0, 3.0)
//   then         header: a Python dict literal, space padded, ending in '\n'
//                {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
//   then         the array bytes, C order, exactly numel * itemsize of them
// The header is validated in full, against the file size, before the data
// buffer is allocated: a hostile header can cost at most its own 1 MiB cap.
#include "qkv/npy.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string_view>

#include "file_util.h"
#include "qkv/error.h"

namespace qkv {
namespace {

using internal::FilePtr;
using internal::Fail;
using internal::OpenRegularFile;
using internal::ReadAt;

constexpr unsigned char kMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
// NumPy itself refuses headers over 10000 bytes unless max_header_size is
// raised; 1 MiB leaves room for any honest rank-8 header and bounds hostile ones.
constexpr uint64_t kMaxHeaderLen = 1 << 20;
constexpr size_t kMaxPreamble = 12;  // magic + version + 4-byte length
constexpr size_t kMaxRank = 8;
// NumPy pads the header so the data starts at a multiple of 64 bytes
// (format.ARRAY_ALIGN), which keeps memory-mapped data aligned for any dtype.
constexpr size_t kHeaderAlign = 64;
constexpr const char* kSupported = "one of '<f4', '<f2', '<f8', '|b1', '<i4', '<i8'";

struct Descr {
  const char* text;  // the descr NumPy writes
  DType dtype;
};
constexpr Descr kDescrs[] = {
    {"<f4", DType::kFloat32}, {"<f2", DType::kFloat16}, {"<f8", DType::kFloat64},
    {"|b1", DType::kBool},    {"<i4", DType::kInt32},   {"<i8", DType::kInt64},
};

// Where the header is: header text at [header_offset, data_offset).
struct Preamble {
  uint64_t header_offset = 0;
  uint64_t data_offset = 0;
};

// What the header says.
struct Layout {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  uint64_t data_bytes = 0;  // numel * itemsize, checked for overflow
};

// Checks rank and signs of `shape` and returns numel * itemsize, computed with
// checked multiplication. A zero dimension makes the array empty whatever the
// others are, so the product is only checked when every dimension is positive.
int64_t CheckShape(DType dtype, std::span<const int64_t> shape, const std::string& name) {
  if (shape.size() > kMaxRank) {
    Fail(name, "rank " + std::to_string(shape.size()) + " is too large",
         "rank 0.." + std::to_string(kMaxRank));
  }
  if (std::any_of(shape.begin(), shape.end(), [](int64_t dim) { return dim < 0; })) {
    Fail(name, "negative dimension in shape " + NpyShapeString(shape), "every dimension >= 0");
  }
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  int64_t bytes = static_cast<int64_t>(DTypeSize(dtype));
  for (int64_t dim : shape) {
    if (__builtin_mul_overflow(bytes, dim, &bytes)) {
      Fail(name,
           "byte size of shape " + NpyShapeString(shape) + " " + DTypeName(dtype) +
               " overflows int64",
           "a total size below 2^63 bytes");
    }
  }
  return bytes;
}

std::string Quote(std::string_view text) { return internal::Quote(text, 40); }

// Maps a descr string to a dtype or throws, naming the nearest supported one.
DType ParseDescr(const std::string& descr, const std::string& name) {
  for (const Descr& d : kDescrs) {
    if (descr == d.text) return d.dtype;
  }
  // A 1-byte type has no byte order, so every order character means bool.
  if (descr == "<b1" || descr == ">b1" || descr == "=b1") return DType::kBool;
  if (descr.size() == 3 && (descr[0] == '>' || descr[0] == '=')) {
    for (const Descr& d : kDescrs) {
      if (descr.compare(1, 2, d.text + 1) != 0) continue;
      if (descr[0] == '>') {
        Fail(name, "big-endian dtype " + Quote(descr) + " is not supported",
             std::string("little-endian '") + d.text + "'");
      }
      Fail(name, "native byte order in dtype " + Quote(descr) + " is ambiguous",
           std::string("explicit little-endian '") + d.text + "'");
    }
  }
  Fail(name, "unsupported dtype " + Quote(descr), kSupported);
}

// Parses the header dict: a strict subset of the Python literal syntax that
// NumPy's ast.literal_eval accepts for these three keys.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& name) : text_(text), name_(name) {}

  Layout Parse() {
    if (!Consume('{')) {
      Fail(name_, "header is not a dict literal: " + Quote(Rest()),
           "a Python dict like {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}");
    }
    std::string descr;
    bool has_descr = false, has_fortran = false, has_shape = false;
    bool fortran_order = false;
    std::vector<int64_t> shape;
    while (!Consume('}')) {
      SkipSpace();
      const std::string key = ParseString("a quoted key");
      bool* seen = nullptr;
      if (key == "descr") seen = &has_descr;
      if (key == "fortran_order") seen = &has_fortran;
      if (key == "shape") seen = &has_shape;
      if (seen == nullptr) {
        Fail(name_, "header has unexpected key " + Quote(key),
             "only 'descr', 'fortran_order' and 'shape'");
      }
      if (*seen) Fail(name_, "header repeats key " + Quote(key), "each key once");
      *seen = true;
      if (!Consume(':')) Malformed("':' after key " + Quote(key));
      SkipSpace();
      if (key == "descr") {
        if (Peek() != '\'' && Peek() != '"') {
          // A list here is a structured dtype, e.g. [('x', '<f4'), ('y', '<i4')].
          Fail(name_, "unsupported descr " + Quote(Rest()), kSupported);
        }
        descr = ParseString("a dtype string");
      } else if (key == "fortran_order") {
        fortran_order = ParseBool();
      } else {
        shape = ParseShape();
      }
      // Entries are separated by ','; a trailing ',' before '}' is allowed.
      if (!Consume(',')) {
        if (!Consume('}')) Malformed("',' or '}' after the value of " + Quote(key));
        break;
      }
    }
    SkipSpace();
    if (pos_ != text_.size()) Malformed("only spaces after the closing '}'");
    if (!has_descr || !has_fortran || !has_shape) {
      const char* missing = !has_descr ? "descr" : !has_fortran ? "fortran_order" : "shape";
      Fail(name_, std::string("header has no '") + missing + "' key",
           "'descr', 'fortran_order' and 'shape'");
    }

    Layout layout;
    layout.dtype = ParseDescr(descr, name_);
    if (fortran_order) {
      Fail(name_, "Fortran-order (column-major) arrays are not supported",
           "'fortran_order': False; save np.ascontiguousarray(a)");
    }
    layout.data_bytes = static_cast<uint64_t>(CheckShape(layout.dtype, shape, name_));
    layout.shape = std::move(shape);
    return layout;
  }

 private:
  char Peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  std::string_view Rest() const { return text_.substr(pos_); }
  void SkipSpace() {
    while (Peek() == ' ' || Peek() == '\t' || Peek() == '\r' || Peek() == '\n') ++pos_;
  }
  // Skips spaces, then consumes `c` if it is next.
  bool Consume(char c) {
    SkipSpace();
    if (Peek() != c) return false;
    ++pos_;
    return true;
  }
  [[noreturn]] void Malformed(const std::string& expected) const {
    Fail(name_, "malformed header at byte " + std::to_string(pos_) + ": " + Quote(Rest()),
         expected);
  }

  // Parses '...' or "..." without escapes (no supported value needs one).
  std::string ParseString(const char* what) {
    const char quote = Peek();
    if (quote != '\'' && quote != '"') Malformed(what);
    const size_t end = text_.find(quote, pos_ + 1);
    if (end == std::string_view::npos) Malformed(std::string("a closing quote for ") + what);
    std::string out(text_.substr(pos_ + 1, end - pos_ - 1));
    pos_ = end + 1;
    return out;
  }

  bool ParseBool() {
    for (bool value : {false, true}) {
      const std::string_view word = value ? "True" : "False";
      if (Rest().substr(0, word.size()) == word) {
        pos_ += word.size();
        return value;
      }
    }
    Malformed("True or False for 'fortran_order'");
  }

  // Parses "()", "(5,)", "(2, 3)" or "(2, 3,)". "(5)" is the int 5 in
  // Python, not a tuple, and NumPy refuses it, so it is refused here too.
  std::vector<int64_t> ParseShape() {
    if (!Consume('(')) Malformed("a shape tuple like (2, 3), (5,) or ()");
    std::vector<int64_t> shape;
    bool trailing_comma = false;
    while (!Consume(')')) {
      if (shape.size() == kMaxRank) {
        Fail(name_, "shape has more than " + std::to_string(kMaxRank) + " dimensions",
             "rank 0.." + std::to_string(kMaxRank));
      }
      SkipSpace();
      shape.push_back(ParseInt());
      trailing_comma = Consume(',');
      if (!trailing_comma) {
        if (!Consume(')')) Malformed("',' or ')' in the shape tuple");
        break;
      }
    }
    if (shape.size() == 1 && !trailing_comma) {
      Fail(name_, "shape (" + std::to_string(shape[0]) + ") is not a tuple",
           "(" + std::to_string(shape[0]) + ",) with a trailing comma");
    }
    return shape;
  }

  // Parses an optionally negative decimal integer. The 'L' suffix of Python 2
  // longs, found in old version 1.0 files, is accepted as NumPy does.
  int64_t ParseInt() {
    const bool negative = Peek() == '-';
    if (negative) ++pos_;
    if (Peek() < '0' || Peek() > '9') Malformed("an integer dimension");
    int64_t value = 0;
    while (Peek() >= '0' && Peek() <= '9') {
      // value = 10 * value - digit: accumulates negatively so that both
      // signs share one overflow check.
      if (__builtin_mul_overflow(value, 10, &value) ||
          __builtin_sub_overflow(value, text_[pos_] - '0', &value)) {
        Malformed("a dimension that fits in int64");
      }
      ++pos_;
    }
    if (Peek() == 'L' || Peek() == 'l') ++pos_;
    if (!negative && __builtin_mul_overflow(value, -1, &value)) {
      Malformed("a dimension that fits in int64");
    }
    return value;
  }

  std::string_view text_;
  const std::string& name_;
  size_t pos_ = 0;
};

// Checks magic, version and header length against the file size. `head` holds
// the first min(file_size, kMaxPreamble) bytes of the file.
Preamble ParsePreamble(std::span<const unsigned char> head, uint64_t file_size,
                       const std::string& name) {
  const size_t magic_checked = std::min(head.size(), sizeof(kMagic));
  if (magic_checked > 0 && std::memcmp(head.data(), kMagic, magic_checked) != 0) {
    Fail(name, "bad magic: not a .npy file", "the bytes \\x93NUMPY at offset 0");
  }
  if (head.size() < 8) {
    Fail(name, "file is " + std::to_string(file_size) + " bytes, too short for a .npy preamble",
         "at least 10 bytes");
  }
  const int major = head[6], minor = head[7];
  if (minor != 0 || major < 1 || major > 3) {
    Fail(name, "unsupported .npy version " + std::to_string(major) + "." + std::to_string(minor),
         "1.0, 2.0 or 3.0");
  }
  const size_t len_bytes = major == 1 ? 2 : 4;
  Preamble p;
  p.header_offset = 8 + len_bytes;
  if (file_size < p.header_offset) {
    Fail(name, "header is truncated: file is " + std::to_string(file_size) + " bytes",
         "at least " + std::to_string(p.header_offset) + " bytes for version " +
             std::to_string(major) + ".0");
  }
  uint64_t header_len = 0;
  for (size_t i = 0; i < len_bytes; ++i) header_len |= uint64_t{head[8 + i]} << (8 * i);
  if (header_len > kMaxHeaderLen) {
    Fail(name, "header length " + std::to_string(header_len) + " is too large",
         "at most " + std::to_string(kMaxHeaderLen) + " bytes");
  }
  p.data_offset = p.header_offset + header_len;
  if (p.data_offset > file_size) {
    Fail(name,
         "header is truncated: it claims " + std::to_string(header_len) +
             " bytes but the file has " + std::to_string(file_size - p.header_offset) +
             " after the preamble",
         "a complete header");
  }
  return p;
}

// Checks that exactly the array bytes follow the header.
void CheckDataSize(const Layout& layout, const Preamble& p, uint64_t file_size,
                   const std::string& name) {
  const uint64_t present = file_size - p.data_offset;
  if (present == layout.data_bytes) return;
  const std::string what = "shape " + NpyShapeString(layout.shape) + " " + DTypeName(layout.dtype) +
                           " needs " + std::to_string(layout.data_bytes) + " data bytes but " +
                           std::to_string(present) + " follow the header";
  Fail(name, (present < layout.data_bytes ? "data is truncated: " : "trailing bytes: ") + what,
       "file size " + std::to_string(p.data_offset + layout.data_bytes));
}

}  // namespace

int64_t NpyArray::numel() const {
  // A zero-size array may declare other dims whose product overflows int64
  // (the parser accepts it: it holds no bytes); it has no elements. Every
  // other accepted shape's product fits (the parser checked it).
  for (int64_t dim : shape) {
    if (dim == 0) return 0;
  }
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

NpyArray ParseNpy(std::span<const unsigned char> file, const std::string& name) {
  const Preamble p =
      ParsePreamble(file.first(std::min(file.size(), kMaxPreamble)), file.size(), name);
  const std::string_view header(reinterpret_cast<const char*>(file.data()) + p.header_offset,
                                p.data_offset - p.header_offset);
  Layout layout = HeaderParser(header, name).Parse();
  CheckDataSize(layout, p, file.size(), name);
  // Bool bytes are copied as they are: NumPy reads any nonzero byte as True,
  // and so do the readers of NpyArray, so 0/1 is not enforced.
  return {layout.dtype, std::move(layout.shape), {file.begin() + p.data_offset, file.end()}};
}

NpyArray ReadNpy(const std::string& path) {
  uint64_t file_size = 0;
  const FilePtr f = OpenRegularFile(path, ".npy file", &file_size);

  // Preamble and header first (at most 1 MiB), then the data once it is known
  // to match the file size.
  unsigned char head[kMaxPreamble];
  const size_t head_size = std::min<uint64_t>(file_size, kMaxPreamble);
  ReadAt(f.get(), 0, head, head_size, path);
  const Preamble p = ParsePreamble({head, head_size}, file_size, path);
  std::string header(p.data_offset - p.header_offset, '\0');
  ReadAt(f.get(), p.header_offset, header.data(), header.size(), path);
  Layout layout = HeaderParser(header, path).Parse();
  CheckDataSize(layout, p, file_size, path);

  NpyArray array{layout.dtype, std::move(layout.shape), {}};
  array.bytes.resize(layout.data_bytes);
  // Bool bytes other than 0/1 are kept as they are (nonzero = true), as in ParseNpy.
  ReadAt(f.get(), p.data_offset, array.bytes.data(), array.bytes.size(), path);
  return array;
}

void WriteNpy(const std::string& path, DType dtype, std::span<const int64_t> shape,
              const void* data) {
  const Descr* descr = std::find_if(std::begin(kDescrs), std::end(kDescrs),
                                    [dtype](const Descr& d) { return d.dtype == dtype; });
  if (descr == std::end(kDescrs)) {
    Fail(path, "cannot write dtype " + std::to_string(static_cast<int>(dtype)), kSupported);
  }
  const size_t data_bytes = static_cast<size_t>(CheckShape(dtype, shape, path));
  if (data_bytes > 0 && data == nullptr) Fail(path, "data is null", "a pointer to the array bytes");

  // Header exactly as np.save writes it, padded with spaces so that
  // magic + version + length + header is a multiple of kHeaderAlign.
  std::string header = std::string("{'descr': '") + descr->text +
                       "', 'fortran_order': False, 'shape': " + NpyShapeString(shape) + ", }";
  const size_t unpadded = 10 + header.size() + 1;  // + '\n'
  header.append((kHeaderAlign - unpadded % kHeaderAlign) % kHeaderAlign, ' ');
  header += '\n';
  std::string head(reinterpret_cast<const char*>(kMagic), sizeof(kMagic));
  head += {'\x01', '\x00', static_cast<char>(header.size() & 0xff),
           static_cast<char>(header.size() >> 8)};  // version 1.0, uint16 LE length
  head += header;

  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    Fail(path, std::string("cannot create: ") + std::strerror(errno),
         "a writable path in an existing directory");
  }
  bool ok = std::fwrite(head.data(), 1, head.size(), f) == head.size() &&
            (data_bytes == 0 || std::fwrite(data, 1, data_bytes, f) == data_bytes);
  int error = ok ? 0 : errno;
  // fclose flushes the stdio buffer, so a full disk may only show up here.
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    error = errno;
  }
  if (!ok) {
    std::remove(path.c_str());
    Fail(path, std::string("write failed: ") + std::strerror(error),
         "a writable path with enough free space");
  }
}

std::string NpyShapeString(std::span<const int64_t> shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  if (shape.size() == 1) out += ",";
  return out + ")";
}

}  // namespace qkv
