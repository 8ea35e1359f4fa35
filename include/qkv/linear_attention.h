// qkv/linear_attention.h: linear attention (Katharopoulos et al. 2020,
// "Transformers are RNNs", arXiv:2006.16236) in O(seq * head_dim * head_dim_v).
//
//   out_i = phi(q_i)^T S / (phi(q_i) . z)     S = sum_j phi(k_j) v_j^T  [head_dim, head_dim_v]
//                                             z = sum_j phi(k_j)        [head_dim]
// over every key j (causal = false), or over keys j <= i + seq_kv - seq_q
// (causal: bottom-right aligned as in qkv/mask.h, so the last query sees every
// key and a query with i + seq_kv - seq_q < 0 sees none). phi is elementwise:
//   kElu       phi(x) = elu(x) + 1 = x + 1 (x > 0), e^x (x <= 0): the paper's; > 0
//   kRelu      phi(x) = max(x, 0): >= 0; a row of q <= 0 gets phi(q) = 0
//   kIdentity  phi(x) = x: the denominator may be 0, negative or tiny
// A denominator exactly 0 (no key, relu zeros, identity cancellation,
// e^x underflow) gives out_i = 0 and zero gradients for that row; any other
// denominator is divided by as is (identity near 0 may give huge values).
// There is no scale: 1/sqrt(head_dim) would cancel between numerator and
// denominator for identity and relu (homogeneous), and the paper has none.
//
// Shapes, strides, dtypes (float32/float16/float64) and GQA exactly as
// qkv/attention.h: q [batch, num_q_heads, seq_q, head_dim], k [batch,
// num_kv_heads, seq_kv, head_dim], v [batch, num_kv_heads, seq_kv, head_dim_v],
// out [batch, num_q_heads, seq_q, head_dim_v]; query head h reads the S, z of
// kv_head = h / group_size.
//
// Arithmetic: inputs are widened to float64, phi, S, z and every sum are
// float64 in a fixed order, and each output is rounded once (float16 via
// float32). Results are bitwise identical for any num_threads. The causal
// chunk changes the grouping of the float64 sums (not the final S, z), so
// outputs for two chunk sizes agree to float64 rounding (~1e-16 of the sum
// of the absolute terms) and may differ in the last bit after rounding.
// Work: O(seq * head_dim * head_dim_v) time, O(head_dim * head_dim_v) state
// per (batch, kv head) and thread; the causal form runs each (batch, kv head)
// on one thread, the non-causal form also splits one across threads.
#ifndef QKV_LINEAR_ATTENTION_H_
#define QKV_LINEAR_ATTENTION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "qkv/tensor.h"

namespace qkv {

enum class FeatureMap : uint8_t { kElu, kRelu, kIdentity };

struct LinearAttentionParams {
  TensorView q, k, v;
  MutableTensorView out;
  FeatureMap feature_map = FeatureMap::kElu;
  bool causal = false;
  int num_threads = 0;  // 0: OpenMP's default; results never depend on it
  // Causal: keys per chunk, >= 1 (min(chunk, seq_kv) is used). Per key the
  // work is ~2 head_dim head_dim_v + chunk (head_dim + head_dim_v) / 2
  // multiply-adds: at head_dim 64, chunk 8 and 16 ran 1.5x and 1.3x faster
  // than 64 (1M tokens, 1 thread). 64 is the usual GPU tile.
  int64_t chunk = 64;
};

struct LinearAttentionBackwardParams {
  TensorView q, k, v, dout;      // dout [batch, num_q_heads, seq_q, head_dim_v]
  MutableTensorView dq, dk, dv;  // q's, k's, v's shapes; dk, dv summed over the group
  FeatureMap feature_map = FeatureMap::kElu;
  bool causal = false;
  int num_threads = 0;
  int64_t chunk = 64;
};

// What ran: qkv never takes a slower path silently.
struct LinearAttentionInfo {
  std::string path;   // "non-causal" or "causal chunked"
  int64_t chunk = 0;  // chunk used (min(chunk, seq_kv)); 0 for non-causal
  int threads = 1;
  int64_t state_bytes = 0;    // float64 S, z (and dS, dz) held at once
  int64_t scratch_bytes = 0;  // all working memory, state included
  std::string simd_target;    // Highway target, e.g. "AVX3"
};

// Computes out as documented above. Validates every view first and throws
// qkv::Error (one line naming the argument) before writing anything.
LinearAttentionInfo LinearAttention(const LinearAttentionParams& params);

// Computes dq, dk, dv of sum(out * dout) (the forward is recomputed, out is
// not needed; phi'(0) = 0 for relu, as torch). Memory: the forward's, plus
// 16 * group_size * seq_q bytes per thread for the causal form.
// Validates first, as LinearAttention.
LinearAttentionInfo LinearAttentionBackward(const LinearAttentionBackwardParams& params);

// Returns "elu", "relu" or "identity"; FeatureMapFromName is its inverse and
// throws qkv::Error for another name.
const char* FeatureMapName(FeatureMap feature_map);
FeatureMap FeatureMapFromName(const std::string& name);

// The decode cache of causal linear attention: S and z per (batch, kv head),
// float64, stored as [head_dim, ld] with z as column head_dim_v and ld =
// head_dim_v + 1 rounded up to a multiple of 8: a constant 8 * batch *
// num_kv_heads * head_dim * ld bytes whatever the number of tokens seen.
class LinearAttentionState {
 public:
  // Throws qkv::Error for negative dims or num_kv_heads not dividing num_q_heads.
  LinearAttentionState(int64_t batch, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                       int64_t head_dim_v, FeatureMap feature_map, int num_threads = 0);

  // The state's arithmetic is the causal forward's (kernels, float64, any
  // num_threads bitwise the same); tokens() counts the tokens appended.
  // Appends one token per sequence and writes its output: q_t [batch,
  // num_q_heads, 1, head_dim], k_t, v_t [batch, num_kv_heads, 1, head_dim(_v)],
  // out_t [batch, num_q_heads, 1, head_dim_v]. Bitwise what the causal
  // LinearAttention with chunk = 1 writes for that row.
  void Step(const TensorView& q_t, const TensorView& k_t, const TensorView& v_t,
            const MutableTensorView& out_t);
  // Appends seq tokens (q, k, v all of length seq), writing out (optional:
  // absent, only k, v are absorbed and q is not read). From an empty state,
  // bitwise the causal LinearAttention with the same chunk; the state after
  // any mix of Prefill and Step calls over the same tokens is bitwise the same.
  LinearAttentionInfo Prefill(const TensorView& q, const TensorView& k, const TensorView& v,
                              const MutableTensorView& out, int64_t chunk = 64);
  // Forgets every token (S = 0, z = 0).
  void Reset();

  int64_t tokens() const { return tokens_; }
  int64_t state_bytes() const { return static_cast<int64_t>(state_.size() * sizeof(double)); }
  // Returns S[a, e] resp. z[a] of (batch b, kv head g), for inspection.
  double S(int64_t b, int64_t g, int64_t a, int64_t e) const;
  double z(int64_t b, int64_t g, int64_t a) const;

 private:
  int64_t batch_, num_q_heads_, num_kv_heads_, head_dim_, head_dim_v_, ld_;
  FeatureMap feature_map_;
  int num_threads_;
  int64_t tokens_ = 0;
  std::vector<double> state_;  // [batch, num_kv_heads, head_dim, ld_]
};

}  // namespace qkv

#endif  // QKV_LINEAR_ATTENTION_H_
