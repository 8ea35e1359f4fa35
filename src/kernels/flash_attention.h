// Internal: the tiled online-softmax (FlashAttention-style) CPU kernel.
#ifndef QKV_SRC_KERNELS_FLASH_ATTENTION_H_
#define QKV_SRC_KERNELS_FLASH_ATTENTION_H_

#include <cstdint>

#include "problem.h"
#include "qkv/attention.h"

namespace qkv::internal {

// Returns the bytes FlashAttention allocates for `problem`: fixed-size tiles
// per thread, independent of seq_q and seq_kv (linear in head_dim).
int64_t FlashScratchBytes(const Problem& problem);

// Computes out (and lse if present) for valid `params` with
// accumulate == kFloat32 and no weights output (no checks here). Returns the
// number of (work item, key block) tiles it computed: every tile of the
// structural, explicit-mask and block-sparse rules' union, none other.
int64_t FlashAttention(const AttentionParams& params, const Problem& problem);

// Returns the name of the SIMD target the dispatcher picks on this machine,
// e.g. "AVX3" or "AVX2".
const char* FlashSimdTarget();

// Computes out[i] = 2^in[i] with the kernel's softmax exp2 (valid for
// in[i] <= 0) under the dispatched target. For tests of its accuracy.
void FlashExp2ForTest(const float* in, int64_t n, float* out);

}  // namespace qkv::internal

#endif  // QKV_SRC_KERNELS_FLASH_ATTENTION_H_
