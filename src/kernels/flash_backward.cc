// PLACEHOLDER while the kernel is written.
#include "kernels/flash_backward.h"

#include "qkv/error.h"

namespace qkv::internal {
int64_t FlashBackwardScratchBytes(const Problem&, const AttentionBackwardParams&) { return 0; }
void FlashBackward(const AttentionBackwardParams&, const Problem&) {
  throw Error("flash backward: not yet built");
}
}  // namespace qkv::internal
