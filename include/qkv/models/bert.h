// qkv/models/bert.h: a BERT encoder with sentence-transformers pooling, run
// on qkv's attention: all-MiniLM-L6-v2 and other Hugging Face BertModel
// checkpoints (post-LayerNorm, absolute positions, exact-erf GELU).
//
// Per padded batch of token ids [batch, seq] with lengths[b] real tokens:
//   x = LayerNorm(word[id] + position[s] + token_type[0])
//   per layer: q,k,v = x Wq^T + bq, ...      (one [3*hidden, hidden] product)
//              a = Attention(q, k, v) over heads, keys j < lengths[b] only
//              x = LayerNorm(x + a Wo^T + bo)
//              x = LayerNorm(x + GELU(x W1^T + b1) W2^T + b2)
// then mean pooling over the real tokens and L2 normalisation (when the
// model's modules.json lists Normalize), as sentence-transformers does.
// Padding never reaches a real row: padded keys are masked by key lengths,
// and padded rows are dropped by the pooling.
#ifndef QKV_MODELS_BERT_H_
#define QKV_MODELS_BERT_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "qkv/models/tokenizer.h"

namespace qkv::models {

struct BertConfig {
  int64_t vocab_size = 0, hidden_size = 0, num_layers = 0, num_heads = 0;
  int64_t intermediate_size = 0, max_positions = 0, type_vocab_size = 0;
  float layer_norm_eps = 1e-12f;
  int64_t head_dim() const { return hidden_size / num_heads; }
};

// Per-layer attention weights of one batch, handed to EmbedOptions::on_weights:
// weights [rows.size(), num_heads, seq, seq] row-major; rows[i] is the input
// index of batch row i; entries past a row's token count are 0.
struct LayerWeights {
  int64_t layer = 0;
  std::span<const int64_t> rows;
  int64_t seq = 0;
  const float* weights = nullptr;
};

struct EmbedOptions {
  int64_t batch_size = 32;
  int num_threads = 0;  // 0: OpenMP's default
  // Called after each batch with the number of texts done so far.
  std::function<void(int64_t done, int64_t total)> on_progress;
  // When set, attention runs on the reference kernel (the only one that
  // writes weights) and hands every layer's weights here.
  std::function<void(const LayerWeights&)> on_weights;
};

// Where the time went (seconds, wall clock), for `qkv embed` and benchmarks.
struct EmbedStats {
  double tokenize_s = 0, dense_s = 0, attention_s = 0, other_s = 0;
  int64_t tokens = 0;            // real tokens, [CLS] and [SEP] included
  int64_t padded_tokens = 0;     // tokens computed, padding included
  std::string attention_kernel;  // what qkv::Attention ran, and why
};

// The tokenizer of a model directory and its truncation length: DIR/tokenizer.json,
// and sentence_bert_config.json's max_seq_length when present, else
// config.json's max_position_embeddings (what BertEncoder::Load uses).
struct ModelTokenizer {
  WordPieceTokenizer tokenizer;
  int64_t max_length = 0;
};
ModelTokenizer LoadBertTokenizer(const std::string& dir);

class BertEncoder {
 public:
  // Reads DIR/config.json, DIR/model.safetensors (names with or without a
  // "bert." prefix), DIR/tokenizer.json and, when present, the
  // sentence-transformers files (sentence_bert_config.json: max_seq_length;
  // 1_Pooling/config.json: only mean pooling is implemented; modules.json:
  // Normalize). Validates every value, name, shape and dtype and throws a
  // one-line qkv::Error naming the file and the tensor or key.
  static BertEncoder Load(const std::string& dir);

  const BertConfig& config() const { return config_; }
  const WordPieceTokenizer& tokenizer() const { return *tokenizer_; }
  int64_t max_seq_length() const { return max_seq_length_; }
  bool normalize() const { return normalize_; }

  // Token ids of one text, truncated to max_seq_length().
  Encoding Tokenize(std::string_view text) const;

  // Last hidden states [batch, seq, hidden] of padded token ids [batch, seq]
  // (lengths[b] in 1..seq real tokens in row b; ids past it are ignored, and
  // their rows of the result are 0). `weights_out`, when not null, receives
  // each layer's attention weights [batch, heads, seq, seq] (layer-major:
  // num_layers blocks; 0 outside the real rows and columns). `qkv_out`, when
  // not null, receives each layer's projected queries, keys and values of
  // the real tokens, packed [tokens, 3 * hidden] (row first + t is token t of
  // row b, rows in batch order; per row q | k | v, each [heads, head_dim];
  // layer-major): what `qkv explain scaling --model` measures.
  std::vector<float> Forward(std::span<const int32_t> ids, int64_t batch, int64_t seq,
                             std::span<const int64_t> lengths, int num_threads,
                             std::vector<float>* weights_out = nullptr,
                             EmbedStats* stats = nullptr,
                             std::vector<float>* qkv_out = nullptr) const;

  // Sentence embeddings [texts.size(), hidden], in input order. Texts are
  // tokenised, sorted by token count (as sentence-transformers does, so a
  // batch holds texts of similar length), run batch_size at a time, pooled.
  std::vector<float> Embed(std::span<const std::string> texts, const EmbedOptions& options,
                           EmbedStats* stats = nullptr) const;

 private:
  struct Layer {
    std::vector<float> qkv_w, qkv_b;  // [3 * hidden, hidden], [3 * hidden]
    std::vector<float> out_w, out_b, ln1_g, ln1_b;
    std::vector<float> ffn1_w, ffn1_b, ffn2_w, ffn2_b, ln2_g, ln2_b;
  };
  BertEncoder() = default;

  BertConfig config_;
  std::optional<WordPieceTokenizer> tokenizer_;  // always set after Load
  int64_t max_seq_length_ = 0;
  bool normalize_ = false;
  std::vector<float> word_, position_, token_type_, emb_ln_g_, emb_ln_b_;
  std::vector<Layer> layers_;
};

}  // namespace qkv::models

#endif  // QKV_MODELS_BERT_H_
