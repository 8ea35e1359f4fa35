// Tests of qkv/classic_attention.h: each score on a tiny example against
// float64 values computed independently, weights summing to 1, masks, the
// all-masked and empty steps, stability with large scores, argument checks.
#include "qkv/classic_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "qkv/error.h"
#include "test_util.h"

namespace qkv {
namespace {

using test::kU32;
using test::kU64;

// The tiny example: 3 encoder states of width 2, a decoder state of width 3
// (width 2 for dot), attn_dim 4; every input is a multiple of 1/4 (exact).
const std::vector<float> kEncoder = {1.0f, 0.5f, -0.5f, 2.0f, 0.25f, -1.0f};  // [3, 2]
const std::vector<float> kState3 = {0.5f, -1.0f, 0.25f};
const std::vector<float> kState2 = {0.5f, -1.0f};
const std::vector<float> kW1 = {0.5f,  -0.25f, 1.0f, 0.75f, 0.5f, -0.5f,  // [4, 3]
                                -1.0f, 0.25f,  0.5f, 0.25f, 1.0f, 0.75f};
const std::vector<float> kW2 = {1.0f, -0.5f, 0.25f, 0.75f, -0.75f, 0.5f, 0.5f, 0.25f};  // [4, 2]
const std::vector<float> kVBahdanau = {1.5f, -0.75f, 0.5f, 1.0f};
const std::vector<float> kWGeneral = {1.0f, -0.5f, 0.25f, 0.75f, -1.5f, 0.5f};  // [3, 2]
const std::vector<float> kWConcat = {0.5f,   -0.25f, 1.0f,   0.75f, -0.5f,      // [4, 3 + 2]
                                     0.25f,  0.5f,   -0.75f, 1.0f,  0.25f, -1.0f, 0.75f, 0.5f,
                                     -0.25f, 0.5f,   0.5f,   1.0f,  0.25f, 0.5f,  -1.0f};
const std::vector<float> kVConcat = {1.0f, -0.5f, 0.75f, -1.25f};

// Expected values, computed once in float64 by a short independent Python
// script (math.tanh / math.exp, no library code), printed with repr():
//   mv = lambda W, x: [sum(a * b for a, b in zip(r, x)) for r in W]
//   bahdanau e_j = dot(v, [tanh(x + y) for x, y in zip(mv(W1, s), mv(W2, h_j))])
//   dot      e_j = dot(s2, h_j)       general e_j = dot(s, mv(W, h_j))
//   concat   e_j = dot(v, [tanh(x) for x in mv(W, s + h_j)])   (s + h_j: list concat)
//   alpha = exp(e - max) / sum over unmasked; context_k = sum_j alpha_j h_j[k]
struct Expected {
  std::vector<double> scores, weights, context;
};
const Expected kBahdanau = {{0.6218850498558072, -1.6536948107126457, 0.8048556371033112},
                            {0.43411889617172794, 0.04460021101648098, 0.5212808928117911},
                            {0.5421390138664353, -0.2150210226929652}};
const Expected kDot = {{0.0, -2.25, 1.125},
                       {0.23891345561672744, 0.02518129295939846, 0.7359052514238741},
                       {0.41029912199299673, -0.5660859376967134}};
const Expected kGeneral = {{-0.5625, -1.6875, 0.84375},
                           {0.18500440154309944, 0.060062135433122124, 0.7549334630237785},
                           {0.343706699582483, -0.5423069913859846}};
const Expected kConcat = {{0.7318597947876017, 0.9433129471004436, -0.06672527474149181},
                          {0.3723788344212056, 0.46006365507024194, 0.16755751050855236},
                          {0.18423638451322275, 0.9387592168425344}};
// Bahdanau with mask [1, 0, 1] (the same script, position 1 left out).
const Expected kBahdanauMasked = {{0.6218850498558072, -INFINITY, 0.8048556371033112},
                                  {0.45438454265685063, 0.0, 0.5456154573431493},
                                  {0.5907884069926379, -0.31842318601472397}};

// The library and the script each evaluate in double: a score is a sum of
// at most 12 products, tanh and exp of terms below 8 in magnitude (|e| <=
// ||v||_1 = 3.75; the inputs are <= 2), so each is within 12 * 8 * 2 u64
// of the exact value, and softmax at most doubles that: 512 u64 covers both.
// The one float32 rounding at the end adds u |x|.
constexpr double kDoubleSlack = 512 * kU64;

struct Outputs {
  std::vector<float> context, weights, scores;
};

ClassicAttentionParams TinyParams(ClassicScore score) {
  ClassicAttentionParams p;
  p.score = score;
  p.seq_kv = 3;
  p.enc_dim = 2;
  p.dec_dim = score == ClassicScore::kDot ? 2 : 3;
  p.encoder = kEncoder;
  p.state = score == ClassicScore::kDot ? std::span<const float>(kState2) : kState3;
  if (score == ClassicScore::kBahdanau) p.attn_dim = 4, p.w1 = kW1, p.w2 = kW2, p.v = kVBahdanau;
  if (score == ClassicScore::kGeneral) p.w = kWGeneral;
  if (score == ClassicScore::kConcat) p.attn_dim = 4, p.w = kWConcat, p.v = kVConcat;
  return p;
}

Outputs RunStep(ClassicAttentionParams p) {
  // Sized from the dims (0 for a negative dim, which must then be rejected).
  const size_t enc_dim = std::max<int64_t>(p.enc_dim, 0), seq_kv = std::max<int64_t>(p.seq_kv, 0);
  Outputs o{std::vector<float>(enc_dim, -9.0f), std::vector<float>(seq_kv, -9.0f),
            std::vector<float>(seq_kv, -9.0f)};
  p.context = o.context;
  p.weights = o.weights;
  p.scores = o.scores;
  ClassicAttention(p);
  return o;
}

void ExpectNear(const char* what, const std::vector<float>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isinf(want[i])) {
      EXPECT_EQ(got[i], want[i]) << what << "[" << i << "]";
    } else {
      EXPECT_NEAR(got[i], want[i], kU32 * std::fabs(want[i]) + kDoubleSlack)
          << what << "[" << i << "]";
    }
  }
}

void CheckTiny(ClassicScore score, const Expected& want, std::span<const uint8_t> mask = {}) {
  SCOPED_TRACE(ClassicScoreName(score));
  ClassicAttentionParams p = TinyParams(score);
  p.mask = mask;
  const Outputs o = RunStep(p);
  ExpectNear("scores", o.scores, want.scores);
  ExpectNear("weights", o.weights, want.weights);
  ExpectNear("context", o.context, want.context);
}

TEST(ClassicAttentionTest, BahdanauMatchesFloat64) {
  CheckTiny(ClassicScore::kBahdanau, kBahdanau);
}
TEST(ClassicAttentionTest, DotMatchesFloat64) { CheckTiny(ClassicScore::kDot, kDot); }
TEST(ClassicAttentionTest, GeneralMatchesFloat64) { CheckTiny(ClassicScore::kGeneral, kGeneral); }
TEST(ClassicAttentionTest, ConcatMatchesFloat64) { CheckTiny(ClassicScore::kConcat, kConcat); }

TEST(ClassicAttentionTest, MaskExcludesPositions) {
  const std::vector<uint8_t> mask = {1, 0, 1};
  CheckTiny(ClassicScore::kBahdanau, kBahdanauMasked, mask);
  ClassicAttentionParams p = TinyParams(ClassicScore::kDot);
  p.mask = mask;
  EXPECT_EQ(RunStep(p).weights[1], 0.0f);  // exactly 0, not merely small
}

// Each float32 weight is within u of its double value (relative), and the
// double weights sum to 1 within seq_kv u64; summing the floats in double
// adds seq_kv u64 more.
TEST(ClassicAttentionTest, WeightsSumToOne) {
  const int64_t seq_kv = 37, enc_dim = 5, dec_dim = 7, attn_dim = 9;
  std::mt19937_64 rng(5);
  auto random = [&](int64_t n) {
    const std::vector<double> x = test::RandomValues(n, rng);
    return std::vector<float>(x.begin(), x.end());
  };
  const std::vector<float> encoder = random(seq_kv * enc_dim), state = random(dec_dim),
                           state_e = random(enc_dim), w1 = random(attn_dim * dec_dim),
                           w2 = random(attn_dim * enc_dim), v = random(attn_dim),
                           wg = random(dec_dim * enc_dim),
                           wc = random(attn_dim * (dec_dim + enc_dim));
  for (ClassicScore score : {ClassicScore::kBahdanau, ClassicScore::kDot, ClassicScore::kGeneral,
                             ClassicScore::kConcat}) {
    ClassicAttentionParams p;
    p.score = score;
    p.seq_kv = seq_kv, p.enc_dim = enc_dim;
    p.dec_dim = score == ClassicScore::kDot ? enc_dim : dec_dim;
    p.encoder = encoder;
    p.state = score == ClassicScore::kDot ? state_e : state;
    if (score == ClassicScore::kBahdanau) p.attn_dim = attn_dim, p.w1 = w1, p.w2 = w2, p.v = v;
    if (score == ClassicScore::kGeneral) p.w = wg;
    if (score == ClassicScore::kConcat) p.attn_dim = attn_dim, p.w = wc, p.v = v;
    const Outputs o = RunStep(p);
    double sum = 0.0;
    for (float w : o.weights) {
      EXPECT_GE(w, 0.0f);
      sum += w;
    }
    EXPECT_NEAR(sum, 1.0, kU32 + 2 * seq_kv * kU64) << ClassicScoreName(score);
  }
}

TEST(ClassicAttentionTest, AllMaskedOrEmptyGivesZeros) {
  const std::vector<uint8_t> none = {0, 0, 0};
  for (ClassicScore score : {ClassicScore::kBahdanau, ClassicScore::kDot}) {
    ClassicAttentionParams p = TinyParams(score);
    p.mask = none;
    const Outputs o = RunStep(p);
    EXPECT_EQ(o.context, std::vector<float>(2, 0.0f));
    EXPECT_EQ(o.weights, std::vector<float>(3, 0.0f));
    EXPECT_EQ(o.scores, std::vector<float>(3, -INFINITY));
  }
  ClassicAttentionParams p = TinyParams(ClassicScore::kDot);
  p.seq_kv = 0;
  p.encoder = {};
  const Outputs o = RunStep(p);
  EXPECT_EQ(o.context, std::vector<float>(2, 0.0f));
}

// A masked encoder row is never read into the context: a NaN there stays out.
TEST(ClassicAttentionTest, MaskedNaNRowDoesNotReachOutputs) {
  std::vector<float> encoder = kEncoder;
  encoder[2] = encoder[3] = NAN;
  const std::vector<uint8_t> mask = {1, 0, 1};
  ClassicAttentionParams p = TinyParams(ClassicScore::kBahdanau);
  p.encoder = encoder;
  p.mask = mask;
  const Outputs o = RunStep(p);
  ExpectNear("weights", o.weights, kBahdanauMasked.weights);
  ExpectNear("context", o.context, kBahdanauMasked.context);
}

// Scores 1000, 2000, 3000 would overflow exp unshifted; max-subtraction gives
// exp(-1000) = 0 in double and a one-hot weight.
TEST(ClassicAttentionTest, LargeScoresAreStable) {
  const std::vector<float> encoder = {1.0f, 2.0f, 3.0f}, state = {1000.0f};
  ClassicAttentionParams p;
  p.score = ClassicScore::kDot;
  p.seq_kv = 3, p.enc_dim = 1, p.dec_dim = 1;
  p.encoder = encoder;
  p.state = state;
  const Outputs o = RunStep(p);
  EXPECT_EQ(o.weights, (std::vector<float>{0.0f, 0.0f, 1.0f}));
  EXPECT_EQ(o.context, std::vector<float>{3.0f});
}

std::string ErrorOf(const ClassicAttentionParams& p) {
  try {
    RunStep(p);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ClassicAttentionTest, RejectsBadArguments) {
  ClassicAttentionParams p = TinyParams(ClassicScore::kDot);
  p.state = kState3, p.dec_dim = 3;
  EXPECT_NE(ErrorOf(p).find("state: dec_dim 3 but encoder enc_dim 2"), std::string::npos);
  p = TinyParams(ClassicScore::kGeneral);
  p.w = {};
  EXPECT_NE(ErrorOf(p).find("w: 0 elements (expected [dec_dim, enc_dim] = [3, 2] = 6)"),
            std::string::npos);
  p = TinyParams(ClassicScore::kDot);
  p.w = kWGeneral;
  EXPECT_NE(ErrorOf(p).find("w: given, but score dot does not use it"), std::string::npos);
  p = TinyParams(ClassicScore::kBahdanau);
  p.v = kVConcat;
  p.attn_dim = 3;
  EXPECT_NE(ErrorOf(p).find("w1: 12 elements (expected [attn_dim, dec_dim] = [3, 3] = 9)"),
            std::string::npos);
  p = TinyParams(ClassicScore::kConcat);
  const std::vector<uint8_t> short_mask = {1, 1};
  p.mask = short_mask;
  EXPECT_NE(ErrorOf(p).find("mask: 2 elements"), std::string::npos);
  p = TinyParams(ClassicScore::kDot);
  p.seq_kv = 4;
  EXPECT_NE(ErrorOf(p).find("encoder: 6 elements (expected [seq_kv, enc_dim] = [4, 2] = 8)"),
            std::string::npos);
  p = TinyParams(ClassicScore::kDot);
  p.seq_kv = -1;
  EXPECT_NE(ErrorOf(p).find("expected each >= 0"), std::string::npos);
}

}  // namespace
}  // namespace qkv
