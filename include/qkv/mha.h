// qkv/mha.h: multi-head attention layer, compatible with torch.nn.MultiheadAttention
// (batch_first=True), plus grouped-query / multi-query variants. docs/mha.md.
//
//   query [batch, seq_q, embed_dim], key [batch, seq_kv, kdim], value [batch, seq_kv, vdim]
//   Q = query.W_q^T + b_q  [batch, seq_q,  num_heads,    head_dim]  head_dim = E / num_heads
//   K = key.W_k^T + b_k    [batch, seq_kv, num_kv_heads, head_dim]
//   V = value.W_v^T + b_v  [batch, seq_kv, num_kv_heads, head_dim]
//   O = qkv::Attention(Q, K, V) per head on bshd views (no copies), scale 1/sqrt(head_dim)
//   out = O.W_o^T + b_o    [batch, seq_q, embed_dim]  (O's memory is [batch, seq_q, E])
// Query head h reads kv head h / (num_heads / num_kv_heads), as in qkv/attention.h.
// Weights use torch's Linear layout [out_features, in_features]; all float32.
#ifndef QKV_MHA_H_
#define QKV_MHA_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "qkv/attention.h"
#include "qkv/mask.h"
#include "qkv/safetensors.h"
#include "qkv/tensor.h"

namespace qkv {

struct MhaConfig {
  int64_t embed_dim = 0;     // E >= 1, a multiple of num_heads
  int64_t num_heads = 0;     // H >= 1 (query heads)
  int64_t num_kv_heads = 0;  // G: divides H; 0 means H (standard MHA), 1 is MQA
  int64_t kdim = 0;          // key features, 0 means E
  int64_t vdim = 0;          // value features, 0 means E
};

// torch-layout float32 weights, row-major; an empty bias vector means "no bias".
struct MhaWeights {
  std::vector<float> q_proj, k_proj, v_proj;  // [E, E], [G*hd, kdim], [G*hd, vdim]
  std::vector<float> q_bias, k_bias, v_bias;  // [E], [G*hd], [G*hd]
  std::vector<float> out_proj, out_bias;      // [E, E], [E]
};

// A torch-style mask: bool (one byte, nonzero = MASKED OUT, the opposite of
// qkv/mask.h and scaled_dot_product_attention) or float32/float64/float16,
// added to the scores (-inf masks). Absent when data is null.
struct MhaMask {
  const void* data = nullptr;
  DType dtype = DType::kBool;
  std::vector<int64_t> shape;
};

struct MhaParams {
  std::span<const float> query;  // [batch, seq_q, embed_dim]
  std::span<const float> key;    // [batch, seq_kv, kdim]    (cross-attention)
  std::span<const float> value;  // [batch, seq_kv, vdim]    (cross-attention)
  int64_t batch = 0, seq_q = 0;
  int64_t seq_kv = -1;               // -1: self-attention (key, value empty: both are query)
  MhaMask key_padding_mask;          // [batch, seq_kv]
  MhaMask attn_mask;                 // [seq_q, seq_kv] or [batch * num_heads, seq_q, seq_kv]
  bool causal = false;               // causal mask, aligned as below
  Alignment causal_alignment = Alignment::kTopLeft;  // torch's is_causal: key j <= query i;
                                     // kBottomRight: j <= i + seq_kv - seq_q (qkv/mask.h)
  std::span<float> out;              // [batch, seq_q, embed_dim]
  std::span<float> attn_weights;     // optional: [batch, seq_q, seq_kv] averaged over heads,
  bool average_attn_weights = true;  // or [batch, num_heads, seq_q, seq_kv] when false
  int num_threads = 0;               // 0: OpenMP's default; results never depend on it
};

// The torch masks as qkv's one additive float32 mask (see ConvertMhaMasks).
struct MhaMaskSpec {
  MaskSpec spec;              // views `buffer` (or the caller's float32 mask)
  std::vector<float> buffer;  // moving keeps spec valid; do not copy
  MhaMaskSpec() = default;
  MhaMaskSpec(MhaMaskSpec&&) = default;
  MhaMaskSpec& operator=(MhaMaskSpec&&) = default;
};

// Converts key_padding_mask, attn_mask and causal (at `alignment`) to a
// MaskSpec for [batch, num_heads, seq_q, seq_kv]. Memory: none without masks
// or for one float32 mask alone (viewed in place, stride 0 where it
// broadcasts); otherwise one float32 buffer of the smallest broadcast shape:
// kpm [B,1,1,Nk], 2-D [1,1,Nq,Nk], kpm + 2-D [B,1,Nq,Nk], 3-D (with or
// without kpm) [B,H,Nq,Nk]. Throws qkv::Error naming the mask.
MhaMaskSpec ConvertMhaMasks(const MhaMask& key_padding_mask, const MhaMask& attn_mask, bool causal,
                            int64_t batch, int64_t num_heads, int64_t seq_q, int64_t seq_kv,
                            Alignment alignment = Alignment::kTopLeft);

// Returns the number of parameters, W_q + W_k + W_v + W_o (+ biases):
//   E*E + G*hd*kdim + G*hd*vdim + E*E  (+ E + 2*G*hd + E),
// which is 4*E^2 (+ 4*E) for standard MHA (kdim = vdim = E, G*hd = E),
// whatever H: heads split E, they do not add parameters. Validates `config`.
int64_t MhaParamCount(const MhaConfig& config, bool bias);

class MultiHeadAttention {
 public:
  // Validates the config and every weight's size; throws qkv::Error naming it.
  MultiHeadAttention(const MhaConfig& config, const MhaWeights& weights);

  // Loads torch.nn.MultiheadAttention state_dict names (docs/mha.md): packed
  // in_proj_weight [3E, E] or q/k/v_proj_weight; in_proj_bias, out_proj.weight,
  // out_proj.bias. Biases are optional. GQA uses q/k/v_proj_weight and an
  // in_proj_bias of E + 2*G*hd. `prefix` is prepended to every name (e.g.
  // "layers.0.self_attn."). Throws qkv::Error naming the tensor.
  static MultiHeadAttention FromSafetensors(const SafetensorsFile& file, const MhaConfig& config,
                                            const std::string& prefix = "");

  // Computes out (and attn_weights) as above; validates everything first and
  // throws qkv::Error before writing anything. Returns what the core
  // qkv::Attention ran (the kernel and why).
  AttentionInfo Forward(const MhaParams& params) const;

  const MhaConfig& config() const { return config_; }  // kdim, vdim, num_kv_heads resolved
  int64_t head_dim() const { return config_.embed_dim / config_.num_heads; }
  bool has_bias() const { return !q_bias_.empty(); }  // the in-projection bias

 private:
  MhaConfig config_;
  // nn.Linear layout [out, in], multiplied by OpenBLAS (qkv/models/layers.h).
  std::vector<float> q_proj_, k_proj_, v_proj_, out_proj_;
  std::vector<float> q_bias_, k_bias_, v_bias_, out_bias_;
};

}  // namespace qkv

#endif  // QKV_MHA_H_
