// Internal: the reference (oracle-style) attention backward kernel.
#ifndef QKV_SRC_REFERENCE_REFERENCE_BACKWARD_H_
#define QKV_SRC_REFERENCE_REFERENCE_BACKWARD_H_

#include <cstdint>

#include "problem.h"
#include "qkv/attention_backward.h"

namespace qkv::internal {

// Returns the bytes ReferenceBackward allocates for `problem`.
int64_t ReferenceBackwardScratchBytes(const Problem& problem,
                                      const AttentionBackwardParams& params);

// Computes dq, dk, dv (and dmask) for valid `params` whose out and lse are
// present (no checks here).
void ReferenceBackward(const AttentionBackwardParams& params, const Problem& problem);

}  // namespace qkv::internal

#endif  // QKV_SRC_REFERENCE_REFERENCE_BACKWARD_H_
