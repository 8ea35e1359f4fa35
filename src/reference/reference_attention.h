// Internal: the reference (oracle) attention kernel.
#ifndef QKV_SRC_REFERENCE_REFERENCE_ATTENTION_H_
#define QKV_SRC_REFERENCE_REFERENCE_ATTENTION_H_

#include <cstdint>

#include "qkv/attention.h"

namespace qkv::internal {

// Dimensions and scale resolved and validated by Attention().
struct Problem {
  int64_t batch = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t group_size = 1;  // num_q_heads / num_kv_heads
  int64_t seq_q = 0;
  int64_t seq_kv = 0;
  int64_t head_dim = 0;
  int64_t head_dim_v = 0;
  double scale = 1.0;
  int threads = 1;
};

// Query rows per reference work item; each item holds a [kRefRows, seq_kv]
// score block. 64 rows keep that block in L2 up to seq_kv = 8K (2 MiB).
inline constexpr int64_t kRefRows = 64;

// Returns the bytes ReferenceAttention allocates for `problem`.
int64_t ReferenceScratchBytes(const Problem& problem, Accumulate accumulate);

// Computes attention for valid `params` (no checks here).
void ReferenceAttention(const AttentionParams& params, const Problem& problem);

}  // namespace qkv::internal

#endif  // QKV_SRC_REFERENCE_REFERENCE_ATTENTION_H_
