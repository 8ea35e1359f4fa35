// The reference kernel against the independent float64 oracle (test_util.h)
// on awkward sizes, every mask rule and combination, GQA/MQA, large logits,
// fully masked rows and NaN inputs; plus properties that need no oracle.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "test_util.h"

namespace qkv::test {
namespace {

constexpr int64_t kSizes[] = {1, 7, 97, 129, 1025};
constexpr int64_t kHeadDims[] = {1, 3, 59, 80, 256};
const double kInf = std::numeric_limits<double>::infinity();

// The reference in both arithmetics, and (on the same cases) the flash kernel,
// whose online rescaling adds a few roundings per key block: its bound uses
// 2u (derived in flash_attention_test.cc).
void ExpectMatches(const Case& c) {
  const OracleResult o = Oracle(c);
  const Result r32 = RunQkv(c, Accumulate::kFloat32, 0, true, DType::kFloat32, Kernel::kReference);
  EXPECT_TRUE(MatchesOracle(c, r32, o, kU32)) << "float32 accumulate";
  const Result r64 =
      RunQkv(c, Accumulate::kFloat64, 0, true, DType::kFloat64, Kernel::kReference);
  EXPECT_TRUE(MatchesOracle(c, r64, o, kU64)) << "float64 accumulate";
  const Result flash = RunQkv(c, Accumulate::kFloat32, 0, false, DType::kFloat32, Kernel::kFlash);
  EXPECT_TRUE(MatchesOracle(c, flash, o, 2 * kU32)) << "flash kernel";
}

// Every (seq_q, seq_kv) pair of the awkward sizes, head dims cycling, with and
// without causal masking, in both alignments.
TEST(ReferenceAttentionTest, AwkwardSizesAgainstOracle) {
  uint64_t seed = 1;
  for (size_t a = 0; a < 5; ++a)
    for (size_t b = 0; b < 5; ++b) {
      const int64_t nq = kSizes[a], nk = kSizes[b];
      const int64_t d = kHeadDims[(a + b) % 5];
      // Keep the float64 oracle cheap at the largest sizes.
      const int64_t heads = nq * nk * d > 50'000'000 ? 1 : 2;
      Case c = RandomCase(1, heads, 1, nq, nk, d, kHeadDims[(a + 2 * b) % 5], seed++);
      SCOPED_TRACE("seq_q " + std::to_string(nq) + " seq_kv " + std::to_string(nk) +
                   " head_dim " + std::to_string(d));
      ExpectMatches(c);
      c.causal = true;
      ExpectMatches(c);
      c.top_left = true;
      ExpectMatches(c);
    }
}

// Each head dim on a cross shape both ways.
TEST(ReferenceAttentionTest, HeadDimsBothCrossShapes) {
  for (int64_t d : kHeadDims) {
    SCOPED_TRACE("head_dim " + std::to_string(d));
    ExpectMatches(RandomCase(2, 2, 2, 97, 129, d, d, 10 + d));
    ExpectMatches(RandomCase(1, 2, 1, 129, 97, d, 7, 20 + d));
  }
}

void ApplyMask(Case& c, int kind, std::mt19937_64& rng) { ApplyMaskKind(c, kind, rng); }

TEST(ReferenceAttentionTest, EveryMaskKindAndCombination) {
  const int64_t shapes[][2] = {{7, 97}, {97, 7}, {129, 129}, {1, 1025}, {1025, 1}, {1, 1}};
  std::mt19937_64 rng(7);
  uint64_t seed = 100;
  for (const auto& s : shapes)
    for (int kind = 0; kind <= 9; ++kind) {
      Case c = RandomCase(3, 2, 1, s[0], s[1], 59, 80, seed++);
      ApplyMask(c, kind, rng);
      SCOPED_TRACE("mask kind " + std::to_string(kind) + " seq_q " + std::to_string(s[0]) +
                   " seq_kv " + std::to_string(s[1]));
      ExpectMatches(c);
    }
}

// Pairs of rules composed, including causal with a window in both alignments.
TEST(ReferenceAttentionTest, MaskPairsCompose) {
  std::mt19937_64 rng(9);
  uint64_t seed = 500;
  for (int a = 1; a <= 8; ++a)
    for (int b = a + 1; b <= 8; ++b) {
      Case c = RandomCase(2, 2, 2, 33, 47, 16, 16, seed++);
      ApplyMask(c, a, rng);
      ApplyMask(c, b, rng);
      SCOPED_TRACE("mask kinds " + std::to_string(a) + " + " + std::to_string(b));
      ExpectMatches(c);
    }
}

TEST(ReferenceAttentionTest, GroupedAndMultiQuery) {
  for (int64_t kv_heads : {1, 2, 3, 6}) {
    SCOPED_TRACE("kv_heads " + std::to_string(kv_heads));
    Case c = RandomCase(2, 6, kv_heads, 31, 45, 24, 12, 40 + kv_heads);
    ExpectMatches(c);
    c.causal = true;
    ExpectMatches(c);
  }
}

// GQA equals MHA with each KV head repeated group_size times (STYLE.md 6, B).
TEST(ReferenceAttentionTest, GqaEqualsRepeatedKv) {
  Case g = RandomCase(1, 4, 2, 9, 13, 8, 8, 77);
  Case m = g;
  m.num_kv_heads = 4;
  m.k.clear(), m.v.clear();
  for (int64_t h = 0; h < 4; ++h) {
    const int64_t kv = h / 2;
    m.k.insert(m.k.end(), g.k.begin() + kv * 13 * 8, g.k.begin() + (kv + 1) * 13 * 8);
    m.v.insert(m.v.end(), g.v.begin() + kv * 13 * 8, g.v.begin() + (kv + 1) * 13 * 8);
  }
  EXPECT_EQ(RunQkv(g).out, RunQkv(m).out);  // same arithmetic, bitwise
}

// Scores near +-1e4: the max subtraction keeps exp in range; float32's
// absolute score error grows with the logits, which the bound accounts for.
TEST(ReferenceAttentionTest, LargeLogits) {
  for (double sigma : {100.0, -100.0}) {
    Case c = RandomCase(1, 2, 1, 17, 33, 1, 16, 3);
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
  // 1e4 exactly in every score: uniform weights, no overflow, no NaN.
  Case c = RandomCase(1, 1, 1, 3, 5, 1, 2, 4);
  for (auto& x : c.q) x = 100.0;
  for (auto& x : c.k) x = 100.0;
  c.scale = 1.0;
  const Result r = RunQkv(c);
  for (double w : r.weights) EXPECT_EQ(w, 0.2f);  // exp(0) / 5 in float32
  for (double l : r.lse) EXPECT_NEAR(l, 1e4 + std::log(5.0), 1e4 * kU32 * 4);
}

TEST(ReferenceAttentionTest, FullyMaskedRowsGiveZerosNotNan) {
  Case c = RandomCase(2, 1, 1, 4, 6, 3, 3, 5);
  c.key_lengths = {0, 6};
  c.bool_mask.assign(2 * 4 * 6, 1);
  for (int j = 0; j < 6; ++j) c.bool_mask[(1 * 4 + 2) * 6 + j] = 0;  // batch 1, row 2
  const Result r = RunQkv(c);
  for (int64_t row : {0, 1, 2, 3, 6}) {
    EXPECT_EQ(r.lse[row], -kInf) << row;
    for (int d = 0; d < 3; ++d) EXPECT_EQ(r.out[row * 3 + d], 0.0) << row;
    for (int j = 0; j < 6; ++j) EXPECT_EQ(r.weights[row * 6 + j], 0.0) << row;
  }
  for (int64_t row : {4, 5, 7}) EXPECT_TRUE(std::isfinite(r.lse[row])) << row;
  ExpectMatches(c);
}

TEST(ReferenceAttentionTest, EmptyShapes) {
  // seq_kv = 0: every row fully masked.
  Case c = RandomCase(1, 2, 1, 3, 0, 4, 5, 6);
  const Result r = RunQkv(c);
  for (double x : r.out) EXPECT_EQ(x, 0.0);
  for (double l : r.lse) EXPECT_EQ(l, -kInf);
  // Empty batch, heads or queries: nothing to write, no error.
  for (const Case& e : {RandomCase(0, 2, 1, 3, 4, 4, 4, 1), RandomCase(1, 0, 0, 3, 4, 4, 4, 1),
                        RandomCase(1, 2, 1, 0, 4, 4, 4, 1)}) {
    EXPECT_TRUE(RunQkv(e).out.empty());
  }
  // head_dim = 0: all scores 0, uniform weights.
  Case z = RandomCase(1, 1, 1, 2, 4, 0, 2, 8);
  for (double w : RunQkv(z).weights) EXPECT_EQ(w, 0.25);
}

// A NaN reaches exactly the rows that attend it (STYLE.md / brief).
TEST(ReferenceAttentionTest, NanStaysInTheRowsItTouches) {
  const int64_t nq = 6, nk = 6, d = 4;
  auto row_has_nan = [&](const Result& r, int64_t i) {
    bool any = false;
    for (int64_t x = 0; x < d; ++x) any |= std::isnan(r.out[i * d + x]);
    return any;
  };
  {  // NaN in query row 2: only row 2.
    Case c = RandomCase(1, 1, 1, nq, nk, d, d, 11);
    c.q[2 * d + 1] = std::nan("");
    const Result r = RunQkv(c);
    for (int64_t i = 0; i < nq; ++i) EXPECT_EQ(row_has_nan(r, i), i == 2) << i;
    EXPECT_TRUE(std::isnan(r.lse[2]));
  }
  for (bool in_value : {false, true}) {  // NaN in key/value 3, causal: rows >= 3.
    Case c = RandomCase(1, 1, 1, nq, nk, d, d, 12);
    (in_value ? c.v : c.k)[3 * d] = std::nan("");
    c.causal = true;
    const Result r = RunQkv(c);
    for (int64_t i = 0; i < nq; ++i) EXPECT_EQ(row_has_nan(r, i), i >= 3) << i << in_value;
    const OracleResult o = Oracle(c);
    for (int64_t i = 0; i < 3 * d; ++i) EXPECT_NEAR(r.out[i], o.out[i], 1e-5);
  }
  {  // Inf in a value that the additive mask removes with -inf: no NaN.
    Case c = RandomCase(1, 1, 1, 2, 3, d, d, 13);
    c.v[1 * d] = kInf;
    c.add_mask = {0.5, -kInf, 0.0, -kInf, -kInf, 1.0};
    const Result r = RunQkv(c);
    for (double x : r.out) EXPECT_TRUE(std::isfinite(x));
  }
  {  // NaN in the additive mask: only that row.
    Case c = RandomCase(1, 1, 1, 2, 3, d, d, 14);
    c.add_mask = {0.0, std::nan(""), 0.0, 0.0, 0.0, 0.0};
    const Result r = RunQkv(c);
    EXPECT_TRUE(row_has_nan(r, 0));
    EXPECT_FALSE(row_has_nan(r, 1));
  }
}

// Oracle B: properties that need no reference.
TEST(ReferenceAttentionTest, WeightRowsSumToOneAndCausalZeros) {
  for (bool top_left : {false, true})
    for (auto [nq, nk] : {std::pair<int64_t, int64_t>{9, 20}, {20, 9}, {33, 33}}) {
      Case c = RandomCase(1, 2, 2, nq, nk, 16, 16, 60 + nq);
      c.causal = true;
      c.top_left = top_left;
      const Result r = RunQkv(c);
      const int64_t diag = top_left ? 0 : nk - nq;
      for (int64_t row = 0; row < 2 * nq; ++row) {
        const int64_t i = row % nq;
        double sum = 0.0;
        for (int64_t j = 0; j < nk; ++j) {
          const double w = r.weights[row * nk + j];
          if (j > i + diag) {
            EXPECT_EQ(w, 0.0) << "above the diagonal: row " << i << " key " << j;
          }
          sum += w;
        }
        // w_j = p_j / l with l a float32 nk-term sum of the same p_j: the sum is 1 within (nk + 4) u.
        if (i + diag >= 0) {
          EXPECT_NEAR(sum, 1.0, (nk + 4) * kU32) << row;
        }
      }
    }
}

// Results never depend on the thread count (one thread owns each row).
TEST(ReferenceAttentionTest, BitwiseIdenticalForAnyThreadCount) {
  Case c = RandomCase(2, 4, 2, 150, 131, 40, 24, 99);
  c.causal = true;
  const Result one = RunQkv(c, Accumulate::kFloat32, 1, true, DType::kFloat32, Kernel::kReference);
  for (int threads : {2, 3, 8}) {
    const Result r = RunQkv(c, Accumulate::kFloat32, threads, true, DType::kFloat32, Kernel::kReference);
    EXPECT_EQ(r.out, one.out) << threads;
    EXPECT_EQ(r.lse, one.lse) << threads;
    EXPECT_EQ(r.weights, one.weights) << threads;
  }
}

}  // namespace
}  // namespace qkv::test
