// qkv/mask.h: the one mask algebra of qkv.
//
// Query i (0 <= i < seq_q) may attend key j (0 <= j < seq_kv) of batch b and
// query head h when EVERY rule in force allows the pair (the rules compose by
// AND, in any combination, in one call):
//
//   diagonal offset   d = seq_kv - seq_q   (Alignment::kBottomRight, default)
//                     d = 0                (Alignment::kTopLeft)
//   causal            j <= i + d
//   window (L, R)     i + d - L <= j <= i + d + R   (inclusive; -1 = unbounded
//                     on that side; causal is the window (-1, 0))
//   key lengths       j < key_lengths[b]            (keys past it are padding)
//   boolean mask      mask[b,h,i,j] == true         (true = attend, as in
//                     torch's scaled_dot_product_attention)
//   additive mask     mask[b,h,i,j] != -inf; the value is added to the score
//   block-sparse      block_mask[b,h,i/64,j/64] == true: the 64 x 64 tile of
//                     queries and keys holding (i, j) is present (qkv/sparse.h
//                     builds BigBird, Longformer, strided and fixed layouts);
//                     absent tiles are never computed, so the work is
//                     proportional to the tiles present
//
// Bottom-right alignment puts the last query on the last key, as
// FlashAttention (>= 2.1) and KV-cache decoding need: with seq_q = 1 the one
// query sees every key. Top-left is torch's is_causal (j <= i). The window
// follows the same alignment. Key lengths only pad: they do not move the
// diagonal (it is always computed from the tensor's seq_kv).
//
// Learned attention sinks (gpt-oss; MaskSpec::sink_logits): head h has one
// virtual key with score sink_logits[h] (natural-log units, not scaled) and
// value 0. It joins every row's softmax denominator, so a row's weights sum
// to less than 1 and lse includes it: lse = log(sum_j exp(s_j) + exp(sink)).
// A row with no allowed key then has out = 0 and lse = sink (not -inf).
//
// Logit soft-capping (Gemma 2; MaskSpec::softcap = C > 0): the scaled score
// is capped before the mask is added, s = C tanh(scale (q_i . k_j) / C) +
// mask_value, bounding every score to (-C, C) + mask.
//
// The score of an allowed pair is  s = scale * (q_i . k_j) + mask_value;
// disallowed pairs are skipped, not given -inf arithmetically, so a NaN or inf
// in a key or value that a row does not attend never reaches that row.
//
// A row with no allowed key (fully masked, or seq_kv = 0) gives an all-zero
// output row, all-zero weights and log-sum-exp = -inf: never NaN.
//
// The explicit mask is broadcast to [batch, num_q_heads, seq_q, seq_kv] with
// NumPy rules: give it as a 4-D view whose dims are each 1 (stride 0) or full.
#ifndef QKV_MASK_H_
#define QKV_MASK_H_

#include <cstdint>
#include <span>

#include "qkv/tensor.h"

namespace qkv {

enum class Alignment : uint8_t { kBottomRight, kTopLeft };

// Tile edge of MaskSpec::block_mask: the flash kernels' key block (64), so a
// tile is either computed whole or skipped before any K/V row is read.
inline constexpr int64_t kSparseBlock = 64;

struct MaskSpec {
  Alignment alignment = Alignment::kBottomRight;
  bool causal = false;
  int64_t window_left = -1;   // -1: unbounded
  int64_t window_right = -1;  // -1: unbounded
  // [batch] valid key counts, each in [0, seq_kv]; empty: no padding.
  std::span<const int64_t> key_lengths;
  // Block-sparse layout: DType::kBool [batch|1, num_q_heads|1,
  // ceil(seq_q / kSparseBlock), ceil(seq_kv / kSparseBlock)], stride 0 on
  // each broadcast dimension, nonzero = the tile is present. Blocks follow
  // query and key indices (i / 64, j / 64) whatever the alignment; the last
  // block row / column covers the remainder. Absent: every tile present.
  TensorView block_mask;
  // [num_q_heads] learned sink logits (above), each finite or -inf (no sink
  // for that head); empty: none. Must outlive the call.
  std::span<const float> sink_logits;
  // > 0: soft-capping (above); 0: none.
  double softcap = 0.0;
  // Boolean (DType::kBool, one byte, nonzero = attend) or additive
  // (kFloat32 / kFloat64 / kFloat16) mask, [batch|1, num_q_heads|1, seq_q|1,
  // seq_kv|1] with stride 0 on each broadcast dimension; absent: none.
  TensorView mask;
};

// Returns the NumPy-broadcast 4-D view of a row-major mask array of rank 0..4
// and the given shape against [batch, num_q_heads, seq_q, seq_kv]: missing
// leading dims and dims of size 1 get stride 0. Throws qkv::Error when a dim
// is neither 1 nor the target's.
TensorView BroadcastMask(const void* data, DType dtype, std::span<const int64_t> shape,
                         const Shape4& target);

// Returns the number of (batch, query, key) pairs that the causal, window,
// key-length and block-sparse rules allow, summed over the batch (the
// explicit mask is not counted; a block mask is read for head 0). Per head, the attention costs 2 * (head_dim + head_dim_v) flops
// for each allowed pair. `mask` must be valid for these sizes.
int64_t CountAllowedPairs(const MaskSpec& mask, int64_t batch, int64_t seq_q, int64_t seq_kv);

}  // namespace qkv

#endif  // QKV_MASK_H_
