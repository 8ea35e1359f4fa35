// The memory planner of qkv/memory_plan.h (moved out of cli/memory.cc so
// that the CLI and the Python module share one implementation).
#include "qkv/memory_plan.h"

#include <algorithm>
#include <initializer_list>
#include <string>

#include "kernels/flash_attention.h"
#include "problem.h"
#include "qkv/error.h"
#include "validate.h"

namespace qkv {
namespace {

struct Model {
  int64_t layers = 1, heads = 0, kv_heads = 0, head_dim = 0, window = 0;  // window 0: none
};

struct Preset {
  const char* name;
  Model model;
};

// Published configurations (num_key_value_heads, sliding_window of each
// model's config.json).
constexpr Preset kPresets[] = {
    {"llama2-7b", {32, 32, 32, 128, 0}},
    {"llama3-8b", {32, 32, 8, 128, 0}},
    {"mistral-7b", {32, 32, 8, 128, 4096}},
    {"llama2-70b", {80, 64, 8, 128, 0}},
};

// Returns the field's name as the caller spells it: "--kv-heads" or "kv_heads".
std::string Name(const MemoryPlanConfig& c, std::string field) {
  if (c.flag_prefix == "--") {
    // The CLI names the cache's fields as qkv decode / generate do.
    if (field == "window" || field == "dtype") field = "cache_" + field;
    std::replace(field.begin(), field.end(), '_', '-');
  }
  return c.flag_prefix + field;
}

// Returns the product of `factors`, or kMemoryPlanOverflow when it exceeds
// int64 (every factor is >= 0).
int64_t Product(std::initializer_list<int64_t> factors) {
  int64_t r = 1;
  for (int64_t f : factors) {
    if (__builtin_mul_overflow(r, f, &r)) return kMemoryPlanOverflow;
  }
  return r;
}

void CheckRange(const MemoryPlanConfig& c, const char* field, int64_t v, int64_t min = 1) {
  if (v < min || v > (int64_t{1} << 31) - 1) {
    throw Error(Name(c, field) + ": " + std::to_string(v) + " (expected " + std::to_string(min) +
                " to 2^31 - 1)");
  }
}

}  // namespace

std::vector<std::string> MemoryPresetNames() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.emplace_back(p.name);
  return names;
}

MemoryPlan PlanMemory(const MemoryPlanConfig& c) {
  Model m;
  if (!c.preset.empty()) {
    bool found = false;
    for (const Preset& p : kPresets) {
      if (c.preset == p.name) m = p.model, found = true;
    }
    if (!found) {
      throw Error(Name(c, "preset") + ": '" + c.preset +
                  "' (expected llama2-7b, llama3-8b, mistral-7b or llama2-70b)");
    }
  } else if (!c.heads || !c.head_dim) {
    throw Error(Name(c, "heads") + " and " + Name(c, "head_dim") +
                " are required without " + Name(c, "preset") + " (expected e.g. " +
                Name(c, "preset") + " llama3-8b, or " + Name(c, "heads") + " 32 " +
                Name(c, "head_dim") + " 128)");
  }
  // The fields override the preset's.
  if (c.layers) m.layers = *c.layers;
  if (c.heads) m.heads = *c.heads;
  if (c.head_dim) m.head_dim = *c.head_dim;
  if (c.kv_heads) {
    m.kv_heads = *c.kv_heads;
  } else if (c.preset.empty()) {
    m.kv_heads = m.heads;
  }
  if (c.window) m.window = *c.window;
  CheckRange(c, "layers", m.layers);
  CheckRange(c, "heads", m.heads);
  CheckRange(c, "kv_heads", m.kv_heads);
  CheckRange(c, "head_dim", m.head_dim);
  CheckRange(c, "seq", c.seq);
  CheckRange(c, "batch", c.batch);
  CheckRange(c, "window", m.window, 0);
  CheckRange(c, "threads", c.threads, 0);
  // 0: every core, as everywhere in qkv (the threads the kernels would use).
  const int threads = c.threads == 0 ? internal::ResolveThreads(0) : c.threads;
  if (m.heads % m.kv_heads != 0) {
    throw Error(Name(c, "kv_heads") + ": " + std::to_string(m.kv_heads) + " must divide " +
                Name(c, "heads") + " " + std::to_string(m.heads) +
                " (expected a divisor: MHA equal, GQA a divisor, MQA 1)");
  }
  int64_t bytes = 0;
  if (c.dtype == "f32") {
    bytes = 4;
  } else if (c.dtype == "f16" || c.dtype == "bf16") {
    bytes = 2;
  } else if (c.dtype == "i8") {
    bytes = 1;
  } else {
    throw Error(Name(c, "dtype") + ": '" + c.dtype + "' (expected f32, f16, bf16 or i8)");
  }
  const bool int8 = c.dtype == "i8";

  MemoryPlan plan;
  plan.config = c;
  plan.config.threads = threads;
  plan.layers = m.layers, plan.heads = m.heads, plan.kv_heads = m.kv_heads;
  plan.head_dim = m.head_dim, plan.window = m.window;
  const int64_t tokens = m.window > 0 ? std::min(c.seq, m.window) : c.seq;
  plan.cached_tokens = tokens;
  // KV cache: K and V of every layer, kv head and kept token (+ int8 scales).
  plan.kv_cache_bytes_per_token =
      Product({2 * m.layers, m.kv_heads, m.head_dim * bytes + (int8 ? 4 : 0)});
  plan.kv_cache_bytes = plan.kv_cache_bytes_per_token == kMemoryPlanOverflow
                            ? kMemoryPlanOverflow
                            : Product({plan.kv_cache_bytes_per_token, tokens, c.batch});
  // Naive attention: the [batch, heads, seq, seq] score matrix of one layer.
  const int64_t score_bytes = int8 ? 4 : bytes;
  plan.score_matrix_bytes_per_layer = Product({c.batch, m.heads, c.seq, c.seq, score_bytes});
  // Flash kernel: fixed tiles per thread (the kernel's own accounting).
  internal::Problem problem;
  problem.batch = c.batch, problem.num_q_heads = m.heads, problem.num_kv_heads = m.kv_heads;
  problem.group_size = m.heads / m.kv_heads, problem.seq_q = c.seq, problem.seq_kv = c.seq;
  problem.head_dim = m.head_dim, problem.head_dim_v = m.head_dim, problem.threads = 1;
  plan.flash_working_set_bytes_per_thread = internal::FlashScratchBytes(problem);
  plan.flash_working_set_bytes = Product({plan.flash_working_set_bytes_per_thread, threads});
  // One generated token: 2 * head_dim flops for q.k and 2 * head_dim for p.v
  // per attended token, query head and layer.
  plan.attention_flops_per_token = Product({4 * m.layers, m.heads, m.head_dim, tokens});
  return plan;
}

}  // namespace qkv
