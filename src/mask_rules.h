// Internal: the structural mask rules of qkv/mask.h as key ranges.
#ifndef QKV_SRC_MASK_RULES_H_
#define QKV_SRC_MASK_RULES_H_

#include <algorithm>
#include <cstdint>

#include "qkv/mask.h"

namespace qkv::internal {

// The half-open key range [lo, hi) that causal, window and key-length rules
// allow for query row i; empty when hi <= lo. The explicit mask, if any, is
// applied on top by the kernel. Window sides are clamped to seq_q + seq_kv,
// beyond which they change nothing, so no sum below overflows.
struct KeyRange {
  int64_t lo = 0;
  int64_t hi = 0;
};

inline KeyRange RowKeyRange(const MaskSpec& mask, int64_t seq_q, int64_t seq_kv, int64_t i,
                            int64_t key_length) {
  const int64_t diag = mask.alignment == Alignment::kBottomRight ? seq_kv - seq_q : 0;
  const int64_t far = seq_q + seq_kv;
  int64_t lo = 0;
  int64_t hi = std::min(key_length, seq_kv);
  if (mask.causal) hi = std::min(hi, i + diag + 1);                          // j <= i + d
  if (mask.window_right >= 0) hi = std::min(hi, i + diag + std::min(mask.window_right, far) + 1);
  if (mask.window_left >= 0) lo = std::max(lo, i + diag - std::min(mask.window_left, far));
  hi = std::max(hi, int64_t{0});
  return {lo, std::max(lo, hi)};
}

// True when the block-sparse layout (if any) lets query i of (b, h) attend
// the keys of key block kb (keys [kb * kSparseBlock, (kb + 1) * kSparseBlock)).
inline bool BlockPresent(const MaskSpec& mask, int64_t b, int64_t h, int64_t i, int64_t kb) {
  const TensorView& bm = mask.block_mask;
  if (bm.data == nullptr) return true;
  return static_cast<const uint8_t*>(bm.data)[bm.Offset(b, h, i / kSparseBlock, kb)] != 0;
}

}  // namespace qkv::internal

#endif  // QKV_SRC_MASK_RULES_H_
