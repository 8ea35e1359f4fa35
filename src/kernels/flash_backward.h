// Internal: the tiled (FlashAttention-2-style) CPU backward kernel.
#ifndef QKV_SRC_KERNELS_FLASH_BACKWARD_H_
#define QKV_SRC_KERNELS_FLASH_BACKWARD_H_

#include <cstdint>

#include "problem.h"
#include "qkv/attention_backward.h"

namespace qkv::internal {

// Returns the bytes FlashBackward allocates for `problem`: fixed-size tiles
// per thread, plus O(seq_q) row statistics (and a float32 dq accumulator
// when dq is not float32 with unit stride along head_dim).
int64_t FlashBackwardScratchBytes(const Problem& problem, const AttentionBackwardParams& params);

// Computes dq, dk, dv for valid `params` whose out and lse are present,
// accumulate == kFloat32 and no dmask (no checks here).
void FlashBackward(const AttentionBackwardParams& params, const Problem& problem);

}  // namespace qkv::internal

#endif  // QKV_SRC_KERNELS_FLASH_BACKWARD_H_
