// Tests of qkv/models/layers.h against float64 oracles, with error bounds
// derived for float32 arithmetic (u = 2^-24):
//   Linear: any summation order of k products plus the bias obeys
//     |y - y_exact| <= gamma_(k+1) * (sum_k |x w| + |b|), gamma_n = n u / (1 - n u)
//   AddLayerNorm: statistics in double; the float32 rounding of the residual
//     sum (one ulp) and of the result dominate.
#include "qkv/models/layers.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "test_util.h"

namespace qkv::models {
namespace {

using test::kU32;

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

struct LinearCase {
  int64_t rows, in, out;
  bool bias;
};

class LinearTest : public ::testing::TestWithParam<LinearCase> {};

TEST_P(LinearTest, MatchesFloat64WithinTheGammaBound) {
  const auto [rows, in, out, has_bias] = GetParam();
  const std::vector<float> x = Random(static_cast<size_t>(rows * in), 1);
  const std::vector<float> w = Random(static_cast<size_t>(out * in), 2, 0.5f);
  const std::vector<float> b = Random(static_cast<size_t>(out), 3, 2.0f);
  std::vector<float> y(static_cast<size_t>(rows * out), std::nanf(""));
  Linear(x.data(), rows, in, w.data(), has_bias ? b.data() : nullptr, out, y.data(), 2);
  const double n = static_cast<double>(in + 1), gamma = n * kU32 / (1 - n * kU32);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t o = 0; o < out; ++o) {
      double exact = has_bias ? b[o] : 0.0, magnitude = has_bias ? std::abs(b[o]) : 0.0;
      for (int64_t k = 0; k < in; ++k) {
        exact += static_cast<double>(x[m * in + k]) * w[o * in + k];
        magnitude += std::abs(static_cast<double>(x[m * in + k]) * w[o * in + k]);
      }
      ASSERT_NEAR(y[m * out + o], exact, gamma * magnitude + 1e-30)
          << "row " << m << " out " << o << " (rows " << rows << ", in " << in << ", out " << out
          << ")";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AwkwardSizes, LinearTest,
                         ::testing::Values(LinearCase{1, 1, 1, true}, LinearCase{7, 3, 5, false},
                                           LinearCase{129, 59, 97, true},
                                           LinearCase{300, 384, 1152, true},
                                           LinearCase{97, 1536, 384, true},
                                           LinearCase{1, 80, 256, false},
                                           LinearCase{257, 7, 3, true}, LinearCase{3, 0, 4, true}));

TEST(LinearTest, BitwiseIdenticalForAnyThreadCount) {
  const int64_t rows = 1025, in = 384, out = 1152;  // 5 row blocks of 256
  const std::vector<float> x = Random(static_cast<size_t>(rows * in), 4);
  const std::vector<float> w = Random(static_cast<size_t>(out * in), 5);
  const std::vector<float> b = Random(static_cast<size_t>(out), 6);
  std::vector<float> ref(static_cast<size_t>(rows * out));
  Linear(x.data(), rows, in, w.data(), b.data(), out, ref.data(), 1);
  for (int threads : {2, 3, 5}) {
    std::vector<float> y(ref.size());
    Linear(x.data(), rows, in, w.data(), b.data(), out, y.data(), threads);
    ASSERT_EQ(0, std::memcmp(y.data(), ref.data(), y.size() * sizeof(float)))
        << threads << " threads";
  }
}

TEST(LinearTest, NoInputsGivesTheBiasOrZero) {
  std::vector<float> y(6, std::nanf(""));
  const float b[3] = {1, 2, 3};
  Linear(nullptr, 2, 0, nullptr, b, 3, y.data(), 1);
  EXPECT_EQ(y, (std::vector<float>{1, 2, 3, 1, 2, 3}));
  Linear(nullptr, 2, 0, nullptr, nullptr, 3, y.data(), 1);
  EXPECT_EQ(y, std::vector<float>(6, 0.0f));
}

TEST(AddLayerNormTest, MatchesFloat64) {
  const int64_t rows = 9, features = 384;
  std::vector<float> x = Random(static_cast<size_t>(rows * features), 7, 3.0f);
  const std::vector<float> res = Random(x.size(), 8, 3.0f);
  const std::vector<float> g = Random(static_cast<size_t>(features), 9);
  const std::vector<float> b = Random(static_cast<size_t>(features), 10);
  x[5] = 1e4f;  // one large value, as real activations have
  const std::vector<float> x0 = x;
  AddLayerNorm(x.data(), res.data(), rows, features, g.data(), b.data(), 1e-12f, 2);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> s(static_cast<size_t>(features));
    double mean = 0, var = 0;
    for (int64_t f = 0; f < features; ++f) {
      // The sum is rounded to float32 first, as the layer (and torch) stores it.
      s[f] = static_cast<float>(x0[r * features + f] + res[r * features + f]);
      mean += s[f] / features;
    }
    for (int64_t f = 0; f < features; ++f) var += (s[f] - mean) * (s[f] - mean) / features;
    for (int64_t f = 0; f < features; ++f) {
      const double normed = (s[f] - mean) / std::sqrt(var + 1e-12);
      const double want = normed * g[f] + b[f];
      // normed rounded to float (u), times g (u), plus b (u).
      const double bound = 4 * kU32 * (std::abs(normed * g[f]) + std::abs(b[f])) + 1e-30;
      ASSERT_NEAR(x[r * features + f], want, bound) << "row " << r << " feature " << f;
    }
  }
}

TEST(AddLayerNormTest, ConstantRowGivesBeta) {
  std::vector<float> x(8, 3.5f);
  const std::vector<float> g(8, 2.0f), b = Random(8, 11);
  AddLayerNorm(x.data(), nullptr, 1, 8, g.data(), b.data(), 1e-12f, 1);
  for (int f = 0; f < 8; ++f) EXPECT_EQ(x[f], b[f]);
}

TEST(GeluErfTest, MatchesFloat64) {
  std::vector<float> x = Random(100000, 12, 8.0f);
  x[0] = 0.0f, x[1] = -40.0f, x[2] = 40.0f, x[3] = 1e-30f;
  const std::vector<float> x0 = x;
  GeluErf(x.data(), static_cast<int64_t>(x.size()), 2);
  for (size_t i = 0; i < x.size(); ++i) {
    const double v = x0[i], want = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
    // erf in float (a few ulp of 1 + erf) and three products: 8 ulp of |x|.
    ASSERT_NEAR(x[i], want, 8 * kU32 * std::abs(v) + 1e-37) << "x = " << v;
  }
  EXPECT_EQ(x[1], -0.0f);
  EXPECT_EQ(x[2], 40.0f);
}

TEST(BlasDescriptionTest, NamesOpenBlasAndItsKernel) {
  const std::string d = BlasDescription();
  EXPECT_NE(d.find("OpenBLAS"), std::string::npos) << d;
  EXPECT_NE(d.find("core"), std::string::npos) << d;
}

}  // namespace
}  // namespace qkv::models
