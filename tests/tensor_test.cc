// float16 conversion (exhaustive) and view helpers.
#include "qkv/tensor.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace qkv {
namespace {

// Every half round-trips through float; NaNs stay NaN.
TEST(TensorTest, HalfRoundTripsExhaustively) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << h;
    } else {
      EXPECT_EQ(FloatToHalf(f), h) << h;
    }
  }
}

// Values decode to sign * 2^(e-15) * (1 + m/1024), or m * 2^-24 when e = 0.
TEST(TensorTest, HalfDecodesKnownValues) {
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xc000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(HalfToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::signbit(HalfToFloat(0x8000)));
}

// Midpoints between neighbouring halves round to the even one; just above a
// midpoint rounds up; overflow rounds to inf at 65520.
TEST(TensorTest, FloatToHalfRoundsToNearestEven) {
  for (uint32_t h = 0; h < 0x7bff; ++h) {
    const double a = HalfToFloat(static_cast<uint16_t>(h));
    const double b = HalfToFloat(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((a + b) / 2);  // exact in float
    ASSERT_EQ(static_cast<double>(mid), (a + b) / 2);
    const uint32_t even = (h % 2 == 0) ? h : h + 1;
    EXPECT_EQ(FloatToHalf(mid), even) << h;
    EXPECT_EQ(FloatToHalf(std::nextafter(mid, INFINITY)), h + 1) << h;
    EXPECT_EQ(FloatToHalf(std::nextafter(mid, -INFINITY)), h) << h;
    EXPECT_EQ(FloatToHalf(-mid), 0x8000u | even) << h;
  }
  EXPECT_EQ(FloatToHalf(65519.99f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);
  EXPECT_EQ(FloatToHalf(1e10f), 0x7c00);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -26)), 0);  // below half the smallest subnormal
}

// bfloat16 is the top half of a float: every value round-trips, and the
// midpoint between neighbours rounds to the even one.
TEST(TensorTest, BFloat16RoundsToNearestEven) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = BFloat16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(f)))) << h;
      continue;
    }
    EXPECT_EQ(FloatToBFloat16(f), h) << h;
    if ((h & 0x7fffu) >= 0x7f7fu) continue;  // next is inf or NaN
    const double mid = (static_cast<double>(f) + BFloat16ToFloat(static_cast<uint16_t>(h + 1))) / 2;
    const uint32_t even = (h % 2 == 0) ? h : h + 1;
    EXPECT_EQ(FloatToBFloat16(static_cast<float>(mid)), even) << h;
  }
  EXPECT_EQ(BFloat16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(DTypeSize(DType::kBFloat16), 2u);
}

TEST(TensorTest, ViewsAddressBhsdAndBshd) {
  const auto c = TensorView::Contiguous(nullptr, DType::kFloat32, {2, 3, 4, 5});
  EXPECT_EQ(c.strides, (Shape4{60, 20, 5, 1}));
  EXPECT_EQ(c.Offset(1, 2, 3, 4), 119);
  // [B=2, S=4, H=3, D=5] memory: element (b, h, s, d) at ((b*4 + s)*3 + h)*5 + d.
  const auto s = TensorView::FromBSHD(nullptr, DType::kFloat32, 2, 4, 3, 5);
  EXPECT_EQ(s.shape, (Shape4{2, 3, 4, 5}));
  EXPECT_EQ(s.Offset(1, 2, 3, 4), ((1 * 4 + 3) * 3 + 2) * 5 + 4);
  EXPECT_EQ(ShapeString(s.shape), "[2,3,4,5]");
  EXPECT_EQ(DTypeSize(DType::kFloat16), 2u);
  EXPECT_STREQ(DTypeName(DType::kBool), "bool");
}

}  // namespace
}  // namespace qkv
