// qkv embed / qkv tokenize: sentence embeddings from a BERT model folder
// (all-MiniLM-L6-v2 from `make models`; docs/models.md); tokenize also reads
// the byte-level BPE tokenizer of a .gguf file (SmolLM2).
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
#include "model_flags.h"
#include "qkv/error.h"
#include "qkv/gguf.h"
#include "qkv/models/bert.h"
#include "qkv/models/bpe_tokenizer.h"
#include "qkv/models/layers.h"

namespace qkv::cli {
namespace {

struct EmbedFlags {
  std::string model, input, out, attn_weights;
  std::vector<std::string> texts;
  int64_t batch_size = 32;
  int threads = 0;
};

// Throws unless `dir` is a directory; the message names --model.
void CheckModelDir(const std::string& dir) {
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw Error("--model: " + dir + " is not a directory (expected a model folder such as " +
                "models/all-MiniLM-L6-v2, which `make models` fetches)");
  }
}

}  // namespace

// Loads the model; errors name --model.
models::BertEncoder LoadBertModel(const std::string& dir) {
  CheckModelDir(dir);
  try {
    return models::BertEncoder::Load(dir);
  } catch (const Error& e) {
    throw Error("--model: " + std::string(e.what()));
  }
}

namespace {

int RunEmbed(const EmbedFlags& f) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  if (f.input.empty() == f.texts.empty()) {
    throw Error("--text, --input: " + std::string(f.input.empty() ? "neither" : "both") +
                " given (expected one: --text TEXT ... or --input lines.txt)");
  }
  if (f.batch_size < 1 || f.batch_size > 65536) {
    throw Error("--batch-size: " + std::to_string(f.batch_size) + " (expected 1..65536)");
  }
  CheckThreadsFlag(f.threads);
  std::vector<FlagPath> outputs{{"--out", f.out}};
  CheckOutputPaths({{"--input", f.input}}, outputs);
  CheckAttnDirFlag(f.attn_weights);
  const std::vector<std::string> texts = f.input.empty() ? f.texts : ReadInputLines(f.input);
  const models::BertEncoder model = LoadBertModel(f.model);
  const models::BertConfig& c = model.config();
  // Throughput is timed from here, as sentence-transformers' encode() is.
  const auto loaded = Clock::now();
  const double load_s = std::chrono::duration<double>(loaded - start).count();

  const int64_t n = static_cast<int64_t>(texts.size());
  {
    // One batch's working memory (src/models/bert.cc): about 10 hidden-size
    // rows and one intermediate row of floats per token, padded, and with
    // --attn-weights every layer's [batch, heads, seq, seq].
    const double batch = static_cast<double>(std::min(f.batch_size, std::max<int64_t>(n, 1)));
    const double seq = static_cast<double>(model.max_seq_length());
    const double per_token = 4.0 * (10.0 * c.hidden_size + c.intermediate_size);
    const double weights_bytes =
        f.attn_weights.empty() ? 0.0 : 4.0 * c.num_layers * batch * c.num_heads * seq * seq;
    CheckFitsInMemory("--batch-size " + std::to_string(f.batch_size) + " (one batch of up to " +
                          std::to_string(model.max_seq_length()) + " tokens per input)",
                      batch * seq * per_token + weights_bytes);
  }
  int64_t seq_max = 0;
  std::vector<std::vector<std::string>> pieces;
  if (!f.attn_weights.empty()) {
    for (const std::string& t : texts) {
      try {
        pieces.push_back(model.Tokenize(t).pieces);
      } catch (const Error&) {
        pieces.emplace_back();  // Embed below reports it, naming the line
      }
      seq_max = std::max<int64_t>(seq_max, static_cast<int64_t>(pieces.back().size()));
    }
    CheckFitsInMemory("--attn-weights for " + std::to_string(n) + " inputs of up to " +
                          std::to_string(seq_max) + " tokens",
                      4.0 * c.num_layers * n * c.num_heads * seq_max * seq_max);
  }
  std::vector<std::vector<float>> weights(
      f.attn_weights.empty() ? 0 : static_cast<size_t>(c.num_layers),
      std::vector<float>(static_cast<size_t>(n * c.num_heads * seq_max * seq_max)));

  models::EmbedOptions options;
  options.batch_size = f.batch_size;
  options.num_threads = f.threads;
  auto last_report = Clock::now();
  options.on_progress = [&](int64_t done, int64_t total) {
    const auto now = Clock::now();
    if (done < total && now - last_report > std::chrono::seconds(2)) {
      const double s = std::chrono::duration<double>(now - loaded).count();
      std::fprintf(stderr, "qkv embed: %lld/%lld lines, %.1f lines/s\n",
                   static_cast<long long>(done), static_cast<long long>(total), done / s);
      last_report = now;
    }
  };
  if (!f.attn_weights.empty()) {
    options.on_weights = [&](const models::LayerWeights& w) {
      const int64_t heads = c.num_heads, s = w.seq;
      float* layer = weights[static_cast<size_t>(w.layer)].data();
      for (size_t r = 0; r < w.rows.size(); ++r) {
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t i = 0; i < s; ++i) {
            const float* src = w.weights + ((static_cast<int64_t>(r) * heads + h) * s + i) * s;
            std::copy(src, src + s, layer + ((w.rows[r] * heads + h) * seq_max + i) * seq_max);
          }
      }
    };
  }
  models::EmbedStats stats;
  std::vector<float> emb;
  try {
    emb = model.Embed(texts, options, &stats);
  } catch (const Error& e) {
    // Embed names the input "text N: ..."; name the flag and the line.
    std::string what = e.what();
    if (what.rfind("text ", 0) == 0 && !f.input.empty()) {
      throw Error("--input: " + f.input + ": line " + what.substr(5));
    }
    if (what.rfind("text ", 0) == 0) throw Error("--text #" + what.substr(5));
    throw;
  }

  OutputSet out;
  out.Add(f.out, DType::kFloat32, {n, c.hidden_size}, emb.data());
  if (!f.attn_weights.empty()) {
    for (int64_t l = 0; l < c.num_layers; ++l) {
      out.Add(f.attn_weights + "/layer" + std::to_string(l) + ".npy", DType::kFloat32,
              {n, c.num_heads, seq_max, seq_max}, weights[static_cast<size_t>(l)].data());
    }
    out.AddText(f.attn_weights + "/tokens.json", nlohmann::json(pieces).dump() + "\n", "[");
  }
  CommitWithAttnDir(out, f.attn_weights);
  const double total = std::chrono::duration<double>(Clock::now() - loaded).count();
  // What ran: the BLAS kernel (a slow one is named), GELU's erf, attention.
  const std::string attention =
      stats.attention_kernel.empty() ? "nothing (no inputs)" : stats.attention_kernel;
  std::fprintf(stderr, "qkv embed: dense layers on %s; GELU erf from %s; attention on %s\n",
               models::BlasDescription().c_str(), models::GeluErfImplementation(),
               attention.c_str());
  const double rate = total > 0 ? static_cast<double>(n) / total : 0.0;
  std::fprintf(stderr,
               "qkv embed: %lld lines in %.3f s (%.1f lines/s) after loading the model in %.3f s; "
               "tokenise %.3f s, dense %.3f s, attention %.3f s, other %.3f s\n",
               static_cast<long long>(n), total, rate, load_s, stats.tokenize_s, stats.dense_s,
               stats.attention_s, total - stats.tokenize_s - stats.dense_s - stats.attention_s);
  return 0;
}

struct TokenizeFlags {
  std::string model;
  std::vector<std::string> texts;
};

// qkv tokenize --model FILE.gguf: one JSON line per text, {"ids", "tokens"
// (the vocabulary pieces, byte-level encoded: "Ġ" for a space), "bytes" (what
// each token decodes to; a character split across tokens shows as U+FFFD)}.
int RunTokenizeGguf(const TokenizeFlags& f) {
  std::optional<models::BpeTokenizer> tok;
  try {
    tok.emplace(models::BpeTokenizer::FromGguf(GgufFile::Open(f.model)));
  } catch (const Error& e) {
    throw Error("--model: " + std::string(e.what()));
  }
  std::string lines;
  for (size_t i = 0; i < f.texts.size(); ++i) {
    std::vector<int32_t> ids;
    try {
      ids = tok->Encode(f.texts[i]);
    } catch (const Error& error) {
      throw Error("--text #" + std::to_string(i + 1) + ": " + error.what());
    }
    std::vector<std::string> pieces, bytes;
    for (const int32_t id : ids) {
      pieces.push_back(tok->Piece(id));
      bytes.push_back(tok->TokenBytes(id));
    }
    lines += nlohmann::json{{"ids", ids}, {"tokens", pieces}, {"bytes", bytes}}.dump(
                 -1, ' ', false, nlohmann::json::error_handler_t::replace) +
             "\n";
  }
  std::fputs(lines.c_str(), stdout);
  return FinishStdout(0);
}

int RunTokenize(const TokenizeFlags& f) {
  if (f.model.ends_with(".gguf")) return RunTokenizeGguf(f);
  CheckModelDir(f.model);
  std::optional<models::ModelTokenizer> tok;
  try {
    tok.emplace(models::LoadBertTokenizer(f.model));
  } catch (const Error& e) {
    throw Error("--model: " + std::string(e.what()));
  }
  std::string lines;
  for (size_t i = 0; i < f.texts.size(); ++i) {
    models::Encoding e;
    try {
      e = tok->tokenizer.Encode(f.texts[i], static_cast<size_t>(tok->max_length));
    } catch (const Error& error) {
      throw Error("--text #" + std::to_string(i + 1) + ": " + error.what());
    }
    lines += nlohmann::json{{"ids", e.ids}, {"tokens", e.pieces}}.dump() + "\n";
  }
  std::fputs(lines.c_str(), stdout);
  return FinishStdout(0);
}

}  // namespace

Runner AddEmbedCommand(CLI::App& app) {
  auto flags = std::make_shared<EmbedFlags>();
  EmbedFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "embed", "Sentence embeddings from a BERT model folder (all-MiniLM-L6-v2; docs/models.md)");
  cmd->add_option("--model", f.model,
                  "Model folder: config.json, model.safetensors, "
                  "tokenizer.json (make models: models/all-MiniLM-L6-v2)")
      ->required();
  cmd->add_option("--text", f.texts, "Text to embed (repeat for several)");
  cmd->add_option("--input", f.input, "Text file, one input per line (UTF-8)");
  cmd->add_option("--out", f.out, "Output .npy, float32 [inputs, hidden]")->required();
  cmd->add_option("--batch-size", f.batch_size, "Inputs per forward pass (sorted by length)")
      ->capture_default_str();
  cmd->add_option("--threads", f.threads, "Threads (0 = all cores); results never depend on it")
      ->capture_default_str();
  cmd->add_option("--attn-weights", f.attn_weights,
                  "Write each layer's attention weights into this folder: layer{L}.npy [inputs, "
                  "heads, seq, seq] and tokens.json (runs the reference attention kernel)");
  return [flags] { return RunEmbed(*flags); };
}

Runner AddTokenizeCommand(CLI::App& app) {
  auto flags = std::make_shared<TokenizeFlags>();
  TokenizeFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "tokenize", "Token ids and pieces of a model's tokenizer, one JSON line per --text");
  cmd->add_option("--model", f.model,
                  "Model folder with tokenizer.json, or a .gguf file (byte-level BPE, e.g. "
                  "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")
      ->required();
  cmd->add_option("--text", f.texts, "Text to tokenise (repeat for several)")->required();
  return [flags] { return RunTokenize(*flags); };
}

}  // namespace qkv::cli
