// Internal: the tiled online-softmax (FlashAttention-style) CPU kernel.
#ifndef QKV_SRC_KERNELS_FLASH_ATTENTION_H_
#define QKV_SRC_KERNELS_FLASH_ATTENTION_H_

#include <cstdint>

#include "problem.h"
#include "qkv/attention.h"

namespace qkv::internal {

// Returns the bytes FlashAttention allocates for `problem`: independent of
// seq_q and linear in seq_kv only through nothing (tiles are fixed size).
int64_t FlashScratchBytes(const Problem& problem);

// Computes out (and lse if present) for valid `params` with
// accumulate == kFloat32 and no weights output (no checks here).
void FlashAttention(const AttentionParams& params, const Problem& problem);

// Returns the name of the SIMD target the dispatcher picks on this machine,
// e.g. "AVX3" or "AVX2".
const char* FlashSimdTarget();

}  // namespace qkv::internal

#endif  // QKV_SRC_KERNELS_FLASH_ATTENTION_H_
