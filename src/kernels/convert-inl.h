// Element conversion and finiteness checks shared by the flash forward and
// backward kernels, for every Highway target. Included by a file that
// includes hwy/foreach_target.h and hwy/highway.h, once per target
// (Highway's -inl.h convention: the include guard toggles per target).
#if defined(QKV_SRC_KERNELS_CONVERT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef QKV_SRC_KERNELS_CONVERT_INL_H_
#undef QKV_SRC_KERNELS_CONVERT_INL_H_
#else
#define QKV_SRC_KERNELS_CONVERT_INL_H_
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "hwy/highway.h"
#include "qkv/tensor.h"

HWY_BEFORE_NAMESPACE();
namespace qkv::internal::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Returns element `offset` of a float32/float64/float16 array as float.
HWY_INLINE float LoadAsFloat(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kFloat64: return static_cast<float>(static_cast<const double*>(base)[offset]);
    case DType::kFloat16: return HalfToFloat(static_cast<const uint16_t*>(base)[offset]);
    default: return 0.0f;  // excluded by validation
  }
}

// Converts `n` elements at `src` (element stride `stride`) to float32 `dst`.
HWY_INLINE void ConvertRow(const void* base, DType dtype, int64_t offset, int64_t stride,
                           int64_t n, float* HWY_RESTRICT dst) {
  if (n <= 0) return;  // an empty row may have no data pointer (memcpy needs one)
  if (stride == 1 && dtype == DType::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(base) + offset, n * sizeof(float));
  } else if (stride == 1 && dtype == DType::kFloat16) {
    const hn::ScalableTag<float> df;
    const hn::Rebind<hwy::float16_t, decltype(df)> dh;
    const auto* src = static_cast<const hwy::float16_t*>(base) + offset;
    const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
    int64_t x = 0;
    for (; x + nf <= n; x += nf) hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, src + x)), df, dst + x);
    for (; x < n; ++x) dst[x] = LoadAsFloat(base, dtype, offset + x);
  } else if (stride == 1 && dtype == DType::kFloat64) {
    const double* src = static_cast<const double*>(base) + offset;
    for (int64_t x = 0; x < n; ++x) dst[x] = static_cast<float>(src[x]);
  } else {
    for (int64_t x = 0; x < n; ++x) dst[x] = LoadAsFloat(base, dtype, offset + x * stride);
  }
}

// Stores `value` as element `offset` of a float32/float64/float16 array
// (float16 rounded to nearest even).
HWY_INLINE void StoreFromFloat(void* base, DType dtype, int64_t offset, float value) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[offset] = value; break;
    case DType::kFloat64: static_cast<double*>(base)[offset] = value; break;
    case DType::kFloat16: static_cast<uint16_t*>(base)[offset] = FloatToHalf(value); break;
    default: break;  // excluded by validation
  }
}

// Returns true when the n floats at row have no inf or NaN (x * 0 is NaN
// exactly for those).
HWY_INLINE bool RowFinite(const float* HWY_RESTRICT row, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t nf = static_cast<int64_t>(hn::Lanes(df));
  const auto zero = hn::Zero(df);
  auto sum = zero;
  int64_t x = 0;
  for (; x + nf <= n; x += nf) sum = hn::Add(sum, hn::Mul(hn::LoadU(df, row + x), zero));
  float tail = 0.0f;
  for (; x < n; ++x) tail += row[x] * 0.0f;
  return hn::AllFalse(df, hn::IsNaN(sum)) && !std::isnan(tail);
}

}  // namespace qkv::internal::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // QKV_SRC_KERNELS_CONVERT_INL_H_
