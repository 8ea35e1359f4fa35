// Logit soft-capping (issue 17, part 3; MaskSpec::softcap, Gemma 2):
// s = C tanh(scale q.k / C) + mask, in the flash and reference kernels,
// forward and backward.
//  - Forward against the float64 oracle of test_util.h (which caps from the
//    definition), every mask kind, GQA, Nq != Nk, caps that bite (large
//    logits, C = 5) and caps that barely do (C = 50).
//  - Backward: dq, dk, dv (dS times 1 - tanh^2) against the float64
//    backward oracle; dmask (the gradient at the capped score, since the
//    mask is added after the cap) from the reference kernel; a central
//    difference of the float64 forward for one element of q.
//  - Bitwise identical for any thread count; a bad cap is a one-line error.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backward_test_util.h"
#include "qkv/attention.h"
#include "qkv/error.h"
#include "test_util.h"

namespace qkv::test {
namespace {

using ::testing::HasSubstr;

struct Size {
  int64_t batch, heads, kv_heads, seq_q, seq_kv, dim, dim_v;
};
const Size kSizes[] = {{1, 2, 1, 7, 7, 3, 3}, {2, 4, 2, 97, 129, 59, 80}, {1, 2, 2, 129, 97, 80, 16},
                       {1, 1, 1, 1, 1025, 64, 64}, {1, 4, 4, 200, 200, 256, 32}};

TEST(SoftcapTest, ForwardKernelsMatchTheFloat64Oracle) {
  std::mt19937_64 rng(4);
  for (const Size& z : kSizes) {
    for (const double cap : {5.0, 50.0}) {
      for (const int kind : {0, 1, 3, 7, 8, 9}) {
        if (kind >= 8 && z.batch * z.heads * z.seq_q < 2) continue;
        Case c = RandomCase(z.batch, z.heads, z.kv_heads, z.seq_q, z.seq_kv, z.dim, z.dim_v, 51 + kind);
        for (double& x : c.q) x *= 8.0;  // scores of tens: the cap bites
        ApplyMaskKind(c, kind, rng);
        c.softcap = cap;
        SCOPED_TRACE("seq " + std::to_string(z.seq_q) + "x" + std::to_string(z.seq_kv) + " cap " +
                     std::to_string(cap) + " kind " + std::to_string(kind));
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
  // The cap is real: without it the same case gives other weights.
  Case c = RandomCase(1, 1, 1, 16, 16, 8, 8, 1);
  for (double& x : c.q) x *= 8.0;
  Case capped = c;
  capped.softcap = 5.0;
  const Result a = RunQkv(c, Accumulate::kFloat32, 1, false, DType::kFloat32, Kernel::kFlash);
  const Result b = RunQkv(capped, Accumulate::kFloat32, 1, false, DType::kFloat32, Kernel::kFlash);
  EXPECT_NE(a.out, b.out);
}

TEST(SoftcapTest, BackwardMatchesTheFloat64Oracle) {
  std::mt19937_64 rng(8);
  for (const Size& z : kSizes) {
    if (z.seq_q * z.seq_kv > 200000) continue;
    for (const int kind : {0, 1, 8}) {
      if (kind >= 8 && z.batch * z.heads * z.seq_q < 2) continue;
      Case c = RandomCase(z.batch, z.heads, z.kv_heads, z.seq_q, z.seq_kv, z.dim, z.dim_v, 61 + kind);
      for (double& x : c.q) x *= 6.0;
      ApplyMaskKind(c, kind, rng);
      c.softcap = 10.0;
      const std::vector<double> dout = RandomDout(c, 2);
      SCOPED_TRACE("seq " + std::to_string(z.seq_q) + "x" + std::to_string(z.seq_kv) + " kind " +
                   std::to_string(kind));
      for (const Kernel kernel : {Kernel::kFlash, Kernel::kReference}) {
        BackwardOptions opt = Options(kernel);
        opt.threads = 2;
        const BackwardResult r = RunBackward(c, dout, opt);
        EXPECT_TRUE(MatchesBackwardOracle(c, dout, r, kernel == Kernel::kFlash ? kFlashBackwardU : kU32))
            << KernelName(kernel);
      }
      if (kind == 8) {  // dmask: the gradient at the capped score
        BackwardOptions opt = Options(Kernel::kReference);
        opt.dmask = true;
        const BackwardResult r = RunBackward(c, dout, opt);
        EXPECT_TRUE(MatchesBackwardOracle(c, dout, r, kU32)) << "dmask";
      }
    }
  }
  // A central difference of L = sum dout . out in float64 for q[0][0].
  Case c = RandomCase(1, 1, 1, 5, 6, 3, 2, 9);
  for (double& x : c.q) x *= 6.0;
  c.softcap = 4.0;
  const std::vector<double> dout = RandomDout(c, 1);
  const auto loss = [&](const Case& x) {
    const Result r = RunQkv(x, Accumulate::kFloat64, 1, false, DType::kFloat64, Kernel::kReference);
    double l = 0.0;
    for (size_t e = 0; e < r.out.size(); ++e) l += dout[e] * r.out[e];
    return l;
  };
  const BackwardResult r = RunBackward(c, dout, Options(Kernel::kReference, Accumulate::kFloat64));
  const double eps = std::ldexp(1.0, -14);  // float32 inputs: the step keeps q exact
  Case up = c, down = c;
  up.q[0] += eps, down.q[0] -= eps;
  const double fd = (loss(up) - loss(down)) / (2 * eps);
  EXPECT_NEAR(r.dq[0], fd, 1e-6 * (1 + std::fabs(fd)));
}

TEST(SoftcapTest, ThreadCountNeverChangesABitAndBadCapsAreErrors) {
  Case c = RandomCase(1, 4, 2, 150, 170, 32, 32, 5);
  for (double& x : c.q) x *= 6.0;
  c.causal = true;
  c.softcap = 8.0;
  const std::vector<double> dout = RandomDout(c, 3);
  const Result f1 = RunQkv(c, Accumulate::kFloat32, 1, false, DType::kFloat32, Kernel::kFlash);
  BackwardOptions opt = Options(Kernel::kFlash);
  opt.threads = 1;
  const BackwardResult b1 = RunBackward(c, dout, opt);
  for (const int threads : {2, 3}) {
    EXPECT_EQ(RunQkv(c, Accumulate::kFloat32, threads, false, DType::kFloat32, Kernel::kFlash).out, f1.out);
    opt.threads = threads;
    const BackwardResult b = RunBackward(c, dout, opt);
    EXPECT_EQ(b.dq, b1.dq);
    EXPECT_EQ(b.dk, b1.dk);
  }
  for (const double bad : {-1.0, std::numeric_limits<double>::infinity(), std::nan("")}) {
    Case x = c;
    x.softcap = bad;
    try {
      RunQkv(x);
      ADD_FAILURE() << bad;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("softcap: "));
      EXPECT_THAT(e.what(), HasSubstr("(expected a finite cap > 0, or 0 for none)"));
    }
  }
}

}  // namespace
}  // namespace qkv::test
