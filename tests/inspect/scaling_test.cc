// Tests of qkv/inspect/scaling.h and `qkv explain scaling`:
//  - MeasureSoftmax against an independent float64 NumPy computation that
//    builds each row's softmax Jacobian (tests/inspect/gen_scaling_fixtures.py),
//    within a bound derived from the float32 score error;
//  - ExplainScaling: the measured variance of q.k within 5 Monte-Carlo
//    standard errors of d_k (the error formula is derived in scaling.cc), the
//    saturation and vanishing gain without the scale, thread independence;
//  - the command: JSON, SVG, bad flags.
#include "qkv/inspect/scaling.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "file_test_util.h"
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
