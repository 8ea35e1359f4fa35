// qkv/attention.h: scaled dot-product attention, the public entry point.
//
//   out = softmax(scale * Q.K^T + M) . V        (per batch b and query head h)
//
// Dimensions, one word set everywhere in qkv:
//   q        [batch, num_q_heads,  seq_q,  head_dim]
//   k        [batch, num_kv_heads, seq_kv, head_dim]
//   v        [batch, num_kv_heads, seq_kv, head_dim_v]
//   out      [batch, num_q_heads,  seq_q,  head_dim_v]
//   lse      [batch, num_q_heads,  seq_q,  1]        (optional)
//   weights  [batch, num_q_heads,  seq_q,  seq_kv]   (optional)
// Grouped-query / multi-query attention: num_q_heads is a multiple of
// num_kv_heads, group_size = num_q_heads / num_kv_heads, and query head h reads
// kv_head = h / group_size (no copy of K or V is made). Self-attention is
// seq_q == seq_kv on the same data; cross-attention any seq_q, seq_kv >= 0.
//
// lse[b,h,i] = log(sum over allowed j of exp(s_ij)) in natural log, with s_ij
// the masked, scaled score of qkv/mask.h; -inf for a fully masked row.
// Inputs may be float32, float16 or float64 in any strides; outputs are
// written in their view's dtype (float16 outputs are rounded to nearest even).
#ifndef QKV_ATTENTION_H_
#define QKV_ATTENTION_H_

#include <optional>
#include <string>
#include <vector>

#include "qkv/mask.h"
#include "qkv/tensor.h"

namespace qkv {

// Which implementation computes the attention.
enum class Kernel : uint8_t {
  kAuto,       // flash, unless weights or float64 accumulation are asked for
  kReference,  // materialises every score row; exact; O(64 * seq_kv) scratch;
               // the only kernel that writes weights or accumulates in double
  kFlash,      // tiled online softmax (FlashAttention-2 on the CPU): exact,
               // fixed-size scratch independent of seq_q and seq_kv, SIMD
};

// Arithmetic of the reference kernel.
enum class Accumulate : uint8_t {
  kFloat32,  // float32 products and sums (the production path)
  kFloat64,  // inputs widened to double, everything in double (the oracle)
};

struct AttentionParams {
  TensorView q, k, v;
  MutableTensorView out;
  MutableTensorView lse;      // optional
  MutableTensorView weights;  // optional
  MaskSpec mask;
  std::optional<double> scale;  // default 1 / sqrt(head_dim)
  Kernel kernel = Kernel::kAuto;
  Accumulate accumulate = Accumulate::kFloat32;
  int num_threads = 0;  // 0: OpenMP's default; results never depend on it
};

// What ran, and why: qkv never takes a slower path silently.
struct AttentionInfo {
  Kernel kernel = Kernel::kReference;
  std::string reason;         // one line: why this kernel
  int64_t scratch_bytes = 0;  // working memory the kernel allocated
  int threads = 1;
  std::string simd_target;    // e.g. "AVX3" (Highway target) or "baseline"
  // Flash: K/V tiles computed, one per (work item of 64 query rows of a KV
  // head's group, key block of 64) with some allowed pair; skipped tiles
  // (causal, window, key lengths, block-sparse) are not counted. 0 otherwise.
  int64_t tiles = 0;
};

// Computes attention as documented above. Validates every view, the mask and
// the scale first and throws qkv::Error (one line naming the argument and
// what was expected) before writing anything.
AttentionInfo Attention(const AttentionParams& params);

// Returns the default scale 1 / sqrt(head_dim) (1 when head_dim is 0).
double DefaultScale(int64_t head_dim);

// Returns the kernel's name: "auto", "reference", ...
const char* KernelName(Kernel kernel);
// Returns the kernel called `name` (as KernelName spells it); throws qkv::Error.
Kernel KernelFromName(const std::string& name);
// Returns every kernel name, for command-line choices.
std::vector<std::string> KernelNames();

}  // namespace qkv

#endif  // QKV_ATTENTION_H_
