// qkv/decode.h: attention for autoregressive decoding against KV caches.
//
// Each sequence b of the batch has a few new queries (seq_q, typically 1)
// whose K/V have already been appended to its cache; query i of sequence b
// sits at absolute position  p_i = Length(b) - seq_q + i  and attends the
// cached tokens at positions <= p_i (causal), and, with a window, only those
// > p_i - window (window = kept recent tokens, as KvCacheConfig::window). The
// sequences may have different lengths and different caches' chunk layouts
// (continuous batching).
//
// Flash-decoding: the keys of a sequence are cut into splits of
// `split_tokens` consecutive cached tokens (fixed by the data, never by the
// thread count), each split's partial (out, lse) is computed independently,
// and the partials are merged by log-sum-exp in split order. Results are
// bitwise identical for any number of threads.
#ifndef QKV_DECODE_H_
#define QKV_DECODE_H_

#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "qkv/kv_cache.h"
#include "qkv/tensor.h"

namespace qkv {

struct DecodeParams {
  // [batch, num_q_heads, seq_q, head_dim], any strides, float32/16/64.
  TensorView q;
  // [batch] caches' views; all with the same num_kv_heads and head_dim;
  // num_q_heads must be a multiple of num_kv_heads (GQA / MQA).
  std::span<const KvSequenceView> sequences;
  // [batch, num_q_heads, seq_q, head_dim] (float32/16/64) and optional
  // lse [batch, num_q_heads, seq_q, 1].
  MutableTensorView out;
  MutableTensorView lse;
  std::optional<double> scale;  // default 1 / sqrt(head_dim)
  int64_t window = -1;          // -1: none; else keys with position > p_i - window
  int64_t split_tokens = 0;     // 0: the default (documented in decode.cc)
  int num_threads = 0;          // 0: all cores; never changes the results
};

struct DecodeInfo {
  int64_t splits = 0;          // partial results computed
  int64_t kv_bytes_read = 0;   // K/V (and scale) bytes the kernel read
  int threads = 1;
  std::string simd_target;
  // How K/V rows were read, and why: "in place" (the storage dtype converted
  // in registers), or "float32 tiles" when head_dim is not a multiple of the
  // SIMD width (each row converted and zero-padded first: slower).
  std::string path;
};

// Computes decode attention as above. Validates first; throws qkv::Error.
DecodeInfo Decode(const DecodeParams& params);

// Merges n partial attention results of the same query into one:
//   lse = log(sum_i exp(lse_i)),  out = sum_i exp(lse_i - lse) * out_i.
// out_parts is [n, head_dim_v] row-major, lse_parts [n]. Partials with
// lse_i = -inf (empty chunks) contribute nothing; if all are -inf the result
// is zeros with lse = -inf. Merging is done in index order (deterministic).
void MergeAttentionPartials(std::span<const float> out_parts, std::span<const float> lse_parts,
                            int64_t head_dim_v, std::span<float> out, float* lse);

}  // namespace qkv

#endif  // QKV_DECODE_H_
