// qkv decode: a generation-shaped workload on random data (a prompt, then
// tokens generated one at a time through a KV cache), and the decode part of
// qkv bench (one step over a filled cache). Only useful for measurement:
// correctness is the tests' job.
//
// Bandwidth = K/V (and int8 scale) bytes the kernel read / time; decode is
// bound by it (each cached byte is used for ~num_q_heads / num_kv_heads
// multiply-adds).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "common.h"
#include "qkv/decode.h"
#include "qkv/error.h"
#include "qkv/kv_cache.h"
#include "validate.h"

namespace qkv::cli {
namespace {

struct DecodeFlags {
  int64_t prompt = 1024;
  int64_t generate = 64;
  std::string cache = "contiguous";
  std::string cache_dtype = "f32";
  int64_t heads = 32, kv_heads = 8, head_dim = 128;
  int64_t window = 4096, sinks = 4, block_size = 16;
  int threads = 0;
  int repeat = 5;
  bool json = false;
};

KvCacheConfig MakeConfig(const DecodeFlags& f, int64_t tokens) {
  KvCacheConfig c;
  c.dtype = CacheDType(f.cache_dtype);
  c.num_kv_heads = f.kv_heads;
  c.head_dim = f.head_dim;
  if (f.cache == "sliding") {
    c.kind = CacheKind::kSliding;
    c.window = f.window;
  } else if (f.cache == "sinks") {
    c.kind = CacheKind::kSinks;
    c.window = f.window;
    c.num_sinks = f.sinks;
  } else if (f.cache == "paged") {
    c.kind = CacheKind::kPaged;
    c.block_size = f.block_size;
    // A block_size below 1 is KvCache's to reject (with its message); no
    // division by it here.
    c.num_blocks = f.block_size >= 1 ? (tokens + f.block_size - 1) / f.block_size : 1;
  } else {
    c.capacity = tokens;
  }
  return c;
}

// Random N(0, 1) float32 [1, heads, n, head_dim].
std::vector<float> Random(int64_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = normal(rng);
  return x;
}

// Checks each flag by its own name, then the memory of every buffer the run
// allocates, before allocating any: the cache, the float32 K and V staging of
// the prompt (both alive while it is appended), q and out, and the decode
// kernel's partial results. `bench` names --cache-len (qkv bench --decode)
// instead of --prompt-tokens / --generate.
void CheckFlags(const DecodeFlags& f, bool bench) {
  CheckDimFlag("--heads", f.heads, 1);
  CheckDimFlag("--kv-heads", f.kv_heads, 1);
  CheckDimFlag("--head-dim", f.head_dim, 1);
  if (f.heads % f.kv_heads != 0) {
    throw Error("--kv-heads: " + std::to_string(f.kv_heads) + " does not divide --heads " +
                std::to_string(f.heads) + " (expected a divisor: MHA equal, GQA a divisor, MQA 1)");
  }
  if (f.repeat < 1 || f.repeat > 10000) {
    throw Error("--repeat: " + std::to_string(f.repeat) + " (expected 1 to 10000)");
  }
  CheckThreadsFlag(f.threads);
  if (bench) {
    CheckDimFlag("--cache-len", f.prompt, 1);
  } else {
    CheckDimFlag("--prompt-tokens", f.prompt, 0);
    CheckDimFlag("--generate", f.generate, 1);
    if (f.prompt + f.generate > internal::kMaxDim) {
      throw Error("--prompt-tokens + --generate: " + std::to_string(f.prompt + f.generate) +
                  " tokens (expected at most 2^31 - 1)");
    }
  }
  // The cache's own field names are kept in the message (KvCacheConfig).
  auto check_cache = [](const char* flag, int64_t value, int64_t min, const char* field) {
    if (value < min || value > internal::kMaxDim) {
      throw Error(std::string(flag) + ": " + std::to_string(value) + " (expected " + field + " " +
                  std::to_string(min) + " to 2^31 - 1)");
    }
  };
  if (f.cache == "sliding" || f.cache == "sinks") check_cache("--cache-window", f.window, 1, "window");
  if (f.cache == "sinks") check_cache("--sinks", f.sinks, 0, "num_sinks");
  if (f.cache == "paged") check_cache("--block-size", f.block_size, 1, "block_size");
  const double tokens = static_cast<double>(f.prompt + f.generate);
  const double kv = static_cast<double>(f.kv_heads), dim = static_cast<double>(f.head_dim);
  const bool int8 = CacheDType(f.cache_dtype) == DType::kInt8;
  const double per_token = 2.0 * kv * dim * DTypeSize(CacheDType(f.cache_dtype)) +
                           (int8 ? 2.0 * kv * 4.0 : 0.0);  // + int8 scales
  double slots = tokens;
  if (f.cache == "paged") {
    slots = std::ceil(tokens / static_cast<double>(f.block_size)) * f.block_size;
  }
  const double cache = per_token * slots;
  const double staging = 2.0 * 4.0 * kv * dim * static_cast<double>(std::max<int64_t>(f.prompt, 1));
  const double q_out = 2.0 * 4.0 * static_cast<double>(f.heads) * dim;
  const double partials =
      4.0 * static_cast<double>(f.heads) * (dim + 2.0) * (std::ceil(tokens / 2048.0) + 1.0);
  CheckFitsInMemory(std::string(bench ? "--cache-len" : "--prompt-tokens + --generate") +
                        " with --heads, --kv-heads, --head-dim and --cache-dtype (the KV cache " +
                        HumanBytes(cache) + ", its float32 staging " + HumanBytes(staging) + ")",
                    cache + staging + q_out + partials);
}

// Appends n random tokens to `seq`.
void AppendRandom(KvCache& cache, int64_t seq, int64_t n, const DecodeFlags& f,
                  std::mt19937_64& rng) {
  const std::vector<float> k = Random(f.kv_heads * n * f.head_dim, rng);
  const std::vector<float> v = Random(f.kv_heads * n * f.head_dim, rng);
  const Shape4 shape{1, f.kv_heads, n, f.head_dim};
  cache.Append(seq, TensorView::Contiguous(k.data(), DType::kFloat32, shape),
               TensorView::Contiguous(v.data(), DType::kFloat32, shape));
}

// Runs one decode step of sequence `seq` with random queries; returns info.
DecodeInfo Step(const KvCache& cache, int64_t seq, const DecodeFlags& f,
                const std::vector<float>& q, std::vector<float>& out) {
  const KvSequenceView view = cache.View(seq);
  DecodeParams p;
  p.q = TensorView::Contiguous(q.data(), DType::kFloat32, {1, f.heads, 1, f.head_dim});
  p.sequences = std::span<const KvSequenceView>(&view, 1);
  p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, {1, f.heads, 1, f.head_dim});
  p.num_threads = f.threads;
  if (f.cache == "sliding") p.window = f.window;
  return Decode(p);
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int RunDecode(const DecodeFlags& f) {
  CheckFlags(f, false);
  KvCache cache(MakeConfig(f, f.prompt + f.generate));
  const int64_t seq = cache.AddSequence();
  std::mt19937_64 rng(1);
  if (f.prompt > 0) AppendRandom(cache, seq, f.prompt, f, rng);
  const std::vector<float> q = Random(f.heads * f.head_dim, rng);
  std::vector<float> out(q.size());
  // Every step is timed; the first (cold: page faults, thread start-up) is
  // reported apart and left out of the statistics. Rates are per step
  // (bytes read / time, the cache grows as it goes), their median reported.
  std::vector<double> times, rates;
  double first_step = 0.0;
  DecodeInfo info;
  const bool progress = isatty(STDERR_FILENO) != 0;
  double last_report = Now();
  for (int64_t t = 0; t < f.generate; ++t) {
    AppendRandom(cache, seq, 1, f, rng);  // the new token's K/V, then its query
    const double t0 = Now();
    info = Step(cache, seq, f, q, out);
    const double dt = Now() - t0;
    if (t == 0 && f.generate > 1) {
      first_step = dt;
    } else {
      times.push_back(dt);
      rates.push_back(static_cast<double>(info.kv_bytes_read) / std::max(dt, 1e-12));
    }
    if (progress && Now() - last_report > 2.0) {
      std::fprintf(stderr, "decode: %lld/%lld tokens\n", static_cast<long long>(t + 1),
                   static_cast<long long>(f.generate));
      last_report = Now();
    }
  }
  double total = 0.0;
  for (double t : times) total += t;
  std::printf("decode: %s cache (%s), %lld heads / %lld kv heads x %lld, prompt %lld, "
              "%lld tokens generated\n",
              f.cache.c_str(), f.cache_dtype.c_str(), (long long)f.heads, (long long)f.kv_heads,
              (long long)f.head_dim, (long long)f.prompt, (long long)f.generate);
  char cold[96] = "";
  if (f.generate > 1) {
    std::snprintf(cold, sizeof cold, " (the first, cold step took %.1f us: left out)",
                  first_step * 1e6);
  }
  std::printf("time per token: median %.1f us, mean %.1f us over %zu steps%s\n"
              "K/V read: median %.2f GB/s (per step: bytes read / its time); %d threads, %s; "
              "cache %s, peak memory %s\n",
              Median(times) * 1e6, total / static_cast<double>(times.size()) * 1e6, times.size(),
              cold, Median(rates) * 1e-9, info.threads, info.simd_target.c_str(),
              HumanBytes(static_cast<double>(cache.BytesAllocated())).c_str(),
              HumanBytes(static_cast<double>(PeakRssBytes())).c_str());
  std::printf("K/V path: %s\n", info.path.c_str());
  return 0;
}

int RunDecodeBench(const DecodeFlags& f, int64_t cache_len) {
  DecodeFlags g = f;
  g.prompt = cache_len;
  g.generate = 1;
  CheckFlags(g, true);
  KvCache cache(MakeConfig(g, cache_len));
  const int64_t seq = cache.AddSequence();
  std::mt19937_64 rng(1);
  AppendRandom(cache, seq, cache_len, g, rng);
  const std::vector<float> q = Random(g.heads * g.head_dim, rng);
  std::vector<float> out(q.size());
  DecodeInfo info = Step(cache, seq, g, q, out);  // warm-up
  std::vector<double> times;
  for (int r = 0; r < g.repeat; ++r) {
    const double t0 = Now();
    info = Step(cache, seq, g, q, out);
    times.push_back(Now() - t0);
  }
  const double median = Median(times);
  const nlohmann::json j = {
      {"mode", "decode"}, {"cache_len", cache_len}, {"cache", g.cache},
      {"cache_dtype", g.cache_dtype}, {"num_q_heads", g.heads}, {"num_kv_heads", g.kv_heads},
      {"head_dim", g.head_dim}, {"repeat", g.repeat}, {"median_s", median},
      {"min_s", *std::min_element(times.begin(), times.end())},
      {"max_s", *std::max_element(times.begin(), times.end())},
      {"bytes_per_token", info.kv_bytes_read}, {"gbps", info.kv_bytes_read / median * 1e-9},
      {"splits", info.splits}, {"threads", info.threads}, {"simd_target", info.simd_target},
      {"path", info.path},
      {"peak_rss_bytes", PeakRssBytes()}};
  if (g.json) {
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("decode step over %lld cached tokens (%s): median %.1f us, %lld bytes read, "
                "%.2f GB/s, %lld splits, %d threads, %s; K/V path: %s\n",
                (long long)cache_len, g.cache_dtype.c_str(), median * 1e6,
                (long long)info.kv_bytes_read, info.kv_bytes_read / median * 1e-9,
                (long long)info.splits, info.threads, info.simd_target.c_str(), info.path.c_str());
  }
  return 0;
}

void AddCacheFlags(CLI::App* cmd, DecodeFlags& f) {
  cmd->add_option("--cache", f.cache, "Cache kind")
      ->check(CLI::IsMember({"contiguous", "sliding", "sinks", "paged"}))
      ->capture_default_str();
  cmd->add_option("--cache-dtype", f.cache_dtype, "Cache storage dtype")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "i8"}))
      ->capture_default_str();
  cmd->add_option("--heads", f.heads, "Query heads")->capture_default_str();
  cmd->add_option("--kv-heads", f.kv_heads, "KV heads (dividing --heads)")->capture_default_str();
  cmd->add_option("--head-dim", f.head_dim, "Head dim")->capture_default_str();
  cmd->add_option("--cache-window", f.window, "sliding / sinks cache: recent tokens kept")
      ->capture_default_str();
  cmd->add_option("--sinks", f.sinks, "sinks: first tokens kept")->capture_default_str();
  cmd->add_option("--block-size", f.block_size, "paged: tokens per block")->capture_default_str();
  cmd->add_option("--threads", f.threads, "Threads (0 = all cores)")->capture_default_str();
}

}  // namespace

Runner AddDecodeCommand(CLI::App& app) {
  auto flags = std::make_shared<DecodeFlags>();
  DecodeFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "decode", "Generation-shaped decode workload on random data: time per token, bandwidth");
  cmd->add_option("--prompt-tokens", f.prompt, "Prompt tokens appended first (random)")
      ->capture_default_str();
  cmd->add_option("--generate", f.generate, "Tokens generated one at a time")->capture_default_str();
  AddCacheFlags(cmd, f);
  return [flags] { return RunDecode(*flags); };
}

int RunDecodeBenchmark(const DecodeBenchArgs& a) {
  DecodeFlags f;
  f.heads = a.heads;
  f.kv_heads = a.kv_heads;
  f.head_dim = a.head_dim;
  f.cache_dtype = a.cache_dtype;
  f.threads = a.threads;
  f.repeat = a.repeat;
  f.json = a.json;
  return RunDecodeBench(f, a.cache_len);
}

}  // namespace qkv::cli
