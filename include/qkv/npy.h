// qkv/npy.h: NumPy .npy files (format versions 1.0, 2.0 and 3.0).
//
// Supported: little-endian (or byte-order-free) float32 '<f4', float16 '<f2',
// float64 '<f8', bool '|b1', int32 '<i4', int64 '<i8'; C order; rank 0..8.
// Everything else (Fortran order, big-endian, other dtypes, structured arrays,
// truncated data, trailing bytes, a header longer than 1 MiB, a shape whose
// byte count overflows or disagrees with the file size) is refused with a
// qkv::Error naming the file and the problem, before any allocation larger
// than the file itself.
#ifndef QKV_NPY_H_
#define QKV_NPY_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "qkv/tensor.h"

namespace qkv {

struct NpyArray {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;  // empty for a 0-d array
  std::vector<unsigned char> bytes;  // row-major element data

  int64_t numel() const;
  template <class T>
  const T* data() const { return reinterpret_cast<const T*>(bytes.data()); }
  template <class T>
  T* data() { return reinterpret_cast<T*>(bytes.data()); }
};

// Reads a .npy file. Throws qkv::Error "<path>: <problem> (expected ...)".
NpyArray ReadNpy(const std::string& path);

// Parses .npy bytes already in memory; `name` is used in messages.
NpyArray ParseNpy(std::span<const unsigned char> file, const std::string& name);

// Writes a C-order little-endian .npy (version 1.0) file. Throws qkv::Error on
// an I/O failure; a failed write removes the partial file.
void WriteNpy(const std::string& path, DType dtype, std::span<const int64_t> shape,
              const void* data);

// Returns "(2, 3, 4)"-style text for messages.
std::string NpyShapeString(std::span<const int64_t> shape);

}  // namespace qkv

#endif  // QKV_NPY_H_
