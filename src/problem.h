// Internal: an attention problem after validation, shared by the kernels.
#ifndef QKV_SRC_PROBLEM_H_
#define QKV_SRC_PROBLEM_H_

#include <cstdint>

namespace qkv::internal {

// Dimensions and scale resolved and validated by Attention().
struct Problem {
  int64_t batch = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t group_size = 1;  // num_q_heads / num_kv_heads
  int64_t seq_q = 0;
  int64_t seq_kv = 0;
  int64_t head_dim = 0;
  int64_t head_dim_v = 0;
  double scale = 1.0;
  int threads = 1;
};

}  // namespace qkv::internal

#endif  // QKV_SRC_PROBLEM_H_
