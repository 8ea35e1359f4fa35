// Internal: the split-KV decode kernel (flash-decoding on the CPU) behind
// qkv::Decode. Decode() validates and fills a DecodePlan; the kernel assumes
// valid input and writes one partial (out, lse) per (row, split).
#ifndef QKV_SRC_KERNELS_DECODE_ATTENTION_H_
#define QKV_SRC_KERNELS_DECODE_ATTENTION_H_

#include <cstdint>
#include <vector>

#include "qkv/decode.h"

namespace qkv::internal {

// A validated decode problem. Rows of sequence b are (head h, query i),
// h = g * group_size + h_local for KV head g; partial p of row (b, h, i) and
// split s is at index part_base[b] + (h * seq_q + i) * splits[b] + s of
// part_lse, and at that index * head_dim of part_out.
struct DecodePlan {
  int64_t batch = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t group_size = 1;  // num_q_heads / num_kv_heads
  int64_t seq_q = 0;
  int64_t head_dim = 0;
  int64_t window = -1;
  int64_t split_tokens = 0;  // resolved (> 0)
  double scale = 1.0;
  int threads = 1;
  DType dtype = DType::kFloat32;        // of the caches
  std::vector<int64_t> kept;            // [batch] cached tokens (sum of chunk counts)
  std::vector<int64_t> splits;          // [batch] ceil(kept / split_tokens)
  std::vector<int64_t> part_base;       // [batch + 1] first partial of sequence b
  std::vector<int64_t> item_base;       // [batch + 1] first work item (b, g, s) of b
};

// Computes every partial of `plan` (skipped splits get lse = -inf and an
// untouched out). part_out is [part_base[batch], head_dim], part_lse
// [part_base[batch]]. Adds the partials computed (splits with any key read)
// and the K/V bytes read to *splits_computed and *kv_bytes_read.
void DecodePartials(const DecodeParams& params, const DecodePlan& plan, float* part_out,
                    float* part_lse, int64_t* splits_computed, int64_t* kv_bytes_read);

// Merges n partials of one row (index order; no checks): see
// qkv::MergeAttentionPartials. out_parts may be read only where lse != -inf.
void MergeRow(const float* out_parts, const float* lse_parts, int64_t n, int64_t head_dim_v,
              float* out, float* lse);

// Returns the SIMD target the dispatcher picks, e.g. "AVX3".
const char* DecodeSimdTarget();
// Returns its float32 lane count (16 on AVX3): head_dims that are a multiple
// of it read K/V rows in place.
int64_t DecodeSimdLanes();

}  // namespace qkv::internal

#endif  // QKV_SRC_KERNELS_DECODE_ATTENTION_H_
