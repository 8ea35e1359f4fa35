// qkv explain scaling: why attention divides scores by sqrt(d_k), measured
// on random numbers, or on a real model's queries and keys with --model
// (docs/inspect.md).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
#include "model_flags.h"
#include "qkv/error.h"
#include "qkv/inspect/scaling.h"

namespace qkv::cli {
namespace {

struct ExplainFlags {
  std::string dims = "4,16,64,256,1024", svg;
  int64_t keys = 128, samples = 8;
  uint64_t seed = 0;
  bool json = false;
  int threads = 0;
  // --model mode
  std::string model, input;
  std::vector<std::string> texts;
  int64_t layer = 0;
  CLI::App* cmd = nullptr;  // to tell flags given from defaults
};

nlohmann::json StatsJson(const inspect::SoftmaxStats& s) {
  return {{"scale", s.scale},
          {"mean_max_weight", s.mean_max_weight},
          {"entropy", s.entropy},
          {"one_hot_fraction", s.one_hot_fraction},
          {"score_grad_norm", s.score_grad_norm},
          {"query_grad_norm", s.query_grad_norm},
          {"softmax_gain", s.softmax_gain}};
}

// Two panels over log2(d_k): the mean max weight, and the gradient norm at
// the scores (log scale), scaled and unscaled.
std::string Svg(const std::vector<inspect::ScalingRow>& rows) {
  const double w = 360, h = 240, left = 60, top = 40, gap = 90;
  double lo = 0, hi = 1;  // log10 range of the gradient norms
  bool first = true;
  for (const auto& r : rows) {
    for (double g : {r.scaled.score_grad_norm, r.unscaled.score_grad_norm}) {
      const double l = std::log10(std::max(g, 1e-12));
      lo = first ? l : std::min(lo, l), hi = first ? l : std::max(hi, l), first = false;
    }
  }
  lo = std::floor(lo), hi = std::max(std::ceil(hi), lo + 1);
  const double x0 = std::log2(static_cast<double>(rows.front().head_dim));
  const double x1 = std::max(std::log2(static_cast<double>(rows.back().head_dim)), x0 + 1);
  auto px = [&](int panel, double d) {
    return left + panel * (w + gap) + (std::log2(d) - x0) / (x1 - x0) * w;
  };
  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" +
                    std::to_string(static_cast<int>(2 * w + gap + 2 * left)) + "\" height=\"" +
                    std::to_string(static_cast<int>(h + top + 70)) +
                    "\" font-family=\"sans-serif\" font-size=\"12\">\n";
  const char* titles[2] = {"mean max softmax weight", "mean |dL/dscores| per row (log10)"};
  for (int panel = 0; panel < 2; ++panel) {
    const double l = left + panel * (w + gap);
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
                  "stroke=\"#888\"/>\n<text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
                  l, top, w, h, l, top - 12, titles[panel]);
    svg += buf;
    for (const auto& r : rows) {
      std::snprintf(buf, sizeof buf,
                    "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%lld</text>\n",
                    px(panel, static_cast<double>(r.head_dim)), top + h + 16,
                    static_cast<long long>(r.head_dim));
      svg += buf;
    }
    std::snprintf(buf, sizeof buf,
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">d_k</text>\n", l + w / 2,
                  top + h + 34);
    svg += buf;
    const std::string lo_label = panel == 0 ? "0" : "1e" + std::to_string(static_cast<int>(lo));
    const std::string hi_label = panel == 0 ? "1" : "1e" + std::to_string(static_cast<int>(hi));
    std::snprintf(buf, sizeof buf,
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n"
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
                  l - 6, top + h, lo_label.c_str(), l - 6, top + 10, hi_label.c_str());
    svg += buf;
    for (int scaled = 1; scaled >= 0; --scaled) {
      std::string points;
      for (const auto& r : rows) {
        const inspect::SoftmaxStats& s = scaled ? r.scaled : r.unscaled;
        const double v = panel == 0
                             ? s.mean_max_weight
                             : (std::log10(std::max(s.score_grad_norm, 1e-12)) - lo) / (hi - lo);
        std::snprintf(buf, sizeof buf, "%.1f,%.1f ", px(panel, static_cast<double>(r.head_dim)),
                      top + h - v * h);
        points += buf;
      }
      svg += "<polyline class=\"" + std::string(scaled ? "scaled" : "unscaled") +
             "\" fill=\"none\" stroke-width=\"2\" stroke=\"" + (scaled ? "#1f77b4" : "#d62728") +
             "\" points=\"" + points + "\"/>\n";
    }
  }
  svg += "<text x=\"60\" y=\"" + std::to_string(static_cast<int>(top + h + 58)) +
         "\"><tspan fill=\"#1f77b4\">blue: scores / sqrt(d_k)</tspan>   "
         "<tspan fill=\"#d62728\">red: unscaled scores</tspan></text>\n</svg>\n";
  return svg;
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Layer --layer's projections of every input, from a BERT folder or a GGUF
// decoder; `what` gets a one-line description of the model and layer.
inspect::LayerProjections ModelProjections(const ExplainFlags& f,
                                           const std::vector<std::string>& texts,
                                           std::string& what) {
  inspect::LayerProjections p;
  const auto check_layer = [&](int64_t layers) {
    if (f.layer < 0 || f.layer >= layers) {
      throw Error("--layer: " + std::to_string(f.layer) + " (expected 0.." +
                  std::to_string(layers - 1) + ", the model's layers)");
    }
  };
  if (EndsWith(f.model, ".gguf")) {
    LoadedLlama loaded = LoadLlamaModel(f.model);
    const models::LlamaConfig& c = loaded.model.config();
    check_layer(c.num_layers);
    p.num_q_heads = c.num_q_heads, p.num_kv_heads = c.num_kv_heads, p.head_dim = c.head_dim;
    p.causal = true;
    for (size_t i = 0; i < texts.size(); ++i) {
      std::vector<int32_t> ids;
      try {
        ids = loaded.tokenizer.Encode(texts[i], /*parse_special=*/true);
      } catch (const Error& e) {
        throw Error("--text #" + std::to_string(i + 1) + ": " + e.what());
      }
      if (ids.empty()) throw Error("--text #" + std::to_string(i + 1) + ": empty (expected text)");
      const int64_t n = static_cast<int64_t>(ids.size());
      if (n > 4096) {
        throw Error("--text #" + std::to_string(i + 1) + ": " + std::to_string(n) +
                    " tokens (expected at most 4096: the measurement keeps every weight)");
      }
      KvCacheConfig cc;
      cc.capacity = n;
      models::LlamaCache cache(c, cc);
      const int64_t seq = cache.AddSequence();
      models::LlamaProbe probe;
      probe.want_qkv = true;
      std::vector<float> logits;
      models::LlamaForward(loaded.model, cache, seq, ids, models::Logits::kNone, logits, f.threads,
                           &probe);
      const size_t l = static_cast<size_t>(f.layer);
      p.q.insert(p.q.end(), probe.q[l].begin(), probe.q[l].end());
      p.k.insert(p.k.end(), probe.k[l].begin(), probe.k[l].end());
      p.v.insert(p.v.end(), probe.v[l].begin(), probe.v[l].end());
      p.lengths.push_back(n);
    }
    what = f.model + ", layer " + std::to_string(f.layer) + " (causal; q, k after RoPE)";
    return p;
  }
  const models::BertEncoder model = LoadBertModel(f.model);
  const models::BertConfig& c = model.config();
  check_layer(c.num_layers);
  const int64_t n = static_cast<int64_t>(texts.size());
  std::vector<models::Encoding> enc;
  int64_t seq = 1;
  for (size_t i = 0; i < texts.size(); ++i) {
    try {
      enc.push_back(model.Tokenize(texts[i]));
    } catch (const Error& e) {
      throw Error("--text #" + std::to_string(i + 1) + ": " + e.what());
    }
    seq = std::max<int64_t>(seq, static_cast<int64_t>(enc.back().ids.size()));
  }
  std::vector<int32_t> ids(static_cast<size_t>(n * seq), 0);
  for (int64_t b = 0; b < n; ++b) {
    const std::vector<int32_t>& e = enc[static_cast<size_t>(b)].ids;
    std::copy(e.begin(), e.end(), ids.begin() + b * seq);
    p.lengths.push_back(static_cast<int64_t>(e.size()));
  }
  std::vector<float> qkv;
  model.Forward(ids, n, seq, p.lengths, f.threads, nullptr, nullptr, &qkv);
  const int64_t h = c.hidden_size, tokens = static_cast<int64_t>(qkv.size()) / (c.num_layers * 3 * h);
  p.num_q_heads = p.num_kv_heads = c.num_heads;
  p.head_dim = h / c.num_heads;
  const float* layer = qkv.data() + f.layer * tokens * 3 * h;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = layer + t * 3 * h;
    p.q.insert(p.q.end(), row, row + h);
    p.k.insert(p.k.end(), row + h, row + 2 * h);
    p.v.insert(p.v.end(), row + 2 * h, row + 3 * h);
  }
  what = f.model + ", layer " + std::to_string(f.layer) + " (bidirectional)";
  return p;
}

int RunModelScaling(const ExplainFlags& f) {
  for (const char* flag : {"--dims", "--keys", "--samples"}) {
    if (f.cmd->count(flag) > 0) {
      throw Error(std::string(flag) + ": not with --model (the model sets d_k and the tokens)");
    }
  }
  if (!f.svg.empty()) throw Error("--svg: not with --model (the plot is over d_k)");
  if (f.input.empty() == f.texts.empty()) {
    throw Error("--text, --input: " + std::string(f.input.empty() ? "neither" : "both") +
                " given (expected one with --model: --text TEXT ... or --input lines.txt)");
  }
  const std::vector<std::string> texts = f.input.empty() ? f.texts : ReadInputLines(f.input);
  if (texts.empty()) throw Error("--input: " + f.input + " has no lines (expected one input per line)");
  if (texts.size() > 1024) {
    throw Error("--input: " + std::to_string(texts.size()) + " inputs (expected at most 1024)");
  }
  std::string what;
  const inspect::LayerProjections p = ModelProjections(f, texts, what);
  const std::vector<inspect::HeadScalingRow> rows = inspect::ExplainScalingOnLayer(p, f.seed, f.threads);
  std::string text;
  if (f.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& r : rows) {
      list.push_back({{"layer", f.layer},
                      {"head", r.head},
                      {"d_k", r.head_dim},
                      {"rows", r.rows},
                      {"pairs", r.pairs},
                      {"q_mean_square", r.q_mean_square},
                      {"k_mean_square", r.k_mean_square},
                      {"mean", r.dot_mean},
                      {"variance", r.dot_variance},
                      {"scaled", StatsJson(r.scaled)},
                      {"unscaled", StatsJson(r.unscaled)}});
    }
    text = list.dump(1) + "\n";
  } else {
    int64_t tokens = 0;
    for (const int64_t len : p.lengths) tokens += len;
    char line[512];
    std::snprintf(line, sizeof line,
                  "%s: %zu input(s), %lld tokens, d_k = %lld; dL/dout entries N(0,1), seed %llu\n\n",
                  what.c_str(), texts.size(), static_cast<long long>(tokens),
                  static_cast<long long>(p.head_dim), static_cast<unsigned long long>(f.seed));
    text += line;
    text +=
        "            q.k                 | softmax(q.k / sqrt(d_k)), the model | "
        "softmax(q.k), unscaled\n";
    text +=
        " head   mean  variance var/d_k | max w entropy 1-hot  |dS|   gain    | max w "
        "entropy 1-hot  |dS|   gain\n";
    for (const auto& r : rows) {
      std::snprintf(line, sizeof line,
                    "%5lld %7.2f %9.2f %7.2f | %5.3f %6.3f %5.2f %6.2f %8.2e | %5.3f %6.3f %5.2f "
                    "%6.2f %8.2e\n",
                    static_cast<long long>(r.head), r.dot_mean, r.dot_variance,
                    r.dot_variance / static_cast<double>(r.head_dim), r.scaled.mean_max_weight,
                    r.scaled.entropy, r.scaled.one_hot_fraction, r.scaled.score_grad_norm,
                    r.scaled.softmax_gain, r.unscaled.mean_max_weight, r.unscaled.entropy,
                    r.unscaled.one_hot_fraction, r.unscaled.score_grad_norm,
                    r.unscaled.softmax_gain);
      text += line;
    }
    text +=
        "\nvar/d_k: 1 for unit-variance random q, k. Rows that see a single key (a decoder's "
        "first) are left out.\nColumns as without --model (docs/inspect.md); the model was "
        "trained with the scale, so the left half\nis what it computes, the right half what "
        "it would compute without it.\n";
  }
  std::fputs(text.c_str(), stdout);
  return FinishStdout(0);
}

int RunScaling(const ExplainFlags& f) {
  CheckThreadsFlag(f.threads);
  if (!f.model.empty()) return RunModelScaling(f);
  for (const char* flag : {"--layer", "--text", "--input"}) {
    if (f.cmd->count(flag) > 0) throw Error(std::string(flag) + ": needs --model");
  }
  inspect::ScalingOptions o;
  o.dims.clear();
  for (const int64_t d : ParseIntList(f.dims, 0, "--dims", false)) o.dims.push_back(d);
  if (f.keys < 2 || f.keys > 4096) {
    throw Error("--keys: " + std::to_string(f.keys) + " (expected 2..4096)");
  }
  if (f.samples < 1 || f.samples > 1024) {
    throw Error("--samples: " + std::to_string(f.samples) + " (expected 1..1024)");
  }
  o.keys = f.keys, o.samples = f.samples, o.seed = f.seed, o.num_threads = f.threads;
  CheckOutputPaths({}, {{"--svg", f.svg}});
  const std::vector<inspect::ScalingRow> rows = inspect::ExplainScaling(o);

  std::string text;
  if (f.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& r : rows) {
      list.push_back({{"d_k", r.head_dim},
                      {"keys", r.keys},
                      {"samples", r.samples},
                      {"mean", r.dot_mean},
                      {"variance", r.dot_variance},
                      {"variance_theory", r.head_dim},
                      {"variance_stderr", r.dot_variance_stderr},
                      {"log_keys", r.log_keys},
                      {"scaled", StatsJson(r.scaled)},
                      {"unscaled", StatsJson(r.unscaled)}});
    }
    text = list.dump(1) + "\n";
  } else {
    char line[512];
    std::snprintf(line, sizeof line,
                  "q, k, v, dL/dout entries N(0,1); %lld keys, %lld samples (%lld q.k pairs per "
                  "d_k); seed %llu\n\n",
                  static_cast<long long>(o.keys), static_cast<long long>(o.samples),
                  static_cast<long long>(o.samples * o.keys * o.keys),
                  static_cast<unsigned long long>(o.seed));
    text += line;
    text +=
        "                 q.k                   | softmax(q.k / sqrt(d_k))           | "
        "softmax(q.k), unscaled\n";
    text +=
        "  d_k    mean  variance (theory, se)  | max w entropy 1-hot  |dS|   gain   | max w "
        "entropy 1-hot  |dS|   gain\n";
    for (const auto& r : rows) {
      std::snprintf(line, sizeof line,
                    "%5lld %7.3f %9.2f (%5lld, %6.2f) | %5.3f %6.3f %5.2f %6.2f %8.2e | %5.3f "
                    "%6.3f %5.2f %6.2f %8.2e\n",
                    static_cast<long long>(r.head_dim), r.dot_mean, r.dot_variance,
                    static_cast<long long>(r.head_dim), r.dot_variance_stderr,
                    r.scaled.mean_max_weight, r.scaled.entropy, r.scaled.one_hot_fraction,
                    r.scaled.score_grad_norm, r.scaled.softmax_gain, r.unscaled.mean_max_weight,
                    r.unscaled.entropy, r.unscaled.one_hot_fraction, r.unscaled.score_grad_norm,
                    r.unscaled.softmax_gain);
      text += line;
    }
    std::snprintf(
        line, sizeof line,
        "\nentropy of a uniform row: ln(%lld) = %.3f. 1-hot: rows whose largest weight "
        "is > 0.99. |dS|: mean per-row norm\nof the gradient reaching the scores (qkv's "
        "backward); gain: median over rows of |dS| / |dL/dweights|, what\nthe softmax passes on. "
        "Without the scale the scores' spread grows like sqrt(d_k), rows turn one-hot and "
        "the\ngain, and with it the gradient reaching Q and K, goes to 0.\n",
        static_cast<long long>(o.keys), std::log(static_cast<double>(o.keys)));
    text += line;
  }
  if (!f.svg.empty()) {
    OutputSet out;
    out.AddText(f.svg, Svg(rows), "<svg");
    out.Commit();
  }
  std::fputs(text.c_str(), stdout);
  return FinishStdout(0);
}

}  // namespace

Runner AddExplainCommand(CLI::App& app) {
  auto flags = std::make_shared<ExplainFlags>();
  ExplainFlags& f = *flags;
  CLI::App* explain = app.add_subcommand("explain", "Measured explanations of attention");
  explain->require_subcommand(1);
  CLI::App* cmd = explain->add_subcommand(
      "scaling",
      "Why scores are divided by sqrt(d_k): q.k variance, softmax saturation and "
      "vanishing gradients, with and without the scale, on random inputs or a model's own");
  cmd->add_option("--dims", f.dims, "Head dims d_k to measure, comma-separated")
      ->capture_default_str();
  cmd->add_option("--keys", f.keys, "Keys (= queries) per sample")->capture_default_str();
  cmd->add_option("--samples", f.samples, "Independent samples per d_k")->capture_default_str();
  cmd->add_option("--seed", f.seed, "Random seed")->capture_default_str();
  cmd->add_flag("--json", f.json, "Print a JSON list, one object per d_k (docs/inspect.md)");
  cmd->add_option("--svg", f.svg, "Also write a plot as SVG to this file");
  cmd->add_option("--threads", f.threads, "Threads (0 = all cores); results never depend on it")
      ->capture_default_str();
  cmd->add_option("--model", f.model,
                  "Measure a real model's queries and keys instead: a BERT folder "
                  "(models/all-MiniLM-L6-v2) or a Llama GGUF file");
  cmd->add_option("--layer", f.layer, "--model: the layer to measure")->capture_default_str();
  cmd->add_option("--text", f.texts, "--model: an input text (repeat for several)");
  cmd->add_option("--input", f.input, "--model: a text file, one input per line");
  f.cmd = cmd;
  return [flags] { return RunScaling(*flags); };
}

}  // namespace qkv::cli
