// qkv/attention_backward.h: gradients of scaled dot-product attention.
//
// With out = softmax(S) . V, S = scale * Q.K^T + M (qkv/attention.h, the
// mask rules of qkv/mask.h), P = softmax(S) and dout = dL/dout:
//
//   dV   = P^T . dout                       (summed over the group's q heads)
//   dP   = dout . V^T
//   D_i  = sum_d dout[i, d] * out[i, d]     (= sum_j P_ij dP_ij)
//   dS   = P o (dP - D)                     (o: elementwise)
//   dQ   = scale * dS . K
//   dK   = scale * dS^T . Q                 (summed over the group's q heads)
//   dM   = dS, summed over the mask's broadcast dimensions
//
// Shapes (the forward's word set):
//   q, dq          [batch, num_q_heads,  seq_q,  head_dim]
//   k, dk          [batch, num_kv_heads, seq_kv, head_dim]
//   v, dv          [batch, num_kv_heads, seq_kv, head_dim_v]
//   out, dout      [batch, num_q_heads,  seq_q,  head_dim_v]
//   lse            [batch, num_q_heads,  seq_q,  1]
//   dmask          the additive mask's own shape: 1 on each dim where the
//                  mask view has stride 0 (as BroadcastMask makes it)
// A disallowed pair (and a pair whose score is -inf) contributes nothing to
// any gradient, so a NaN it does not touch stays out. A row with no allowed
// key has dq = 0 and adds nothing to dk, dv. seq_kv = 0 gives dq = 0.
#ifndef QKV_ATTENTION_BACKWARD_H_
#define QKV_ATTENTION_BACKWARD_H_

#include <optional>
#include <span>

#include "qkv/attention.h"

namespace qkv {

struct AttentionBackwardParams {
  TensorView q, k, v;
  // The forward's output and log-sum-exp (natural log), as Attention wrote
  // them. Either may be absent: the forward is then recomputed first (the
  // returned reason says so), which needs O(seq_q * head_dim_v) scratch.
  TensorView out;
  TensorView lse;
  TensorView dout;
  MutableTensorView dq, dk, dv;
  // Optional: the gradient of an additive (float) mask.mask, in the mask's
  // own shape (its broadcast dims summed).
  MutableTensorView dmask;
  // Optional: the gradient of mask.sink_logits, [num_q_heads]:
  //   dsink[h] = -sum over b, i of exp(sink[h] - lse[b,h,i]) (dout . out)[b,h,i]
  // (a sink takes weight p = exp(sink - lse) and carries value 0), summed in
  // double in a fixed order.
  std::span<float> dsink_logits;
  MaskSpec mask;
  std::optional<double> scale;  // default 1 / sqrt(head_dim)
  Kernel kernel = Kernel::kAuto;
  Accumulate accumulate = Accumulate::kFloat32;  // kFloat64: reference only
  int num_threads = 0;  // 0: OpenMP's default; results never depend on it
};

// Computes dq, dk, dv (and dmask) as documented above. Validates every view
// first and throws qkv::Error (one line naming the argument) before writing
// anything. Kernel kAuto picks the flash backward unless float64
// accumulation or dmask is asked for (the reference kernel; the returned
// reason says why).
AttentionInfo AttentionBackward(const AttentionBackwardParams& params);

// Returns the flops of a backward pass in FlashAttention's convention: 2.5
// times the forward's 2 * (head_dim + head_dim_v) per allowed pair and head.
double BackwardFlops(const MaskSpec& mask, int64_t batch, int64_t num_q_heads, int64_t seq_q,
                     int64_t seq_kv, int64_t head_dim, int64_t head_dim_v);

}  // namespace qkv

#endif  // QKV_ATTENTION_BACKWARD_H_
