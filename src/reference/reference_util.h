// Internal: element conversion shared by the reference kernels (forward and
// backward): any float dtype to and from the compute type T (float or double).
#ifndef QKV_SRC_REFERENCE_REFERENCE_UTIL_H_
#define QKV_SRC_REFERENCE_REFERENCE_UTIL_H_

#include <cstdint>
#include <limits>

#include "qkv/tensor.h"

namespace qkv::internal {

template <class T>
T LoadAs(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<T>(static_cast<const float*>(base)[offset]);
    case DType::kFloat64: return static_cast<T>(static_cast<const double*>(base)[offset]);
    case DType::kFloat16:
      return static_cast<T>(HalfToFloat(static_cast<const uint16_t*>(base)[offset]));
    default: return T(0);  // excluded by validation
  }
}

template <class T>
void StoreAs(void* base, DType dtype, int64_t offset, T value) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[offset] = static_cast<float>(value); break;
    case DType::kFloat64: static_cast<double*>(base)[offset] = static_cast<double>(value); break;
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[offset] = FloatToHalf(static_cast<float>(value));
      break;
    default: break;  // excluded by validation
  }
}

// Explicit-mask value of (b, h, i, j) in T; kBool gives 0 or -inf.
template <class T>
T MaskValue(const TensorView& mask, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t off = mask.Offset(b, h, i, j);
  if (mask.dtype == DType::kBool) {
    return static_cast<const uint8_t*>(mask.data)[off] ? T(0)
                                                       : -std::numeric_limits<T>::infinity();
  }
  return LoadAs<T>(mask.data, mask.dtype, off);
}

}  // namespace qkv::internal

#endif  // QKV_SRC_REFERENCE_REFERENCE_UTIL_H_
