// qkv memory: a planner that prints, for a model configuration, what
// attention costs in memory and arithmetic, without allocating anything:
//   kv cache      2 * layers * kv_heads * head_dim * tokens * batch * bytes
//                 (+ 2 * layers * kv_heads * tokens * batch * 4 int8 scales);
//                 tokens = min(seq, window) for a sliding-window cache
//   score matrix  batch * heads * seq^2 * bytes per layer: what naive
//                 attention materialises (float32 for an int8 cache)
//   flash tiles   the flash kernel's fixed working set per thread, from the
//                 kernel's own FlashScratchBytes (independent of seq)
//   flops/token   4 * layers * heads * head_dim * attended tokens: Q.K and
//                 P.V of one generated token, attention only (no projections
//                 or MLP)
// Bytes are printed exactly and in GB (1e9) and GiB (2^30).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "kernels/flash_attention.h"
#include "problem.h"
#include "qkv/error.h"

namespace qkv::cli {
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

struct MemoryFlags {
  std::string preset;
  std::optional<int64_t> layers, heads, kv_heads, head_dim, window;
  int64_t seq = 0, batch = 1;
  std::string dtype = "f16";
  int threads = 1;
  bool json = false;
};

int64_t DTypeBytes(const std::string& dtype) {
  if (dtype == "f32") return 4;
  if (dtype == "f16" || dtype == "bf16") return 2;
  return 1;  // i8
}

// Returns a * b; throws naming `what` when it exceeds int64.
int64_t Mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) {
    throw Error(std::string(what) + ": more than 2^63 (expected a smaller configuration)");
  }
  return r;
}

// Returns "68,719,476,736".
std::string Grouped(int64_t v) {
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

void CheckPositive(const char* flag, int64_t v, int64_t min = 1) {
  if (v < min || v > (int64_t{1} << 31) - 1) {
    throw Error(std::string(flag) + ": " + std::to_string(v) + " (expected " + std::to_string(min) +
                " to 2^31 - 1)");
  }
}

int RunMemory(const MemoryFlags& f) {
  Model m;
  if (!f.preset.empty()) {
    bool found = false;
    for (const Preset& p : kPresets) {
      if (f.preset == p.name) m = p.model, found = true;
    }
    if (!found) {
      throw Error("--preset: '" + f.preset +
                  "' (expected llama2-7b, llama3-8b, mistral-7b or llama2-70b)");
    }
  } else if (!f.heads || !f.head_dim) {
    throw Error("--heads and --head-dim are required without --preset (expected e.g. --preset "
                "llama3-8b, or --heads 32 --head-dim 128)");
  }
  // Flags override the preset's fields.
  if (f.layers) m.layers = *f.layers;
  if (f.heads) m.heads = *f.heads;
  if (f.head_dim) m.head_dim = *f.head_dim;
  if (f.kv_heads) {
    m.kv_heads = *f.kv_heads;
  } else if (f.preset.empty()) {
    m.kv_heads = m.heads;
  }
  if (f.window) m.window = *f.window;
  CheckPositive("--layers", m.layers);
  CheckPositive("--heads", m.heads);
  CheckPositive("--kv-heads", m.kv_heads);
  CheckPositive("--head-dim", m.head_dim);
  CheckPositive("--seq", f.seq);
  CheckPositive("--batch", f.batch);
  CheckPositive("--window", m.window, 0);
  CheckPositive("--threads", f.threads);
  if (m.heads % m.kv_heads != 0) {
    throw Error("--kv-heads: " + std::to_string(m.kv_heads) + " must divide --heads " +
                std::to_string(m.heads) + " (expected a divisor: MHA equal, GQA a divisor, MQA 1)");
  }

  const int64_t bytes = DTypeBytes(f.dtype);
  const bool int8 = f.dtype == "i8";
  const int64_t tokens = m.window > 0 ? std::min(f.seq, m.window) : f.seq;
  // KV cache: K and V of every layer, kv head and kept token (+ int8 scales).
  const int64_t per_token = Mul(Mul(2 * m.layers, m.kv_heads, "kv cache bytes"),
                                m.head_dim * bytes + (int8 ? 4 : 0), "kv cache bytes");
  const int64_t kv_cache =
      Mul(Mul(per_token, tokens, "kv cache bytes"), f.batch, "kv cache bytes");
  // Naive attention: the [batch, heads, seq, seq] score matrix of one layer.
  const int64_t score_bytes = int8 ? 4 : bytes;
  const int64_t scores = Mul(Mul(Mul(f.batch, m.heads, "score matrix bytes"),
                                 Mul(f.seq, f.seq, "score matrix bytes"), "score matrix bytes"),
                             score_bytes, "score matrix bytes");
  // Flash kernel: fixed tiles per thread (the kernel's own accounting).
  internal::Problem problem;
  problem.batch = f.batch, problem.num_q_heads = m.heads, problem.num_kv_heads = m.kv_heads;
  problem.group_size = m.heads / m.kv_heads, problem.seq_q = f.seq, problem.seq_kv = f.seq;
  problem.head_dim = m.head_dim, problem.head_dim_v = m.head_dim, problem.threads = 1;
  const int64_t flash_thread = internal::FlashScratchBytes(problem);
  const int64_t flash = Mul(flash_thread, f.threads, "flash working set");
  // One generated token: 2 * head_dim flops for q.k and 2 * head_dim for p.v
  // per attended token, query head and layer.
  const int64_t flops = Mul(Mul(Mul(4 * m.layers, m.heads, "flops per token"), m.head_dim,
                                "flops per token"),
                            tokens, "flops per token");

  if (f.json) {
    const nlohmann::json j = {
        {"preset", f.preset},
        {"layers", m.layers},
        {"heads", m.heads},
        {"kv_heads", m.kv_heads},
        {"head_dim", m.head_dim},
        {"window", m.window},
        {"seq", f.seq},
        {"batch", f.batch},
        {"dtype", f.dtype},
        {"threads", f.threads},
        {"cached_tokens", tokens},
        {"kv_cache_bytes_per_token", per_token},
        {"kv_cache_bytes", kv_cache},
        {"score_matrix_bytes_per_layer", scores},
        {"flash_working_set_bytes_per_thread", flash_thread},
        {"flash_working_set_bytes", flash},
        {"attention_flops_per_token", flops}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("config: %s%lld layers, %lld heads, %lld kv heads, head_dim %lld, seq %lld, batch %lld, "
              "%s%s\n",
              f.preset.empty() ? "" : (f.preset + ": ").c_str(), static_cast<long long>(m.layers),
              static_cast<long long>(m.heads), static_cast<long long>(m.kv_heads),
              static_cast<long long>(m.head_dim), static_cast<long long>(f.seq),
              static_cast<long long>(f.batch), f.dtype.c_str(),
              m.window > 0 ? (", window " + std::to_string(m.window)).c_str() : "");
  std::printf("kv cache (%lld tokens kept, %s bytes per token): %s\n", static_cast<long long>(tokens),
              Grouped(per_token).c_str(), Bytes(kv_cache).c_str());
  std::printf("naive score matrix per layer (%s): %s\n", int8 ? "float32" : f.dtype.c_str(),
              Bytes(scores).c_str());
  std::printf("flash kernel working set (fixed tiles, any seq): %s per thread, %s bytes for %d thread%s\n",
              Bytes(flash_thread).c_str(), Grouped(flash).c_str(), f.threads,
              f.threads == 1 ? "" : "s");
  std::printf("attention flops per generated token (q.k and p.v only; no projections or MLP): "
              "%s = %.3g GFLOP\n",
              Grouped(flops).c_str(), static_cast<double>(flops) * 1e-9);
  return 0;
}

}  // namespace

Runner AddMemoryCommand(CLI::App& app) {
  auto flags = std::make_shared<MemoryFlags>();
  MemoryFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "memory", "Plan attention memory: KV cache, naive score matrix, flash tiles, flops/token");
  cmd->add_option("--preset", f.preset,
                  "Model: llama2-7b, llama3-8b, mistral-7b (window 4096) or llama2-70b; flags "
                  "override its fields");
  cmd->add_option("--layers", f.layers, "Attention layers (default 1 without --preset)");
  cmd->add_option("--heads", f.heads, "Query heads");
  cmd->add_option("--kv-heads", f.kv_heads, "KV heads (default --heads; fewer = GQA/MQA)");
  cmd->add_option("--head-dim", f.head_dim, "Head dim");
  cmd->add_option("--window", f.window, "Sliding window: cached tokens kept (0 = none)");
  cmd->add_option("--seq", f.seq, "Sequence length (tokens)")->required();
  cmd->add_option("--batch", f.batch, "Sequences")->capture_default_str();
  cmd->add_option("--dtype", f.dtype, "Element type of K/V and scores (i8: cache only)")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "i8"}))
      ->capture_default_str();
  cmd->add_option("--threads", f.threads, "Threads for the flash working set")
      ->capture_default_str();
  cmd->add_flag("--json", f.json, "Print the same as one JSON object");
  return [flags] { return RunMemory(*flags); };
}

}  // namespace qkv::cli
