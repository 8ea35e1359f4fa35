// qkv/models/llama.h: a Llama-architecture decoder (SmolLM2, Llama 2/3 and
// their small cousins) run from a GGUF file on qkv's KV caches.
//
// Per block, for the n new tokens of a sequence at positions L .. L+n-1:
//   h  = RMSNorm(x) * attn_norm
//   q, k, v = h Wq^T, h Wk^T, h Wv^T          (quantised weights, in place)
//   q, k rotated by RoPE at their absolute positions, adjacent pairs
//        (RopeStyle::kGptJ: the GGUF converter permuted Wq / Wk's rows so
//        that llama.cpp's "normal" RoPE applies; docs/models.md)
//   k, v appended to the layer's KvCache (AppendWithRope)
//   a  = attention of q over the cache (below), GQA by head groups
//   x += a Wo^T
//   h  = RMSNorm(x) * ffn_norm
//   x += (silu(h Wgate^T) * (h Wup^T)) Wdown^T   (SwiGLU)
// then logits = RMSNorm(x) * output_norm . Woutput^T, where Woutput is
// token_embd when the file has no output.weight (tied embeddings).
//
// Attention path of a call (Forward says which ran in ForwardInfo):
//   "flash prefill"  an empty float32 contiguous or paged cache: qkv::Attention
//                    (the flash kernel) on the chunk's own rotated K/V, causal
//   "decode"         otherwise: qkv::Decode over the cache's view (its dtype),
//                    the chunk's queries at their positions, causal
//   sliding-window and sinks caches evict while a chunk is appended, so their
//   chunks run one token at a time ("decode, one token at a time").
#ifndef QKV_MODELS_LLAMA_H_
#define QKV_MODELS_LLAMA_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "qkv/gguf.h"
#include "qkv/kv_cache.h"
#include "qkv/models/quant.h"

namespace qkv::models {

struct LlamaConfig {
  int64_t num_layers = 0;
  int64_t hidden = 0;        // llama.embedding_length
  int64_t ffn = 0;           // llama.feed_forward_length
  int64_t num_q_heads = 0;   // llama.attention.head_count
  int64_t num_kv_heads = 0;  // llama.attention.head_count_kv
  int64_t head_dim = 0;      // hidden / num_q_heads
  int64_t vocab = 0;
  int64_t context = 0;       // llama.context_length (trained)
  double rope_base = 10000;  // llama.rope.freq_base
  int64_t rotary_dim = 0;    // llama.rope.dimension_count (default head_dim)
  float rms_eps = 1e-5f;     // llama.attention.layer_norm_rms_epsilon
  bool tied_output = false;  // no output.weight: token_embd is the output head
};

class LlamaModel {
 public:
  // Maps the GGUF file and checks it: architecture "llama", every tensor
  // the config needs with the shape it implies and a supported type. Throws
  // qkv::Error naming the file and the tensor or key.
  static LlamaModel Load(const std::string& path);

  LlamaModel(LlamaModel&&) noexcept;
  LlamaModel& operator=(LlamaModel&&) noexcept;
  ~LlamaModel();

  const LlamaConfig& config() const;
  const GgufFile& file() const;
  // Bytes of the weights as stored (what a decode step reads).
  int64_t WeightBytes() const;

  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  explicit LlamaModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// One KvCache per layer, all of one kind and dtype; sequences are added,
// forked and freed on every layer together.
class LlamaCache {
 public:
  // `cache` gives kind, dtype, capacity / window / num_sinks / block_size /
  // num_blocks; num_kv_heads and head_dim are taken from the model.
  LlamaCache(const LlamaConfig& config, KvCacheConfig cache);
  int64_t AddSequence();
  int64_t ForkSequence(int64_t parent);
  void FreeSequence(int64_t seq);
  int64_t Length(int64_t seq) const;
  int64_t BytesAllocated() const;
  const KvCacheConfig& cache_config() const { return layers_.front().config(); }
  std::vector<KvCache>& layers() { return layers_; }

 private:
  std::vector<KvCache> layers_;
};

enum class Logits : uint8_t { kNone, kLast, kAll };

struct ForwardInfo {
  std::string attention_path;  // "flash prefill", "decode", ...
  double attention_seconds = 0;  // time inside the attention kernels
};

// What a forward pass hands out for inspection (`qkv logits --attn-weights`,
// `qkv explain scaling --model`; docs/inspect.md). Only for a prefill of an
// empty float32 contiguous or paged cache, where the chunk's keys are all
// the keys; LlamaForward throws qkv::Error otherwise. Per layer:
//   weights  [num_q_heads, n, n]: softmax(scale Q.K^T), causal (0 above the
//            diagonal). Asking for them runs attention on the reference
//            kernel (the only one that writes weights) instead of flash, and
//            ForwardInfo says so; logits then differ from a plain run in the
//            last bits (summation order), never by more than rounding.
//   q        [n, num_q_heads, head_dim], k and v [n, num_kv_heads, head_dim]:
//            the projections attention sees (q and k after RoPE).
struct LlamaProbe {
  bool want_weights = false, want_qkv = false;
  std::vector<std::vector<float>> weights, q, k, v;  // [layer][...], filled by LlamaForward
};

// Runs `tokens` through the model as the next tokens of sequence `seq` of
// `cache` and writes logits [n, vocab] (kAll), [1, vocab] (kLast) or nothing
// into `logits` (resized). Throws qkv::Error on a token id out of range or a
// cache error (full, exhausted) before anything is appended to any layer.
// `probe`, when not null, is filled as described above.
ForwardInfo LlamaForward(const LlamaModel& model, LlamaCache& cache, int64_t seq,
                         std::span<const int32_t> tokens, Logits mode, std::vector<float>& logits,
                         int num_threads = 0, LlamaProbe* probe = nullptr);

}  // namespace qkv::models

#endif  // QKV_MODELS_LLAMA_H_
