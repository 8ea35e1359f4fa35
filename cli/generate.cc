// qkv generate / logits / perplexity: a Llama-architecture GGUF decoder
// (SmolLM2-135M-Instruct; docs/models.md) run on qkv's KV caches.
//
//   generate    streams the continuation of --prompt (or of the ChatML-wrapped
//               --prompt with --chat) until an end-of-text token or
//               --max-tokens; temperature 0 is greedy; --seed fixes sampling
//   logits      one teacher-forced pass: float32 logits [tokens, vocab]
//   perplexity  exp(mean negative log-likelihood) over a text file, in
//               independent chunks of --context tokens
// The cache flags are those of `qkv decode`: --cache contiguous|sliding|
// sinks|paged, --cache-dtype f32|f16|bf16|i8, --cache-window, --sinks, --block-size.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "common.h"
#include "model_flags.h"
#include "io/file_util.h"
#include "qkv/error.h"
#include "qkv/models/bpe_tokenizer.h"
#include "qkv/models/llama.h"
#include "qkv/version.h"

namespace qkv::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct CacheFlags {
  std::string cache = "contiguous";
  std::string cache_dtype = "f32";
  int64_t window = 4096, sinks = 4, block_size = 16;
  int threads = 0;
};

void AddModelCacheFlags(CLI::App* cmd, std::string& model, CacheFlags& f) {
  cmd->add_option("--model", model, "GGUF file of a Llama-architecture model "
                  "(models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf after `make models`)")
      ->required();
  cmd->add_option("--cache", f.cache, "KV cache kind")
      ->check(CLI::IsMember({"contiguous", "sliding", "sinks", "paged"}))
      ->capture_default_str();
  cmd->add_option("--cache-dtype", f.cache_dtype, "KV cache storage dtype")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "i8"}))
      ->capture_default_str();
  cmd->add_option("--cache-window", f.window, "sliding / sinks cache: recent tokens kept")
      ->capture_default_str();
  cmd->add_option("--sinks", f.sinks, "sinks: first tokens kept")->capture_default_str();
  cmd->add_option("--block-size", f.block_size, "paged: tokens per block")->capture_default_str();
  cmd->add_option("--threads", f.threads, "Threads (0 = all cores); results never depend on it")
      ->capture_default_str();
}

// A cache for sequences of up to `tokens` tokens (paged: one spare block).
KvCacheConfig MakeCacheConfig(const CacheFlags& f, int64_t tokens) {
  CheckThreadsFlag(f.threads);
  KvCacheConfig c;
  c.dtype = CacheDType(f.cache_dtype);
  if (f.cache == "sliding" || f.cache == "sinks") {
    CheckDimFlag("--cache-window", f.window, 1);
    c.kind = f.cache == "sliding" ? CacheKind::kSliding : CacheKind::kSinks;
    c.window = f.window;
    if (f.cache == "sinks") {
      CheckDimFlag("--sinks", f.sinks, 0);
      c.num_sinks = f.sinks;
    }
  } else if (f.cache == "paged") {
    CheckDimFlag("--block-size", f.block_size, 1);
    c.kind = CacheKind::kPaged;
    c.block_size = f.block_size;
    c.num_blocks = (tokens + f.block_size - 1) / f.block_size + 1;
  } else {
    c.capacity = tokens;
  }
  return c;
}

std::string DescribeCache(const CacheFlags& f) {
  std::string s = f.cache + " " + f.cache_dtype;
  if (f.cache == "sliding" || f.cache == "sinks") s += ", window " + std::to_string(f.window);
  if (f.cache == "sinks") s += ", " + std::to_string(f.sinks) + " sinks";
  return s;
}

using Loaded = LoadedLlama;

Loaded Load(const std::string& path) { return LoadLlamaModel(path); }

std::vector<int32_t> Tokenize(const models::BpeTokenizer& tok, const std::string& text,
                              const char* flag) {
  std::vector<int32_t> ids;
  try {
    ids = tok.Encode(text, /*parse_special=*/true);
  } catch (const Error& e) {
    throw Error(std::string(flag) + ": " + e.what());
  }
  if (ids.empty()) throw Error(std::string(flag) + ": empty (expected text of at least one token)");
  return ids;
}

// Picks the next token from one row of logits: argmax at temperature 0
// (lowest id on ties), else softmax(logits / T) restricted to the top_k most
// likely (0: all) and to the smallest set whose mass reaches top_p, sampled
// with a uniform draw from `rng` (53 bits, the same on every platform).
int32_t Sample(const float* logits, int64_t vocab, double temperature, int64_t top_k,
               double top_p, std::mt19937_64& rng) {
  if (temperature <= 0) {
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  }
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) ids[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  const auto by_logit = [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const int64_t k = top_k > 0 ? std::min(top_k, vocab) : vocab;
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), by_logit);
  ids.resize(static_cast<size_t>(k));
  std::vector<double> p(ids.size());
  const double top = logits[ids[0]];
  double sum = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    p[i] = std::exp((logits[ids[i]] - top) / temperature);
    sum += p[i];
  }
  size_t keep = ids.size();
  double mass = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    mass += p[i] / sum;
    if (mass >= top_p) {
      keep = i + 1;
      break;
    }
  }
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += p[i];
  const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53 * kept;
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (u < acc) return ids[i];
  }
  return ids[keep - 1];
}

struct GenerateFlags {
  std::string model, prompt;
  bool chat = false, verbose = false;
  int64_t max_tokens = 256;
  double temperature = 0.8, top_p = 0.95;
  int64_t top_k = 40;
  int64_t seed = 0;
  CacheFlags cache;
};

int RunGenerate(const GenerateFlags& f) {
  CheckDimFlag("--max-tokens", f.max_tokens, 0);
  if (!(f.temperature >= 0) || !std::isfinite(f.temperature)) {
    throw Error("--temperature: " + std::to_string(f.temperature) + " (expected >= 0; 0 is greedy)");
  }
  if (!(f.top_p > 0 && f.top_p <= 1)) {
    throw Error("--top-p: " + std::to_string(f.top_p) + " (expected in (0, 1])");
  }
  if (f.top_k < 0) throw Error("--top-k: " + std::to_string(f.top_k) + " (expected >= 0; 0 = all)");
  if (f.seed < 0) throw Error("--seed: " + std::to_string(f.seed) + " (expected >= 0)");
  MakeCacheConfig(f.cache, 1);  // flag errors before the model is read
  Loaded loaded = Load(f.model);
  const models::LlamaConfig& c = loaded.model.config();
  const std::string text = f.chat ? loaded.tokenizer.ApplyChatTemplate(f.prompt) : f.prompt;
  const std::vector<int32_t> ids = Tokenize(loaded.tokenizer, text, "--prompt");
  const int64_t total = static_cast<int64_t>(ids.size()) + f.max_tokens;
  models::LlamaCache cache(c, MakeCacheConfig(f.cache, total));
  const int64_t seq = cache.AddSequence();
  std::mt19937_64 rng(static_cast<uint64_t>(f.seed));
  std::vector<float> logits;
  const auto t0 = Clock::now();
  models::ForwardInfo prefill =
      models::LlamaForward(loaded.model, cache, seq, ids, models::Logits::kLast, logits, f.cache.threads);
  const double prefill_s = std::chrono::duration<double>(Clock::now() - t0).count();
  models::Utf8Stream stream;
  std::vector<double> step_s;
  double attention_s = 0;
  int64_t generated = 0;
  std::string stop = "--max-tokens";
  for (int64_t i = 0; i < f.max_tokens; ++i) {
    const int32_t next = Sample(logits.data(), c.vocab, f.temperature, f.top_k, f.top_p, rng);
    ++generated;
    if (next == loaded.tokenizer.eos_id() || loaded.tokenizer.IsControl(next)) {
      stop = "end-of-text token " + loaded.tokenizer.Piece(next);
      break;
    }
    std::fputs(stream.Push(loaded.tokenizer.TokenBytes(next)).c_str(), stdout);
    std::fflush(stdout);
    if (i + 1 == f.max_tokens) break;
    const auto s0 = Clock::now();
    const models::ForwardInfo step = models::LlamaForward(
        loaded.model, cache, seq, std::span<const int32_t>(&next, 1), models::Logits::kLast, logits,
        f.cache.threads);
    step_s.push_back(std::chrono::duration<double>(Clock::now() - s0).count());
    attention_s += step.attention_seconds;
  }
  std::fputs(stream.Finish().c_str(), stdout);
  std::fputs("\n", stdout);
  if (f.verbose) {
    std::fprintf(stderr, "qkv generate: build %s\n", BuildInfo().c_str());
    double decode_s = 0;
    for (double s : step_s) decode_s += s;
    std::fprintf(stderr,
                 "qkv generate: %zu prompt tokens in %.3f s (%.1f tokens/s, attention: %s); "
                 "%lld tokens generated, %zu decode steps in %.3f s (%.1f tokens/s, median step "
                 "%.2f ms, attention %.0f%% of it); stopped at %s\n",
                 ids.size(), prefill_s, static_cast<double>(ids.size()) / prefill_s,
                 prefill.attention_path.c_str(), static_cast<long long>(generated), step_s.size(),
                 decode_s, decode_s > 0 ? static_cast<double>(step_s.size()) / decode_s : 0.0,
                 step_s.empty() ? 0.0 : Median(step_s) * 1e3,
                 decode_s > 0 ? 100.0 * attention_s / decode_s : 0.0, stop.c_str());
    std::fprintf(stderr, "qkv generate: KV cache (%s) %s for %lld tokens; weights %s; "
                 "quantised products on %s\n",
                 DescribeCache(f.cache).c_str(), HumanBytes(static_cast<double>(cache.BytesAllocated())).c_str(),
                 static_cast<long long>(cache.Length(seq)),
                 HumanBytes(static_cast<double>(loaded.model.WeightBytes())).c_str(),
                 models::QuantSimdTarget());
  }
  return FinishStdout(0);
}

struct LogitsFlags {
  std::string model, prompt, out, tokens_out, attn_weights;
  bool chat = false;
  CacheFlags cache;
};

int RunLogits(const LogitsFlags& f) {
  CheckOutputPaths({{"--model", f.model}}, {{"--out", f.out}, {"--tokens-out", f.tokens_out}});
  MakeCacheConfig(f.cache, 1);
  CheckAttnDirFlag(f.attn_weights);
  const bool want_weights = !f.attn_weights.empty();
  if (want_weights && (f.cache.cache_dtype != "f32" ||
                       (f.cache.cache != "contiguous" && f.cache.cache != "paged"))) {
    throw Error("--attn-weights: needs --cache contiguous or paged with --cache-dtype f32 (the "
                "weights come from the prefill, which other caches run token by token)");
  }
  Loaded loaded = Load(f.model);
  const models::LlamaConfig& c = loaded.model.config();
  const std::string text = f.chat ? loaded.tokenizer.ApplyChatTemplate(f.prompt) : f.prompt;
  const std::vector<int32_t> ids = Tokenize(loaded.tokenizer, text, "--prompt");
  const int64_t n = static_cast<int64_t>(ids.size());
  const double weight_bytes = want_weights ? 4.0 * c.num_layers * c.num_q_heads * n * n : 0.0;
  CheckFitsInMemory("logits for " + std::to_string(n) + " tokens" +
                        (want_weights ? " and --attn-weights" : ""),
                    4.0 * static_cast<double>(n) * static_cast<double>(c.vocab) + weight_bytes);
  models::LlamaCache cache(c, MakeCacheConfig(f.cache, n));
  const int64_t seq = cache.AddSequence();
  std::vector<float> logits;
  models::LlamaProbe probe;
  probe.want_weights = want_weights;
  const models::ForwardInfo info = models::LlamaForward(
      loaded.model, cache, seq, ids, models::Logits::kAll, logits, f.cache.threads, &probe);
  OutputSet out;
  out.Add(f.out, DType::kFloat32, {n, c.vocab}, logits.data());
  if (!f.tokens_out.empty()) out.Add(f.tokens_out, DType::kInt32, {n}, ids.data());
  if (want_weights) {
    // Layer files as qkv embed writes them: [inputs = 1, heads, seq, seq];
    // tokens as the text each one stands for (invalid UTF-8 of a token that
    // ends inside a character becomes U+FFFD).
    for (int64_t l = 0; l < c.num_layers; ++l) {
      out.Add(f.attn_weights + "/layer" + std::to_string(l) + ".npy", DType::kFloat32,
              {1, c.num_q_heads, n, n}, probe.weights[static_cast<size_t>(l)].data());
    }
    std::vector<std::string> pieces;
    for (const int32_t id : ids) pieces.push_back(loaded.tokenizer.TokenBytes(id));
    out.AddText(f.attn_weights + "/tokens.json",
                nlohmann::json(std::vector<std::vector<std::string>>{pieces})
                        .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
                    "\n",
                "[");
    std::fprintf(stderr, "qkv logits: attention on the %s\n", info.attention_path.c_str());
  }
  CommitWithAttnDir(out, f.attn_weights);
  return 0;
}

struct PerplexityFlags {
  std::string model, input;
  int64_t context = 512, chunks = 0;
  CacheFlags cache;
};

int RunPerplexity(const PerplexityFlags& f) {
  CheckDimFlag("--context", f.context, 2);
  if (f.chunks < 0) throw Error("--chunks: " + std::to_string(f.chunks) + " (expected >= 0; 0 = all)");
  MakeCacheConfig(f.cache, f.context);
  std::string text;
  try {
    text = internal::ReadSmallFile(f.input, "text file", uint64_t{64} << 20);
  } catch (const Error& e) {
    throw Error("--input: " + std::string(e.what()));
  }
  Loaded loaded = Load(f.model);
  const models::LlamaConfig& c = loaded.model.config();
  const std::vector<int32_t> ids = Tokenize(loaded.tokenizer, text, "--input");
  int64_t chunks = static_cast<int64_t>(ids.size()) / f.context;
  if (chunks == 0) {
    throw Error("--input: " + f.input + " has " + std::to_string(ids.size()) +
                " tokens (expected at least --context " + std::to_string(f.context) + ")");
  }
  if (f.chunks > 0) chunks = std::min(chunks, f.chunks);
  CheckFitsInMemory("logits for --context " + std::to_string(f.context),
                    4.0 * static_cast<double>(f.context) * static_cast<double>(c.vocab));
  double nll = 0;
  int64_t predicted = 0;
  const auto t0 = Clock::now();
  std::vector<float> logits;
  Progress progress("qkv perplexity", "chunks", chunks);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    progress.Done(ch);
    models::LlamaCache cache(c, MakeCacheConfig(f.cache, f.context));
    const int64_t seq = cache.AddSequence();
    const std::span<const int32_t> chunk(ids.data() + ch * f.context, static_cast<size_t>(f.context));
    models::LlamaForward(loaded.model, cache, seq, chunk, models::Logits::kAll, logits, f.cache.threads);
    for (int64_t t = 0; t + 1 < f.context; ++t) {
      const float* row = logits.data() + t * c.vocab;
      const double mx = *std::max_element(row, row + c.vocab);
      double sum = 0;
      for (int64_t j = 0; j < c.vocab; ++j) sum += std::exp(static_cast<double>(row[j]) - mx);
      nll += mx + std::log(sum) - row[chunk[static_cast<size_t>(t + 1)]];
      ++predicted;
    }
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("perplexity %.4f over %lld predicted tokens (%lld chunks of %lld tokens; KV cache %s)\n",
              std::exp(nll / static_cast<double>(predicted)), static_cast<long long>(predicted),
              static_cast<long long>(chunks), static_cast<long long>(f.context),
              DescribeCache(f.cache).c_str());
  std::fprintf(stderr, "qkv perplexity: %lld tokens in %.2f s (%.1f tokens/s)\n",
               static_cast<long long>(chunks * f.context), seconds,
               static_cast<double>(chunks * f.context) / seconds);
  return FinishStdout(0);
}

}  // namespace

LoadedLlama LoadLlamaModel(const std::string& path) {
  try {
    models::LlamaModel model = models::LlamaModel::Load(path);
    models::BpeTokenizer tokenizer = models::BpeTokenizer::FromGguf(model.file());
    return LoadedLlama{std::move(model), std::move(tokenizer)};
  } catch (const Error& e) {
    throw Error("--model: " + std::string(e.what()));
  }
}


Runner AddGenerateCommand(CLI::App& app) {
  auto flags = std::make_shared<GenerateFlags>();
  GenerateFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "generate", "Generate text with a Llama-architecture GGUF model on qkv's KV caches");
  AddModelCacheFlags(cmd, f.model, f.cache);
  cmd->add_option("--prompt", f.prompt, "Prompt text")->required();
  cmd->add_flag("--chat", f.chat, "Wrap --prompt in the model's chat template (ChatML) as a user turn");
  cmd->add_option("--max-tokens", f.max_tokens, "Tokens to generate at most")->capture_default_str();
  cmd->add_option("--temperature", f.temperature, "Sampling temperature (0 = greedy)")
      ->capture_default_str();
  cmd->add_option("--top-p", f.top_p, "Nucleus sampling mass")->capture_default_str();
  cmd->add_option("--top-k", f.top_k, "Sample among the k most likely (0 = all)")->capture_default_str();
  cmd->add_option("--seed", f.seed, "Sampling seed (the same seed gives the same text)")
      ->capture_default_str();
  cmd->add_flag("--verbose", f.verbose,
                "Print prefill and decode tokens/s, attention's share and KV-cache bytes");
  return [flags] { return RunGenerate(*flags); };
}

Runner AddLogitsCommand(CLI::App& app) {
  auto flags = std::make_shared<LogitsFlags>();
  LogitsFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "logits", "Teacher-forced logits of every prompt position (float32 [tokens, vocab] .npy)");
  AddModelCacheFlags(cmd, f.model, f.cache);
  cmd->add_option("--prompt", f.prompt, "Prompt text")->required();
  cmd->add_flag("--chat", f.chat, "Wrap --prompt in the model's chat template (ChatML)");
  cmd->add_option("--out", f.out, "Output .npy, float32 [tokens, vocab]")->required();
  cmd->add_option("--tokens-out", f.tokens_out, "Output .npy, int32 [tokens]: the prompt's ids");
  cmd->add_option("--attn-weights", f.attn_weights,
                  "Write every layer's attention weights into this folder: layer{L}.npy [1, heads, "
                  "tokens, tokens] and tokens.json, as qkv embed does (runs the reference kernel)");
  return [flags] { return RunLogits(*flags); };
}

Runner AddPerplexityCommand(CLI::App& app) {
  auto flags = std::make_shared<PerplexityFlags>();
  PerplexityFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "perplexity", "Perplexity of a Llama-architecture GGUF model over a text file");
  AddModelCacheFlags(cmd, f.model, f.cache);
  cmd->add_option("--input", f.input, "UTF-8 text file")->required();
  cmd->add_option("--context", f.context, "Tokens per independent chunk")->capture_default_str();
  cmd->add_option("--chunks", f.chunks, "Chunks to evaluate at most (0 = all)")->capture_default_str();
  return [flags] { return RunPerplexity(*flags); };
}

}  // namespace qkv::cli
