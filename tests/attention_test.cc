// The public API: validation messages, layouts and strides, dtypes,
// broadcast masks, and what AttentionInfo reports.
#include "qkv/attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "qkv/error.h"
#include "test_util.h"

namespace qkv::test {
namespace {

// Valid float32 [1, 2, 3, 4] self-attention buffers to break one at a time.
struct Fixture {
  std::vector<float> q = std::vector<float>(24, 0.5f), k = q, v = q, out = q, lse = q, w = q;
  AttentionParams p;
  Fixture() {
    p.q = TensorView::Contiguous(q.data(), DType::kFloat32, {1, 2, 3, 4});
    p.k = p.q, p.k.data = k.data();
    p.v = p.q, p.v.data = v.data();
    p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, {1, 2, 3, 4});
  }
};

void ExpectError(const AttentionParams& p, const std::string& fragment) {
  try {
    Attention(p);
    ADD_FAILURE() << "no error; expected one containing '" << fragment << "'";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(fragment), std::string::npos) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    EXPECT_NE(what.find("expected"), std::string::npos) << what;
  }
}

TEST(AttentionTest, ValidationNamesTheArgument) {
  { Fixture f; f.p.q.data = nullptr; ExpectError(f.p, "q: missing"); }
  { Fixture f; f.p.k.dtype = DType::kInt32; ExpectError(f.p, "k: dtype int32"); }
  { Fixture f; f.p.v.shape[0] = 2; ExpectError(f.p, "k, v: batch"); }
  { Fixture f; f.p.k.shape[3] = 3; ExpectError(f.p, "k: head_dim 3"); }
  { Fixture f; f.p.v.shape[2] = 2; ExpectError(f.p, "v: shape"); }
  { Fixture f; f.p.q.shape[1] = 3; f.p.out.shape[1] = 3; ExpectError(f.p, "must divide"); }
  { Fixture f; f.p.out.shape[3] = 5; ExpectError(f.p, "out: shape [1,2,3,5]"); }
  { Fixture f; f.p.out.strides[2] = 0; ExpectError(f.p, "out: stride 0"); }
  { Fixture f; f.p.q.shape[2] = -1; ExpectError(f.p, "q: negative dimension"); }
  {
    Fixture f;
    f.p.lse = MutableTensorView::Contiguous(f.lse.data(), DType::kFloat32, {1, 2, 3, 2});
    ExpectError(f.p, "lse: shape");
  }
  {
    Fixture f;
    f.p.weights = MutableTensorView::Contiguous(f.w.data(), DType::kFloat32, {1, 2, 4, 3});
    ExpectError(f.p, "weights: shape");
  }
  { Fixture f; f.p.mask.window_left = -2; ExpectError(f.p, "window"); }
  {
    Fixture f;
    const int64_t lengths[] = {4};
    f.p.mask.key_lengths = lengths;
    ExpectError(f.p, "key_lengths[0]: 4");
  }
  {
    Fixture f;
    const int64_t lengths[] = {1, 2};
    f.p.mask.key_lengths = lengths;
    ExpectError(f.p, "key_lengths: 2 entries");
  }
  {
    Fixture f;
    f.p.mask.mask = TensorView::Contiguous(f.w.data(), DType::kInt64, {1, 2, 3, 3});
    ExpectError(f.p, "mask: dtype int64");
  }
  {
    Fixture f;
    f.p.mask.mask = TensorView::Contiguous(f.w.data(), DType::kFloat32, {1, 2, 3, 2});
    ExpectError(f.p, "mask: shape");
  }
  { Fixture f; f.p.scale = NAN; ExpectError(f.p, "scale"); }
  { Fixture f; f.p.scale = INFINITY; ExpectError(f.p, "scale"); }
  { Fixture f; f.p.num_threads = -1; ExpectError(f.p, "num_threads"); }
}

// An error is raised before any output is written.
TEST(AttentionTest, NothingWrittenOnError) {
  Fixture f;
  f.out.assign(24, 7.0f);
  f.p.mask.window_right = -5;
  EXPECT_THROW(Attention(f.p), Error);
  for (float x : f.out) EXPECT_EQ(x, 7.0f);
}

// bshd memory, a padded row stride and reversed (negative) strides all give
// bitwise the same result as contiguous bhsd.
TEST(AttentionTest, AnyStridesGiveTheSameResult) {
  const Case c = RandomCase(2, 4, 2, 13, 17, 8, 6, 31);
  const Result want = RunQkv(c, Accumulate::kFloat32, 1, false);
  const int64_t B = 2, H = 4, G = 2, NQ = 13, NK = 17, D = 8, DV = 6;
  // bshd copies.
  auto to_bshd = [&](const std::vector<double>& x, int64_t heads, int64_t seq, int64_t dim) {
    std::vector<float> y(x.size());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t s = 0; s < seq; ++s)
          for (int64_t d = 0; d < dim; ++d)
            y[((b * seq + s) * heads + h) * dim + d] = x[((b * heads + h) * seq + s) * dim + d];
    return y;
  };
  std::vector<float> q = to_bshd(c.q, H, NQ, D), k = to_bshd(c.k, G, NK, D),
                     v = to_bshd(c.v, G, NK, DV), out(B * NQ * H * DV);
  AttentionParams p;
  p.q = TensorView::FromBSHD(q.data(), DType::kFloat32, B, NQ, H, D);
  p.k = TensorView::FromBSHD(k.data(), DType::kFloat32, B, NK, G, D);
  p.v = TensorView::FromBSHD(v.data(), DType::kFloat32, B, NK, G, DV);
  p.out = MutableTensorView::FromBSHD(out.data(), DType::kFloat32, B, NQ, H, DV);
  p.num_threads = 2;
  Attention(p);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < NQ; ++s)
        for (int64_t d = 0; d < DV; ++d)
          ASSERT_EQ(out[((b * NQ + s) * H + h) * DV + d],
                    want.out[((b * H + h) * NQ + s) * DV + d]);
  // Keys stored in reverse order, rows padded to 11 floats: negative stride.
  std::vector<float> kr(B * G * NK * 11, NAN);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t s = 0; s < NK; ++s)
        for (int64_t d = 0; d < D; ++d)
          kr[((b * G + g) * NK + (NK - 1 - s)) * 11 + d] =
              static_cast<float>(c.k[((b * G + g) * NK + s) * D + d]);
  p.k = {kr.data() + (NK - 1) * 11, DType::kFloat32, {B, G, NK, D}, {G * NK * 11, NK * 11, -11, 1}};
  Attention(p);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < NQ; ++s)
        for (int64_t d = 0; d < DV; ++d)
          ASSERT_EQ(out[((b * NQ + s) * H + h) * DV + d],
                    want.out[((b * H + h) * NQ + s) * DV + d]);
}

// float16 inputs are read exactly; float16 outputs add one rounding of
// 2^-11 relative to the float32 result.
TEST(AttentionTest, Float16InputsAndOutputs) {
  Case c = RandomCase(1, 2, 1, 19, 23, 16, 8, 41);
  for (auto* t : {&c.q, &c.k, &c.v})
    for (double& x : *t) x = HalfToFloat(FloatToHalf(static_cast<float>(x)));
  const OracleResult o = Oracle(c);
  std::vector<uint16_t> q, k, v, out(2 * 19 * 8);
  for (double x : c.q) q.push_back(FloatToHalf(static_cast<float>(x)));
  for (double x : c.k) k.push_back(FloatToHalf(static_cast<float>(x)));
  for (double x : c.v) v.push_back(FloatToHalf(static_cast<float>(x)));
  AttentionParams p;
  p.q = TensorView::Contiguous(q.data(), DType::kFloat16, {1, 2, 19, 16});
  p.k = TensorView::Contiguous(k.data(), DType::kFloat16, {1, 1, 23, 16});
  p.v = TensorView::Contiguous(v.data(), DType::kFloat16, {1, 1, 23, 8});
  p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat16, {1, 2, 19, 8});
  Attention(p);
  const Bound bound{kU32};
  for (int64_t row = 0; row < 2 * 19; ++row)
    for (int64_t d = 0; d < 8; ++d) {
      const double want = o.out[row * 8 + d];
      const double tol = bound.RowFactor(o.score_mag[row], 16, 23) * o.abs_v[row * 8 + d] +
                         std::ldexp(std::fabs(want), -11) + std::ldexp(1.0, -25);
      EXPECT_NEAR(HalfToFloat(out[row * 8 + d]), want, tol) << row << " " << d;
    }
}

// A mask given as [seq_q, seq_kv] or [1, H, 1, seq_kv] broadcasts exactly
// like the same mask expanded to full size.
TEST(AttentionTest, BroadcastMaskEqualsExpandedMask) {
  Case c = RandomCase(2, 3, 3, 5, 7, 4, 4, 51);
  std::vector<float> small(5 * 7);
  for (size_t i = 0; i < small.size(); ++i) small[i] = (i % 3 == 0) ? -INFINITY : 0.25f * (i % 5);
  c.add_mask.resize(2 * 3 * 5 * 7);
  for (size_t i = 0; i < c.add_mask.size(); ++i) c.add_mask[i] = small[i % 35];
  const Result full = RunQkv(c, Accumulate::kFloat32, 1, false);
  std::vector<float> q(c.q.begin(), c.q.end()), k(c.k.begin(), c.k.end()),
      v(c.v.begin(), c.v.end()), out(2 * 3 * 5 * 4);
  AttentionParams p;
  p.q = TensorView::Contiguous(q.data(), DType::kFloat32, {2, 3, 5, 4});
  p.k = TensorView::Contiguous(k.data(), DType::kFloat32, {2, 3, 7, 4});
  p.v = TensorView::Contiguous(v.data(), DType::kFloat32, {2, 3, 7, 4});
  p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, {2, 3, 5, 4});
  const int64_t shape[] = {5, 7};
  p.mask.mask = BroadcastMask(small.data(), DType::kFloat32, shape, {2, 3, 5, 7});
  p.num_threads = 1;
  Attention(p);
  EXPECT_EQ(std::vector<double>(out.begin(), out.end()), full.out);
}

TEST(AttentionTest, InfoSaysWhichKernelRanAndWhy) {
  Fixture f;
  AttentionInfo info = Attention(f.p);  // auto, no weights: flash
  EXPECT_EQ(info.kernel, Kernel::kFlash);
  EXPECT_NE(info.reason.find("flash"), std::string::npos);
  EXPECT_FALSE(info.simd_target.empty());
  EXPECT_GT(info.scratch_bytes, 0);
  f.p.weights = MutableTensorView::Contiguous(f.w.data(), DType::kFloat32, {1, 2, 3, 3});
  info = Attention(f.p);  // weights: only the reference forms them
  EXPECT_EQ(info.kernel, Kernel::kReference);
  EXPECT_NE(info.reason.find("weights"), std::string::npos);
  f.p.kernel = Kernel::kFlash;  // asked for explicitly: an error, not a switch
  ExpectError(f.p, "kernel flash: cannot write attention weights");
  f.p.weights = {};
  f.p.accumulate = Accumulate::kFloat64;
  ExpectError(f.p, "kernel flash: accumulates in float32 only");
  f.p.kernel = Kernel::kAuto;
  info = Attention(f.p);
  EXPECT_EQ(info.kernel, Kernel::kReference);
  EXPECT_NE(info.reason.find("float64"), std::string::npos);
  f.p.kernel = Kernel::kReference;
  f.p.accumulate = Accumulate::kFloat32;
  f.p.num_threads = 3;
  info = Attention(f.p);
  EXPECT_EQ(info.reason, "reference: requested");
  EXPECT_EQ(info.threads, 3);
  EXPECT_EQ(KernelFromName("flash"), Kernel::kFlash);
  EXPECT_THROW(KernelFromName("fast"), Error);
  EXPECT_DOUBLE_EQ(DefaultScale(64), 0.125);
}

// Dims beyond int32 are refused (zero-sized tensors could declare them).
TEST(AttentionTest, HugeDimsAreRefused) {
  Fixture f;
  f.p.k.shape = {1, 1, int64_t{1} << 40, 0};
  f.p.v.shape = {1, 1, int64_t{1} << 40, 0};
  f.p.q.shape = {1, 1, 1, 0};
  f.p.out.shape = {1, 1, 1, 0};
  ExpectError(f.p, "k: dimension 1099511627776");
}

}  // namespace
}  // namespace qkv::test
