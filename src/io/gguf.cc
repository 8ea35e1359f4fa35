// qkv/gguf.cc: reads GGUF files (versions 2 and 3, little-endian).
//
// Design. The whole file is in memory, memory-mapped read-only by Open() or a
// vector given to Parse(), and one forward cursor (Reader) walks the header:
// metadata, then tensor infos. Every read goes through Reader::Need(), which
// compares the request with the bytes left, so no field is read past the end
// however the file lies. Before anything is allocated from a claimed count or
// length, the claim is checked against the bytes left at its smallest
// possible encoding:
//   string            8-byte length + that many bytes (<= bytes left);
//                     keys and tensor names also <= kMaxNameBytes
//   array             count x minimal element size <= bytes left, where a
//                     scalar takes its size, a string >= 8 bytes and a nested
//                     array >= 12 (type + count); nesting depth <= kMaxDepth
//   metadata entry    >= kMinKvBytes, tensor info >= kMinTensorInfoBytes
// so a hostile header can make us allocate a small constant times the file's
// size (a std::string per 8-byte empty string), never more.
// Then the tensors: each type must have a known block layout (a tensor whose
// size we cannot compute cannot be checked against the file, so the file is
// refused), each ne >= 1, ne[0] a multiple of the block, the byte size
// computed with checked multiplication, the offset a multiple of the
// alignment and the range inside the data section. Sorted by offset, no two
// ranges may overlap. Bytes after the last tensor and gaps between tensors are
// accepted: an unclaimed byte is never read (as in safetensors.cc).
// Ref: ggml docs/gguf.md; ggml src/gguf.cpp (gguf_init_from_file_impl).
#include "qkv/gguf.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <unordered_set>

#include "file_util.h"
#include "qkv/error.h"

namespace qkv {
namespace {

using internal::Fail;

constexpr unsigned char kMagic[4] = {'G', 'G', 'U', 'F'};
constexpr uint64_t kDefaultAlignment = 32;  // GGUF_DEFAULT_ALIGNMENT
// 1 MiB: far above any alignment a writer uses (32, sometimes 64 or 4096) and
// small enough that padding to it cannot overflow any offset arithmetic.
constexpr uint64_t kMaxAlignment = uint64_t{1} << 20;
constexpr int kMaxDims = 4;   // GGML_MAX_DIMS
constexpr int kMaxDepth = 4;  // arrays of arrays: ggml writes none, 4 is generous
// Keys and tensor names: ggml caps names at 64 bytes (GGML_MAX_NAME) and
// llama.cpp's keys are under 100; 64 KiB refuses only nonsense.
constexpr uint64_t kMaxNameBytes = uint64_t{1} << 16;
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;               // empty key, type, uint8
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;  // empty name, 1 dim
constexpr uint64_t kMinStringBytes = 8;
constexpr uint64_t kMinArrayBytes = 4 + 8;
constexpr const char* kKnownTypes =
    "one of F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

std::string Quote(std::string_view text) { return internal::Quote(text, 80); }

std::string Str(uint64_t v) { return std::to_string(v); }

// Size of a scalar value type, 0 for string / array / unknown.
uint64_t ScalarSize(uint32_t type) {
  switch (static_cast<GgufValueType>(type)) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    default:
      return 0;
  }
}

bool IsInteger(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

std::string ValueTypeName(uint32_t type) {
  static constexpr const char* kNames[] = {"uint8",  "int8",  "uint16",  "int16", "uint32",
                                           "int32",  "float32", "bool",  "string", "array",
                                           "uint64", "int64", "float64"};
  return type < std::size(kNames) ? kNames[type] : "type " + Str(type);
}

std::string ValueTypeName(const GgufValue& v) {
  if (v.type != GgufValueType::kArray) return ValueTypeName(static_cast<uint32_t>(v.type));
  return "array of " + ValueTypeName(static_cast<uint32_t>(v.element_type));
}

// Little-endian loads; the file may put any field at any byte.
uint64_t LoadLe(const unsigned char* p, uint64_t bytes) {
  uint64_t v = 0;
  for (uint64_t i = 0; i < bytes; ++i) v |= uint64_t{p[i]} << (8 * i);
  return v;
}

// Sign-extends the low `bytes` bytes of `v`.
int64_t SignExtend(uint64_t v, uint64_t bytes) {
  const int shift = static_cast<int>(64 - 8 * bytes);
  return static_cast<int64_t>(v << shift) >> shift;
}

// Reads an integer of `type` at `p` (a scalar value or an array element).
// Sets *is_big for uint64 values above INT64_MAX.
int64_t IntAt(GgufValueType type, const unsigned char* p, bool* is_big) {
  const uint64_t size = ScalarSize(static_cast<uint32_t>(type));
  const uint64_t raw = LoadLe(p, size);
  *is_big = false;
  switch (type) {
    case GgufValueType::kInt8:
    case GgufValueType::kInt16:
    case GgufValueType::kInt32:
    case GgufValueType::kInt64:
      return SignExtend(raw, size);
    default:
      *is_big = raw > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
      return static_cast<int64_t>(raw);
  }
}

double FloatAt(GgufValueType type, const unsigned char* p) {
  if (type == GgufValueType::kFloat32) {
    const uint32_t bits = static_cast<uint32_t>(LoadLe(p, 4));
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  const uint64_t bits = LoadLe(p, 8);
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
}

// A forward cursor over [data, data + size) whose every read is bounds-checked.
class Reader {
 public:
  Reader(const unsigned char* data, uint64_t size, const std::string& name)
      : data_(data), size_(size), name_(name) {}

  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }

  // Returns a pointer to the next `n` bytes and moves past them, or throws.
  const unsigned char* Take(uint64_t n, const std::string& what) {
    if (n > left()) {
      Fail(name_,
           "truncated at byte " + Str(pos_) + " reading " + what + " (" + Str(n) +
               " bytes, " + Str(left()) + " left)",
           "a complete GGUF file");
    }
    const unsigned char* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  uint32_t U32(const std::string& what) { return static_cast<uint32_t>(LoadLe(Take(4, what), 4)); }
  uint64_t U64(const std::string& what) { return LoadLe(Take(8, what), 8); }

  // Reads a gguf string: uint64 length, then the bytes. `max_len` bounds keys
  // and names below the file's own bound.
  std::string_view String(const std::string& what, uint64_t max_len) {
    const uint64_t at = pos_;
    const uint64_t len = U64("the length of " + what);
    if (len > max_len) {
      Fail(name_, what + " at byte " + Str(at) + " is " + Str(len) + " bytes long",
           "at most " + Str(max_len) + " bytes");
    }
    if (len > left()) {
      Fail(name_,
           "string length " + Str(len) + " of " + what + " at byte " + Str(at) + " exceeds the " +
               Str(left()) + " bytes left in the file",
           "a length within the file");
    }
    return {reinterpret_cast<const char*>(Take(len, what)), static_cast<size_t>(len)};
  }

 private:
  const unsigned char* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
  const std::string& name_;
};

// Parses one value of `type` (the array's element type for elements); `what`
// names it in errors; `depth` counts the arrays it is nested in.
GgufValue ParseValue(Reader& in, uint32_t type, const std::string& what, int depth,
                     const std::string& name) {
  GgufValue v;
  v.type = static_cast<GgufValueType>(type);
  if (const uint64_t size = ScalarSize(type); size != 0) {
    const unsigned char* p = in.Take(size, what);
    if (v.type == GgufValueType::kFloat32 || v.type == GgufValueType::kFloat64) {
      v.float_value = FloatAt(v.type, p);
      return v;
    }
    if (v.type == GgufValueType::kBool && *p > 1) {
      Fail(name, what + " is a bool of value " + Str(*p), "0 or 1");
    }
    bool is_big = false;
    const int64_t i = IntAt(v.type, p, &is_big);
    v.uint_value = i < 0 && !is_big ? 0 : static_cast<uint64_t>(i);
    if (!is_big) v.int_value = i;
    return v;
  }
  if (v.type == GgufValueType::kString) {
    v.string_value = std::string(in.String(what, std::numeric_limits<uint64_t>::max()));
    return v;
  }
  if (v.type != GgufValueType::kArray) {
    Fail(name, what + " has unknown value type " + Str(type), "a GGUF value type 0..12");
  }
  if (depth >= kMaxDepth) {
    Fail(name, what + " nests arrays " + Str(depth + 1) + " deep",
         "arrays nested at most " + Str(kMaxDepth) + " deep");
  }
  const uint64_t at = in.pos();
  const uint32_t element = in.U32("the element type of " + what);
  v.element_type = static_cast<GgufValueType>(element);
  v.count = in.U64("the count of " + what);
  const uint64_t scalar = ScalarSize(element);
  const uint64_t min_size = scalar != 0                             ? scalar
                            : v.element_type == GgufValueType::kString ? kMinStringBytes
                            : v.element_type == GgufValueType::kArray  ? kMinArrayBytes
                                                                       : 0;
  if (min_size == 0) {
    Fail(name, what + " has elements of unknown value type " + Str(element),
         "a GGUF value type 0..12");
  }
  if (v.count > in.left() / min_size) {
    Fail(name,
         "array count " + Str(v.count) + " of " + what + " at byte " + Str(at) +
             " needs at least " + Str(min_size) + " bytes per element, but " + Str(in.left()) +
             " bytes are left",
         "a count that fits in the file");
  }
  if (scalar != 0) {
    const unsigned char* p = in.Take(v.count * scalar, what);
    v.raw = {p, static_cast<size_t>(v.count * scalar)};
    if (v.element_type == GgufValueType::kBool) {
      for (uint64_t i = 0; i < v.count; ++i) {
        if (p[i] > 1) {
          Fail(name, "element " + Str(i) + " of " + what + " is a bool of value " + Str(p[i]),
               "0 or 1");
        }
      }
    }
  } else if (v.element_type == GgufValueType::kString) {
    v.strings.reserve(v.count);
    for (uint64_t i = 0; i < v.count; ++i) {
      v.strings.emplace_back(in.String("element " + Str(i) + " of " + what,
                                       std::numeric_limits<uint64_t>::max()));
    }
  } else {
    v.arrays.reserve(v.count);
    for (uint64_t i = 0; i < v.count; ++i) {
      v.arrays.push_back(ParseValue(in, element, "element " + Str(i) + " of " + what,
                                    depth + 1, name));
    }
  }
  return v;
}

// A tensor's data range in the data section, for the overlap check.
struct Range {
  uint64_t begin = 0;
  uint64_t end = 0;
  size_t index = 0;
};

}  // namespace

std::string GgmlTypeName(uint32_t type) {
  // ggml.h enum ggml_type; 4, 5 (Q4_2, Q4_3) and 31..33, 36..38 (repacked
  // layouts) were removed from GGUF files.
  static constexpr const char* kNames[] = {
      "F32",     "F16",    "Q4_0",    "Q4_1",  "",       "",      "Q5_0",  "Q5_1",
      "Q8_0",    "Q8_1",   "Q2_K",    "Q3_K",  "Q4_K",   "Q5_K",  "Q6_K",  "Q8_K",
      "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
      "I8",      "I16",    "I32",     "I64",   "F64",    "IQ1_M", "BF16",  "",
      "",        "",       "TQ1_0",   "TQ2_0", "",       "",      "",      "MXFP4"};
  if (type < std::size(kNames) && kNames[type][0] != '\0') return kNames[type];
  return "type " + std::to_string(type);
}

bool GgmlTypeLayout(uint32_t type, int64_t* block_values, int64_t* block_bytes) {
  // Block sizes from ggml-common.h (block_q4_0 = half d + 16 nibble bytes, ...):
  // QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = QK8_1 = 32, QK_K = 256.
  struct Layout {
    GgmlType type;
    int64_t values, bytes;
  };
  static constexpr Layout kLayouts[] = {
      {GgmlType::kF32, 1, 4},      {GgmlType::kF16, 1, 2},      {GgmlType::kBF16, 1, 2},
      {GgmlType::kQ4_0, 32, 18},   {GgmlType::kQ4_1, 32, 20},   {GgmlType::kQ5_0, 32, 22},
      {GgmlType::kQ5_1, 32, 24},   {GgmlType::kQ8_0, 32, 34},   {GgmlType::kQ8_1, 32, 36},
      {GgmlType::kQ2_K, 256, 84},  {GgmlType::kQ3_K, 256, 110}, {GgmlType::kQ4_K, 256, 144},
      {GgmlType::kQ5_K, 256, 176}, {GgmlType::kQ6_K, 256, 210}, {GgmlType::kQ8_K, 256, 292},
  };
  for (const Layout& l : kLayouts) {
    if (static_cast<uint32_t>(l.type) == type) {
      *block_values = l.values;
      *block_bytes = l.bytes;
      return true;
    }
  }
  return false;
}

// Owns the file's bytes: an mmap (Open) or a vector (Parse).
struct GgufFile::Mapping {
  void* addr = nullptr;
  size_t length = 0;
  std::vector<unsigned char> bytes;
  ~Mapping() {
    if (addr != nullptr) munmap(addr, length);
  }
};

GgufFile::GgufFile() = default;
GgufFile::GgufFile(GgufFile&&) noexcept = default;
GgufFile& GgufFile::operator=(GgufFile&&) noexcept = default;
GgufFile::~GgufFile() = default;

GgufFile GgufFile::Open(const std::string& path) {
  // OpenRegularFile refuses a directory, FIFO or device on a descriptor
  // opened without blocking, before any read.
  uint64_t size = 0;
  const internal::FilePtr f = internal::OpenRegularFile(path, "GGUF file", &size);
  if (size == 0) Fail(path, "is empty", "a GGUF file starting with \"GGUF\"");
  GgufFile file;
  file.name_ = path;
  file.mapping_ = std::make_unique<Mapping>();
  void* addr = mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fileno(f.get()), 0);
  if (addr == MAP_FAILED) {
    Fail(path, std::string("cannot memory-map: ") + std::strerror(errno), "a mappable GGUF file");
  }
  // The mapping outlives the descriptor, which is closed when `f` goes.
  file.mapping_->addr = addr;
  file.mapping_->length = static_cast<size_t>(size);
  file.data_ = static_cast<const unsigned char*>(addr);
  file.size_ = size;
  file.ParseAll();
  return file;
}

GgufFile GgufFile::Parse(std::vector<unsigned char> bytes, const std::string& name) {
  GgufFile file;
  file.name_ = name;
  file.mapping_ = std::make_unique<Mapping>();
  file.mapping_->bytes = std::move(bytes);  // the buffer, and pointers into it, stay put
  file.data_ = file.mapping_->bytes.data();
  file.size_ = file.mapping_->bytes.size();
  file.ParseAll();
  return file;
}

void GgufFile::ParseAll() {
  Reader in(data_, size_, name_);

  // Header: magic, version, counts.
  if (size_ < 4 || std::memcmp(data_, kMagic, 4) != 0) {
    Fail(name_, "bad magic " + Quote({reinterpret_cast<const char*>(data_),
                                      static_cast<size_t>(std::min<uint64_t>(size_, 4))}),
         "a GGUF file starting with \"GGUF\"");
  }
  in.Take(4, "the magic");
  version_ = in.U32("the version");
  if (version_ == 1) {
    Fail(name_, "GGUF version 1 (32-bit counts and lengths) is not supported",
         "version 2 or 3");
  }
  if (version_ == 0x02000000 || version_ == 0x03000000) {
    Fail(name_, "is a big-endian GGUF file (version field " + Str(version_) + ")",
         "a little-endian GGUF file, version 2 or 3");
  }
  if (version_ != 2 && version_ != 3) {
    Fail(name_, "unsupported GGUF version " + Str(version_), "version 2 or 3");
  }
  const uint64_t tensor_count = in.U64("the tensor count");
  const uint64_t kv_count = in.U64("the metadata count");
  if (tensor_count > in.left() / kMinTensorInfoBytes) {
    Fail(name_,
         "tensor count " + Str(tensor_count) + " cannot fit in the " + Str(in.left()) +
             " bytes left",
         "a count within the file, each tensor info taking >= " + Str(kMinTensorInfoBytes) +
             " bytes");
  }
  if (kv_count > in.left() / kMinKvBytes) {
    Fail(name_,
         "metadata count " + Str(kv_count) + " cannot fit in the " + Str(in.left()) +
             " bytes left",
         "a count within the file, each entry taking >= " + Str(kMinKvBytes) + " bytes");
  }

  // Metadata. Keys are checked for duplicates as views into the file bytes,
  // which stay put while metadata_ grows.
  std::unordered_set<std::string_view> keys;
  metadata_.reserve(kv_count);
  for (uint64_t i = 0; i < kv_count; ++i) {
    const std::string_view key = in.String("key of metadata entry " + Str(i), kMaxNameBytes);
    if (!keys.insert(key).second) {
      Fail(name_, "duplicate metadata key " + Quote(key), "unique keys");
    }
    const std::string what = "metadata " + Quote(key);
    const uint32_t type = in.U32("the value type of " + what);
    metadata_.emplace_back(std::string(key), ParseValue(in, type, what, 0, name_));
  }

  alignment_ = kDefaultAlignment;
  if (const GgufValue* a = FindMetadata("general.alignment"); a != nullptr) {
    if (a->type != GgufValueType::kUint32) {
      Fail(name_, "metadata 'general.alignment' has type " + ValueTypeName(*a), "uint32");
    }
    const uint64_t value = a->uint_value;
    if (value == 0 || value > kMaxAlignment || (value & (value - 1)) != 0) {
      Fail(name_, "general.alignment is " + Str(value),
           "a power of two from 1 to " + Str(kMaxAlignment));
    }
    alignment_ = value;
  }

  // Tensor infos.
  std::unordered_set<std::string_view> names;
  tensors_.reserve(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) {
    const std::string_view tname = in.String("name of tensor " + Str(i), kMaxNameBytes);
    if (!names.insert(tname).second) {
      Fail(name_, "duplicate tensor name " + Quote(tname), "unique tensor names");
    }
    const std::string what = "tensor " + Quote(tname);
    Tensor t;
    t.name = std::string(tname);
    const uint32_t n_dims = in.U32("n_dims of " + what);
    if (n_dims < 1 || n_dims > kMaxDims) {
      Fail(name_, what + " has n_dims " + Str(n_dims), "1.." + Str(kMaxDims));
    }
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = in.U64("ne[" + Str(d) + "] of " + what);
      if (ne == 0 || ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        Fail(name_,
             what + " has ne[" + Str(d) + "] = " +
                 (ne == 0 ? std::string("0") : std::to_string(static_cast<int64_t>(ne))),
             "every dimension >= 1");
      }
      t.ne.push_back(static_cast<int64_t>(ne));
    }
    t.shape.assign(t.ne.rbegin(), t.ne.rend());
    t.type = in.U32("the type of " + what);
    t.offset = in.U64("the offset of " + what);
    tensors_.push_back(std::move(t));
  }

  // The data section starts at the next multiple of the alignment (at most
  // kMaxAlignment - 1 bytes on, so no overflow). A file without tensors may
  // end before it.
  const uint64_t data_start = (in.pos() + alignment_ - 1) / alignment_ * alignment_;
  const uint64_t data_size = size_ > data_start ? size_ - data_start : 0;

  // Sizes and ranges.
  std::vector<Range> ranges;
  ranges.reserve(tensors_.size());
  for (size_t i = 0; i < tensors_.size(); ++i) {
    Tensor& t = tensors_[i];
    const std::string what = "tensor " + Quote(t.name);
    int64_t block_values = 0, block_bytes = 0;
    if (!GgmlTypeLayout(t.type, &block_values, &block_bytes)) {
      const std::string type_name = GgmlTypeName(t.type);
      Fail(name_,
           what + " has ggml type " + Str(t.type) +
               (type_name.starts_with("type ") ? "" : " (" + type_name + ")") +
               ", whose size qkv cannot compute",
           kKnownTypes);
    }
    if (t.ne[0] % block_values != 0) {
      Fail(name_,
           what + " has ne[0] = " + std::to_string(t.ne[0]) + ", not a multiple of the " +
               GgmlTypeName(t.type) + " block of " + std::to_string(block_values),
           "rows of whole blocks");
    }
    // bytes = ne[0] / block_values * block_bytes * ne[1] * ne[2] * ne[3]
    int64_t bytes = t.ne[0] / block_values;
    bool overflow = __builtin_mul_overflow(bytes, block_bytes, &bytes);
    for (size_t d = 1; d < t.ne.size(); ++d) {
      overflow = overflow || __builtin_mul_overflow(bytes, t.ne[d], &bytes);
    }
    if (overflow) {
      Fail(name_, what + " byte size overflows int64", "a size below 2^63 bytes");
    }
    if (t.offset % alignment_ != 0) {
      Fail(name_, what + " offset " + Str(t.offset) + " is not aligned",
           "a multiple of the alignment " + Str(alignment_));
    }
    const uint64_t size = static_cast<uint64_t>(bytes);
    if (t.offset > data_size || size > data_size - t.offset) {
      Fail(name_,
           what + " data [" + Str(t.offset) + ", +" + Str(size) + ") ends past the end of the " +
               Str(data_size) + "-byte data section at byte " + Str(data_start),
           "tensor data inside the file");
    }
    t.bytes = {data_ + data_start + t.offset, static_cast<size_t>(size)};
    ranges.push_back({t.offset, t.offset + size, i});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].begin < ranges[i - 1].end) {
      Fail(name_,
           "tensors " + Quote(tensors_[ranges[i - 1].index].name) + " and " +
               Quote(tensors_[ranges[i].index].name) + " overlap at data byte " +
               Str(ranges[i].begin),
           "disjoint tensor data");
    }
  }
}

const GgufValue* GgufFile::FindMetadata(std::string_view key) const {
  for (const auto& [k, v] : metadata_) {
    if (k == key) return &v;
  }
  return nullptr;
}

const GgufFile::Tensor* GgufFile::Find(std::string_view name) const {
  for (const Tensor& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

namespace {

const GgufValue& Require(const GgufFile& file, std::string_view key) {
  const GgufValue* v = file.FindMetadata(key);
  if (v == nullptr) Fail(file.name(), "metadata " + Quote(key) + " missing", "the key present");
  return *v;
}

[[noreturn]] void WrongType(const GgufFile& file, std::string_view key, const GgufValue& v,
                            const std::string& expected) {
  Fail(file.name(), "metadata " + Quote(key) + " has type " + ValueTypeName(v), expected);
}

}  // namespace

std::string GgufFile::GetString(std::string_view key) const {
  const GgufValue& v = Require(*this, key);
  if (v.type != GgufValueType::kString) WrongType(*this, key, v, "string");
  return v.string_value;
}

int64_t GgufFile::GetInt(std::string_view key) const {
  const GgufValue& v = Require(*this, key);
  if (!IsInteger(v.type) && v.type != GgufValueType::kBool) {
    WrongType(*this, key, v, "an integer type or bool");
  }
  if (v.uint_value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    Fail(name_, "metadata " + Quote(key) + " is " + Str(v.uint_value), "a value below 2^63");
  }
  return v.int_value;
}

double GgufFile::GetFloat(std::string_view key) const {
  const GgufValue& v = Require(*this, key);
  if (v.type == GgufValueType::kFloat32 || v.type == GgufValueType::kFloat64) {
    return v.float_value;
  }
  if (!IsInteger(v.type)) WrongType(*this, key, v, "float32, float64 or an integer type");
  if (v.type == GgufValueType::kUint64) return static_cast<double>(v.uint_value);
  return static_cast<double>(v.int_value);
}

const std::vector<std::string>& GgufFile::GetStringArray(std::string_view key) const {
  const GgufValue& v = Require(*this, key);
  if (v.type != GgufValueType::kArray || v.element_type != GgufValueType::kString) {
    WrongType(*this, key, v, "array of string");
  }
  return v.strings;
}

std::vector<int64_t> GgufFile::GetIntArray(std::string_view key) const {
  const GgufValue& v = Require(*this, key);
  if (v.type != GgufValueType::kArray || !IsInteger(v.element_type)) {
    WrongType(*this, key, v, "array of an integer type");
  }
  const uint64_t size = ScalarSize(static_cast<uint32_t>(v.element_type));
  std::vector<int64_t> out(v.count);
  for (uint64_t i = 0; i < v.count; ++i) {
    bool is_big = false;
    out[i] = IntAt(v.element_type, v.raw.data() + i * size, &is_big);
    if (is_big) {
      Fail(name_,
           "element " + Str(i) + " of metadata " + Quote(key) + " is " +
               Str(static_cast<uint64_t>(out[i])),
           "values below 2^63");
    }
  }
  return out;
}

std::vector<double> GgufFile::GetFloatArray(std::string_view key) const {
  const GgufValue& v = Require(*this, key);
  if (v.type != GgufValueType::kArray || (v.element_type != GgufValueType::kFloat32 &&
                                          v.element_type != GgufValueType::kFloat64)) {
    WrongType(*this, key, v, "array of float32 or float64");
  }
  const uint64_t size = ScalarSize(static_cast<uint32_t>(v.element_type));
  std::vector<double> out(v.count);
  for (uint64_t i = 0; i < v.count; ++i) out[i] = FloatAt(v.element_type, v.raw.data() + i * size);
  return out;
}

}  // namespace qkv
