// qkv::AttentionBackward through the public API against the independent
// float64 gradient oracle (backward_test_util.h): the reference kernel in
// float64 (a 2^-53 bound) and float32, and the flash kernel, on awkward
// sizes, every mask rule alone and combined, GQA/MQA, float16/float64 and
// bshd/strided memory, large logits, empty rows and sequences, NaN rules;
// dmask in every broadcast shape; a central-difference check of dq, dk, dv
// and dmask; recomputed forward; thread and layout invariance; and every
// validation error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "backward_test_util.h"
#include "qkv/attention_backward.h"
#include "qkv/error.h"
#include "test_util.h"

namespace qkv::test {
namespace {

const double kInf = std::numeric_limits<double>::infinity();

// The flash backward's bound: 2u (derived in backward_test_util.h).
constexpr double kFlashU = kFlashBackwardU;

struct KernelConfig {
  const char* name;
  Kernel kernel;
  Accumulate accumulate;
  double u;  // the bound's unit roundoff
};

const KernelConfig kConfigs[] = {
    {"reference_float64", Kernel::kReference, Accumulate::kFloat64, kU64},
    {"reference_float32", Kernel::kReference, Accumulate::kFloat32, kU32},
    {"flash", Kernel::kFlash, Accumulate::kFloat32, kFlashU},
};

std::string Name(const Case& c) {
  return "seq_q " + std::to_string(c.seq_q) + " seq_kv " + std::to_string(c.seq_kv) +
         " head_dim " + std::to_string(c.head_dim) + "/" + std::to_string(c.head_dim_v) +
         " heads " + std::to_string(c.num_q_heads) + "/" + std::to_string(c.num_kv_heads) +
         (c.causal ? (c.top_left ? " causal top-left" : " causal") : "");
}

void PrintTo(const KernelConfig& c, std::ostream* os) { *os << c.name; }

bool SameBits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

// Every test below runs for the three kernel configurations.
class BackwardKernelTest : public ::testing::TestWithParam<KernelConfig> {
 protected:
  BackwardOptions Opts() const {
    BackwardOptions o = Options(GetParam().kernel, GetParam().accumulate);
    o.threads = 2;
    return o;
  }
  // The forward of the same family, for bitwise comparisons with recomputation.
  Kernel ForwardFamily() const {
    return GetParam().kernel == Kernel::kFlash ? Kernel::kFlash : Kernel::kReference;
  }
  // Runs `c` and checks every gradient against the oracle's bound.
  BackwardResult ExpectMatches(const Case& c, BackwardOptions o, uint64_t seed) {
    const std::vector<double> dout = RandomDout(c, seed, o.in == DType::kFloat16);
    const BackwardResult r = RunBackward(c, dout, o);
    EXPECT_EQ(r.info.kernel, GetParam().kernel);
    EXPECT_TRUE(MatchesBackwardOracle(c, dout, r, GetParam().u, o.grad, o.mask_shape));
    EXPECT_TRUE(r.gaps_untouched) << "written between the elements of a strided output";
    return r;
  }
  BackwardResult ExpectMatches(const Case& c, uint64_t seed) { return ExpectMatches(c, Opts(), seed); }
};

// The awkward sizes with seq_q > seq_kv and seq_q < seq_kv: every pair of
// 1, 7, 97, 129, and 1025 against each of them (head dims cycling), with no
// mask, causal and causal top-left.
TEST_P(BackwardKernelTest, AwkwardSizes) {
  const int64_t small[] = {1, 7, 97, 129};
  const int64_t dims[] = {1, 3, 59, 80, 128, 256};
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (int64_t a : small)
    for (int64_t b : small) shapes.push_back({a, b});
  for (int64_t a : small) shapes.push_back({a, 1025}), shapes.push_back({1025, a});
  shapes.push_back({1025, 1025});
  uint64_t seed = 1;
  for (const auto& [nq, nk] : shapes) {
    // Keep the float64 oracle cheap at the largest sizes.
    const bool big = nq * nk > 100'000;
    const int64_t d = big ? 3 : dims[seed % 6], dv = big ? 5 : dims[(seed + 3) % 6];
    Case c = RandomCase(1, big ? 1 : 2, 1, nq, nk, d, dv, seed);
    for (int mode = 0; mode < 3; ++mode) {
      c.causal = mode > 0, c.top_left = mode == 2;
      SCOPED_TRACE(Name(c));
      ExpectMatches(c, seed * 3 + mode);
    }
    ++seed;
  }
}

TEST_P(BackwardKernelTest, HeadDimsBothCrossShapes) {
  for (int64_t d : {1, 3, 59, 80, 128, 256}) {
    Case a = RandomCase(1, 2, 2, 97, 129, d, d, 10 + d);
    SCOPED_TRACE(Name(a));
    ExpectMatches(a, 1);
    Case b = RandomCase(1, 2, 1, 129, 97, d, 7, 20 + d);  // head_dim_v != head_dim
    b.causal = true;
    SCOPED_TRACE(Name(b));
    ExpectMatches(b, 2);
  }
}

// Every rule of ApplyMaskKind alone (0..9; 9 is causal + key lengths +
// additive + window), on cross shapes both ways.
TEST_P(BackwardKernelTest, EveryMaskKind) {
  const int64_t shapes[][2] = {{7, 97}, {97, 7}, {129, 130}, {1, 1025}, {1025, 1}};
  std::mt19937_64 rng(7);
  uint64_t seed = 100;
  for (const auto& s : shapes)
    for (int kind = 0; kind <= 9; ++kind) {
      Case c = RandomCase(2, 2, 1, s[0], s[1], 19, 11, seed++);
      ApplyMaskKind(c, kind, rng, /*left_window=*/70);
      SCOPED_TRACE("mask kind " + std::to_string(kind) + " " + Name(c));
      ExpectMatches(c, seed);
    }
}

// Rules combined: each list applied in order (a boolean with an additive
// mask is given as one additive mask with -inf where the boolean is false).
TEST_P(BackwardKernelTest, CombinedMasks) {
  const std::vector<std::vector<int>> combos = {
      {2, 3, 7, 8}, {1, 5, 6, 7}, {4, 6, 8}, {1, 3, 6, 7, 8}, {2, 6, 8}};
  std::mt19937_64 rng(9);
  uint64_t seed = 200;
  for (const auto& s : std::vector<std::pair<int64_t, int64_t>>{{70, 129}, {129, 70}})
    for (const auto& combo : combos) {
      Case c = RandomCase(2, 2, 2, s.first, s.second, 16, 24, seed++);
      std::string name = "mask kinds";
      for (int kind : combo) ApplyMaskKind(c, kind, rng), name += " " + std::to_string(kind);
      SCOPED_TRACE(name + " " + Name(c));
      ExpectMatches(c, seed);
    }
}

// GQA with groups 2 and 3, MQA (group 6) and MHA: dk, dv sum the group.
TEST_P(BackwardKernelTest, GroupedAndMultiQuery) {
  for (int64_t kv_heads : {1, 2, 3, 6})
    for (int64_t nq : {1, 31, 70}) {
      Case c = RandomCase(2, 6, kv_heads, nq, 77, 24, 12, 40 + kv_heads + nq);
      for (int mode = 0; mode < 3; ++mode) {
        c.causal = mode > 0, c.top_left = mode == 2;
        SCOPED_TRACE("kv_heads " + std::to_string(kv_heads) + " " + Name(c));
        ExpectMatches(c, mode);
      }
    }
}

// float16 and float64 q, k, v, dout (and out, lse, gradients, mask), [b, s,
// h, d] memory, and every stride doubled (NaN between the input elements,
// and nothing written between the output elements).
TEST_P(BackwardKernelTest, DtypesAndStrides) {
  Case c = RandomCase(2, 4, 2, 70, 130, 40, 24, 21);
  c.causal = true;
  std::mt19937_64 rng(22);
  ApplyMaskKind(c, 8, rng);
  for (double& m : c.add_mask) m = HalfToFloat(FloatToHalf(float(m)));  // exact in float16
  BackwardOptions o = Opts();
  o.bshd = true;
  SCOPED_TRACE("bshd");
  ExpectMatches(c, o, 1);
  o.spread = true;
  SCOPED_TRACE("bshd, strides doubled");
  ExpectMatches(c, o, 5);
  o = Opts();
  o.spread = true, o.in = o.mask_dtype = DType::kFloat64;
  SCOPED_TRACE("float64 inputs and mask, strides doubled");
  ExpectMatches(c, o, 6);
  RoundCaseToHalf(c);
  o = Opts();
  o.in = DType::kFloat16;
  SCOPED_TRACE("float16 inputs");
  ExpectMatches(c, o, 2);
  o.bshd = true;
  ExpectMatches(c, o, 3);
  o.fwd = o.grad = o.mask_dtype = DType::kFloat16;  // the forward writes float16 out and lse
  SCOPED_TRACE("float16 out, lse, gradients and mask");
  ExpectMatches(c, o, 4);
  o.spread = true;
  ExpectMatches(c, o, 7);
}

// Scores near +-1e4 (big q and k, or a big scale): P is nearly one-hot; the
// bound grows with A = |score|, and nothing overflows.
TEST_P(BackwardKernelTest, LargeLogits) {
  for (double sigma : {100.0, -100.0}) {
    Case c = RandomCase(1, 2, 1, 17, 150, 1, 16, 3);
    for (auto& x : c.q) x = static_cast<float>(x * sigma);
    for (auto& x : c.k) x = static_cast<float>(x * 100.0);
    double max_score = 0.0;
    for (double m : Oracle(c).score_mag) max_score = std::max(max_score, m);
    EXPECT_GT(max_score, 1e4);
    const BackwardResult r = ExpectMatches(c, 5);
    for (const auto* g : {&r.dq, &r.dk, &r.dv})
      for (double x : *g) ASSERT_TRUE(std::isfinite(x));
    c.causal = true;
    ExpectMatches(c, 6);
  }
  Case c = RandomCase(1, 2, 2, 33, 70, 16, 8, 4);
  c.scale = 2500.0;  // |q.k| ~ 4: scores ~ 1e4
  ExpectMatches(c, 7);
  c.scale = -2500.0;
  ExpectMatches(c, 8);
}

// A row with no allowed key: dq exactly 0 (over the sentinel) and it adds
// nothing to dk, dv: with NaN in its q and dout, every other gradient keeps
// its bits.
TEST_P(BackwardKernelTest, FullyMaskedRowsAddNothing) {
  Case c = RandomCase(2, 2, 1, 6, 9, 5, 4, 5);
  c.key_lengths = {0, 9};  // batch 0: every row empty
  c.bool_mask.assign(2 * 2 * 6 * 9, 1);
  c.add_mask.assign(2 * 2 * 6 * 9, 0.25);
  const int64_t empty_b1[] = {(1 * 2 + 0) * 6 + 2, (1 * 2 + 1) * 6 + 4};  // rows of batch 1
  for (int j = 0; j < 9; ++j) c.bool_mask[empty_b1[0] * 9 + j] = 0, c.add_mask[empty_b1[1] * 9 + j] = -kInf;
  std::vector<int64_t> empty_rows = {empty_b1[0], empty_b1[1]};
  for (int64_t row = 0; row < 12; ++row) empty_rows.push_back(row);
  const std::vector<double> dout = RandomDout(c, 9);
  const BackwardResult r = RunBackward(c, dout, Opts());
  EXPECT_TRUE(MatchesBackwardOracle(c, dout, r, GetParam().u, Opts().grad));
  for (int64_t row : empty_rows)
    for (int d = 0; d < 5; ++d) EXPECT_EQ(r.dq[row * 5 + d], 0.0) << row;
  for (int64_t e = 0; e < 9 * 5; ++e) EXPECT_EQ(r.dk[e], 0.0) << "batch 0 key " << e / 5;
  for (int64_t e = 0; e < 9 * 4; ++e) EXPECT_EQ(r.dv[e], 0.0) << "batch 0 key " << e / 4;
  Case poisoned = c;
  std::vector<double> dout_p = dout;
  for (int64_t row : empty_rows) {
    for (int d = 0; d < 5; ++d) poisoned.q[row * 5 + d] = std::nan("");
    for (int d = 0; d < 4; ++d) dout_p[row * 4 + d] = std::nan("");
  }
  const BackwardResult p = RunBackward(poisoned, dout_p, Opts());
  EXPECT_TRUE(SameBits(p.dq, r.dq));
  EXPECT_TRUE(SameBits(p.dk, r.dk));
  EXPECT_TRUE(SameBits(p.dv, r.dv));
}

// NaN in a q, k or v row reaches exactly what depends on it
// (ExpectNanPattern, backward_test_util.h), with structural skipping (window
// j in [i - 3, i], top-left; row and key 64 straddle the tiles) and with
// explicit-mask skipping (a boolean and an additive -inf mask hide the NaN
// from most rows); GQA with 2 q heads per KV head.
TEST_P(BackwardKernelTest, NanStaysWhereItBelongs) {
  Case window = RandomCase(1, 2, 1, 70, 140, 4, 4, 11);
  window.causal = window.top_left = true;
  window.window_left = 3;
  Case masked = RandomCase(2, 4, 2, 70, 100, 8, 5, 12);
  std::mt19937_64 rng(13);
  ApplyMaskKind(masked, 7, rng);
  ApplyMaskKind(masked, 8, rng);
  for (const Case* c : {&window, &masked}) {
    SCOPED_TRACE(Name(*c));
    EXPECT_GT(ExpectNanPattern(*c, 'q', 64, Opts(), GetParam().u), 0);
    EXPECT_GT(ExpectNanPattern(*c, 'q', c->seq_q + 65, Opts(), GetParam().u), 0);  // head 1
    for (char which : {'k', 'v'}) {
      EXPECT_GT(ExpectNanPattern(*c, which, 64, Opts(), GetParam().u), 0);
      // The last key of the last KV head: no row of the window case sees it.
      const int64_t reach =
          ExpectNanPattern(*c, which, c->batch * c->num_kv_heads * c->seq_kv - 3, Opts(), GetParam().u);
      EXPECT_EQ(reach == 0, c == &window);
    }
  }
}

// A given lse of -inf marks a row as empty, whatever its keys: dq = 0 and
// it adds nothing (dk, dv as with that row masked out).
TEST_P(BackwardKernelTest, MinusInfLseRowIsEmpty) {
  Case c = RandomCase(1, 2, 1, 70, 90, 8, 6, 14);
  c.bool_mask.assign(2 * 70 * 90, 1);
  Case masked = c;
  const int64_t row = 70 + 65;  // head 1, row 65
  for (int64_t j = 0; j < 90; ++j) masked.bool_mask[row * 90 + j] = 0;
  const std::vector<double> dout = RandomDout(c, 15);
  const BackwardResult want = RunBackward(masked, dout, Opts());
  BackwardSetup s(c, dout, Opts());
  const double minus_inf = -kInf;
  if (Opts().fwd == DType::kFloat64) {
    std::memcpy(s.lse_.data() + row * 8, &minus_inf, 8);
  } else {
    const float f = float(minus_inf);
    std::memcpy(s.lse_.data() + row * 4, &f, 4);
  }
  AttentionBackward(s.params);
  const BackwardResult r = s.Read();
  for (int d = 0; d < 8; ++d) EXPECT_EQ(r.dq[row * 8 + d], 0.0);
  BackwardResult check = r;
  check.out = want.out, check.lse = want.lse;  // the bound of the masked case
  EXPECT_TRUE(MatchesBackwardOracle(masked, dout, check, GetParam().u, Opts().grad));
}

// seq_kv = 0: dq is written as zeros; seq_q = 0: dk, dv zeros; head_dim 0.
TEST_P(BackwardKernelTest, EmptySequences) {
  for (bool give : {true, false}) {
    BackwardOptions o = Opts();
    o.give_out = o.give_lse = give;
    SCOPED_TRACE(give ? "out, lse given" : "recomputed");
    Case kv0 = RandomCase(2, 2, 1, 5, 0, 4, 3, 1);
    const BackwardResult a = RunBackward(kv0, RandomDout(kv0, 1), o);
    ASSERT_EQ(a.dq.size(), 2u * 2 * 5 * 4);
    for (double x : a.dq) EXPECT_EQ(x, 0.0);
    Case q0 = RandomCase(1, 2, 1, 0, 6, 4, 3, 2);
    q0.causal = true;
    const BackwardResult b = RunBackward(q0, RandomDout(q0, 2), o);
    ASSERT_EQ(b.dk.size(), 6u * 4);
    for (double x : b.dk) EXPECT_EQ(x, 0.0);
    for (double x : b.dv) EXPECT_EQ(x, 0.0);
  }
  Case z = RandomCase(1, 2, 1, 3, 5, 0, 2, 3);  // head_dim 0: uniform P
  ExpectMatches(z, 3);
}

// Without out and/or lse the forward is recomputed (the reason says so);
// against out, lse from the same kernel family the bits are the same.
TEST_P(BackwardKernelTest, RecomputedForwardIsBitwiseSame) {
  Case c = RandomCase(2, 4, 2, 70, 130, 24, 16, 31);
  std::mt19937_64 rng(3);
  ApplyMaskKind(c, 9, rng);
  BackwardOptions o = Opts();
  o.forward_kernel = ForwardFamily();
  const std::vector<double> dout = RandomDout(c, 4);
  const BackwardResult given = RunBackward(c, dout, o);
  EXPECT_EQ(given.info.reason.find("recomputed"), std::string::npos);
  for (int which = 0; which < 3; ++which) {
    o.give_out = which == 1, o.give_lse = which == 2;
    SCOPED_TRACE("given: " + std::string(which == 0 ? "neither" : which == 1 ? "out" : "lse"));
    const BackwardResult r = RunBackward(c, dout, o);
    EXPECT_NE(r.info.reason.find("forward recomputed"), std::string::npos) << r.info.reason;
    EXPECT_TRUE(SameBits(r.dq, given.dq));
    EXPECT_TRUE(SameBits(r.dk, given.dk));
    EXPECT_TRUE(SameBits(r.dv, given.dv));
  }
}

// The same bits for 1, 2, 3 and 8 threads, and for bhsd and bshd memory.
TEST_P(BackwardKernelTest, BitwiseAcrossThreadsAndLayouts) {
  Case c = RandomCase(2, 4, 2, 150, 131, 40, 24, 99);
  c.causal = true;
  Case m = RandomCase(1, 3, 1, 129, 200, 16, 8, 98);
  std::mt19937_64 rng(3);
  ApplyMaskKind(m, 8, rng);
  for (const Case* x : {&c, &m}) {
    const std::vector<double> dout = RandomDout(*x, 5);
    BackwardOptions o = Opts();
    o.threads = 1;
    const BackwardResult one = RunBackward(*x, dout, o);
    for (int threads : {2, 3, 8}) {
      o.threads = threads;
      const BackwardResult r = RunBackward(*x, dout, o);
      EXPECT_TRUE(SameBits(r.dq, one.dq) && SameBits(r.dk, one.dk) && SameBits(r.dv, one.dv))
          << threads << " threads " << Name(*x);
    }
    o.threads = 1, o.bshd = true;
    const BackwardResult r = RunBackward(*x, dout, o);
    EXPECT_TRUE(SameBits(r.dq, one.dq) && SameBits(r.dk, one.dk) && SameBits(r.dv, one.dv))
        << "bshd " << Name(*x);
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, BackwardKernelTest, ::testing::ValuesIn(kConfigs),
                         [](const ::testing::TestParamInfo<KernelConfig>& info) {
                           return std::string(info.param.name);
                         });

// dmask against the oracle's dS summed over each broadcast shape, in the
// reference kernel's two arithmetics, and through kernel auto (which picks
// the reference for dmask and says why); the mask given in its own shape or
// as BroadcastMask makes it (full shape, stride 0 on the broadcast dims);
// the same bits for 1 and 3 threads.
TEST(AttentionBackwardTest, DmaskMatchesOracle) {
  const int64_t B = 2, H = 4, NQ = 70, NK = 130;
  const Shape4 shapes[] = {{B, H, NQ, NK}, {1, 1, NQ, NK}, {B, 1, 1, NK}, {1, H, NQ, 1}, {B, H, 1, NK}};
  uint64_t seed = 50;
  for (const Shape4& shape : shapes) {
    Case c = RandomCase(B, H, 2, NQ, NK, 16, 8, seed++);
    c.causal = true;
    std::mt19937_64 rng(seed);
    BroadcastAddMask(c, shape, rng);
    const std::vector<double> dout = RandomDout(c, seed);
    SCOPED_TRACE("mask " + ShapeString(shape));
    for (const KernelConfig& cfg : {kConfigs[0], kConfigs[1],
                                    KernelConfig{"auto", Kernel::kAuto, Accumulate::kFloat32, kU32}})
      for (bool full_view : {false, true}) {
        BackwardOptions o = Options(cfg.kernel, cfg.accumulate);
        o.dmask = true, o.mask_shape = shape, o.mask_view_full = full_view;
        o.threads = 3;
        const BackwardResult r = RunBackward(c, dout, o);
        EXPECT_EQ(r.info.kernel, Kernel::kReference);
        if (cfg.kernel == Kernel::kAuto) {
          EXPECT_NE(r.info.reason.find("dmask"), std::string::npos);
        }
        EXPECT_TRUE(MatchesBackwardOracle(c, dout, r, cfg.u, o.grad, shape))
            << cfg.name << (full_view ? " full view" : " own shape");
        o.threads = 1;
        EXPECT_TRUE(SameBits(RunBackward(c, dout, o).dmask, r.dmask)) << cfg.name;
      }
  }
}

// Kernel auto: flash for float32 without dmask, the reference for float64.
TEST(AttentionBackwardTest, AutoPicksAndSaysWhy) {
  Case c = RandomCase(1, 2, 1, 9, 11, 4, 4, 1);
  const std::vector<double> dout = RandomDout(c, 1);
  const BackwardResult f32 = RunBackward(c, dout, Options(Kernel::kAuto));
  EXPECT_EQ(f32.info.kernel, Kernel::kFlash) << f32.info.reason;
  const BackwardResult f64 = RunBackward(c, dout, Options(Kernel::kAuto, Accumulate::kFloat64));
  EXPECT_EQ(f64.info.kernel, Kernel::kReference);
  EXPECT_NE(f64.info.reason.find("float64"), std::string::npos) << f64.info.reason;
  EXPECT_TRUE(MatchesBackwardOracle(c, dout, f64, kU64, DType::kFloat64));
}

// Flops: 2.5 times the forward's 2 (head_dim + head_dim_v) per allowed pair
// and head, the pairs counted here from the rules' definitions.
TEST(AttentionBackwardTest, FlopsCountAllowedPairs) {
  MaskSpec m;
  m.causal = true, m.window_left = 5;
  const std::vector<int64_t> lengths = {40, 7};
  m.key_lengths = lengths;
  int64_t pairs = 0;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t i = 0; i < 30; ++i)
      for (int64_t j = 0; j < 40; ++j)
        pairs += j <= i + 10 && j >= i + 10 - 5 && j < lengths[b];
  EXPECT_EQ(BackwardFlops(m, 2, 3, 30, 40, 16, 8), 2.5 * 2 * (16 + 8) * 3 * double(pairs));
}

// Central differences of L = sum(dout * out) in float64 (qkv::Attention,
// float64 reference) against the float64 reference backward, for dq, dk, dv
// and dmask (a full additive mask, then [1, 1, Nq, Nk] and [B, 1, 1, Nk]).
// Bound: with F(h) = (L(x + h) - L(x - h)) / 2h, F(h) = g + c h^2 + O(h^4) +
// r_h, |r_h| <= e_L / h, e_L the error of one L (the forward's bound from
// test_util.h on each out, weighted by |dout|, plus the sum's (n + 1) u).
// Richardson: F(h) - F(2h) = -3 c h^2 + r_h - r_2h, so |c h^2| <=
// (|F(h) - F(2h)| + 1.5 e_L / h) / 3 and |F(h) - g| <= |F(h) - F(2h)| / 3 +
// 1.5 e_L / h; we take |F(h) - F(2h)| (three times the estimate, for the
// h^4 terms) + 1.5 e_L / h + the backward's own float64 bound.
// h = 2^-16: x +- h and x +- 2h are exact in double for float32-valued x.
TEST(AttentionBackwardTest, CentralDifferences) {
  const double h = std::ldexp(1.0, -16);
  const Shape4 shapes[] = {{2, 2, 5, 7}, {1, 1, 5, 7}, {2, 1, 1, 7}};
  for (int t = 0; t < 3; ++t) {
    Case c = RandomCase(2, 2, 1, 5, 7, 3, 4, 60 + t);
    c.causal = t != 1;
    c.top_left = t == 2;
    if (t == 0) c.key_lengths = {7, 4};
    std::mt19937_64 rng(70 + t);
    BroadcastAddMask(c, shapes[t], rng);
    const std::vector<double> dout = RandomDout(c, 80 + t);
    BackwardOptions o = Options(Kernel::kReference, Accumulate::kFloat64);
    o.in = o.mask_dtype = DType::kFloat64, o.dmask = true, o.mask_shape = shapes[t];
    const BackwardResult g = RunBackward(c, dout, o);
    const ErrorModel em = ModelFor(kU64, DType::kFloat64, g.out, g.lse);
    const BackwardOracleResult bo = BackwardOracle(c, dout, &em);
    const std::vector<double> dmask_bound = DmaskBound(c, bo, shapes[t], em);
    // e_L from the forward's bound (test_util.h) and the sum over out.
    const OracleResult fo = Oracle(c);
    double e_l = 0.0, l_abs = 0.0;
    for (int64_t row = 0; row < 2 * 2 * 5; ++row)
      for (int64_t d = 0; d < 4; ++d) {
        const double f = Bound{kU64}.RowFactor(fo.score_mag[row], 3, 7);
        e_l += std::fabs(dout[row * 4 + d]) * (f * fo.abs_v[row * 4 + d] + 1e-300);
        l_abs += std::fabs(dout[row * 4 + d] * fo.out[row * 4 + d]);
      }
    e_l += (2 * 2 * 5 * 4 + 1) * kU64 * l_abs;
    auto loss = [&](const Case& x) {
      BackwardSetup s(x, dout, o);
      const std::vector<double> out = s.Read().out;
      double l = 0.0;
      for (size_t e = 0; e < out.size(); ++e) l += dout[e] * out[e];
      return l;
    };
    // F at step `step` for the element(s) `touch` edits.
    auto diff = [&](const std::function<void(Case&, double)>& touch, double step) {
      Case plus = c, minus = c;
      touch(plus, step), touch(minus, -step);
      return (loss(plus) - loss(minus)) / (2 * step);
    };
    auto check = [&](const char* what, const std::vector<double>& got, const std::vector<double>& lib_bound,
                     const std::function<void(Case&, int64_t, double)>& touch) {
      std::vector<double> want(got.size()), bound(got.size());
      double max_bound = 0.0, max_g = 0.0;
      for (size_t e = 0; e < got.size(); ++e) {
        auto t1 = [&](Case& x, double s) { touch(x, int64_t(e), s); };
        const double f1 = diff(t1, h), f2 = diff(t1, 2 * h);
        want[e] = f1;
        bound[e] = std::fabs(f1 - f2) + 1.5 * e_l / h + lib_bound[e];
        max_bound = std::max(max_bound, bound[e]), max_g = std::max(max_g, std::fabs(f1));
      }
      EXPECT_TRUE(WithinBound(what, got, want, bound));
      // The check can fail: its bound is far below the gradients.
      EXPECT_LT(max_bound, 1e-6 * max_g) << what;
    };
    SCOPED_TRACE("mask " + ShapeString(shapes[t]));
    if (t == 0) {
      check("dq", g.dq, bo.dq_bound, [](Case& x, int64_t e, double s) { x.q[e] += s; });
      check("dk", g.dk, bo.dk_bound, [](Case& x, int64_t e, double s) { x.k[e] += s; });
      check("dv", g.dv, bo.dv_bound, [](Case& x, int64_t e, double s) { x.v[e] += s; });
    }
    // A mask element moves every full element it broadcasts to; a -inf one
    // has gradient exactly 0 (it is no score at all).
    const Shape4& ms = shapes[t];
    auto touch_mask = [&](Case& x, int64_t e, double s) {
      const int64_t j = e % ms[3], i = e / ms[3] % ms[2], hh = e / (ms[3] * ms[2]) % ms[1],
                    b = e / (ms[3] * ms[2] * ms[1]);
      for (int64_t fb = 0; fb < 2; ++fb)
        for (int64_t fh = 0; fh < 2; ++fh)
          for (int64_t fi = 0; fi < 5; ++fi)
            for (int64_t fj = 0; fj < 7; ++fj)
              if ((ms[0] == 1 || fb == b) && (ms[1] == 1 || fh == hh) && (ms[2] == 1 || fi == i) &&
                  (ms[3] == 1 || fj == j)) {
                double& v = x.add_mask[((fb * 2 + fh) * 5 + fi) * 7 + fj];
                if (v != -kInf) v += s;
              }
    };
    check("dmask", g.dmask, dmask_bound, touch_mask);
    int64_t neg_inf = 0;
    for (int64_t e = 0; e < int64_t(g.dmask.size()); ++e) {
      const int64_t j = e % ms[3], i = e / ms[3] % ms[2], hh = e / (ms[3] * ms[2]) % ms[1],
                    b = e / (ms[3] * ms[2] * ms[1]);
      if (c.add_mask[((b * 2 + hh) * 5 + i) * 7 + j] != -kInf) continue;
      ++neg_inf;
      EXPECT_EQ(g.dmask[e], 0.0) << e;
    }
    EXPECT_GT(neg_inf, 0);
  }
}

// Every argument error: one line naming the argument, thrown before anything
// is written (dq, dk, dv, dmask keep the sentinel).
TEST(AttentionBackwardTest, ValidationErrorsWriteNothing) {
  Case c = RandomCase(2, 4, 2, 6, 9, 5, 3, 1);
  std::mt19937_64 rng(1);
  BroadcastAddMask(c, {2, 4, 6, 9}, rng);
  const std::vector<double> dout = RandomDout(c, 1);
  BackwardOptions o = Options(Kernel::kAuto);
  o.dmask = true;
  BackwardSetup s(c, dout, o);
  const std::vector<uint8_t> bool_mask(2 * 4 * 6 * 9, 1);
  const std::vector<float> plane(6 * 9, 0.5f);  // a [seq_q, seq_kv] mask
  const int64_t plane_shape[] = {6, 9};
  const TensorView broadcast =
      BroadcastMask(plane.data(), DType::kFloat32, plane_shape, {2, 4, 6, 9});
  const TensorView bool_view = TensorView::Contiguous(bool_mask.data(), DType::kBool, {2, 4, 6, 9});
  using Edit = std::function<void(AttentionBackwardParams&)>;
  auto reshape = [](auto& view, int dim, int64_t delta) {
    view.shape[dim] += delta;
    view.strides = {view.shape[1] * view.shape[2] * view.shape[3], view.shape[2] * view.shape[3],
                    view.shape[3], 1};
  };
  const std::vector<std::pair<std::string, Edit>> errors = {
      {"dout:", [&](auto& p) { reshape(p.dout, 3, 1); }},
      {"dout:", [&](auto& p) { p.dout.data = nullptr; }},
      {"dout:", [&](auto& p) { p.dout.dtype = DType::kInt32; }},
      {"dq:", [&](auto& p) { reshape(p.dq, 2, -1); }},
      {"dq:", [&](auto& p) { reshape(p.dq, 1, 1); }},
      {"dq:", [&](auto& p) { p.dq.data = nullptr; }},
      {"dq:", [&](auto& p) { p.dq.dtype = DType::kBool; }},
      {"dq:", [&](auto& p) { p.dq.strides[2] = 0; }},
      {"dk:", [&](auto& p) { reshape(p.dk, 3, 1); }},
      {"dk:", [&](auto& p) { reshape(p.dk, 1, 2); }},
      {"dv:", [&](auto& p) { reshape(p.dv, 3, -1); }},
      {"dv:", [&](auto& p) { reshape(p.dv, 2, 1); }},
      {"dmask:", [&](auto& p) { p.mask.mask = bool_view; }},
      {"dmask:", [&](auto& p) { p.mask.mask = TensorView{}; }},
      {"dmask:", [&](auto& p) { reshape(p.dmask, 0, -1); }},
      {"dmask:", [&](auto& p) { p.dmask.strides[3] = 0; }},
      {"dmask:", [&](auto& p) { p.dmask.dtype = DType::kInt64; }},
      // dmask has the mask's own shape, 1 on its stride-0 dims: [1, 1, 6, 9].
      {"dmask:", [&](auto& p) { p.mask.mask = broadcast; }},
      {"kernel flash:", [&](auto& p) { p.kernel = Kernel::kFlash; }},  // with dmask
      {"kernel flash:", [&](auto& p) {
         p.kernel = Kernel::kFlash, p.dmask = MutableTensorView{}, p.accumulate = Accumulate::kFloat64;
       }},
      {"lse:", [&](auto& p) { reshape(p.lse, 3, 1); }},
      {"lse:", [&](auto& p) { reshape(p.lse, 2, -1); }},
      {"lse:", [&](auto& p) { p.lse.dtype = DType::kInt8; }},
      {"out:", [&](auto& p) { reshape(p.out, 3, 1); }},
      {"out:", [&](auto& p) { reshape(p.out, 0, -1); }},
      {"num_threads:", [&](auto& p) { p.num_threads = -1; }},
      {"num_threads:", [&](auto& p) { p.num_threads = -7; }},
      {"window:", [&](auto& p) { p.mask.window_left = -2; }},
      {"k:", [&](auto& p) { reshape(p.k, 3, 1); }},
      {"scale:", [&](auto& p) { p.scale = std::nan(""); }},
  };
  const std::vector<unsigned char> dq0 = s.dq_, dk0 = s.dk_, dv0 = s.dv_, dm0 = s.dmask_;
  for (const auto& [prefix, edit] : errors) {
    AttentionBackwardParams p = s.params;
    edit(p);
    try {
      AttentionBackward(p);
      ADD_FAILURE() << "no error; expected " << prefix;
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.rfind(prefix, 0), 0u) << "expected " << prefix << " got: " << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    }
    EXPECT_TRUE(s.dq_ == dq0 && s.dk_ == dk0 && s.dv_ == dv0 && s.dmask_ == dm0)
        << prefix << ": written before the error";
  }
  for (unsigned char x : dq0) ASSERT_EQ(x, BackwardSetup::kSentinel);
  {  // ... and with that shape it is accepted.
    AttentionBackwardParams p = s.params;
    p.mask.mask = broadcast;
    std::vector<float> dm(6 * 9, -7.0f);
    p.dmask = MutableTensorView::Contiguous(dm.data(), DType::kFloat32, {1, 1, 6, 9});
    EXPECT_NO_THROW(AttentionBackward(p));
    EXPECT_NE(dm[0], -7.0f);
    s.Refill();
  }
  // The unedited params are valid (so each error above comes from its edit).
  EXPECT_NO_THROW(AttentionBackward(s.params));
  EXPECT_NE(s.dq_, dq0);
}

}  // namespace
}  // namespace qkv::test
