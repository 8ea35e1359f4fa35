// The FlashAttention kernel against the independent float64 oracle
// (test_util.h) under every compiled SIMD target: sizes around the tile
// edges, every mask rule, empty tiles and rows, GQA/MQA, dtypes and strides,
// NaN/inf rules; plus thread-count invariance and fixed scratch.
#include "kernels/flash_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "qkv/tensor.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace qkv::test {
namespace {

const double kInf = std::numeric_limits<double>::infinity();
// Tile sizes of flash_attention.cc (FlashTraits), for the edge sweeps.
constexpr int64_t kBlockQ = 64, kBlockKV = 64;

// Error bound. MatchesOracle's factor is the reference kernel's first-order
// analysis. The flash kernel adds, per weight p_j = exp(s_j - m):
//   (a) the online rescaling: p_j is computed against the running max m_k
//       and multiplied by alpha_i = exp(m_i - m_{i+1}) for each later block;
//       the subtractions round by u |m_i - m_{i+1}|, which telescopes to
//       u (m - m_k) <= 2 A u (A = score magnitude, as in test_util.h);
//   (b) per rescale one exp (hn::Exp: 1 ULP <= 2u) and one multiply (u):
//       3 u per key block, nb = ceil(seq_kv / 64) <= (seq_kv + 63) / 64;
//   (c) scale folded into Q: one rounding per product, inside the (D + 2)u A
//       score term already.
// So the weight term grows from 2(D + 2) A u + 2u by at most 2 A u + 3 nb u:
// 2 A u <= 2(D + 2) A u / 3 (D >= 1) and 3 nb u <= 3 (seq_kv + 63) u / 64,
// which is below the sum terms 2 (seq_kv + 2) u + 2u for every seq_kv >= 1.
// Each addition is at most the term it is compared with, so twice the
// reference factor bounds the kernel: we pass u_eff = 2 u. The lse bound
// ((D + 2) A + (N + 2) + |lse|) u gains the same (a) + (b) through l and m,
// again at most doubling it.
constexpr double kFlashU = 2.0 * kU32;

// Input memory layout of one run.
struct Layout {
  DType in = DType::kFloat32;   // q, k, v dtype
  DType out = DType::kFloat32;  // out, lse dtype
  bool bshd = false;            // [b, s, h, d] memory for q, k, v, out
  bool k_transposed = false;    // k memory [b, h, d, s] (stride along d != 1)
  DType mask = DType::kFloat32; // additive-mask dtype (bool masks stay bool)
  bool mask_broadcast = false;  // the explicit mask is [1, 1, seq_q, seq_kv]
  int threads = 1;
};

std::vector<unsigned char> Encode(const std::vector<double>& x, DType dtype) {
  std::vector<unsigned char> bytes(x.size() * DTypeSize(dtype));
  for (size_t i = 0; i < x.size(); ++i) {
    if (dtype == DType::kFloat32) reinterpret_cast<float*>(bytes.data())[i] = float(x[i]);
    if (dtype == DType::kFloat64) reinterpret_cast<double*>(bytes.data())[i] = x[i];
    if (dtype == DType::kFloat16)
      reinterpret_cast<uint16_t*>(bytes.data())[i] = FloatToHalf(float(x[i]));
  }
  return bytes;
}

double Decode(const std::vector<unsigned char>& bytes, DType dtype, size_t i) {
  if (dtype == DType::kFloat64) return reinterpret_cast<const double*>(bytes.data())[i];
  if (dtype == DType::kFloat16) return HalfToFloat(reinterpret_cast<const uint16_t*>(bytes.data())[i]);
  return reinterpret_cast<const float*>(bytes.data())[i];
}

// Rounds the case's inputs to float16 (so the oracle sees what the kernel
// reads).
void RoundToHalf(Case& c) {
  for (auto* x : {&c.q, &c.k, &c.v})
    for (double& e : *x) e = HalfToFloat(FloatToHalf(float(e)));
}

// Runs internal::FlashAttention like qkv::Attention would after Validate.
Result RunFlash(const Case& c, const Layout& lay = {}) {
  const int64_t B = c.batch, H = c.num_q_heads, G = c.num_kv_heads, NQ = c.seq_q,
                NK = c.seq_kv, D = c.head_dim, DV = c.head_dim_v;
  // Memory order [b, h, s, d] (or [b, s, h, d]); index maps from bhsd.
  auto reorder = [&](const std::vector<double>& x, int64_t heads, int64_t seq, int64_t dim,
                     bool bshd, bool dsh) {
    std::vector<double> y(x.size());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t s = 0; s < seq; ++s)
          for (int64_t d = 0; d < dim; ++d) {
            const int64_t src = ((b * heads + h) * seq + s) * dim + d;
            const int64_t dst = dsh    ? ((b * heads + h) * dim + d) * seq + s
                                : bshd ? ((b * seq + s) * heads + h) * dim + d
                                       : src;
            y[dst] = x[src];
          }
    return y;
  };
  auto view = [&](const std::vector<unsigned char>& bytes, int64_t heads, int64_t seq,
                  int64_t dim, bool dsh) {
    if (dsh) {
      return TensorView{bytes.data(), lay.in, {B, heads, seq, dim},
                        {heads * dim * seq, dim * seq, 1, seq}};
    }
    return lay.bshd ? TensorView::FromBSHD(bytes.data(), lay.in, B, seq, heads, dim)
                    : TensorView::Contiguous(bytes.data(), lay.in, {B, heads, seq, dim});
  };
  const auto q = Encode(reorder(c.q, H, NQ, D, lay.bshd, false), lay.in);
  const auto k = Encode(reorder(c.k, G, NK, D, lay.bshd, lay.k_transposed), lay.in);
  const auto v = Encode(reorder(c.v, G, NK, DV, lay.bshd, false), lay.in);
  const size_t osize = DTypeSize(lay.out);
  std::vector<unsigned char> out(B * H * NQ * DV * osize, 0xAB), lse(B * H * NQ * osize, 0xAB);

  AttentionParams p;
  p.q = view(q, H, NQ, D, false);
  p.k = view(k, G, NK, D, lay.k_transposed);
  p.v = view(v, G, NK, DV, false);
  p.out = lay.bshd ? MutableTensorView::FromBSHD(out.data(), lay.out, B, NQ, H, DV)
                   : MutableTensorView::Contiguous(out.data(), lay.out, {B, H, NQ, DV});
  p.lse = MutableTensorView::Contiguous(lse.data(), lay.out, {B, H, NQ, 1});
  p.mask.causal = c.causal;
  p.mask.alignment = c.top_left ? Alignment::kTopLeft : Alignment::kBottomRight;
  p.mask.window_left = c.window_left;
  p.mask.window_right = c.window_right;
  p.mask.key_lengths = c.key_lengths;
  // One explicit mask: bool, or additive (bool folded in as -inf).
  std::vector<double> add = c.add_mask;
  if (!c.bool_mask.empty() && !add.empty())
    for (size_t i = 0; i < add.size(); ++i)
      if (!c.bool_mask[i]) add[i] = -kInf;
  const int64_t mask_n = lay.mask_broadcast ? NQ * NK : B * H * NQ * NK;
  const Shape4 mask_shape{B, H, NQ, NK};
  const Shape4 mask_strides = lay.mask_broadcast ? Shape4{0, 0, NK, 1}
                                                 : Shape4{H * NQ * NK, NQ * NK, NK, 1};
  std::vector<uint8_t> bool_mask(c.bool_mask.begin(), c.bool_mask.begin() +
                                                          (c.bool_mask.empty() ? 0 : mask_n));
  std::vector<unsigned char> add_bytes;
  if (!add.empty()) {
    add.resize(mask_n);
    add_bytes = Encode(add, lay.mask);
    p.mask.mask = TensorView{add_bytes.data(), lay.mask, mask_shape, mask_strides};
  } else if (!bool_mask.empty()) {
    p.mask.mask = TensorView{bool_mask.data(), DType::kBool, mask_shape, mask_strides};
  }
  internal::Problem pr;
  pr.batch = B, pr.num_q_heads = H, pr.num_kv_heads = G, pr.seq_q = NQ, pr.seq_kv = NK;
  pr.head_dim = D, pr.head_dim_v = DV;
  pr.group_size = G == 0 ? 1 : H / G;
  pr.scale = EffectiveScale(c);
  pr.threads = lay.threads;
  internal::FlashAttention(p, pr);

  Result r;
  r.out.resize(B * H * NQ * DV);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < NQ; ++i)
        for (int64_t d = 0; d < DV; ++d)
          r.out[((b * H + h) * NQ + i) * DV + d] = Decode(out, lay.out, p.out.Offset(b, h, i, d));
  r.lse.resize(B * H * NQ);
  for (size_t i = 0; i < r.lse.size(); ++i) r.lse[i] = Decode(lse, lay.out, i);
  return r;
}

// Calls fn(target name) once per compiled SIMD target of the flash kernel.
template <class Fn>
void ForEachTarget(const Fn& fn) {
  ForEachSimdTarget([] { return std::string(internal::FlashSimdTarget()); }, fn);
}

// The oracle once, then the kernel under every target.
void ExpectMatches(const Case& c, const Layout& lay = {}) {
  const OracleResult o = Oracle(c);
  ForEachTarget([&](const std::string&) { EXPECT_TRUE(MatchesOracle(c, RunFlash(c, lay), o, kFlashU)); });
}

std::string Name(const Case& c) {
  return "seq_q " + std::to_string(c.seq_q) + " seq_kv " + std::to_string(c.seq_kv) +
         " head_dim " + std::to_string(c.head_dim) + "/" + std::to_string(c.head_dim_v) +
         (c.causal ? (c.top_left ? " causal top-left" : " causal") : "");
}

TEST(FlashAttentionTest, CompiledTargetsIncludeTheBest) {
  std::vector<std::string> names;
  ForEachTarget([&](const std::string& name) { names.push_back(name); });
  EXPECT_GE(names.size(), 2u);  // at least one SIMD target and the fallback
  const std::string best = internal::FlashSimdTarget();
  EXPECT_EQ(best, names.front());
}

// Sizes around each block edge (Br +- 1, Bc +- 1, 2 Bc +- 1), both ways.
TEST(FlashAttentionTest, TileEdgeSizes) {
  const int64_t sizes[] = {1, kBlockQ - 1, kBlockQ + 1, kBlockKV, 2 * kBlockKV - 1,
                           2 * kBlockKV + 1};
  const int64_t dims[] = {1, 3, 59, 80, 128};
  uint64_t seed = 1;
  for (int64_t nq : sizes)
    for (int64_t nk : sizes) {
      Case c = RandomCase(1, 2, 1, nq, nk, dims[seed % 5], dims[(seed + 2) % 5], seed);
      ++seed;
      for (int mode = 0; mode < 3; ++mode) {
        c.causal = mode > 0;
        c.top_left = mode == 2;
        SCOPED_TRACE(Name(c));
        ExpectMatches(c);
      }
    }
}

TEST(FlashAttentionTest, HeadDimsBothCrossShapes) {
  for (int64_t d : {1, 3, 59, 80, 128, 256}) {
    SCOPED_TRACE("head_dim " + std::to_string(d));
    ExpectMatches(RandomCase(1, 2, 2, 97, 129, d, d, 10 + d));
    Case c = RandomCase(1, 2, 1, 129, 97, d, 7, 20 + d);
    c.causal = true;
    ExpectMatches(c);
  }
}

// Applies mask rule `kind` (0..11) to `c`. 10 and 11 empty whole 64 x 64
// tiles and whole rows.
void ApplyMask(Case& c, int kind, std::mt19937_64& rng) {
  const int64_t n = c.batch * c.num_q_heads * c.seq_q * c.seq_kv;
  if (kind <= 9) {
    ApplyMaskKind(c, kind, rng, /*left_window=*/70);
    return;
  }
  switch (kind) {
    case 10:  // bool: tile (ti, tj) empty when ti + tj is odd, rows 3 and 70 empty
    case 11: {  // the same as an additive -inf / random mask
      std::normal_distribution<double> normal(0.0, 1.0);
      c.bool_mask.assign(n, 1);
      if (kind == 11) c.add_mask.assign(n, 0.0);
      for (int64_t row = 0; row < c.batch * c.num_q_heads * c.seq_q; ++row) {
        const int64_t i = row % c.seq_q;
        for (int64_t j = 0; j < c.seq_kv; ++j) {
          const bool off = (i / kBlockQ + j / kBlockKV) % 2 == 1 || i == 3 || i == 70;
          if (kind == 10) {
            c.bool_mask[row * c.seq_kv + j] = !off;
          } else {
            c.add_mask[row * c.seq_kv + j] = off ? -kInf : static_cast<float>(normal(rng));
          }
        }
      }
      if (kind == 11) c.bool_mask.clear();
      break;
    }
  }
}

TEST(FlashAttentionTest, EveryMaskKind) {
  const int64_t shapes[][2] = {{7, 97}, {97, 7}, {130, 200}, {1, 1025}, {1025, 1}, {1, 1}};
  std::mt19937_64 rng(7);
  uint64_t seed = 100;
  for (const auto& s : shapes)
    for (int kind = 0; kind <= 11; ++kind) {
      Case c = RandomCase(2, 2, 1, s[0], s[1], 59, 80, seed++);
      ApplyMask(c, kind, rng);
      SCOPED_TRACE("mask kind " + std::to_string(kind) + " " + Name(c));
      ExpectMatches(c);
    }
}

TEST(FlashAttentionTest, MaskDtypesAndBroadcast) {
  std::mt19937_64 rng(8);
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kFloat64}) {
    Case c = RandomCase(2, 2, 2, 70, 150, 16, 16, 31);
    ApplyMask(c, 11, rng);
    for (auto& m : c.add_mask) m = HalfToFloat(FloatToHalf(float(m)));  // exact in every dtype
    Layout lay;
    lay.mask = dt;
    SCOPED_TRACE(DTypeName(dt));
    ExpectMatches(c, lay);
  }
  // [1, 1, seq_q, seq_kv] broadcast: the oracle gets the expanded mask.
  Case c = RandomCase(2, 3, 1, 40, 90, 8, 8, 32);
  std::bernoulli_distribution coin(0.5);
  std::vector<uint8_t> plane(40 * 90);
  for (auto& m : plane) m = coin(rng);
  for (int64_t x = 0; x < 2 * 3; ++x) c.bool_mask.insert(c.bool_mask.end(), plane.begin(), plane.end());
  Layout lay;
  lay.mask_broadcast = true;
  ExpectMatches(c, lay);
}

TEST(FlashAttentionTest, GroupedAndMultiQuery) {
  for (int64_t kv_heads : {1, 2, 3, 6})
    for (int64_t nq : {1, 31, 70}) {
      Case c = RandomCase(2, 6, kv_heads, nq, 77, 24, 12, 40 + kv_heads + nq);
      SCOPED_TRACE("kv_heads " + std::to_string(kv_heads) + " " + Name(c));
      ExpectMatches(c);
      c.causal = true;
      ExpectMatches(c);
      c.top_left = true;
      ExpectMatches(c);
    }
}

// Decode: one query per head, the 8 heads of a group in one tile.
TEST(FlashAttentionTest, DecodeWithKeyLengths) {
  Case c = RandomCase(3, 16, 2, 1, 300, 64, 64, 55);
  c.key_lengths = {300, 1, 129};
  c.causal = true;
  ExpectMatches(c);
}

TEST(FlashAttentionTest, LargeLogits) {
  for (double sigma : {100.0, -100.0}) {
    Case c = RandomCase(1, 2, 1, 17, 150, 1, 16, 3);
    for (auto& x : c.q) x = static_cast<float>(x * sigma);
    for (auto& x : c.k) x = static_cast<float>(x * 100.0);
    const OracleResult o = Oracle(c);
    double max_score = 0.0;
    for (double m : o.score_mag) max_score = std::max(max_score, m);
    EXPECT_GT(max_score, 1e4);
    ExpectMatches(c);
    c.causal = true;
    ExpectMatches(c);
  }
  // 1e4 in every score across 3 key blocks: uniform weights, no overflow.
  Case c = RandomCase(1, 1, 1, 3, 150, 1, 2, 4);
  for (auto& x : c.q) x = 100.0;
  for (auto& x : c.k) x = 100.0;
  c.scale = 1.0;
  ForEachTarget([&](const std::string&) {
    const Result r = RunFlash(c);
    for (double l : r.lse) EXPECT_NEAR(l, 1e4 + std::log(150.0), 1e4 * kU32 * 4);
    for (size_t i = 0; i < r.out.size(); ++i) EXPECT_TRUE(std::isfinite(r.out[i]));
  });
}

TEST(FlashAttentionTest, FullyMaskedRowsAndEmptyShapes) {
  Case c = RandomCase(2, 1, 1, 4, 6, 3, 3, 5);
  c.key_lengths = {0, 6};
  c.bool_mask.assign(2 * 4 * 6, 1);
  for (int j = 0; j < 6; ++j) c.bool_mask[(1 * 4 + 2) * 6 + j] = 0;  // batch 1, row 2
  ForEachTarget([&](const std::string&) {
    const Result r = RunFlash(c);
    for (int64_t row : {0, 1, 2, 3, 6}) {
      EXPECT_EQ(r.lse[row], -kInf) << row;
      for (int d = 0; d < 3; ++d) EXPECT_EQ(r.out[row * 3 + d], 0.0) << row;
    }
  });
  ExpectMatches(c);
  Case e = RandomCase(1, 2, 1, 3, 0, 4, 5, 6);  // seq_kv = 0
  const Result r = RunFlash(e);
  for (double x : r.out) EXPECT_EQ(x, 0.0);
  for (double l : r.lse) EXPECT_EQ(l, -kInf);
  for (const Case& z : {RandomCase(0, 2, 1, 3, 4, 4, 4, 1), RandomCase(1, 2, 1, 0, 4, 4, 4, 1)})
    EXPECT_TRUE(RunFlash(z).out.empty());
  Case z = RandomCase(1, 1, 1, 2, 4, 0, 2, 8);  // head_dim 0: uniform weights
  ExpectMatches(z);
}

TEST(FlashAttentionTest, DtypesAndStrides) {
  Case c = RandomCase(2, 4, 2, 70, 130, 40, 24, 21);
  c.causal = true;
  Layout lay;
  lay.bshd = true;
  SCOPED_TRACE("bshd");
  ExpectMatches(c, lay);
  lay = {};
  lay.k_transposed = true;  // K converted through the strided path
  ExpectMatches(c, lay);
  lay = {};
  lay.in = DType::kFloat64;
  ExpectMatches(c, lay);
  Case h = c;
  RoundToHalf(h);
  lay.in = DType::kFloat16;
  ExpectMatches(h, lay);
  lay.bshd = true;
  ExpectMatches(h, lay);
  // float16 / float64 outputs are the float32 results rounded once.
  const Result f32 = RunFlash(c);
  Layout o16, o64;
  o16.out = DType::kFloat16, o64.out = DType::kFloat64;
  const Result r16 = RunFlash(c, o16), r64 = RunFlash(c, o64);
  for (size_t i = 0; i < f32.out.size(); ++i) {
    ASSERT_EQ(r16.out[i], HalfToFloat(FloatToHalf(float(f32.out[i])))) << i;
    ASSERT_EQ(r64.out[i], f32.out[i]) << i;
  }
  EXPECT_EQ(r64.lse, f32.lse);
}

// A NaN reaches exactly the rows that attend it; masked inf/NaN never leak.
TEST(FlashAttentionTest, NanStaysInTheRowsItTouches) {
  const int64_t nq = 70, nk = 140, d = 4;
  auto row_has_nan = [&](const Result& r, int64_t i) {
    bool any = false;
    for (int64_t x = 0; x < d; ++x) any |= std::isnan(r.out[i * d + x]);
    return any;
  };
  ForEachTarget([&](const std::string&) {
    {  // NaN in query row 2: only row 2.
      Case c = RandomCase(1, 1, 1, nq, nk, d, d, 11);
      c.q[2 * d + 1] = std::nan("");
      const Result r = RunFlash(c);
      for (int64_t i = 0; i < nq; ++i) EXPECT_EQ(row_has_nan(r, i), i == 2) << i;
      EXPECT_TRUE(std::isnan(r.lse[2]));
    }
    for (bool in_value : {false, true})
      for (int64_t key : {3, 100}) {  // NaN in key/value `key`, causal top-left: rows >= key.
        Case c = RandomCase(1, 1, 1, nq, nk, d, d, 12);
        (in_value ? c.v : c.k)[key * d] = std::nan("");
        c.causal = true;
        c.top_left = true;
        const Result r = RunFlash(c);
        for (int64_t i = 0; i < nq; ++i) EXPECT_EQ(row_has_nan(r, i), i >= key) << i << in_value;
        Case clean = c;
        (in_value ? clean.v : clean.k)[key * d] = 0.0;
        const OracleResult o = Oracle(clean);
        for (int64_t i = 0; i < std::min(key, nq) * d; ++i) EXPECT_NEAR(r.out[i], o.out[i], 1e-5);
      }
    {  // Inf in values that the additive mask removes with -inf: no NaN.
      Case c = RandomCase(1, 1, 1, 2, 3, d, d, 13);
      c.v[1 * d] = kInf;
      c.add_mask = {0.5, -kInf, 0.0, -kInf, -kInf, 1.0};
      const Result r = RunFlash(c);
      for (double x : r.out) EXPECT_TRUE(std::isfinite(x));
      ExpectMatches(c);
    }
    {  // NaN in the additive mask: only that row.
      Case c = RandomCase(1, 1, 1, 2, 3, d, d, 14);
      c.add_mask = {0.0, std::nan(""), 0.0, 0.0, 0.0, 0.0};
      const Result r = RunFlash(c);
      EXPECT_TRUE(row_has_nan(r, 0));
      EXPECT_FALSE(row_has_nan(r, 1));
    }
  });
}

// Results never depend on the thread count (one thread owns each row).
TEST(FlashAttentionTest, BitwiseIdenticalForAnyThreadCount) {
  Case c = RandomCase(2, 4, 2, 150, 131, 40, 24, 99);
  c.causal = true;
  std::mt19937_64 rng(3);
  Case m = c;
  ApplyMask(m, 8, rng);
  for (const Case& x : {c, m}) {
    const Result one = RunFlash(x);
    for (int threads : {2, 3, 8}) {
      Layout lay;
      lay.threads = threads;
      const Result r = RunFlash(x, lay);
      EXPECT_EQ(std::memcmp(r.out.data(), one.out.data(), one.out.size() * sizeof(double)), 0)
          << threads;
      EXPECT_EQ(std::memcmp(r.lse.data(), one.lse.data(), one.lse.size() * sizeof(double)), 0)
          << threads;
    }
  }
}

// The softmax's 2^t for t <= 0 against std::exp2 in double: within 2 ULP
// of float32 where 2^t is normal (t >= -126), at most 2^-126 absolute below
// (the flush the kernel's error analysis allows), and exact at the edges.
TEST(FlashAttentionTest, Exp2WithinTwoUlp) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> wide(-150.0f, 0.0f), narrow(-1.0f, 0.0f);
  std::vector<float> in;
  for (int i = 0; i < 1'000'000; ++i) in.push_back(wide(rng));
  for (int i = 0; i < 1'000'000; ++i) in.push_back(narrow(rng));
  for (int n = 0; n <= 150; ++n)  // integers and their neighbours (rounding ties)
    for (float x : {-float(n), -n - 0.5f, -n + 0.5f, std::nextafter(-n - 0.5f, 0.0f),
                    std::nextafter(-n - 0.5f, -1e9f)})
      if (x <= 0.0f) in.push_back(x);
  for (float x : {-1e-30f, -1e-45f, -0.0f, 0.0f, -126.0f, -126.5f, -127.0f, -149.0f, -1e30f})
    in.push_back(x);
  std::vector<float> out(in.size());
  ForEachTarget([&](const std::string&) {
    internal::FlashExp2ForTest(in.data(), static_cast<int64_t>(in.size()), out.data());
    int64_t bad = 0;
    double worst = 0.0;
    for (size_t i = 0; i < in.size(); ++i) {
      const double want = std::exp2(double{in[i]});
      const double err = std::fabs(out[i] - want);
      // float32 ULP of want (want > 0 wherever the ULP bound applies).
      const double ulp = want > 0.0 ? std::ldexp(1.0, std::ilogb(want) - 23) : 0.0;
      const double bound = in[i] >= -126.0f ? 2.0 * ulp : std::ldexp(1.0, -126);
      if (!(err <= bound)) {
        if (bad++ < 5) ADD_FAILURE() << "2^" << in[i] << " got " << out[i] << " want " << want;
      }
      if (in[i] >= -126.0f) worst = std::max(worst, err / ulp);
    }
    EXPECT_EQ(bad, 0);
    EXPECT_LE(worst, 2.0);
    const float edges[] = {0.0f, -0.0f, -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN()};
    float res[4];
    internal::FlashExp2ForTest(edges, 4, res);
    EXPECT_EQ(res[0], 1.0f);
    EXPECT_EQ(res[1], 1.0f);
    EXPECT_EQ(res[2], 0.0f);
    EXPECT_FALSE(std::signbit(res[2]));  // +0: the safe P.V tells skipped pairs by -0
    EXPECT_TRUE(std::isnan(res[3]));
  });
}

TEST(FlashAttentionTest, ScratchIsFixedSize) {
  internal::Problem pr;
  pr.batch = 1, pr.num_q_heads = 8, pr.num_kv_heads = 8, pr.head_dim = 128, pr.head_dim_v = 128;
  pr.threads = 2;
  pr.seq_q = pr.seq_kv = 16;
  const int64_t small = internal::FlashScratchBytes(pr);
  pr.seq_q = pr.seq_kv = 1 << 20;
  EXPECT_EQ(internal::FlashScratchBytes(pr), small);
  // O(Br Bc + (Br + Bc) head_dim) floats per thread: well under 1 MiB here.
  EXPECT_LT(small, 2 * (1 << 20));
}

}  // namespace
}  // namespace qkv::test
