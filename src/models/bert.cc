// BERT encoder on qkv's attention (qkv/models/bert.h): loading and forward.
//
// The dense layers (90 % of the time at MiniLM's sizes) run on the real
// tokens only, packed row after row; attention alone sees the padded
// [batch, seq] layout (copies of q, k, v in, of its output back: 4 * hidden
// floats per token and layer), with padding masked out by key lengths.
// Memory per batch of T real tokens and P = batch * seq padded ones
// (float32): x, tmp, ctx [T, hidden], qkv [T, 3 * hidden], ffn [T, inter],
// padded qkv and ctx [P, 4 * hidden], the result [P, hidden]: for MiniLM
// (384 / 1536) about 20 KiB per token, 20 MiB for 32 x 32 tokens. Attention
// adds its kernel's fixed scratch, or with weights asked [batch, heads, seq,
// seq] per layer.
#include "qkv/models/bert.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>

#include "io/file_util.h"
#include "qkv/attention.h"
#include "qkv/error.h"
#include "qkv/models/layers.h"
#include "qkv/safetensors.h"
#include "validate.h"

namespace qkv::models {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string S(int64_t v) { return std::to_string(v); }

// Returns the parsed JSON of `path`, or throws "<path>: ...".
// Configuration files are small: at most 1 MiB is read.
constexpr uint64_t kMaxConfigBytes = 1 << 20;

nlohmann::json ReadJsonValue(const std::string& path) {
  const std::string text = internal::ReadSmallFile(path, "JSON file", kMaxConfigBytes);
  return nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
}

nlohmann::json ReadJson(const std::string& path) {
  nlohmann::json j = ReadJsonValue(path);
  if (j.is_discarded() || !j.is_object()) {
    throw Error(path + ": not a JSON object (expected the model's configuration)");
  }
  return j;
}

// True when `path` names anything (stat: a FIFO is not opened, so never
// waited on; ReadSmallFile then refuses what is not a regular file).
bool Exists(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0;
}

// Returns config[key] as an integer in [lo, hi]; throws naming file and key.
int64_t Int(const nlohmann::json& j, const std::string& path, const char* key, int64_t lo,
            int64_t hi) {
  const auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer() || it->get<int64_t>() < lo ||
      it->get<int64_t>() > hi) {
    throw Error(path + ": \"" + key + "\" is " + (it == j.end() ? "missing" : it->dump()) +
                " (expected an integer in [" + S(lo) + ", " + S(hi) + "])");
  }
  return it->get<int64_t>();
}

// Throws unless config[key] is absent (when `optional`) or one of `allowed`.
void Str(const nlohmann::json& j, const std::string& path, const char* key,
         std::initializer_list<const char*> allowed, bool optional) {
  const auto it = j.find(key);
  if (it == j.end() && optional) return;
  std::string list;
  for (const char* a : allowed) {
    if (it != j.end() && it->is_string() && it->get<std::string>() == a) return;
    list += (list.empty() ? "\"" : ", \"") + std::string(a) + "\"";
  }
  throw Error(path + ": \"" + key + "\" is " + (it == j.end() ? "missing" : it->dump()) +
              " (expected " + list + ": what qkv's BERT implements)");
}

BertConfig ParseConfig(const std::string& path) {
  const nlohmann::json j = ReadJson(path);
  Str(j, path, "model_type", {"bert"}, false);
  Str(j, path, "hidden_act", {"gelu"}, false);
  Str(j, path, "position_embedding_type", {"absolute"}, true);
  for (const char* flag : {"is_decoder", "add_cross_attention"}) {
    const auto it = j.find(flag);
    if (it != j.end() && !(it->is_boolean() && !it->get<bool>())) {
      throw Error(path + ": \"" + flag + "\" is " + it->dump() +
                  " (expected false: qkv's BERT is an encoder)");
    }
  }
  BertConfig c;
  constexpr int64_t kMaxDim = 1 << 16;
  c.vocab_size = Int(j, path, "vocab_size", 1, 1 << 24);
  c.hidden_size = Int(j, path, "hidden_size", 1, kMaxDim);
  c.num_layers = Int(j, path, "num_hidden_layers", 1, 1024);
  c.num_heads = Int(j, path, "num_attention_heads", 1, c.hidden_size);
  c.intermediate_size = Int(j, path, "intermediate_size", 1, 4 * kMaxDim);
  c.max_positions = Int(j, path, "max_position_embeddings", 1, 1 << 20);
  c.type_vocab_size = Int(j, path, "type_vocab_size", 1, 1 << 10);
  if (c.hidden_size % c.num_heads != 0) {
    throw Error(path + ": hidden_size " + S(c.hidden_size) + " is not a multiple of " +
                "num_attention_heads " + S(c.num_heads) + " (expected equal head sizes)");
  }
  const auto eps = j.find("layer_norm_eps");
  if (eps != j.end()) {
    if (!eps->is_number() || !(eps->get<double>() > 0) || eps->get<double>() > 1) {
      throw Error(path + ": \"layer_norm_eps\" is " + eps->dump() +
                  " (expected a number in (0, 1])");
    }
    c.layer_norm_eps = eps->get<float>();
  }
  return c;
}

// sentence_bert_config.json's max_seq_length, or max_positions without it.
int64_t MaxSeqLength(const std::string& dir, int64_t max_positions) {
  const std::string st_config = dir + "/sentence_bert_config.json";
  if (!Exists(st_config)) return max_positions;
  return Int(ReadJson(st_config), st_config, "max_seq_length", 2, max_positions);
}

}  // namespace

ModelTokenizer LoadBertTokenizer(const std::string& dir) {
  const BertConfig c = ParseConfig(dir + "/config.json");
  return {WordPieceTokenizer::FromFile(dir + "/tokenizer.json"),
          MaxSeqLength(dir, c.max_positions)};
}

BertEncoder BertEncoder::Load(const std::string& dir) {
  BertEncoder m;
  m.config_ = ParseConfig(dir + "/config.json");
  const BertConfig& c = m.config_;
  m.tokenizer_ = WordPieceTokenizer::FromFile(dir + "/tokenizer.json");
  if (static_cast<int64_t>(m.tokenizer_->vocab_size()) > c.vocab_size) {
    throw Error(dir + "/tokenizer.json: " + S(static_cast<int64_t>(m.tokenizer_->vocab_size())) +
                " tokens (expected at most config.json's vocab_size " + S(c.vocab_size) + ")");
  }

  // sentence-transformers: truncation length, pooling, normalisation.
  m.max_seq_length_ = MaxSeqLength(dir, c.max_positions);
  const std::string pooling = dir + "/1_Pooling/config.json";
  if (Exists(pooling)) {
    const nlohmann::json p = ReadJson(pooling);
    for (const auto& [key, value] : p.items()) {
      if (key.rfind("pooling_mode_", 0) != 0) continue;
      const bool on = value.is_boolean() && value.get<bool>();
      if (on != (key == "pooling_mode_mean_tokens")) {
        throw Error(pooling + ": \"" + key + "\" is " + value.dump() +
                    " (expected mean pooling only: pooling_mode_mean_tokens true, the others "
                    "false)");
      }
    }
  }
  const std::string modules = dir + "/modules.json";
  if (Exists(modules)) {
    const nlohmann::json j = ReadJsonValue(modules);
    if (j.is_discarded() || !j.is_array()) {
      throw Error(modules + ": not a JSON list (expected sentence-transformers' modules)");
    }
    for (const auto& module : j) {
      if (module.is_object() &&
          module.value("type", "") == "sentence_transformers.models.Normalize")
        m.normalize_ = true;
    }
  }

  // Weights, by their Hugging Face names.
  const std::string weights_path = dir + "/model.safetensors";
  const SafetensorsFile file = SafetensorsFile::Read(weights_path);
  const std::string prefix = file.Find("bert.embeddings.word_embeddings.weight") ? "bert." : "";
  const auto load = [&](const std::string& name, std::initializer_list<int64_t> shape) {
    const std::vector<int64_t> dims(shape);
    return file.LoadFloat32(prefix + name, dims);
  };
  const int64_t h = c.hidden_size, inter = c.intermediate_size;
  m.word_ = load("embeddings.word_embeddings.weight", {c.vocab_size, h});
  m.position_ = load("embeddings.position_embeddings.weight", {c.max_positions, h});
  m.token_type_ = load("embeddings.token_type_embeddings.weight", {c.type_vocab_size, h});
  m.emb_ln_g_ = load("embeddings.LayerNorm.weight", {h});
  m.emb_ln_b_ = load("embeddings.LayerNorm.bias", {h});
  m.layers_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    Layer& layer = m.layers_[static_cast<size_t>(l)];
    const std::string p = "encoder.layer." + S(l) + ".";
    for (const char* part : {"query", "key", "value"}) {
      const std::vector<float> w = load(p + "attention.self." + part + ".weight", {h, h});
      const std::vector<float> b = load(p + "attention.self." + part + ".bias", {h});
      layer.qkv_w.insert(layer.qkv_w.end(), w.begin(), w.end());
      layer.qkv_b.insert(layer.qkv_b.end(), b.begin(), b.end());
    }
    layer.out_w = load(p + "attention.output.dense.weight", {h, h});
    layer.out_b = load(p + "attention.output.dense.bias", {h});
    layer.ln1_g = load(p + "attention.output.LayerNorm.weight", {h});
    layer.ln1_b = load(p + "attention.output.LayerNorm.bias", {h});
    layer.ffn1_w = load(p + "intermediate.dense.weight", {inter, h});
    layer.ffn1_b = load(p + "intermediate.dense.bias", {inter});
    layer.ffn2_w = load(p + "output.dense.weight", {h, inter});
    layer.ffn2_b = load(p + "output.dense.bias", {h});
    layer.ln2_g = load(p + "output.LayerNorm.weight", {h});
    layer.ln2_b = load(p + "output.LayerNorm.bias", {h});
  }
  return m;
}

Encoding BertEncoder::Tokenize(std::string_view text) const {
  return tokenizer_->Encode(text, static_cast<size_t>(max_seq_length_));
}

std::vector<float> BertEncoder::Forward(std::span<const int32_t> ids, int64_t batch, int64_t seq,
                                        std::span<const int64_t> lengths, int num_threads,
                                        std::vector<float>* weights_out, EmbedStats* stats,
                                        std::vector<float>* qkv_out) const {
  const BertConfig& c = config_;
  const int64_t h = c.hidden_size, heads = c.num_heads, hd = c.head_dim();
  if (batch < 0 || seq < 1 || seq > c.max_positions ||
      static_cast<int64_t>(ids.size()) != batch * seq ||
      static_cast<int64_t>(lengths.size()) != batch) {
    throw Error("BertEncoder::Forward: ids has " + S(static_cast<int64_t>(ids.size())) +
                " tokens for batch " + S(batch) + " x seq " + S(seq) + " (expected seq in [1, " +
                S(c.max_positions) + "] and batch * seq ids, one length per row)");
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (lengths[b] < 1 || lengths[b] > seq) {
      throw Error("BertEncoder::Forward: lengths[" + S(b) + "] is " + S(lengths[b]) +
                  " (expected 1.." + S(seq) + ")");
    }
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= c.vocab_size) {
      throw Error("BertEncoder::Forward: ids[" + S(static_cast<int64_t>(i)) + "] is " + S(ids[i]) +
                  " (expected a token id in [0, " + S(c.vocab_size) + "))");
    }
  }
  const int threads = internal::ResolveThreads(num_threads);
  EmbedStats local;
  EmbedStats& st = stats ? *stats : local;

  // Dense layers run on the real tokens only, packed: row first[b] + t is
  // token t of row b. Attention reads them scattered into the padded
  // [batch, seq] layout, padding masked out by key lengths.
  auto t0 = Clock::now();
  std::vector<int64_t> first(static_cast<size_t>(batch) + 1, 0);
  for (int64_t b = 0; b < batch; ++b) first[b + 1] = first[b] + lengths[b];
  const int64_t tokens = first[batch];
  std::vector<float> x(static_cast<size_t>(tokens * h)), tmp(x.size());
  // Embeddings: word + position + token type 0, then LayerNorm.
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens * h > 65536)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < lengths[b]; ++t) {
      const float* word = word_.data() + ids[static_cast<size_t>(b * seq + t)] * h;
      const float* pos = position_.data() + t * h;
      float* row = x.data() + (first[b] + t) * h;
      for (int64_t f = 0; f < h; ++f) row[f] = word[f] + pos[f] + token_type_[f];
    }
  }
  AddLayerNorm(x.data(), nullptr, tokens, h, emb_ln_g_.data(), emb_ln_b_.data(), c.layer_norm_eps,
               threads);

  std::vector<float> qkv(static_cast<size_t>(tokens * 3 * h)), ctx(x.size());
  std::vector<float> ffn(static_cast<size_t>(tokens * c.intermediate_size));
  // Padded copies for attention; padded rows stay 0 (masked keys; padded
  // query rows are computed and dropped).
  std::vector<float> qkv_padded(static_cast<size_t>(batch * seq * 3 * h), 0.0f);
  std::vector<float> ctx_padded(static_cast<size_t>(batch * seq * h));
  if (weights_out) {
    weights_out->assign(static_cast<size_t>(c.num_layers * batch * heads * seq * seq), 0.0f);
  }
  if (qkv_out) {
    qkv_out->clear();
    qkv_out->reserve(static_cast<size_t>(c.num_layers * tokens * 3 * h));
  }
  st.other_s += Since(t0);

  AttentionParams a;
  // q, k, v: [batch, heads, seq, head_dim] views of the rows of [batch * seq, 3h].
  const Shape4 qkv_strides{seq * 3 * h, hd, 3 * h, 1};
  a.q = {qkv_padded.data(), DType::kFloat32, {batch, heads, seq, hd}, qkv_strides};
  a.k = {qkv_padded.data() + h, DType::kFloat32, {batch, heads, seq, hd}, qkv_strides};
  a.v = {qkv_padded.data() + 2 * h, DType::kFloat32, {batch, heads, seq, hd}, qkv_strides};
  a.out = MutableTensorView::FromBSHD(ctx_padded.data(), DType::kFloat32, batch, seq, heads, hd);
  a.mask.key_lengths = lengths;
  a.num_threads = threads;

  for (int64_t l = 0; l < c.num_layers; ++l) {
    const Layer& layer = layers_[static_cast<size_t>(l)];
    t0 = Clock::now();
    Linear(x.data(), tokens, h, layer.qkv_w.data(), layer.qkv_b.data(), 3 * h, qkv.data(), threads);
    st.dense_s += Since(t0);
    if (qkv_out) qkv_out->insert(qkv_out->end(), qkv.begin(), qkv.end());

    t0 = Clock::now();
    for (int64_t b = 0; b < batch; ++b) {
      std::copy_n(qkv.data() + first[b] * 3 * h, lengths[b] * 3 * h,
                  qkv_padded.data() + b * seq * 3 * h);
    }
    if (weights_out) {
      a.weights = MutableTensorView::Contiguous(weights_out->data() + l * batch * heads * seq * seq,
                                                DType::kFloat32, {batch, heads, seq, seq});
    }
    const AttentionInfo info = Attention(a);
    if (st.attention_kernel.empty()) {
      st.attention_kernel = std::string(KernelName(info.kernel)) + " (" + info.reason + ")";
    }
    for (int64_t b = 0; b < batch; ++b) {
      std::copy_n(ctx_padded.data() + b * seq * h, lengths[b] * h, ctx.data() + first[b] * h);
    }
    st.attention_s += Since(t0);

    t0 = Clock::now();
    Linear(ctx.data(), tokens, h, layer.out_w.data(), layer.out_b.data(), h, tmp.data(), threads);
    st.dense_s += Since(t0);
    t0 = Clock::now();
    AddLayerNorm(tmp.data(), x.data(), tokens, h, layer.ln1_g.data(), layer.ln1_b.data(),
                 c.layer_norm_eps, threads);
    std::swap(x, tmp);
    st.other_s += Since(t0);

    t0 = Clock::now();
    Linear(x.data(), tokens, h, layer.ffn1_w.data(), layer.ffn1_b.data(), c.intermediate_size,
           ffn.data(), threads);
    st.dense_s += Since(t0);
    t0 = Clock::now();
    GeluErf(ffn.data(), tokens * c.intermediate_size, threads);
    st.other_s += Since(t0);
    t0 = Clock::now();
    Linear(ffn.data(), tokens, c.intermediate_size, layer.ffn2_w.data(), layer.ffn2_b.data(), h,
           tmp.data(), threads);
    st.dense_s += Since(t0);
    t0 = Clock::now();
    AddLayerNorm(tmp.data(), x.data(), tokens, h, layer.ln2_g.data(), layer.ln2_b.data(),
                 c.layer_norm_eps, threads);
    std::swap(x, tmp);
    st.other_s += Since(t0);
  }
  t0 = Clock::now();
  if (weights_out) {
    // The reference kernel writes padded query rows too; they are padding: 0.
    for (int64_t lb = 0; lb < c.num_layers * batch; ++lb) {
      const int64_t len = lengths[lb % batch];
      float* w = weights_out->data() + lb * heads * seq * seq;
      for (int64_t hh = 0; hh < heads; ++hh)
        for (int64_t i = len; i < seq; ++i) std::fill_n(w + (hh * seq + i) * seq, seq, 0.0f);
    }
  }
  // Back to the padded [batch, seq, hidden] layout; padded rows are 0.
  std::vector<float> hidden(static_cast<size_t>(batch * seq * h), 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    std::copy_n(x.data() + first[b] * h, lengths[b] * h, hidden.data() + b * seq * h);
  }
  st.other_s += Since(t0);
  st.padded_tokens += batch * seq;
  st.tokens += tokens;
  return hidden;
}

std::vector<float> BertEncoder::Embed(std::span<const std::string> texts,
                                      const EmbedOptions& options, EmbedStats* stats) const {
  if (options.batch_size < 1) {
    throw Error("batch_size is " + S(options.batch_size) + " (expected at least 1)");
  }
  EmbedStats local;
  EmbedStats& st = stats ? *stats : local;
  const int64_t n = static_cast<int64_t>(texts.size()), h = config_.hidden_size;
  const int64_t heads = config_.num_heads;

  auto t0 = Clock::now();
  std::vector<Encoding> enc(texts.size());
  for (int64_t i = 0; i < n; ++i) {
    try {
      enc[static_cast<size_t>(i)] = Tokenize(texts[static_cast<size_t>(i)]);
    } catch (const Error& e) {
      throw Error("text " + S(i + 1) + ": " + e.what());
    }
  }
  // Longest first, ties in input order: batches of similar lengths.
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return enc[static_cast<size_t>(a)].ids.size() > enc[static_cast<size_t>(b)].ids.size();
  });
  st.tokenize_s += Since(t0);

  std::vector<float> out(static_cast<size_t>(n * h));
  std::vector<float> weights;
  for (int64_t start = 0; start < n; start += options.batch_size) {
    t0 = Clock::now();
    const int64_t batch = std::min(options.batch_size, n - start);
    const std::span<const int64_t> rows(order.data() + start, static_cast<size_t>(batch));
    const int64_t seq = static_cast<int64_t>(enc[static_cast<size_t>(rows[0])].ids.size());
    std::vector<int32_t> ids(static_cast<size_t>(batch * seq), tokenizer_->pad_id());
    std::vector<int64_t> lengths(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) {
      const std::vector<int32_t>& row = enc[static_cast<size_t>(rows[b])].ids;
      std::copy(row.begin(), row.end(), ids.begin() + b * seq);
      lengths[static_cast<size_t>(b)] = static_cast<int64_t>(row.size());
    }
    st.other_s += Since(t0);

    const std::vector<float> hidden = Forward(ids, batch, seq, lengths, options.num_threads,
                                              options.on_weights ? &weights : nullptr, &st);

    // Mean over the real tokens (in order, in double), then x / max(|x|, 1e-12).
    t0 = Clock::now();
    for (int64_t b = 0; b < batch; ++b) {
      float* dst = out.data() + rows[b] * h;
      const int64_t len = lengths[static_cast<size_t>(b)];
      double norm2 = 0.0;
      for (int64_t f = 0; f < h; ++f) {
        double sum = 0.0;
        for (int64_t t = 0; t < len; ++t) sum += hidden[static_cast<size_t>((b * seq + t) * h + f)];
        dst[f] = static_cast<float>(sum / static_cast<double>(len));
        norm2 += static_cast<double>(dst[f]) * dst[f];
      }
      if (normalize_) {
        const double scale = 1.0 / std::max(std::sqrt(norm2), 1e-12);
        for (int64_t f = 0; f < h; ++f) dst[f] = static_cast<float>(dst[f] * scale);
      }
    }
    st.other_s += Since(t0);
    if (options.on_weights) {
      for (int64_t l = 0; l < config_.num_layers; ++l) {
        options.on_weights({l, rows, seq, weights.data() + l * batch * heads * seq * seq});
      }
    }
    if (options.on_progress) options.on_progress(start + batch, n);
  }
  return out;
}

}  // namespace qkv::models
