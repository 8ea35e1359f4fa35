// Tests of qkv/models/bert.h:
//  - a tiny random BERT (awkward sizes: hidden 12, 3 heads of 4, FFN 7,
//    padded batches) against an independent float64 forward written here
//    from the architecture's definition;
//  - all-MiniLM-L6-v2 (make models) against sentence-transformers and
//    Hugging Face transformers (fixtures from tests/models/gen_minilm_fixtures.py):
//    embeddings (cosine >= 0.99999, max |delta| <= 1e-5, the issue's
//    criteria), last hidden states, per-layer attention weights;
//  - bitwise identical results for any thread count;
//  - hostile model folders: one-line errors naming the file and key/tensor.
#include "qkv/models/bert.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "file_test_util.h"
#include "models/model_test_util.h"
#include "qkv/error.h"
#include "qkv/npy.h"
#include "qkv/safetensors.h"

namespace qkv::models {
namespace {

namespace fs = std::filesystem;
using test::ExpectError;
using test::TempDir;

using test::HaveMiniLm;
using test::kMiniLm;
using test::ReadJsonFile;
const std::string kFixtures = test::kMiniLmFixtures;

std::vector<float> ReadFloats(const std::string& path, std::vector<int64_t>* shape) {
  const NpyArray a = ReadNpy(path);
  EXPECT_EQ(a.dtype, DType::kFloat32) << path;
  if (shape) *shape = a.shape;
  return std::vector<float>(a.data<float>(), a.data<float>() + a.numel());
}


// ---------------------------------------------------------------- tiny BERT

struct Tiny {
  int64_t vocab = 0, hidden = 12, heads = 3, inter = 7, layers = 2, positions = 16;
  std::map<std::string, std::vector<float>> w;  // HF name -> values
  std::map<std::string, std::vector<int64_t>> shape;
};

void Add(Tiny& t, const std::string& name, std::vector<int64_t> shape, std::mt19937& rng,
         float scale, float offset = 0.0f) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::normal_distribution<float> dist(offset, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  t.w[name] = std::move(v);
  t.shape[name] = std::move(shape);
}

// Writes a random BERT into `dir`, with the tokenizer of MiniLM (whose
// vocabulary sets vocab_size). `edit` may change the config before writing.
Tiny WriteTiny(const std::string& dir, const std::function<void(nlohmann::json&)>& edit = {}) {
  Tiny t;
  t.vocab = ReadJsonFile(kMiniLm + "/tokenizer.json")["model"]["vocab"].size();
  fs::copy_file(kMiniLm + "/tokenizer.json", dir + "/tokenizer.json");
  nlohmann::json config = {{"model_type", "bert"},
                           {"hidden_act", "gelu"},
                           {"hidden_size", t.hidden},
                           {"num_attention_heads", t.heads},
                           {"intermediate_size", t.inter},
                           {"num_hidden_layers", t.layers},
                           {"max_position_embeddings", t.positions},
                           {"type_vocab_size", 2},
                           {"vocab_size", t.vocab},
                           {"layer_norm_eps", 1e-12},
                           {"position_embedding_type", "absolute"}};
  if (edit) edit(config);
  std::ofstream(dir + "/config.json") << config.dump();
  std::mt19937 rng(42);
  const int64_t h = t.hidden;
  Add(t, "embeddings.word_embeddings.weight", {t.vocab, h}, rng, 1.0f);
  Add(t, "embeddings.position_embeddings.weight", {t.positions, h}, rng, 0.5f);
  Add(t, "embeddings.token_type_embeddings.weight", {2, h}, rng, 0.5f);
  Add(t, "embeddings.LayerNorm.weight", {h}, rng, 0.2f, 1.0f);
  Add(t, "embeddings.LayerNorm.bias", {h}, rng, 0.2f);
  for (int64_t l = 0; l < t.layers; ++l) {
    const std::string p = "encoder.layer." + std::to_string(l) + ".";
    for (const char* part : {"query", "key", "value"}) {
      Add(t, p + "attention.self." + part + ".weight", {h, h}, rng, 0.6f);
      Add(t, p + "attention.self." + part + ".bias", {h}, rng, 0.3f);
    }
    Add(t, p + "attention.output.dense.weight", {h, h}, rng, 0.3f);
    Add(t, p + "attention.output.dense.bias", {h}, rng, 0.1f);
    Add(t, p + "attention.output.LayerNorm.weight", {h}, rng, 0.2f, 1.0f);
    Add(t, p + "attention.output.LayerNorm.bias", {h}, rng, 0.2f);
    Add(t, p + "intermediate.dense.weight", {t.inter, h}, rng, 0.5f);
    Add(t, p + "intermediate.dense.bias", {t.inter}, rng, 0.5f);
    Add(t, p + "output.dense.weight", {h, t.inter}, rng, 0.4f);
    Add(t, p + "output.dense.bias", {h}, rng, 0.1f);
    Add(t, p + "output.LayerNorm.weight", {h}, rng, 0.2f, 1.0f);
    Add(t, p + "output.LayerNorm.bias", {h}, rng, 0.2f);
  }
  std::vector<SafetensorsEntry> entries;
  for (const auto& [name, values] : t.w) entries.push_back({name, t.shape[name], values});
  WriteSafetensors(dir + "/model.safetensors", entries);
  return t;
}

// The float64 forward of one unpadded sequence, from the definition.
std::vector<double> OracleForward(const Tiny& t, const std::vector<int32_t>& ids) {
  const int64_t n = static_cast<int64_t>(ids.size()), h = t.hidden, hd = h / t.heads;
  auto W = [&](const std::string& name) -> const std::vector<float>& { return t.w.at(name); };
  auto layer_norm = [&](std::vector<double>& x, const std::string& p) {
    for (int64_t i = 0; i < n; ++i) {
      double mean = 0, var = 0;
      for (int64_t f = 0; f < h; ++f) mean += x[i * h + f] / h;
      for (int64_t f = 0; f < h; ++f) var += (x[i * h + f] - mean) * (x[i * h + f] - mean) / h;
      for (int64_t f = 0; f < h; ++f) {
        x[i * h + f] =
            (x[i * h + f] - mean) / std::sqrt(var + 1e-12) * W(p + "weight")[f] + W(p + "bias")[f];
      }
    }
  };
  auto linear = [&](const std::vector<double>& x, int64_t in, const std::string& p, int64_t out) {
    std::vector<double> y(static_cast<size_t>(n * out));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t o = 0; o < out; ++o) {
        double s = W(p + "bias")[o];
        for (int64_t k = 0; k < in; ++k) s += x[i * in + k] * W(p + "weight")[o * in + k];
        y[i * out + o] = s;
      }
    return y;
  };
  std::vector<double> x(static_cast<size_t>(n * h));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t f = 0; f < h; ++f)
      x[i * h + f] = static_cast<double>(W("embeddings.word_embeddings.weight")[ids[i] * h + f]) +
                     W("embeddings.position_embeddings.weight")[i * h + f] +
                     W("embeddings.token_type_embeddings.weight")[f];
  layer_norm(x, "embeddings.LayerNorm.");
  for (int64_t l = 0; l < t.layers; ++l) {
    const std::string p = "encoder.layer." + std::to_string(l) + ".";
    const auto q = linear(x, h, p + "attention.self.query.", h);
    const auto k = linear(x, h, p + "attention.self.key.", h);
    const auto v = linear(x, h, p + "attention.self.value.", h);
    std::vector<double> ctx(x.size(), 0.0);
    for (int64_t head = 0; head < t.heads; ++head)
      for (int64_t i = 0; i < n; ++i) {
        std::vector<double> s(static_cast<size_t>(n));
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < n; ++j) {
          double d = 0;
          for (int64_t e = 0; e < hd; ++e) d += q[i * h + head * hd + e] * k[j * h + head * hd + e];
          s[j] = d / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
        for (int64_t j = 0; j < n; ++j)
          for (int64_t e = 0; e < hd; ++e)
            ctx[i * h + head * hd + e] += s[j] / sum * v[j * h + head * hd + e];
      }
    auto a = linear(ctx, h, p + "attention.output.dense.", h);
    for (size_t i = 0; i < a.size(); ++i) a[i] += x[i];
    layer_norm(a, p + "attention.output.LayerNorm.");
    x = a;
    auto f1 = linear(x, h, p + "intermediate.dense.", t.inter);
    for (double& z : f1) z = 0.5 * z * (1 + std::erf(z / std::sqrt(2.0)));
    auto f2 = linear(f1, t.inter, p + "output.dense.", h);
    for (size_t i = 0; i < f2.size(); ++i) f2[i] += x[i];
    layer_norm(f2, p + "output.LayerNorm.");
    x = f2;
  }
  return x;
}

TEST(BertTinyTest, PaddedBatchMatchesFloat64OracleRowByRow) {
  if (!HaveMiniLm()) return;
  TempDir dir("bert_tiny_");
  const Tiny t = WriteTiny(dir.File(""));
  const BertEncoder model = BertEncoder::Load(dir.File(""));
  const std::vector<std::vector<int32_t>> rows = {
      {101, 7592, 102}, {101, 2023, 2003, 1037, 3231, 1012, 4242, 999, 102}, {101, 102}};
  const int64_t batch = 3, seq = 9, h = t.hidden;
  std::vector<int32_t> ids(batch * seq, 0);
  std::vector<int64_t> lengths;
  for (int64_t b = 0; b < batch; ++b) {
    std::copy(rows[b].begin(), rows[b].end(), ids.begin() + b * seq);
    lengths.push_back(static_cast<int64_t>(rows[b].size()));
  }
  for (int threads : {1, 2}) {
    const std::vector<float> got = model.Forward(ids, batch, seq, lengths, threads);
    for (int64_t b = 0; b < batch; ++b) {
      const std::vector<double> want = OracleForward(t, rows[b]);
      for (int64_t i = 0; i < lengths[b]; ++i)
        for (int64_t f = 0; f < h; ++f) {
          // Post-LayerNorm activations are O(1); float32 through two layers
          // of width <= 12 stays within a few hundred ulp.
          ASSERT_NEAR(got[(b * seq + i) * h + f], want[i * h + f], 2e-5)
              << "row " << b << " token " << i << " feature " << f << ", " << threads << " threads";
        }
    }
  }
}

TEST(BertTinyTest, RefusesWhatItDoesNotImplement) {
  if (!HaveMiniLm()) return;
  const std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>> cases = {
      {[](nlohmann::json& c) { c["hidden_act"] = "relu"; }, "\"hidden_act\""},
      {[](nlohmann::json& c) { c["model_type"] = "gpt2"; }, "\"model_type\""},
      {[](nlohmann::json& c) { c["num_attention_heads"] = 5; }, "not a multiple"},
      {[](nlohmann::json& c) { c.erase("hidden_size"); }, "\"hidden_size\" is missing"},
      {[](nlohmann::json& c) { c["hidden_size"] = -12; }, "\"hidden_size\""},
      {[](nlohmann::json& c) { c["position_embedding_type"] = "relative_key"; },
       "\"position_embedding_type\""},
      {[](nlohmann::json& c) { c["is_decoder"] = true; }, "\"is_decoder\""},
      {[](nlohmann::json& c) { c["vocab_size"] = 100; }, "vocab_size"},
      {[](nlohmann::json& c) { c["layer_norm_eps"] = "tiny"; }, "\"layer_norm_eps\""},
  };
  for (const auto& [edit, fragment] : cases) {
    TempDir dir("bert_config_");
    WriteTiny(dir.File(""), edit);
    ExpectError([&] { BertEncoder::Load(dir.File("")); }, "config.json", fragment);
  }
  TempDir dir("bert_broken_");
  WriteTiny(dir.File(""));
  std::ofstream(dir.File("config.json")) << "{\"model_type\": ";
  ExpectError([&] { BertEncoder::Load(dir.File("")); }, "config.json", "not a JSON object");
}

// A safetensors file written by hand: tensor `name` with a dtype and shape
// of the test's choosing, the others as WriteTiny made them.
void RewriteTensor(const std::string& dir, const Tiny& t, const std::string& skip,
                   const std::string& name, const std::string& dtype, std::vector<int64_t> shape) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const auto& [n, values] : t.w) {
    if (n == skip) continue;
    const size_t begin = data.size();
    data.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
    header[n] = {
        {"dtype", "F32"}, {"shape", t.shape.at(n)}, {"data_offsets", {begin, data.size()}}};
  }
  if (!name.empty()) {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    const size_t begin = data.size();
    data.append(static_cast<size_t>(count) * (dtype == "I64" ? 8 : 4), '\0');
    header[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
  }
  const std::string h = header.dump();
  const uint64_t len = h.size();
  std::ofstream out(dir + "/model.safetensors", std::ios::binary);
  out.write(reinterpret_cast<const char*>(&len), 8);
  out << h << data;
}

TEST(BertTinyTest, RefusesMissingMisshapenOrMistypedTensors) {
  if (!HaveMiniLm()) return;
  TempDir dir("bert_tensors_");
  const Tiny t = WriteTiny(dir.File(""));
  const std::string ln = "encoder.layer.1.output.LayerNorm.weight";
  RewriteTensor(dir.File(""), t, ln, "", "", {});
  ExpectError([&] { BertEncoder::Load(dir.File("")); }, "model.safetensors", ln);
  RewriteTensor(dir.File(""), t, ln, ln, "F32", {13});
  ExpectError([&] { BertEncoder::Load(dir.File("")); }, ln, "[12]");
  RewriteTensor(dir.File(""), t, ln, ln, "I64", {12});
  ExpectError([&] { BertEncoder::Load(dir.File("")); }, ln, "I64");
  std::ofstream(dir.File("model.safetensors")) << "not safetensors";
  ExpectError([&] { BertEncoder::Load(dir.File("")); }, "model.safetensors", "");
}

TEST(BertTinyTest, RefusesPoolingItDoesNotImplement) {
  if (!HaveMiniLm()) return;
  TempDir dir("bert_pooling_");
  WriteTiny(dir.File(""));
  fs::create_directories(dir.File("1_Pooling"));
  std::ofstream(dir.File("1_Pooling/config.json"))
      << R"({"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false})";
  ExpectError([&] { BertEncoder::Load(dir.File("")); }, "1_Pooling/config.json",
              "pooling_mode_cls_token");
}

// ---------------------------------------------------------- all-MiniLM-L6-v2

TEST(MiniLmTest, EmbeddingsMatchSentenceTransformers) {
  if (!HaveMiniLm()) return;
  const BertEncoder model = BertEncoder::Load(kMiniLm);
  const std::vector<std::string> sentences = ReadJsonFile(kFixtures + "/sentences.json");
  std::vector<int64_t> shape;
  const std::vector<float> want = ReadFloats(kFixtures + "/embeddings.npy", &shape);
  ASSERT_EQ(shape, (std::vector<int64_t>{static_cast<int64_t>(sentences.size()), 384}));
  ASSERT_GE(sentences.size(), 50u);
  EmbedOptions options;
  options.batch_size = 16;
  const std::vector<float> got = model.Embed(sentences, options);
  double worst_cos = 1, worst_delta = 0;
  for (size_t i = 0; i < sentences.size(); ++i) {
    double dot = 0, na = 0, nb = 0, delta = 0;
    for (int f = 0; f < 384; ++f) {
      const double a = got[i * 384 + f], b = want[i * 384 + f];
      dot += a * b, na += a * a, nb += b * b;
      delta = std::max(delta, std::abs(a - b));
    }
    const double cos = dot / std::sqrt(na * nb);
    EXPECT_GE(cos, 0.99999) << "sentence " << i << ": " << sentences[i];
    EXPECT_LE(delta, 1e-5) << "sentence " << i << ": " << sentences[i];
    worst_cos = std::min(worst_cos, cos), worst_delta = std::max(worst_delta, delta);
  }
  std::printf("MiniLM: %zu sentences, worst cosine %.9f, worst max |delta| %.3g\n",
              sentences.size(), worst_cos, worst_delta);
}

TEST(MiniLmTest, BitwiseIdenticalForAnyThreadCountAndCloseForAnyBatchSize) {
  if (!HaveMiniLm()) return;
  const BertEncoder model = BertEncoder::Load(kMiniLm);
  std::vector<std::string> sentences = ReadJsonFile(kFixtures + "/sentences.json");
  sentences.resize(40);
  EmbedOptions options;
  options.batch_size = 8;
  options.num_threads = 1;
  const std::vector<float> one = model.Embed(sentences, options);
  options.num_threads = 2;
  const std::vector<float> two = model.Embed(sentences, options);
  options.num_threads = 3;
  const std::vector<float> three = model.Embed(sentences, options);
  ASSERT_EQ(0, std::memcmp(one.data(), two.data(), one.size() * sizeof(float)));
  ASSERT_EQ(0, std::memcmp(one.data(), three.data(), one.size() * sizeof(float)));
  // Other batch sizes pad differently, and SGEMM may order a row's sums
  // differently at other block positions: equal to the reference criterion.
  for (int64_t batch_size : {1, 40}) {
    options.batch_size = batch_size;
    const std::vector<float> other = model.Embed(sentences, options);
    for (size_t i = 0; i < one.size(); ++i) {
      ASSERT_NEAR(other[i], one[i], 1e-6) << "batch size " << batch_size << ", element " << i;
    }
  }
}

TEST(MiniLmTest, LastHiddenStatesMatchTransformers) {
  if (!HaveMiniLm()) return;
  const BertEncoder model = BertEncoder::Load(kMiniLm);
  for (int s = 0; s < 3; ++s) {
    const std::string stem = kFixtures + "/hidden_s" + std::to_string(s);
    const NpyArray ids64 = ReadNpy(stem + "_ids.npy");
    std::vector<int64_t> shape;
    const std::vector<float> want = ReadFloats(stem + ".npy", &shape);  // [7, seq, 384]
    const int64_t seq = ids64.numel();
    ASSERT_EQ(shape, (std::vector<int64_t>{7, seq, 384}));
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < seq; ++i) ids.push_back(static_cast<int32_t>(ids64.data<int64_t>()[i]));
    const std::vector<int64_t> lengths = {seq};
    const std::vector<float> got = model.Forward(ids, 1, seq, lengths, 2);
    const float* last = want.data() + 6 * seq * 384;
    for (int64_t i = 0; i < seq * 384; ++i) {
      // Post-LayerNorm values of magnitude up to ~10: 1e-5 relative.
      ASSERT_NEAR(got[i], last[i], 1e-5 * std::max(1.0f, std::abs(last[i])))
          << "sentence " << s << " element " << i;
    }
  }
}

TEST(MiniLmTest, AttentionWeightsMatchTransformersOnRealRows) {
  if (!HaveMiniLm()) return;
  const BertEncoder model = BertEncoder::Load(kMiniLm);
  const std::vector<std::string> texts = ReadJsonFile(kFixtures + "/attn_texts.json");
  const std::vector<int64_t> lengths = ReadJsonFile(kFixtures + "/attn_lengths.json");
  std::map<int64_t, std::vector<float>> layers;  // layer -> [3, 12, seq, seq] in input order
  int64_t seq = 0;
  EmbedOptions options;
  options.on_weights = [&](const LayerWeights& w) {
    seq = w.seq;
    std::vector<float>& dst = layers[w.layer];
    dst.resize(static_cast<size_t>(3 * 12 * seq * seq));
    for (size_t r = 0; r < w.rows.size(); ++r) {
      std::copy(w.weights + r * 12 * seq * seq, w.weights + (r + 1) * 12 * seq * seq,
                dst.begin() + w.rows[r] * 12 * seq * seq);
    }
  };
  model.Embed(texts, options);
  for (int layer : {0, 5}) {
    std::vector<int64_t> shape;
    const std::vector<float> want =
        ReadFloats(kFixtures + "/attn_layer" + std::to_string(layer) + ".npy", &shape);
    ASSERT_EQ(shape, (std::vector<int64_t>{3, 12, seq, seq}));
    const std::vector<float>& got = layers[layer];
    for (int64_t b = 0; b < 3; ++b)
      for (int64_t h = 0; h < 12; ++h)
        for (int64_t i = 0; i < seq; ++i) {
          double row_sum = 0;
          for (int64_t j = 0; j < seq; ++j) {
            const size_t at = static_cast<size_t>(((b * 12 + h) * seq + i) * seq + j);
            if (i >= lengths[b] || j >= lengths[b]) {
              ASSERT_EQ(got[at], 0.0f)
                  << "padding b " << b << " h " << h << " i " << i << " j " << j;
              continue;
            }
            row_sum += got[at];
            ASSERT_NEAR(got[at], want[at], 1e-5)
                << "layer " << layer << " b " << b << " h " << h << " i " << i << " j " << j;
          }
          if (i < lengths[b]) {
            ASSERT_NEAR(row_sum, 1.0, 1e-5);
          }
        }
  }
}

}  // namespace
}  // namespace qkv::models
