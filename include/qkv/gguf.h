// qkv/gguf.h: reading GGUF files, the model format of llama.cpp / ggml.
//
// Format (versions 2 and 3, little-endian; ggml's docs/gguf.md):
//   "GGUF" magic, uint32 version, uint64 tensor_count, uint64 kv_count,
//   kv_count metadata pairs   {gguf string key, uint32 value type, value},
//   tensor_count tensor infos {gguf string name, uint32 n_dims, n_dims x
//                              uint64 ne, uint32 ggml type, uint64 offset},
//   padding to `general.alignment` (default 32), then the tensor data; each
//   tensor's offset is relative to the start of the data and a multiple of
//   the alignment. A gguf string is a uint64 length and that many bytes (no
//   terminator). Value types: uint8 0, int8 1, uint16 2, int16 3, uint32 4,
//   int32 5, float32 6, bool 7, string 8, array 9 (uint32 element type,
//   uint64 count, elements), uint64 10, int64 11, float64 12.
// ne[0] is the fastest-varying dimension: a 2-D weight of `rows` rows of
// `cols` values has ne = {cols, rows} (shape() below reverses it).
//
// Hostile files: every count, length, offset and size is checked against the
// bytes left in the file before anything is allocated or read (string
// lengths, array counts x element size, nested arrays (depth <= 4), tensor
// and metadata counts, n_dims <= 4, ne products and byte sizes overflow-free,
// row lengths a multiple of the type's block, data inside the file, no two
// tensors overlapping, no duplicate names or keys). A violation throws
// qkv::Error "<path>: <problem> (expected ...)": one line, never an
// out-of-bounds read or an allocation larger than the file.
#ifndef QKV_GGUF_H_
#define QKV_GGUF_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace qkv {

// ggml tensor types (ggml.h's enum ggml_type values).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

// "F32", "Q4_1", ... for any ggml type number; "type 123" for unknown ones.
std::string GgmlTypeName(uint32_t type);
// Values per block and bytes per block of a type qkv knows the layout of
// (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K); false for others.
bool GgmlTypeLayout(uint32_t type, int64_t* block_values, int64_t* block_bytes);

enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// One metadata value. Scalars: the integer types in `int_value` (uint64
// values above INT64_MAX in `uint_value` only; both are set otherwise, with
// `uint_value` 0 for negative values),
// float32/float64 in `float_value`, bool in `int_value` (0 / 1), string in
// `string_value`. Arrays: `element_type` and `count`; string elements in
// `strings`, numeric and bool elements as the file's raw little-endian
// bytes in `raw` (count x element size, pointing into the file), arrays of
// arrays in `arrays`.
struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  int64_t int_value = 0;
  uint64_t uint_value = 0;
  double float_value = 0;
  std::string string_value;
  GgufValueType element_type = GgufValueType::kUint8;
  uint64_t count = 0;
  std::vector<std::string> strings;
  std::span<const unsigned char> raw;
  std::vector<GgufValue> arrays;
};

class GgufFile {
 public:
  struct Tensor {
    std::string name;
    uint32_t type = 0;             // a GgmlType value (unknown types are kept)
    std::vector<int64_t> ne;       // as in the file: ne[0] fastest-varying
    std::vector<int64_t> shape;    // ne reversed: PyTorch's order, rows last-but-one
    uint64_t offset = 0;           // from the start of the data section
    std::span<const unsigned char> bytes;  // the tensor's data, in the file
  };

  // Movable, not copyable: tensors' bytes point into the mapped file.
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;
  GgufFile(GgufFile&&) noexcept;
  GgufFile& operator=(GgufFile&&) noexcept;
  ~GgufFile();

  // Memory-maps `path` read-only and validates it. Throws qkv::Error naming
  // `path` (a missing file, a directory or FIFO, a malformed file).
  static GgufFile Open(const std::string& path);
  // Parses bytes already in memory (tests, fuzzing); `name` is used in messages.
  static GgufFile Parse(std::vector<unsigned char> bytes, const std::string& name);

  const std::string& name() const { return name_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t file_size() const { return size_; }

  // Metadata in file order, and by key (nullptr when absent).
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  const GgufValue* FindMetadata(std::string_view key) const;

  // Typed getters: throw qkv::Error "<path>: metadata <key> missing" or
  // "... has type T (expected ...)" naming the key.
  std::string GetString(std::string_view key) const;
  // Any integer type (or bool) whose value fits in int64.
  int64_t GetInt(std::string_view key) const;
  // float32 or float64 (or an integer type).
  double GetFloat(std::string_view key) const;
  // Array of strings.
  const std::vector<std::string>& GetStringArray(std::string_view key) const;
  // Array of any integer type, converted to int64 (values must fit).
  std::vector<int64_t> GetIntArray(std::string_view key) const;
  // Array of float32 / float64.
  std::vector<double> GetFloatArray(std::string_view key) const;

  const std::vector<Tensor>& tensors() const { return tensors_; }
  // The tensor called `name`, or nullptr.
  const Tensor* Find(std::string_view name) const;

 private:
  struct Mapping;
  GgufFile();
  void ParseAll();  // validates and fills everything from data_ / size_

  std::string name_;
  std::unique_ptr<Mapping> mapping_;  // owns the bytes (mmap or vector)
  const unsigned char* data_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::vector<Tensor> tensors_;
};

}  // namespace qkv

#endif  // QKV_GGUF_H_
