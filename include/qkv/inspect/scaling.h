// qkv/inspect/scaling.h: why attention scales scores by 1/sqrt(d_k),
// measured (`qkv explain scaling`, docs/inspect.md).
//
// For q, k with independent unit-variance entries, q.k has mean 0 and
// variance d_k: unscaled scores grow like sqrt(d_k), the softmax saturates
// into one-hot rows, and its Jacobian diag(p) - p p^T goes to 0, so almost
// no gradient reaches the scores (and through them Q and K). Dividing by
// sqrt(d_k) keeps the scores at unit variance whatever d_k. These functions
// measure each step on real numbers, the gradients through qkv's own
// backward pass (its d(mask) output is exactly the gradient at the scores).
#ifndef QKV_INSPECT_SCALING_H_
#define QKV_INSPECT_SCALING_H_

#include <cstdint>
#include <vector>

#include "qkv/tensor.h"

namespace qkv::inspect {

// The softmax and its gradients at one scale, averaged over query rows.
struct SoftmaxStats {
  double scale = 1;
  double mean_max_weight = 0;   // mean over rows of max_j P_ij
  double entropy = 0;           // mean over rows of -sum_j P ln P (nats)
  double one_hot_fraction = 0;  // rows with max_j P_ij > 0.99
  double score_grad_norm = 0;   // mean over rows of ||dL/dS_i||_2
  double query_grad_norm = 0;   // mean over rows of ||dL/dQ_i||_2
  // Median over rows of ||dS_i|| / ||dP_i||, dP = dL/dP (P the weights):
  // the share of the gradient at the weights that the softmax Jacobian
  // diag(p) - p p^T passes on to the scores, free of dout's and V's size.
  // The median, not the mean: a saturated softmax passes ~0 through most
  // rows and much through the few rows split between two keys, and the
  // mean hides the many behind the few.
  double softmax_gain = 0;
};

// Measures attention of float32 q, k, v, dout (self-attention, one head:
// [samples, 1, keys, head_dim] each) at `scale`: forward with weights,
// backward with a zero additive mask whose gradient is dS. Throws qkv::Error
// on other shapes or dtypes.
SoftmaxStats MeasureSoftmax(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& dout, double scale, int num_threads = 0);

struct ScalingRow {
  int64_t head_dim = 0, keys = 0, samples = 0;
  double dot_mean = 0, dot_variance = 0;  // measured over samples * keys^2 pairs
  double dot_variance_stderr = 0;         // its Monte-Carlo standard error (scaling.cc)
  double log_keys = 0;                    // ln(keys): the entropy of a uniform row
  SoftmaxStats scaled, unscaled;          // scale 1/sqrt(head_dim), and 1
};

struct ScalingOptions {
  std::vector<int64_t> dims = {4, 16, 64, 256, 1024};
  int64_t keys = 128, samples = 8;
  uint64_t seed = 0;
  int num_threads = 0;
};

// One row per head_dim: q, k, v, dout drawn N(0, 1) (float32, seeded by
// seed and head_dim, so a row does not depend on the other dims asked).
std::vector<ScalingRow> ExplainScaling(const ScalingOptions& options);

// The same on a real model's layer (`qkv explain scaling --model`): its
// inputs' queries, keys and values as attention sees them (a decoder's after
// RoPE), token after token, input after input.
struct LayerProjections {
  int64_t num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  bool causal = false;             // a decoder: query i sees keys 0..i
  std::vector<int64_t> lengths;    // tokens per input
  std::vector<float> q;            // [sum lengths, num_q_heads, head_dim]
  std::vector<float> k, v;         // [sum lengths, num_kv_heads, head_dim]
};

struct HeadScalingRow {
  int64_t head = 0, head_dim = 0;
  int64_t rows = 0;   // query rows measured: those that see >= 2 keys
  int64_t pairs = 0;  // (query, key) pairs attention sees, for the dot statistics
  double q_mean_square = 0, k_mean_square = 0;  // mean of q_e^2, k_e^2 over tokens and e
  double dot_mean = 0, dot_variance = 0;        // of q.k over those pairs
  SoftmaxStats scaled, unscaled;  // the model's 1/sqrt(head_dim), and 1
};

// One row per query head (GQA: a head's keys are its group's). Each input
// runs alone (no padding); dout is drawn N(0, 1) from `seed`, v is the
// layer's own. Rows that see one key (a decoder's first) are left out: a
// softmax over one key is 1 whatever the score. Throws qkv::Error on sizes
// that do not match.
std::vector<HeadScalingRow> ExplainScalingOnLayer(const LayerProjections& projections,
                                                  uint64_t seed, int num_threads = 0);

}  // namespace qkv::inspect

#endif  // QKV_INSPECT_SCALING_H_
