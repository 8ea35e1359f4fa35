// qkv/safetensors.h: reading (and, for tests and tools, writing) safetensors
// files, the weight format of Hugging Face and PyTorch users.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [d0, ...], "data_offsets": [begin, end]},
//    ..., "__metadata__": {"key": "value", ...}}
// then the data; offsets are relative to the end of the header.
// Accepted dtypes: F32, F16, BF16 (others, e.g. F64 or I64, are refused when
// loaded as float32, but listed). The reader validates everything before
// trusting it: header length within the file and at most 100 MiB, JSON
// well-formed, each entry's offsets inside the data section, begin <= end,
// no two tensors overlapping, byte size == dtype size x product(shape) (with
// overflow checks), no duplicate names. Any violation throws qkv::Error
// "<path>: <problem> (expected ...)", never an out-of-bounds read or an
// allocation larger than the file.
#ifndef QKV_SAFETENSORS_H_
#define QKV_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qkv/tensor.h"

namespace qkv {

class SafetensorsFile {
 public:
  struct Tensor {
    std::string name;
    std::string dtype;  // as in the file: "F32", "F16", "BF16", ...
    std::vector<int64_t> shape;
    std::span<const unsigned char> bytes;  // into the file's data
  };

  // Movable, not copyable: each Tensor's bytes point into this object's file.
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  SafetensorsFile(SafetensorsFile&&) = default;
  SafetensorsFile& operator=(SafetensorsFile&&) = default;

  // Reads and validates the whole file. Throws qkv::Error.
  static SafetensorsFile Read(const std::string& path);
  // Parses file bytes already in memory; `name` is used in messages.
  static SafetensorsFile Parse(std::vector<unsigned char> file, const std::string& name);

  // Returns the tensor called `name`, or nullptr.
  const Tensor* Find(std::string_view name) const;
  const std::vector<Tensor>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Returns tensor `name` converted to float32 (F32/F16/BF16), after checking
  // that its shape equals `expected_shape`. Throws qkv::Error naming the file,
  // the tensor and the expected shape when it is missing, of another shape or
  // of an unsupported dtype.
  std::vector<float> LoadFloat32(std::string_view name,
                                 std::span<const int64_t> expected_shape) const;

 private:
  SafetensorsFile() = default;
  std::string name_;
  std::vector<unsigned char> file_;
  std::vector<Tensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write: float32 data stored as `dtype` ("F32", "F16" or
// "BF16", rounded to nearest even).
struct SafetensorsEntry {
  std::string name;
  std::vector<int64_t> shape;
  std::span<const float> data;
  std::string dtype = "F32";
};

// Writes a safetensors file (tensors in the given order). Throws qkv::Error
// on an I/O failure and removes the partial file.
void WriteSafetensors(const std::string& path, std::span<const SafetensorsEntry> entries);

}  // namespace qkv

#endif  // QKV_SAFETENSORS_H_
