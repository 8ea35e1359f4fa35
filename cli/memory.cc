// qkv memory: prints the plan of qkv/memory_plan.h (KV cache, naive score
// matrix, flash tiles, flops per token) for a model configuration, without
// allocating anything. Bytes are printed exactly and in GB (1e9) and GiB
// (2^30).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "common.h"
#include "qkv/memory_plan.h"

namespace qkv::cli {
namespace {

struct MemoryFlags {
  MemoryPlanConfig config;
  bool json = false;
};

// Returns "68,719,476,736" ("> 2^63" for a figure that overflowed).
std::string Grouped(int64_t v) {
  if (v == kMemoryPlanOverflow) return "> 2^63";
  std::string digits = std::to_string(v), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

// Returns "68,719,476,736 bytes = 68.7 GB = 64 GiB": decimal (1e3 steps)
// and binary (2^10 steps) units, each picked by magnitude.
std::string Bytes(int64_t v) {
  if (v == kMemoryPlanOverflow) return "> 2^63 bytes (too large to plan)";
  static const char* const kDecimal[] = {"B", "kB", "MB", "GB", "TB", "PB", "EB"};
  static const char* const kBinary[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double dec = static_cast<double>(v), bin = dec;
  int di = 0, bi = 0;
  while (dec >= 1000.0 && di < 6) dec /= 1000.0, ++di;
  while (bin >= 1024.0 && bi < 6) bin /= 1024.0, ++bi;
  char text[96];
  std::snprintf(text, sizeof text, " bytes = %.3g %s = %.3g %s", dec, kDecimal[di], bin, kBinary[bi]);
  return Grouped(v) + text;
}

// Returns " = 4.29 GFLOP" (nothing for a figure that overflowed).
std::string Gflop(int64_t flops) {
  if (flops == kMemoryPlanOverflow) return "";
  char text[64];
  std::snprintf(text, sizeof text, " = %.3g GFLOP", static_cast<double>(flops) * 1e-9);
  return text;
}

int RunMemory(const MemoryFlags& flags) {
  CheckThreadsFlag(flags.config.threads);
  const MemoryPlan p = PlanMemory(flags.config);
  const MemoryPlanConfig& f = p.config;
  const bool int8 = f.dtype == "i8";
  const int64_t tokens = p.cached_tokens, per_token = p.kv_cache_bytes_per_token;
  const int64_t kv_cache = p.kv_cache_bytes, scores = p.score_matrix_bytes_per_layer;
  const int64_t flash_thread = p.flash_working_set_bytes_per_thread;
  const int64_t flash = p.flash_working_set_bytes, flops = p.attention_flops_per_token;
  const int64_t seq = f.seq, batch = f.batch;

  if (flags.json) {
    // A figure beyond 2^63 - 1 is null.
    const auto value = [](int64_t v) {
      return v == kMemoryPlanOverflow ? nlohmann::json(nullptr) : nlohmann::json(v);
    };
    const nlohmann::json j = {
        {"preset", f.preset},
        {"layers", p.layers},
        {"heads", p.heads},
        {"kv_heads", p.kv_heads},
        {"head_dim", p.head_dim},
        {"window", p.window},
        {"seq", seq},
        {"batch", batch},
        {"dtype", f.dtype},
        {"threads", f.threads},
        {"cached_tokens", tokens},
        {"kv_cache_bytes_per_token", value(per_token)},
        {"kv_cache_bytes", value(kv_cache)},
        {"score_matrix_bytes_per_layer", value(scores)},
        {"flash_working_set_bytes_per_thread", flash_thread},
        {"flash_working_set_bytes", value(flash)},
        {"attention_flops_per_token", value(flops)}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("config: %s%lld layers, %lld heads, %lld kv heads, head_dim %lld, seq %lld, batch %lld, "
              "%s%s\n",
              f.preset.empty() ? "" : (f.preset + ": ").c_str(), static_cast<long long>(p.layers),
              static_cast<long long>(p.heads), static_cast<long long>(p.kv_heads),
              static_cast<long long>(p.head_dim), static_cast<long long>(seq),
              static_cast<long long>(batch), f.dtype.c_str(),
              p.window > 0 ? (", window " + std::to_string(p.window)).c_str() : "");
  std::printf("kv cache (%lld tokens kept, %s bytes per token): %s\n", static_cast<long long>(tokens),
              Grouped(per_token).c_str(), Bytes(kv_cache).c_str());
  std::printf("naive score matrix per layer (%s): %s\n", int8 ? "float32" : f.dtype.c_str(),
              Bytes(scores).c_str());
  std::printf("flash kernel working set (fixed tiles, any seq): %s per thread, %s bytes for %d thread%s\n",
              Bytes(flash_thread).c_str(), Grouped(flash).c_str(), f.threads,
              f.threads == 1 ? "" : "s");
  std::printf("attention flops per generated token (q.k and p.v only; no projections or MLP): "
              "%s%s\n",
              Grouped(flops).c_str(), Gflop(flops).c_str());
  return 0;
}

}  // namespace

Runner AddMemoryCommand(CLI::App& app) {
  auto flags = std::make_shared<MemoryFlags>();
  MemoryPlanConfig& f = flags->config;
  f.flag_prefix = "--";
  CLI::App* cmd = app.add_subcommand(
      "memory", "Plan attention memory: KV cache, naive score matrix, flash tiles, flops/token");
  cmd->add_option("--preset", f.preset,
                  "Model: llama2-7b, llama3-8b, mistral-7b (window 4096) or llama2-70b; flags "
                  "override its fields");
  cmd->add_option("--layers", f.layers, "Attention layers (default 1 without --preset)");
  cmd->add_option("--heads", f.heads, "Query heads");
  cmd->add_option("--kv-heads", f.kv_heads, "KV heads (default --heads; fewer = GQA/MQA)");
  cmd->add_option("--head-dim", f.head_dim, "Head dim");
  cmd->add_option("--cache-window", f.window,
                  "Sliding-window cache: recent tokens kept (0 = no window)");
  cmd->add_option("--seq", f.seq, "Sequence length (tokens)")->required();
  cmd->add_option("--batch", f.batch, "Sequences")->capture_default_str();
  cmd->add_option("--cache-dtype", f.dtype, "KV cache storage dtype, also the scores' (i8: cache only)")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "i8"}))
      ->capture_default_str();
  cmd->add_option("--threads", f.threads,
                  "Threads holding a flash working set (0 = all cores, as everywhere)")
      ->capture_default_str();
  cmd->add_flag("--json", flags->json, "Print the same as one JSON object");
  return [flags] { return RunMemory(*flags); };
}

}  // namespace qkv::cli
