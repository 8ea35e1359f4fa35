// Tests of qkv/inspect/scaling.h and `qkv explain scaling`:
//  - MeasureSoftmax against an independent float64 NumPy computation that
//    builds each row's softmax Jacobian (tests/inspect/gen_scaling_fixtures.py),
//    within a bound derived from the float32 score error;
//  - ExplainScaling: the measured variance of q.k within 5 Monte-Carlo
//    standard errors of d_k (the error formula is derived in scaling.cc), the
//    saturation and vanishing gain without the scale, thread independence;
//  - ExplainScalingOnLayer (a model's own q, k) against a float64 oracle;
//  - the command: JSON, SVG, bad flags.
#include "qkv/inspect/scaling.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "file_test_util.h"
#include "qkv/error.h"
#include "qkv/npy.h"
#include "test_util.h"

namespace qkv::inspect {
namespace {

const std::string kFixtures = std::string(QKV_TESTDATA_DIR) + "/scaling";

TEST(ScalingTest, MeasureSoftmaxMatchesFloat64Jacobian) {
  std::ifstream in(kFixtures + "/expected.json");
  const nlohmann::json expected = nlohmann::json::parse(in);
  ASSERT_EQ(expected.size(), 8u);
  for (const nlohmann::json& want : expected) {
    const std::string stem = kFixtures + "/case" + std::to_string(want["case"].get<int>());
    const NpyArray q = ReadNpy(stem + "_q.npy"), k = ReadNpy(stem + "_k.npy");
    const NpyArray v = ReadNpy(stem + "_v.npy"), dout = ReadNpy(stem + "_dout.npy");
    const Shape4 shape{q.shape[0], q.shape[1], q.shape[2], q.shape[3]};
    auto view = [&](const NpyArray& a) {
      return TensorView::Contiguous(a.bytes.data(), DType::kFloat32, shape);
    };
    const double scale = want["scale"].get<double>();
    const SoftmaxStats got = MeasureSoftmax(view(q), view(k), view(v), view(dout), scale, 2);
    // Score error: gamma_d * scale * sum_e |q_ie k_je| (the float32 dot);
    // a weight's relative error is at most 2 * that + (N + 2) u (the
    // exponentials and the sum), and the metrics inherit it.
    const int64_t n = shape[2], d = shape[3];
    double worst = 0;
    for (int64_t s = 0; s < shape[0]; ++s)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double a = 0;
          for (int64_t e = 0; e < d; ++e) {
            a += std::abs(q.data<float>()[(s * n + i) * d + e] *
                          k.data<float>()[(s * n + j) * d + e]);
          }
          worst = std::max(worst, a);
        }
    const double u = test::kU32, delta = (d + 1) * u * scale * worst;
    const double rel = 2 * delta + (n + 2) * u;
    const double log_n = std::log(static_cast<double>(n));
    SCOPED_TRACE("case " + std::to_string(want["case"].get<int>()) + " " +
                 want["setting"].get<std::string>());
    EXPECT_NEAR(got.mean_max_weight, want["mean_max_weight"].get<double>(), rel);
    EXPECT_NEAR(got.entropy, want["entropy"].get<double>(), rel * (log_n + 1) + 1e-12);
    EXPECT_EQ(got.one_hot_fraction, want["one_hot_fraction"].get<double>());
    // Gradients: dS = P o (dP - D) in float32 over N keys and d dims, on top
    // of the weights' error.
    const double grad_rel = 4 * rel + 4 * (n + d) * u;
    for (const char* name : {"score_grad_norm", "query_grad_norm", "softmax_gain"}) {
      const double w = want[name].get<double>();
      const double g = std::string(name) == "score_grad_norm"   ? got.score_grad_norm
                       : std::string(name) == "query_grad_norm" ? got.query_grad_norm
                                                                : got.softmax_gain;
      EXPECT_NEAR(g, w, grad_rel * w) << name;
    }
  }
}

TEST(ScalingTest, VarianceIsDkAndTheUnscaledSoftmaxSaturates) {
  ScalingOptions o;
  o.dims = {4, 64, 1024};
  o.keys = 64, o.samples = 4, o.seed = 7;
  const std::vector<ScalingRow> rows = ExplainScaling(o);
  ASSERT_EQ(rows.size(), 3u);
  for (const ScalingRow& r : rows) {
    SCOPED_TRACE("d_k " + std::to_string(r.head_dim));
    const double d = static_cast<double>(r.head_dim);
    const double pairs = static_cast<double>(r.samples * r.keys * r.keys);
    EXPECT_NEAR(r.dot_variance, d, 5 * r.dot_variance_stderr);
    EXPECT_NEAR(r.dot_mean, 0.0, 5 * std::sqrt(d / pairs) * std::sqrt(2.0 * r.keys));
    EXPECT_NEAR(r.log_keys, std::log(64.0), 1e-12);
    // Scaled: the same softmax whatever d_k (scores of unit variance).
    EXPECT_NEAR(r.scaled.mean_max_weight, rows[0].scaled.mean_max_weight, 0.05);
    EXPECT_EQ(r.scaled.one_hot_fraction, 0.0);
  }
  // Unscaled: rows turn one-hot and the softmax passes on almost nothing.
  EXPECT_GT(rows[2].unscaled.one_hot_fraction, 0.5);
  EXPECT_GT(rows[2].unscaled.mean_max_weight, 0.9);
  EXPECT_LT(rows[2].unscaled.softmax_gain, 0.01 * rows[2].scaled.softmax_gain);
  EXPECT_LT(rows[2].unscaled.entropy, 0.1 * rows[2].scaled.entropy);
}

TEST(ScalingTest, IdenticalForAnyThreadCount) {
  ScalingOptions o;
  o.dims = {3, 80};
  o.keys = 97, o.samples = 2;
  o.num_threads = 1;
  const std::vector<ScalingRow> one = ExplainScaling(o);
  o.num_threads = 2;
  const std::vector<ScalingRow> two = ExplainScaling(o);
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_EQ(one[i].dot_variance, two[i].dot_variance);
    EXPECT_EQ(one[i].scaled.score_grad_norm, two[i].scaled.score_grad_norm);
    EXPECT_EQ(one[i].unscaled.query_grad_norm, two[i].unscaled.query_grad_norm);
  }
}

// ExplainScalingOnLayer (`qkv explain scaling --model`) against a float64
// oracle that materialises each row's softmax and applies its Jacobian
// diag(p) - p p^T, on awkward sizes: GQA, a decoder's causal rows (the first
// row, one key, is left out), inputs of 1, 7 and 13 tokens, large scores.
// dL/dout is drawn as documented in scaling.h: N(0, 1) floats from
// mt19937_64(seed * 0x9E3779B97F4A7C15 + 0x5CA11), head by head, input by
// input, token by token.
TEST(ScalingTest, LayerMeasurementsMatchFloat64Oracle) {
  struct Case {
    int64_t hq, hkv, d;
    bool causal;
    std::vector<int64_t> lengths;
    float spread;
  };
  for (const Case& c : {Case{4, 2, 5, true, {1, 7, 13}, 3.0f}, Case{2, 2, 3, false, {3, 9, 1}, 1.0f},
                        Case{3, 1, 59, true, {2, 31}, 0.7f}}) {
    SCOPED_TRACE("hq " + std::to_string(c.hq) + " d " + std::to_string(c.d));
    LayerProjections p;
    p.num_q_heads = c.hq, p.num_kv_heads = c.hkv, p.head_dim = c.d, p.causal = c.causal;
    p.lengths = c.lengths;
    int64_t tokens = 0;
    for (const int64_t len : c.lengths) tokens += len;
    std::mt19937_64 data_rng(42);
    std::normal_distribution<float> data(0.0f, c.spread);
    p.q.resize(static_cast<size_t>(tokens * c.hq * c.d));
    p.k.resize(static_cast<size_t>(tokens * c.hkv * c.d));
    p.v.resize(p.k.size());
    for (std::vector<float>* x : {&p.q, &p.k, &p.v})
      for (float& e : *x) e = data(data_rng);
    const uint64_t seed = 7;
    const std::vector<HeadScalingRow> got = ExplainScalingOnLayer(p, seed, 2);
    ASSERT_EQ(got.size(), static_cast<size_t>(c.hq));
    const std::vector<HeadScalingRow> one = ExplainScalingOnLayer(p, seed, 1);

    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 0x5CA11u);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const double u = test::kU32;
    for (int64_t h = 0; h < c.hq; ++h) {
      const int64_t kh = h / (c.hq / c.hkv);
      // Oracle, per scale: the rows' values, then the summaries.
      std::vector<double> max_w[2], ent[2], ds_norm[2], dq_norm[2], gain[2];
      // Per row: the absolute error of dS from D_i = dO_i . O_i in float32
      // (cancels in dS = p o (dP - D) when a row is nearly one-hot):
      // |err D| <= (keys + d + 2) u |dO_i| max_j |v_j|, and |err dS| <= |err D|.
      std::vector<double> err_ds, err_gain, err_dq;
      double q2 = 0, k2 = 0, dot = 0, dot2 = 0, pairs = 0, worst = 0;
      int64_t first = 0;
      for (const int64_t len : c.lengths) {
        const auto Q = [&](int64_t t, int64_t e) {
          return static_cast<double>(p.q[static_cast<size_t>(((first + t) * c.hq + h) * c.d + e)]);
        };
        const auto K = [&](int64_t t, int64_t e) {
          return static_cast<double>(p.k[static_cast<size_t>(((first + t) * c.hkv + kh) * c.d + e)]);
        };
        const auto V = [&](int64_t t, int64_t e) {
          return static_cast<double>(p.v[static_cast<size_t>(((first + t) * c.hkv + kh) * c.d + e)]);
        };
        std::vector<double> dout(static_cast<size_t>(len * c.d));
        for (double& e : dout) e = normal(rng);
        for (int64_t t = 0; t < len; ++t)
          for (int64_t e = 0; e < c.d; ++e) q2 += Q(t, e) * Q(t, e), k2 += K(t, e) * K(t, e);
        for (int64_t i = 0; i < len; ++i) {
          const int64_t visible = c.causal ? i + 1 : len;
          std::vector<double> qk(static_cast<size_t>(visible)), dp(qk.size());
          for (int64_t j = 0; j < visible; ++j) {
            double x = 0, a = 0, y = 0;
            for (int64_t e = 0; e < c.d; ++e) {
              x += Q(i, e) * K(j, e), a += std::abs(Q(i, e) * K(j, e));
              y += dout[static_cast<size_t>(i * c.d + e)] * V(j, e);
            }
            qk[static_cast<size_t>(j)] = x, dp[static_cast<size_t>(j)] = y;
            dot += x, dot2 += x * x, pairs += 1, worst = std::max(worst, a);
          }
          if (visible < 2) continue;
          double dout_norm = 0, v_max = 0, k_max = 0, dp_norm = 0;
          for (int64_t e = 0; e < c.d; ++e) {
            dout_norm += dout[static_cast<size_t>(i * c.d + e)] * dout[static_cast<size_t>(i * c.d + e)];
          }
          for (int64_t j = 0; j < visible; ++j) {
            double v2 = 0, k2j = 0;
            for (int64_t e = 0; e < c.d; ++e) v2 += V(j, e) * V(j, e), k2j += K(j, e) * K(j, e);
            v_max = std::max(v_max, std::sqrt(v2)), k_max = std::max(k_max, std::sqrt(k2j));
            dp_norm += dp[static_cast<size_t>(j)] * dp[static_cast<size_t>(j)];
          }
          const double e_ds = 2 * (visible + c.d + 2) * u * std::sqrt(dout_norm) * v_max;
          err_ds.push_back(e_ds);
          err_gain.push_back(e_ds / std::sqrt(dp_norm));
          err_dq.push_back(e_ds * k_max * std::sqrt(static_cast<double>(visible)));
          for (int which = 0; which < 2; ++which) {
            const double scale = which == 0 ? 1.0 / std::sqrt(static_cast<double>(c.d)) : 1.0;
            double mx = -INFINITY, sum = 0, pdp = 0, mw = 0, en = 0, g2 = 0, dp2 = 0;
            for (const double x : qk) mx = std::max(mx, scale * x);
            std::vector<double> pr(qk.size());
            for (size_t j = 0; j < qk.size(); ++j) sum += pr[j] = std::exp(scale * qk[j] - mx);
            for (size_t j = 0; j < qk.size(); ++j) pr[j] /= sum, pdp += pr[j] * dp[j];
            std::vector<double> dq(static_cast<size_t>(c.d), 0.0);
            for (size_t j = 0; j < qk.size(); ++j) {
              mw = std::max(mw, pr[j]);
              if (pr[j] > 0) en -= pr[j] * std::log(pr[j]);
              const double g = pr[j] * (dp[j] - pdp);  // (diag(p) - p p^T) dP
              g2 += g * g, dp2 += dp[j] * dp[j];
              for (int64_t e = 0; e < c.d; ++e) {
                dq[static_cast<size_t>(e)] += scale * g * K(static_cast<int64_t>(j), e);
              }
            }
            double dq2 = 0;
            for (const double x : dq) dq2 += x * x;
            max_w[which].push_back(mw), ent[which].push_back(en);
            ds_norm[which].push_back(std::sqrt(g2)), dq_norm[which].push_back(std::sqrt(dq2));
            gain[which].push_back(std::sqrt(g2 / dp2));
          }
        }
        first += len;
      }
      const HeadScalingRow& r = got[static_cast<size_t>(h)];
      SCOPED_TRACE("head " + std::to_string(h));
      EXPECT_EQ(r.rows, static_cast<int64_t>(max_w[0].size()));
      EXPECT_EQ(r.pairs, static_cast<int64_t>(pairs));
      EXPECT_NEAR(r.q_mean_square, q2 / static_cast<double>(tokens * c.d), 1e-12 * q2);
      EXPECT_NEAR(r.k_mean_square, k2 / static_cast<double>(tokens * c.d), 1e-12 * k2);
      EXPECT_NEAR(r.dot_mean, dot / pairs, 1e-10 * (1 + std::abs(dot)));
      EXPECT_NEAR(r.dot_variance, dot2 / pairs - (dot / pairs) * (dot / pairs), 1e-10 * dot2);
      const auto mean = [](const std::vector<double>& x) {
        double s = 0;
        for (const double e : x) s += e;
        return s / static_cast<double>(x.size());
      };
      const auto median = [](std::vector<double> x) {
        std::sort(x.begin(), x.end());
        const size_t n = x.size();
        return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
      };
      int64_t longest = 0;
      for (const int64_t len : c.lengths) longest = std::max(longest, len);
      for (int which = 0; which < 2; ++which) {
        const SoftmaxStats& st = which == 0 ? r.scaled : r.unscaled;
        const SoftmaxStats& st1 = which == 0 ? one[static_cast<size_t>(h)].scaled
                                             : one[static_cast<size_t>(h)].unscaled;
        const double scale = which == 0 ? 1.0 / std::sqrt(static_cast<double>(c.d)) : 1.0;
        // The bound of MeasureSoftmaxMatchesFloat64Jacobian above.
        const double delta = (c.d + 1) * u * scale * worst;
        const double rel = 2 * delta + (longest + 2) * u;
        const double grad_rel = 4 * rel + 4 * (longest + c.d) * u;
        EXPECT_EQ(st.scale, scale);
        EXPECT_NEAR(st.mean_max_weight, mean(max_w[which]), rel);
        EXPECT_NEAR(st.entropy, mean(ent[which]), rel * (std::log(longest) + 1) + 1e-12);
        EXPECT_NEAR(st.score_grad_norm, mean(ds_norm[which]),
                    grad_rel * mean(ds_norm[which]) + mean(err_ds));
        EXPECT_NEAR(st.query_grad_norm, mean(dq_norm[which]),
                    grad_rel * mean(dq_norm[which]) + scale * mean(err_dq));
        EXPECT_NEAR(st.softmax_gain, median(gain[which]),
                    grad_rel * median(gain[which]) + *std::max_element(err_gain.begin(), err_gain.end()));
        // Bitwise the same with one thread.
        EXPECT_EQ(st.mean_max_weight, st1.mean_max_weight);
        EXPECT_EQ(st.score_grad_norm, st1.score_grad_norm);
        EXPECT_EQ(st.softmax_gain, st1.softmax_gain);
      }
    }
  }
  LayerProjections bad;
  bad.num_q_heads = 3, bad.num_kv_heads = 2, bad.head_dim = 4, bad.lengths = {2};
  EXPECT_THROW(ExplainScalingOnLayer(bad, 0), Error);
}

TEST(ScalingTest, CommandPrintsJsonWritesSvgAndRefusesBadFlags) {
  test::TempDir dir("explain_");
  const test::CliResult r = test::RunCli({"explain", "scaling", "--dims", "4,64", "--keys", "32",
                                          "--samples", "2", "--json", "--svg", dir.File("s.svg")},
                                         dir.File(""));
  ASSERT_TRUE(r.exited && r.status == 0) << test::Describe(r);
  const nlohmann::json list = nlohmann::json::parse(r.out);
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[1]["d_k"], 64);
  EXPECT_EQ(list[1]["variance_theory"], 64);
  for (const char* key : {"mean", "variance", "variance_stderr", "log_keys"}) {
    EXPECT_TRUE(list[0][key].is_number()) << key;
  }
  for (const char* key : {"mean_max_weight", "entropy", "one_hot_fraction", "score_grad_norm",
                          "query_grad_norm", "softmax_gain", "scale"}) {
    EXPECT_TRUE(list[0]["scaled"][key].is_number()) << key;
    EXPECT_TRUE(list[0]["unscaled"][key].is_number()) << key;
  }
  const std::string svg = test::ReadFile(dir.File("s.svg"));
  EXPECT_EQ(svg.rfind("<svg", 0), 0u) << svg.substr(0, 80);
  size_t polylines = 0;
  for (size_t at = svg.find("<polyline"); at != std::string::npos;
       at = svg.find("<polyline", at + 1)) {
    ++polylines;
  }
  EXPECT_EQ(polylines, 4u);  // two panels x (scaled, unscaled)

  const test::CliResult table =
      test::RunCli({"explain", "scaling", "--dims", "16", "--keys", "8"}, dir.File(""));
  ASSERT_TRUE(table.exited && table.status == 0) << test::Describe(table);
  EXPECT_NE(table.out.find("softmax(q.k / sqrt(d_k))"), std::string::npos) << table.out;

  for (const std::vector<std::string>& bad : {std::vector<std::string>{"--dims", "0"},
                                              {"--dims", "4,x"},
                                              {"--keys", "1"},
                                              {"--samples", "0"},
                                              {"--keys", "4096", "--samples", "8"},
                                              {"--threads", "-2"}}) {
    std::vector<std::string> args = {"explain", "scaling"};
    args.insert(args.end(), bad.begin(), bad.end());
    const test::CliResult e = test::RunCli(args, dir.File(""));
    EXPECT_TRUE(e.exited && e.status == 2) << bad[0] << ": " << test::Describe(e);
    EXPECT_EQ(std::count(e.err.begin(), e.err.end(), '\n'), 1) << e.err;
  }
}

}  // namespace
}  // namespace qkv::inspect
