// Learned attention sinks (issue 17, part 3; MaskSpec::sink_logits, gpt-oss):
// one virtual key of value 0 and score sink[h] per head joins every row's
// softmax denominator.
//  - Flash, reference f32 and f64 forward against the float64 oracle of
//    test_util.h (which adds exp(sink) to each row's sum from the
//    definition), with every mask kind, GQA, seq_q != seq_kv, a head
//    without a sink (-inf), sinks far above and below the scores, and
//    fully masked rows (out 0, lse = sink).
//  - Backward: dq, dk, dv against the float64 backward oracle; dsink against
//    the oracle's -sum p_sink (dout . out) within a bound built from the
//    kernel's own out / lse errors, and against central finite differences
//    of the float64 forward.
//  - Bitwise identical for any thread count; bad sinks are one-line errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backward_test_util.h"
#include "qkv/attention.h"
#include "qkv/attention_backward.h"
#include "qkv/error.h"
#include "test_util.h"

namespace qkv::test {
namespace {

using ::testing::HasSubstr;
constexpr double kInf = std::numeric_limits<double>::infinity();

// Sinks per head: a mix of ordinary, large, small and absent ones.
std::vector<double> Sinks(int64_t heads, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 2.0);
  std::vector<double> s(static_cast<size_t>(heads));
  for (auto& x : s) x = static_cast<float>(normal(rng));
  if (heads > 1) s[1] = -kInf;   // no sink on head 1
  if (heads > 2) s[2] = 40.0;    // takes almost all the mass
  if (heads > 3) s[3] = -40.0;   // takes almost none
  return s;
}

struct Size {
  int64_t batch, heads, kv_heads, seq_q, seq_kv, dim, dim_v;
};
const Size kSizes[] = {{1, 4, 2, 7, 7, 3, 3},     {2, 4, 4, 97, 129, 59, 80}, {1, 8, 2, 129, 1, 16, 16},
                       {1, 4, 1, 1, 1025, 80, 59}, {2, 4, 2, 200, 150, 64, 32}};

TEST(SinkLogitsTest, ForwardKernelsMatchTheFloat64Oracle) {
  std::mt19937_64 rng(17);
  for (const Size& z : kSizes) {
    for (const int kind : {0, 1, 2, 3, 6, 7, 8, 9}) {
      if (kind >= 8 && z.batch * z.heads * z.seq_q < 2) continue;
      Case c = RandomCase(z.batch, z.heads, z.kv_heads, z.seq_q, z.seq_kv, z.dim, z.dim_v, 31 + kind);
      ApplyMaskKind(c, kind, rng);
      c.sink_logits = Sinks(z.heads, rng);
      SCOPED_TRACE("seq " + std::to_string(z.seq_q) + "x" + std::to_string(z.seq_kv) + " kind " +
                   std::to_string(kind));
      const OracleResult o = Oracle(c);
      EXPECT_TRUE(MatchesOracle(c, RunQkv(c, Accumulate::kFloat32, 2, false, DType::kFloat32, Kernel::kFlash),
                                o, kU32));
      EXPECT_TRUE(MatchesOracle(c, RunQkv(c, Accumulate::kFloat32, 2, true, DType::kFloat32,
                                          Kernel::kReference),
                                o, kU32));
      EXPECT_TRUE(MatchesOracle(c, RunQkv(c, Accumulate::kFloat64, 2, true, DType::kFloat64), o, kU64));
    }
  }
}

TEST(SinkLogitsTest, FullyMaskedRowsGiveZerosAndTheSinkAsLse) {
  Case c = RandomCase(1, 2, 1, 5, 6, 4, 4, 3);
  c.key_lengths = {0};  // no key at all
  c.sink_logits = {0.75, -kInf};
  const Result r = RunQkv(c, Accumulate::kFloat32, 1, false, DType::kFloat32, Kernel::kFlash);
  for (double x : r.out) EXPECT_EQ(x, 0.0);
  for (int64_t i = 0; i < 5; ++i) {
    EXPECT_EQ(r.lse[i], 0.75);
    EXPECT_EQ(r.lse[5 + i], -kInf);
  }
}

TEST(SinkLogitsTest, BackwardMatchesTheOracleAndFiniteDifferences) {
  std::mt19937_64 rng(23);
  for (const Size& z : kSizes) {
    if (z.seq_q * z.seq_kv > 200000) continue;
    for (const int kind : {0, 1, 7}) {
      Case c = RandomCase(z.batch, z.heads, z.kv_heads, z.seq_q, z.seq_kv, z.dim, z.dim_v, 41 + kind);
      ApplyMaskKind(c, kind, rng);
      c.sink_logits = Sinks(z.heads, rng);
      const std::vector<double> dout = RandomDout(c, 9);
      SCOPED_TRACE("seq " + std::to_string(z.seq_q) + "x" + std::to_string(z.seq_kv) + " kind " +
                   std::to_string(kind));
      const BackwardOracleResult exact = BackwardOracle(c, dout, nullptr);
      for (const Kernel kernel : {Kernel::kFlash, Kernel::kReference}) {
        BackwardOptions opt = Options(kernel);
        opt.threads = 2;
        const BackwardResult r = RunBackward(c, dout, opt);
        EXPECT_TRUE(MatchesBackwardOracle(c, dout, r, kernel == Kernel::kFlash ? kFlashBackwardU : kU32))
            << KernelName(kernel);
        // dsink[h] = -sum_i p_i D_i is computed in double from the kernel's
        // out and lse: its error is first order in theirs,
        //   |d dsink| <= sum_i p_i (|D_i| (|d lse_i| + 4u) + sum_d |dout_d| |d out_d|).
        ASSERT_EQ(r.dsink.size(), static_cast<size_t>(c.num_q_heads));
        for (int64_t h = 0; h < c.num_q_heads; ++h) {
          double bound = 1e-30;
          for (int64_t b = 0; b < c.batch; ++b)
            for (int64_t i = 0; i < c.seq_q; ++i) {
              const int64_t row = (b * c.num_q_heads + h) * c.seq_q + i;
              if (c.sink_logits[h] == -kInf || exact.lse[row] == -kInf) continue;
              const double p = std::exp(c.sink_logits[h] - exact.lse[row]);
              double d = 0.0, err = 0.0;
              for (int64_t n = 0; n < c.head_dim_v; ++n) {
                const int64_t e = row * c.head_dim_v + n;
                d += dout[e] * exact.out[e];
                err += std::fabs(dout[e]) * (std::fabs(r.out[e] - exact.out[e]) + 4 * kU32 * std::fabs(exact.out[e]));
              }
              bound += 1.01 * p * (std::fabs(d) * (std::fabs(r.lse[row] - exact.lse[row]) + 4 * kU32) + err);
            }
          bound += kU32 * std::fabs(exact.dsink[h]);  // stored as float
          EXPECT_NEAR(r.dsink[h], exact.dsink[h], bound) << KernelName(kernel) << " head " << h;
        }
      }
    }
  }
  // Central differences of L = sum dout . out in float64 (reference kernel).
  Case c = RandomCase(1, 3, 1, 9, 11, 5, 4, 8);
  c.sink_logits = {0.3, -1.2, 2.0};
  c.causal = true;
  const std::vector<double> dout = RandomDout(c, 4);
  const auto loss = [&](const Case& x) {
    const Result r = RunQkv(x, Accumulate::kFloat64, 1, false, DType::kFloat64, Kernel::kReference);
    double l = 0.0;
    for (size_t e = 0; e < r.out.size(); ++e) l += dout[e] * r.out[e];
    return l;
  };
  BackwardOptions opt = Options(Kernel::kReference, Accumulate::kFloat64);
  const BackwardResult r = RunBackward(c, dout, opt);
  for (int h = 0; h < 3; ++h) {
    // Sinks are float32 in the API: steps of 2^-10 keep them exact.
    const double eps = std::ldexp(1.0, -10);
    Case up = c, down = c;
    up.sink_logits[h] += eps, down.sink_logits[h] -= eps;
    const double fd = (loss(up) - loss(down)) / (2 * eps);
    // Truncation error eps^2 |L'''| / 6 with |L'''| <= 6 max|dout.v| here.
    EXPECT_NEAR(r.dsink[h], fd, 1e-5 * (1 + std::fabs(fd))) << "head " << h;
  }
}

TEST(SinkLogitsTest, ThreadCountNeverChangesABit) {
  std::mt19937_64 rng(2);
  Case c = RandomCase(2, 4, 2, 150, 170, 32, 32, 6);
  c.causal = true;
  c.sink_logits = Sinks(4, rng);
  const std::vector<double> dout = RandomDout(c, 3);
  const Result f1 = RunQkv(c, Accumulate::kFloat32, 1, false, DType::kFloat32, Kernel::kFlash);
  BackwardOptions opt = Options(Kernel::kFlash);
  opt.threads = 1;
  const BackwardResult b1 = RunBackward(c, dout, opt);
  for (const int threads : {2, 3}) {
    const Result f = RunQkv(c, Accumulate::kFloat32, threads, false, DType::kFloat32, Kernel::kFlash);
    EXPECT_EQ(f.out, f1.out);
    EXPECT_EQ(f.lse, f1.lse);
    opt.threads = threads;
    const BackwardResult b = RunBackward(c, dout, opt);
    EXPECT_EQ(b.dq, b1.dq);
    EXPECT_EQ(b.dk, b1.dk);
    EXPECT_EQ(b.dsink, b1.dsink);
  }
}

TEST(SinkLogitsTest, BadSinksAreOneLineErrors) {
  std::vector<float> q(2 * 10 * 4, 0.5f), out(q.size(), 7.0f), dq(q.size()), dk(q.size()),
      dv(q.size());
  AttentionParams p;
  p.q = TensorView::Contiguous(q.data(), DType::kFloat32, {1, 2, 10, 4});
  p.k = p.v = p.q;
  p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, {1, 2, 10, 4});
  const auto expect_error = [&](std::vector<float> sinks, const std::string& words) {
    p.mask.sink_logits = sinks;
    try {
      Attention(p);
      ADD_FAILURE() << words;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(words));
    }
    for (const float x : out) ASSERT_EQ(x, 7.0f);
  };
  expect_error({0.0f}, "sink_logits: 1 values (expected one per query head, num_q_heads = 2)");
  expect_error({0.0f, std::nanf("")}, "sink_logits[1]: nan (expected a finite logit, or -inf");
  expect_error({std::numeric_limits<float>::infinity(), 0.0f}, "sink_logits[0]: inf");
  AttentionBackwardParams b;
  b.q = b.k = b.v = b.dout = p.q;
  b.dq = MutableTensorView::Contiguous(dq.data(), DType::kFloat32, {1, 2, 10, 4});
  b.dk = MutableTensorView::Contiguous(dk.data(), DType::kFloat32, {1, 2, 10, 4});
  b.dv = MutableTensorView::Contiguous(dv.data(), DType::kFloat32, {1, 2, 10, 4});
  std::vector<float> ds(2);
  b.dsink_logits = ds;
  EXPECT_THROW(AttentionBackward(b), Error);  // no sinks to differentiate
  const std::vector<float> sinks{0.0f, 1.0f};
  b.mask.sink_logits = sinks;
  std::vector<float> ds3(3);
  b.dsink_logits = ds3;
  EXPECT_THROW(AttentionBackward(b), Error);  // one per head
}

}  // namespace
}  // namespace qkv::test
