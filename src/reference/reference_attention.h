// Internal: the reference (oracle) attention kernel.
#ifndef QKV_SRC_REFERENCE_REFERENCE_ATTENTION_H_
#define QKV_SRC_REFERENCE_REFERENCE_ATTENTION_H_

#include <cstdint>

#include "qkv/attention.h"
#include "problem.h"

namespace qkv::internal {

// Query rows per reference work item; each item holds a [kRefRows, seq_kv]
// score block. 64 rows keep that block in L2 up to seq_kv = 8K (2 MiB).
inline constexpr int64_t kRefRows = 64;

// Returns the bytes ReferenceAttention allocates for `problem`.
int64_t ReferenceScratchBytes(const Problem& problem, Accumulate accumulate);

// Computes attention for valid `params` (no checks here).
void ReferenceAttention(const AttentionParams& params, const Problem& problem);

}  // namespace qkv::internal

#endif  // QKV_SRC_REFERENCE_REFERENCE_ATTENTION_H_
