// qkv/tensor.h: element types and a non-owning strided 4-D view.
//
// Attention tensors are always seen through the logical order
//   [batch, heads, seq, dim]
// whatever their memory order: strides (in elements, not bytes) say where
// element (b, h, s, d) lives, so [B,H,S,D] ("bhsd") and [B,S,H,D] ("bshd")
// memory are both used without copies. A stride of 0 broadcasts that
// dimension (allowed for masks only).
#ifndef QKV_TENSOR_H_
#define QKV_TENSOR_H_

#include <array>
#include <cstdint>
#include <string>

namespace qkv {

enum class DType : uint8_t {
  kFloat32, kFloat16, kFloat64, kBool, kInt32, kInt64, kBFloat16, kInt8
};

// Returns the size of one element in bytes.
size_t DTypeSize(DType dtype);
// Returns a short name: "float32", "float16", "float64", "bool", "int32",
// "int64", "bfloat16", "int8".
const char* DTypeName(DType dtype);

// Converts IEEE binary16 bits to float (exact: every half is a float).
float HalfToFloat(uint16_t bits);
// Converts float to IEEE binary16 bits, rounding to nearest even; overflow
// gives +-inf, NaN stays NaN (quiet), tiny values become subnormal or +-0.
uint16_t FloatToHalf(float value);

// Converts bfloat16 bits (the top half of a float) to float, exactly.
float BFloat16ToFloat(uint16_t bits);
// Converts float to bfloat16 bits, rounding to nearest even; NaN stays NaN.
uint16_t FloatToBFloat16(float value);

using Shape4 = std::array<int64_t, 4>;

// A non-owning view of a 4-D tensor. Ptr is `const void*` for inputs
// (TensorView) and `void*` for outputs (MutableTensorView).
template <class Ptr>
struct BasicTensorView {
  Ptr data = nullptr;
  DType dtype = DType::kFloat32;
  Shape4 shape{0, 0, 0, 0};
  Shape4 strides{0, 0, 0, 0};  // elements; may be negative; 0 broadcasts

  // True when the view points at data (optional outputs are left empty).
  bool present() const { return data != nullptr; }
  // Returns the element count; 0 when any dim is 0 (even if the others'
  // product would overflow, as zero-sized .npy files can declare).
  int64_t numel() const {
    for (int64_t s : shape) {
      if (s == 0) return 0;
    }
    return shape[0] * shape[1] * shape[2] * shape[3];
  }
  // Returns the element offset of (i0, i1, i2, i3).
  int64_t Offset(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    return i0 * strides[0] + i1 * strides[1] + i2 * strides[2] + i3 * strides[3];
  }

  // Returns a view of row-major (C order) memory of the given shape.
  static BasicTensorView Contiguous(Ptr data, DType dtype, Shape4 shape) {
    return {data, dtype, shape,
            {shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1}};
  }
  // Returns a [batch, heads, seq, dim] view of row-major [batch, seq, heads, dim]
  // memory (the "bshd" layout of FlashAttention and batch-first PyTorch).
  static BasicTensorView FromBSHD(Ptr data, DType dtype, int64_t batch, int64_t seq,
                                  int64_t heads, int64_t dim) {
    return {data, dtype, {batch, heads, seq, dim},
            {seq * heads * dim, dim, heads * dim, 1}};
  }
};

using TensorView = BasicTensorView<const void*>;
using MutableTensorView = BasicTensorView<void*>;

// Returns "[a,b,c,d]" for messages.
std::string ShapeString(const Shape4& shape);

}  // namespace qkv

#endif  // QKV_TENSOR_H_
