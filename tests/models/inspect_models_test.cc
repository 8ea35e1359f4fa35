// Inspection on the real models (issue 16): what the encoder and the decoder
// hand out besides their outputs, and the commands built on it.
//  - BertEncoder::Forward's qkv_out and LlamaForward's LlamaProbe: the
//    weights they report are the float64 softmax of the projections they
//    report (so both are what attention saw), row sums, causality, and the
//    decoder's logits with weights asked equal to a plain run's within the
//    tolerance that held them to transformers;
//  - `qkv logits --attn-weights`: the folder qkv patterns / heatmap / report
//    read, tokens that spell the prompt, one-line errors;
//  - `qkv explain scaling --model` on both models: its softmax statistics
//    recomputed from the weights the model commands write.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cli_test_util.h"
#include "file_test_util.h"
#include "models/model_test_util.h"
#include "qkv/models/bert.h"
#include "qkv/models/llama.h"
#include "qkv/npy.h"

namespace qkv::test {
namespace {

using ::testing::HasSubstr;

constexpr double kTimeout = 240.0;
constexpr int kThreads = 1;  // ctest runs two tests at once on two cores (llama_test.cc)

const models::LlamaModel& Llama() {
  static const models::LlamaModel* model =
      new models::LlamaModel(models::LlamaModel::Load(kSmolLm2));
  return *model;
}

nlohmann::json SmolPrompt(int index) {
  return ReadJsonFile(kSmolLm2Fixtures + "/prompts.json").at("prompts").at(static_cast<size_t>(index));
}

// max |w - softmax(scale q.k^T)| over the visible keys, in double, for one
// head; q [n, q_stride] at q_off, k [n, k_stride] at k_off.
double WorstSoftmaxError(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                         const float* w, int64_t n, int64_t keys, int64_t d, bool causal) {
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t visible = causal ? i + 1 : keys;
    std::vector<double> s(static_cast<size_t>(visible));
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < visible; ++j) {
      double x = 0;
      for (int64_t e = 0; e < d; ++e) {
        x += static_cast<double>(q[i * q_stride + e]) * k[j * k_stride + e];
      }
      s[static_cast<size_t>(j)] = x / std::sqrt(static_cast<double>(d));
      mx = std::max(mx, s[static_cast<size_t>(j)]);
    }
    for (double& x : s) sum += x = std::exp(x - mx);
    for (int64_t j = 0; j < keys; ++j) {
      const double want = j < visible ? s[static_cast<size_t>(j)] / sum : 0.0;
      worst = std::max(worst, std::abs(w[i * keys + j] - want));
    }
  }
  return worst;
}

TEST(InspectModelsTest, LlamaProbeWeightsAreTheSoftmaxOfItsQueriesAndKeys) {
  if (!HaveSmolLm2()) return;
  const models::LlamaConfig& c = Llama().config();
  const std::vector<int32_t> ids = SmolPrompt(0).at("ids").get<std::vector<int32_t>>();
  const int64_t n = static_cast<int64_t>(ids.size()), D = c.head_dim;
  KvCacheConfig cc;
  cc.capacity = n;
  std::vector<float> plain, probed;
  {
    models::LlamaCache cache(c, cc);
    models::LlamaForward(Llama(), cache, cache.AddSequence(), ids, models::Logits::kAll, plain,
                         kThreads);
  }
  models::LlamaCache cache(c, cc);
  models::LlamaProbe probe;
  probe.want_weights = probe.want_qkv = true;
  const models::ForwardInfo info = models::LlamaForward(
      Llama(), cache, cache.AddSequence(), ids, models::Logits::kAll, probed, kThreads, &probe);
  EXPECT_THAT(info.attention_path, HasSubstr("reference"));
  ASSERT_EQ(probe.weights.size(), static_cast<size_t>(c.num_layers));
  ASSERT_EQ(probe.q.size(), static_cast<size_t>(c.num_layers));
  // The reference kernel sums in another order than flash: logits agree to
  // the tolerance llama_test.cc holds them to against transformers.
  ASSERT_EQ(plain.size(), probed.size());
  float max_abs = 0;
  double worst = 0;
  for (size_t i = 0; i < plain.size(); ++i) {
    max_abs = std::max(max_abs, std::abs(plain[i]));
    worst = std::max(worst, static_cast<double>(std::abs(plain[i] - probed[i])));
  }
  EXPECT_LE(worst, 4e-6 * max_abs);
  const int64_t group = c.num_q_heads / c.num_kv_heads;
  for (const int64_t l : {int64_t{0}, c.num_layers / 2, c.num_layers - 1}) {
    const std::vector<float>& w = probe.weights[static_cast<size_t>(l)];
    ASSERT_EQ(w.size(), static_cast<size_t>(c.num_q_heads * n * n));
    ASSERT_EQ(probe.q[static_cast<size_t>(l)].size(), static_cast<size_t>(n * c.num_q_heads * D));
    ASSERT_EQ(probe.k[static_cast<size_t>(l)].size(), static_cast<size_t>(n * c.num_kv_heads * D));
    for (int64_t h = 0; h < c.num_q_heads; ++h) {
      // Weights are float32 softmax values (<= 1): a score error of
      // ~(d + 2) u |q||k| / sqrt(d) moves them by at most about that much.
      EXPECT_LT(WorstSoftmaxError(probe.q[static_cast<size_t>(l)].data() + h * D, c.num_q_heads * D,
                                  probe.k[static_cast<size_t>(l)].data() + (h / group) * D,
                                  c.num_kv_heads * D, w.data() + h * n * n, n, n, D, true),
                2e-5)
          << "layer " << l << " head " << h;
    }
  }
  // Only a prefill of an empty float32 cache hands them out.
  std::vector<float> logits;
  EXPECT_THROW(models::LlamaForward(Llama(), cache, 0, ids, models::Logits::kNone, logits, kThreads,
                                    &probe),
               Error);
}

TEST(InspectModelsTest, BertQkvOutIsWhatAttentionSaw) {
  if (!HaveMiniLm()) return;
  const models::BertEncoder model = models::BertEncoder::Load(kMiniLm);
  const models::BertConfig& c = model.config();
  const std::vector<std::string> texts = {"A short one.", "Attention is all you need, they said."};
  std::vector<std::vector<int32_t>> enc;
  int64_t seq = 0;
  for (const std::string& t : texts) {
    enc.push_back(model.Tokenize(t).ids);
    seq = std::max<int64_t>(seq, static_cast<int64_t>(enc.back().size()));
  }
  const int64_t batch = 2, h = c.hidden_size, heads = c.num_heads, d = h / heads;
  std::vector<int32_t> ids(static_cast<size_t>(batch * seq), 0);
  std::vector<int64_t> lengths;
  for (int64_t b = 0; b < batch; ++b) {
    std::copy(enc[b].begin(), enc[b].end(), ids.begin() + b * seq);
    lengths.push_back(static_cast<int64_t>(enc[b].size()));
  }
  std::vector<float> weights, qkv;
  model.Forward(ids, batch, seq, lengths, kThreads, &weights, nullptr, &qkv);
  const int64_t tokens = lengths[0] + lengths[1];
  ASSERT_EQ(qkv.size(), static_cast<size_t>(c.num_layers * tokens * 3 * h));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    int64_t first = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const float* rows = qkv.data() + (l * tokens + first) * 3 * h;
      for (int64_t hd = 0; hd < heads; ++hd) {
        // Weights of row b, head hd: [seq, seq], real block [L, L].
        const float* w = weights.data() + ((l * batch + b) * heads + hd) * seq * seq;
        std::vector<float> block(static_cast<size_t>(lengths[b] * lengths[b]));
        for (int64_t i = 0; i < lengths[b]; ++i) {
          std::copy_n(w + i * seq, lengths[b], block.data() + i * lengths[b]);
        }
        EXPECT_LT(WorstSoftmaxError(rows + hd * d, 3 * h, rows + h + hd * d, 3 * h, block.data(),
                                    lengths[b], lengths[b], d, false),
                  2e-5)
            << "layer " << l << " input " << b << " head " << hd;
      }
      first += lengths[b];
    }
  }
}

void ExpectOneLineError(const CliResult& r, const std::string& needle) {
  EXPECT_TRUE(r.exited && r.status == 2) << Describe(r);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr(needle));
}

// Mean over the rows that see >= 2 keys of each head's max weight and
// entropy, from a layer file [inputs, heads, seq, seq] and token counts.
struct HeadMeans {
  std::vector<double> max_weight, entropy;
};
HeadMeans MeansFromWeights(const NpyArray& w, const std::vector<int64_t>& lengths, bool causal) {
  const int64_t inputs = w.shape[0], heads = w.shape[1], seq = w.shape[2];
  HeadMeans m;
  for (int64_t hd = 0; hd < heads; ++hd) {
    double mw = 0, en = 0, rows = 0;
    for (int64_t b = 0; b < inputs; ++b)
      for (int64_t i = causal ? 1 : 0; i < lengths[static_cast<size_t>(b)]; ++i) {
        const float* row = w.data<float>() + ((b * heads + hd) * seq + i) * seq;
        double mx = 0, e = 0;
        for (int64_t j = 0; j < lengths[static_cast<size_t>(b)]; ++j) {
          mx = std::max<double>(mx, row[j]);
          if (row[j] > 0) e -= row[j] * std::log(static_cast<double>(row[j]));
        }
        mw += mx, en += e, rows += 1;
      }
    m.max_weight.push_back(mw / rows);
    m.entropy.push_back(en / rows);
  }
  return m;
}

TEST(InspectModelsTest, LogitsWritesTheDecodersAttentionFolder) {
  if (!HaveSmolLm2()) return;
  TempDir dir("inspect_logits");
  const std::string text = SmolPrompt(1).at("text").get<std::string>();
  const CliResult r = RunCli({"logits", "--model", kSmolLm2, "--threads", "1", "--prompt", text,
                              "--out", dir.File("l.npy"), "--attn-weights", dir.File("attn")},
                             dir.File(""), kTimeout);
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_THAT(r.err, HasSubstr("reference prefill"));
  const nlohmann::json tokens = ReadJsonFile(dir.File("attn/tokens.json"));
  ASSERT_EQ(tokens.size(), 1u);
  std::string spelled;
  for (const auto& t : tokens[0]) spelled += t.get<std::string>();
  EXPECT_EQ(spelled, text);
  const int64_t n = static_cast<int64_t>(tokens[0].size());
  const models::LlamaConfig& c = Llama().config();
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const NpyArray w = ReadNpy(dir.File("attn/layer" + std::to_string(l) + ".npy"));
    ASSERT_EQ(w.shape, (std::vector<int64_t>{1, c.num_q_heads, n, n}));
    for (int64_t hd = 0; hd < c.num_q_heads; ++hd)
      for (int64_t i = 0; i < n; ++i) {
        double sum = 0;
        for (int64_t j = 0; j < n; ++j) {
          const float x = w.data<float>()[(hd * n + i) * n + j];
          if (j > i) {
            ASSERT_EQ(x, 0.0f) << "causal: layer " << l << " row " << i;
          }
          sum += x;
        }
        ASSERT_NEAR(sum, 1.0, 1e-5);
      }
  }
  // qkv patterns reads it: every head, and "next" is 0 for a decoder.
  const CliResult p = RunCli({"patterns", "--attn-dir", dir.File("attn"), "--json"}, dir.File(""));
  ASSERT_TRUE(p.exited && p.status == 0) << Describe(p);
  const nlohmann::json heads = nlohmann::json::parse(p.out);
  ASSERT_EQ(heads.size(), static_cast<size_t>(c.num_layers * c.num_q_heads));
  for (const auto& head : heads) EXPECT_EQ(head.at("next").get<double>(), 0.0);

  // Errors: a cache the weights cannot come from; a folder that is a file.
  ExpectOneLineError(RunCli({"logits", "--model", kSmolLm2, "--prompt", "hi", "--out",
                             dir.File("x.npy"), "--attn-weights", dir.File("a2"), "--cache",
                             "sliding"},
                            dir.File(""), kTimeout),
                     "--attn-weights");
  ExpectOneLineError(RunCli({"logits", "--model", kSmolLm2, "--prompt", "hi", "--out",
                             dir.File("x.npy"), "--attn-weights", dir.File("l.npy")},
                            dir.File(""), kTimeout),
                     "not a directory");
  EXPECT_FALSE(std::filesystem::exists(dir.File("x.npy")));
  EXPECT_FALSE(std::filesystem::exists(dir.File("a2")));
}

// explain scaling --model's scaled statistics are those of the weights the
// model commands write for the same texts (independent code paths: the
// commands' attention kernels vs ExplainScalingOnLayer's per-head runs).
TEST(InspectModelsTest, ExplainScalingOnModelsMatchesTheirAttentionWeights) {
  if (!HaveMiniLm() || !HaveSmolLm2()) return;
  TempDir dir("inspect_explain");
  const std::vector<std::string> texts = {"The cat sat on the mat.",
                                          "Attention is all you need, they said, twice."};
  {
    const CliResult e = RunCli({"embed", "--model", kMiniLm, "--threads", "1", "--text", texts[0],
                                "--text", texts[1], "--out", dir.File("e.npy"), "--attn-weights",
                                dir.File("bert")},
                               dir.File(""), kTimeout);
    ASSERT_TRUE(e.exited && e.status == 0) << Describe(e);
    const CliResult x = RunCli({"explain", "scaling", "--model", kMiniLm, "--layer", "3", "--threads",
                                "1", "--text", texts[0], "--text", texts[1], "--json"},
                               dir.File(""), kTimeout);
    ASSERT_TRUE(x.exited && x.status == 0) << Describe(x);
    const nlohmann::json rows = nlohmann::json::parse(x.out);
    const nlohmann::json tokens = ReadJsonFile(dir.File("bert/tokens.json"));
    const std::vector<int64_t> lengths = {static_cast<int64_t>(tokens[0].size()),
                                          static_cast<int64_t>(tokens[1].size())};
    const HeadMeans m = MeansFromWeights(ReadNpy(dir.File("bert/layer3.npy")), lengths, false);
    ASSERT_EQ(rows.size(), m.max_weight.size());
    for (size_t hd = 0; hd < rows.size(); ++hd) {
      EXPECT_EQ(rows[hd].at("d_k"), 32);
      EXPECT_EQ(rows[hd].at("rows"), lengths[0] + lengths[1]);
      EXPECT_NEAR(rows[hd].at("scaled").at("mean_max_weight").get<double>(), m.max_weight[hd], 2e-5);
      EXPECT_NEAR(rows[hd].at("scaled").at("entropy").get<double>(), m.entropy[hd], 1e-4);
      // The unscaled softmax is sharper.
      EXPECT_GT(rows[hd].at("unscaled").at("mean_max_weight").get<double>(), m.max_weight[hd]);
    }
  }
  {
    const std::string text = texts[1];
    const CliResult g = RunCli({"logits", "--model", kSmolLm2, "--threads", "1", "--prompt", text,
                                "--out", dir.File("l.npy"), "--attn-weights", dir.File("llama")},
                               dir.File(""), kTimeout);
    ASSERT_TRUE(g.exited && g.status == 0) << Describe(g);
    const CliResult x = RunCli({"explain", "scaling", "--model", kSmolLm2, "--layer", "7",
                                "--threads", "1", "--text", text, "--json"},
                               dir.File(""), kTimeout);
    ASSERT_TRUE(x.exited && x.status == 0) << Describe(x);
    const nlohmann::json rows = nlohmann::json::parse(x.out);
    const int64_t n = static_cast<int64_t>(ReadJsonFile(dir.File("llama/tokens.json"))[0].size());
    const HeadMeans m = MeansFromWeights(ReadNpy(dir.File("llama/layer7.npy")), {n}, true);
    ASSERT_EQ(rows.size(), m.max_weight.size());
    for (size_t hd = 0; hd < rows.size(); ++hd) {
      EXPECT_EQ(rows[hd].at("d_k"), 64);
      EXPECT_EQ(rows[hd].at("rows"), n - 1);  // the first row sees one key
      EXPECT_NEAR(rows[hd].at("scaled").at("mean_max_weight").get<double>(), m.max_weight[hd], 2e-5);
      EXPECT_NEAR(rows[hd].at("scaled").at("entropy").get<double>(), m.entropy[hd], 1e-4);
    }
  }
  // Flags that only go with --model, and those that do not.
  ExpectOneLineError(RunCli({"explain", "scaling", "--layer", "1"}, dir.File("")), "--layer");
  ExpectOneLineError(RunCli({"explain", "scaling", "--text", "x"}, dir.File("")), "--text");
  ExpectOneLineError(RunCli({"explain", "scaling", "--model", kMiniLm, "--dims", "4", "--text", "x"},
                            dir.File(""), kTimeout),
                     "--dims");
  ExpectOneLineError(RunCli({"explain", "scaling", "--model", kMiniLm}, dir.File(""), kTimeout),
                     "--text, --input");
  ExpectOneLineError(RunCli({"explain", "scaling", "--model", kMiniLm, "--layer", "6", "--text", "x"},
                            dir.File(""), kTimeout),
                     "--layer: 6 (expected 0..5");
  ExpectOneLineError(RunCli({"explain", "scaling", "--model", dir.File("nope.gguf"), "--text", "x"},
                            dir.File(""), kTimeout),
                     "--model");
}

}  // namespace
}  // namespace qkv::test
