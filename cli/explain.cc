// qkv explain scaling: why attention divides scores by sqrt(d_k), measured
// on random numbers (docs/inspect.md).
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
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

int RunScaling(const ExplainFlags& f) {
  CheckThreadsFlag(f.threads);
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
      "vanishing gradients, with and without the scale, on random inputs");
  cmd->add_option("--dims", f.dims, "Head dims d_k to measure, comma-separated")
      ->capture_default_str();
  cmd->add_option("--keys", f.keys, "Keys (= queries) per sample")->capture_default_str();
  cmd->add_option("--samples", f.samples, "Independent samples per d_k")->capture_default_str();
  cmd->add_option("--seed", f.seed, "Random seed")->capture_default_str();
  cmd->add_flag("--json", f.json, "Print a JSON list, one object per d_k (docs/inspect.md)");
  cmd->add_option("--svg", f.svg, "Also write a plot as SVG to this file");
  cmd->add_option("--threads", f.threads, "Threads (0 = all cores); results never depend on it")
      ->capture_default_str();
  return [flags] { return RunScaling(*flags); };
}

}  // namespace qkv::cli
