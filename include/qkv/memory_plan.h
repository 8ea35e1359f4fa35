// qkv/memory_plan.h: what attention costs in memory and arithmetic for a
// model configuration, computed without allocating anything (`qkv memory`,
// `qkv.memory_plan` in Python):
//   kv cache      2 * layers * kv_heads * head_dim * tokens * batch * bytes
//                 (+ 2 * layers * kv_heads * tokens * batch * 4 int8 scales);
//                 tokens = min(seq, window) for a sliding-window cache
//   score matrix  batch * heads * seq^2 * bytes per layer: what naive
//                 attention materialises (float32 for an int8 cache)
//   flash tiles   the flash kernel's fixed working set per thread, from the
//                 kernel's own scratch accounting (independent of seq)
//   flops/token   4 * layers * heads * head_dim * attended tokens: Q.K and
//                 P.V of one generated token, attention only (no projections
//                 or MLP)
#ifndef QKV_MEMORY_PLAN_H_
#define QKV_MEMORY_PLAN_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace qkv {

struct MemoryPlanConfig {
  // A published model ("llama2-7b", "llama3-8b", "mistral-7b", "llama2-70b")
  // or empty; the fields below override its values.
  std::string preset;
  std::optional<int64_t> layers;    // default 1 without a preset
  std::optional<int64_t> heads;     // required without a preset
  std::optional<int64_t> kv_heads;  // default heads
  std::optional<int64_t> head_dim;  // required without a preset
  std::optional<int64_t> window;    // cached tokens kept; 0 = no window
  int64_t seq = 0;
  int64_t batch = 1;
  std::string dtype = "f16";  // K/V and score element: f32, f16, bf16, i8 (cache only)
  int threads = 0;            // threads holding a flash working set; 0: every core
                              // (the plan's config says how many that was)
  // How messages name the fields: "--" gives "--kv-heads" (the CLI's flags;
  // window and dtype are --cache-window and --cache-dtype there), "" gives
  // "kv_heads" (Python's keywords).
  std::string flag_prefix;
};

// Each figure is -1 when it exceeds 2^63 - 1 (kMemoryPlanOverflow): the
// plan still answers the others (--seq 2147483647 overflows the score
// matrix, not the KV cache).
inline constexpr int64_t kMemoryPlanOverflow = -1;

struct MemoryPlan {
  MemoryPlanConfig config;  // with every field resolved
  int64_t layers = 0, heads = 0, kv_heads = 0, head_dim = 0, window = 0;
  int64_t cached_tokens = 0;
  int64_t kv_cache_bytes_per_token = 0;
  int64_t kv_cache_bytes = 0;
  int64_t score_matrix_bytes_per_layer = 0;
  int64_t flash_working_set_bytes_per_thread = 0;
  int64_t flash_working_set_bytes = 0;
  int64_t attention_flops_per_token = 0;
};

// Validates `config` (throws qkv::Error naming the field, with the config's
// flag_prefix) and returns the plan. Every product is checked for int64
// overflow; a figure that overflows is kMemoryPlanOverflow.
MemoryPlan PlanMemory(const MemoryPlanConfig& config);

// The preset names PlanMemory accepts.
std::vector<std::string> MemoryPresetNames();

}  // namespace qkv

#endif  // QKV_MEMORY_PLAN_H_
