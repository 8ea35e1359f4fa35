// NumPy broadcasting of explicit masks to [batch, num_q_heads, seq_q, seq_kv].
#include <algorithm>

#include "qkv/error.h"
#include "qkv/mask.h"
#include "qkv/npy.h"
#include "mask_rules.h"

namespace qkv {

TensorView BroadcastMask(const void* data, DType dtype, std::span<const int64_t> shape,
                         const Shape4& target) {
  if (shape.size() > 4) {
    throw Error("mask: rank " + std::to_string(shape.size()) +
                " is too high (expected at most 4 dims broadcastable to " +
                ShapeString(target) + ")");
  }
  TensorView view{data, dtype, target, {0, 0, 0, 0}};
  // Right-align the mask's dims with the target's; missing leading dims and
  // dims of size 1 broadcast (stride 0).
  int64_t stride = 1;
  const size_t offset = 4 - shape.size();
  for (size_t r = shape.size(); r-- > 0;) {
    const size_t t = r + offset;
    if (shape[r] == target[t]) {
      view.strides[t] = shape[r] == 1 ? 0 : stride;
    } else if (shape[r] == 1) {
      view.strides[t] = 0;
    } else {
      throw Error("mask: shape " + NpyShapeString(shape) + " does not broadcast to " +
                  ShapeString(target) + " (expected each dim 1 or equal, NumPy rules)");
    }
    stride *= shape[r];
  }
  return view;
}

int64_t CountAllowedPairs(const MaskSpec& mask, int64_t batch, int64_t seq_q, int64_t seq_kv) {
  int64_t pairs = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t key_length = mask.key_lengths.empty() ? seq_kv : mask.key_lengths[b];
    for (int64_t i = 0; i < seq_q; ++i) {
      const internal::KeyRange r = internal::RowKeyRange(mask, seq_q, seq_kv, i, key_length);
      if (!mask.block_mask.present()) {
        pairs += r.hi - r.lo;
        continue;
      }
      for (int64_t kb = r.lo / kSparseBlock; kb * kSparseBlock < r.hi; ++kb) {
        if (!internal::BlockPresent(mask, b, 0, i, kb)) continue;
        pairs += std::min(r.hi, (kb + 1) * kSparseBlock) - std::max(r.lo, kb * kSparseBlock);
      }
    }
  }
  return pairs;
}

}  // namespace qkv
