// Internal: the linear-attention kernels (kernels/linear_attention.cc) behind
// qkv/linear_attention.h; they assume validated input.
#ifndef QKV_SRC_KERNELS_LINEAR_ATTENTION_H_
#define QKV_SRC_KERNELS_LINEAR_ATTENTION_H_

#include <cstdint>

#include "problem.h"
#include "qkv/linear_attention.h"

namespace qkv::internal {

// The views of a forward (q, k, v -> out; out may be absent: only the state
// is updated) or backward (q, k, v, dout -> dq, dk, dv) call.
struct LinearViews {
  TensorView q, k, v, dout;
  MutableTensorView out, dq, dk, dv;
};

struct LinearProblem {
  Problem dims;  // sizes, group_size and threads (scale unused)
  FeatureMap feature_map = FeatureMap::kElu;
  bool causal = false;
  int64_t chunk = 1;  // causal keys per chunk, in [1, max(seq_kv, 1)]
};

// Memory a call allocates, and how its work is split over threads.
struct LinearPlan {
  int threads = 1;            // threads that run
  bool by_item = true;        // non-causal: one thread per (batch, kv head)
  int64_t state_bytes = 0;    // float64 S|z and U|w buffers
  int64_t scratch_bytes = 0;  // everything, state included
};

// Returns the doubles per row of a state [head_dim, ld]: head_dim_v + 1
// (S's columns, then z) padded to a multiple of 8.
int64_t LinearStateLd(int64_t head_dim_v);

// Plans a forward (backward = false) or backward; `external_state`: the
// states are the caller's (LinearAttentionState), not allocated.
LinearPlan PlanLinear(const LinearProblem& problem, bool backward, bool external_state);

// Computes out (if present) for valid views. `states`: null, or the caller's
// [batch * num_kv_heads, head_dim, LinearStateLd] causal states, read as the
// starting S|z and left holding S|z after the last key (causal only).
void LinearForward(const LinearViews& views, const LinearProblem& problem, double* states);

// Computes dq, dk, dv for valid views.
void LinearBackward(const LinearViews& views, const LinearProblem& problem);

// Returns the Highway target the kernels run on, e.g. "AVX3".
const char* LinearSimdTarget();

}  // namespace qkv::internal

#endif  // QKV_SRC_KERNELS_LINEAR_ATTENTION_H_
