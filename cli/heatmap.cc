// qkv heatmap: pictures of attention weights (.npy from `qkv attend
// --attn-weights`, `qkv mha --attn-weights`, or a layer of `qkv embed
// --attn-weights`), as PNG, SVG or in the terminal (docs/inspect.md).
#include "qkv/inspect/heatmap.h"

#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
#include "io/file_util.h"
#include "qkv/error.h"
#include "qkv/npy.h"

namespace qkv::cli {
namespace {

struct HeatmapFlags {
  std::string weights, tokens, out, heads = "all";
  int64_t batch = 0;
  bool terminal = false;
};

bool EndsWith(const std::string& s, const char* suffix) {
  const std::string t = suffix;
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

// The token strings for input `batch` from a tokens.json (a list of lists,
// as qkv embed writes, or one flat list).
std::vector<std::string> ReadTokens(const std::string& path, int64_t batch) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(internal::ReadSmallFile(path, "tokens.json", uint64_t{1} << 30),
                              nullptr, false);
  } catch (const Error& e) {
    throw Error("--tokens: " + std::string(e.what()));
  }
  if (j.is_array() && !j.empty() && j[0].is_array()) {
    if (batch >= static_cast<int64_t>(j.size())) {
      throw Error("--tokens: " + path + " has " + std::to_string(j.size()) +
                  " token lists (expected one for --batch-index " + std::to_string(batch) + ")");
    }
    j = j[static_cast<size_t>(batch)];
  }
  std::vector<std::string> tokens;
  if (!j.is_array()) {
    throw Error("--tokens: " + path +
                " is not a JSON list (expected token strings, or one list "
                "of them per input as qkv embed writes)");
  }
  for (const auto& t : j) {
    if (!t.is_string()) {
      throw Error("--tokens: " + path + ": a token is " + std::string(t.type_name()) +
                  " (expected strings)");
    }
    tokens.push_back(t.get<std::string>());
  }
  return tokens;
}

int RunHeatmap(const HeatmapFlags& f) {
  if (f.out.empty() && !f.terminal) {
    throw Error("--out, --terminal: neither given (expected a .png or .svg path, or --terminal)");
  }
  if (!f.out.empty() && !EndsWith(f.out, ".png") && !EndsWith(f.out, ".svg")) {
    throw Error("--out: " + f.out + " (expected a path ending in .png or .svg)");
  }
  CheckOutputPaths({{"--attn-weights", f.weights}, {"--tokens", f.tokens}}, {{"--out", f.out}});
  NpyArray a;
  try {
    a = ReadNpy(f.weights);
  } catch (const Error& e) {
    throw Error("--attn-weights: " + std::string(e.what()));
  }
  if (a.shape.size() < 2 || a.shape.size() > 4 ||
      (a.dtype != DType::kFloat32 && a.dtype != DType::kFloat64)) {
    throw Error("--attn-weights: " + f.weights + " is " + DTypeName(a.dtype) + " " +
                NpyShapeString(a.shape) +
                " (expected float32 or float64 [inputs, heads, seq_q, seq_kv], [heads, seq_q, "
                "seq_kv] or [seq_q, seq_kv])");
  }
  std::vector<int64_t> shape = a.shape;
  while (shape.size() < 4) shape.insert(shape.begin(), 1);
  const int64_t n = shape[0], heads = shape[1], rows = shape[2], cols = shape[3];
  if (rows < 1 || cols < 1 || rows > 4096 || cols > 4096) {
    throw Error("--attn-weights: " + f.weights + " has shape " + NpyShapeString(a.shape) +
                " (expected seq_q and seq_kv in 1..4096 for a picture)");
  }
  if (f.batch < 0 || f.batch >= n) {
    throw Error("--batch-index: " + std::to_string(f.batch) + " (expected 0.." + std::to_string(n - 1) +
                ", the inputs in --attn-weights)");
  }
  std::vector<int64_t> chosen;
  if (f.heads == "all") {
    for (int64_t h = 0; h < heads; ++h) chosen.push_back(h);
  } else {
    for (const int64_t h : ParseIntList(f.heads, 0, "--which-heads", true)) {
      if (h >= heads) {
        throw Error("--which-heads: " + std::to_string(h) + " (expected 'all' or heads in 0.." +
                    std::to_string(heads - 1) + ")");
      }
      chosen.push_back(h);
    }
  }
  inspect::Heatmap map;
  map.rows = rows, map.cols = cols;
  if (!f.tokens.empty()) {
    const std::vector<std::string> tokens = ReadTokens(f.tokens, f.batch);
    const int64_t len = static_cast<int64_t>(tokens.size());
    if (rows != cols || len < 1 || len > rows) {
      throw Error("--tokens: " + std::to_string(len) + " tokens for weights of " +
                  std::to_string(rows) + " x " + std::to_string(cols) +
                  " (expected self-attention weights with at least as many rows as tokens)");
    }
    map.rows = map.cols = len;  // past the tokens: padding
    map.row_labels = map.col_labels = tokens;
  }
  const double pixels = static_cast<double>(chosen.size()) * map.rows * map.cols;
  CheckFitsInMemory("--attn-weights " + f.weights + ": the picture", 24.0 * 24.0 * 3.0 * pixels);
  for (const int64_t h : chosen) {
    std::vector<float> w(static_cast<size_t>(map.rows * map.cols));
    for (int64_t i = 0; i < map.rows; ++i) {
      double sum = 0;
      for (int64_t j = 0; j < map.cols; ++j) {
        const int64_t at = ((f.batch * heads + h) * rows + i) * cols + j;
        const double x = a.dtype == DType::kFloat32 ? a.data<float>()[at] : a.data<double>()[at];
        if (!(x >= 0.0 && x <= 1.0 + 1e-6)) {
          throw Error("--attn-weights: " + f.weights + ": head " + std::to_string(h) + ", row " +
                      std::to_string(i) + ": weight " + std::to_string(x) +
                      " (expected attention weights in [0, 1])");
        }
        w[static_cast<size_t>(i * map.cols + j)] = static_cast<float>(x);
        sum += x;
      }
      if (sum > 1.0 + 1e-3) {
        throw Error("--attn-weights: " + f.weights + ": head " + std::to_string(h) + ", row " +
                    std::to_string(i) + " sums to " + std::to_string(sum) +
                    " (expected a probability distribution, at most 1)");
      }
    }
    map.heads.push_back(h);
    map.weights.push_back(std::move(w));
  }
  if (!f.out.empty()) {
    OutputSet out;
    if (EndsWith(f.out, ".png")) {
      const std::vector<unsigned char> png = inspect::RenderPng(map);
      out.AddText(f.out, std::string(png.begin(), png.end()), "\x89PNG");
    } else {
      out.AddText(f.out, inspect::RenderSvg(map), "<svg");
    }
    out.Commit();
  }
  if (f.terminal) std::fputs(inspect::RenderTerminal(map).c_str(), stdout);
  return FinishStdout(0);
}

}  // namespace

Runner AddHeatmapCommand(CLI::App& app) {
  auto flags = std::make_shared<HeatmapFlags>();
  HeatmapFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "heatmap", "Pictures of attention weights: one map per head, PNG, SVG or the terminal");
  cmd->add_option("--attn-weights", f.weights,
                  "Attention weights .npy to draw (input), [inputs, heads, seq_q, seq_kv] (qkv attend --attn-weights, qkv embed "
                  "--attn-weights DIR/layer{L}.npy), or [heads, ...] / [seq_q, seq_kv]")
      ->required();
  cmd->add_option("--batch-index", f.batch, "Which input (batch index) to draw")->capture_default_str();
  cmd->add_option("--which-heads", f.heads, "Heads to draw: 'all' or a comma-separated list")
      ->capture_default_str();
  cmd->add_option("--tokens", f.tokens,
                  "tokens.json (qkv embed --attn-weights): axis labels, and the map cut to the "
                  "input's tokens");
  cmd->add_option("--out", f.out, "Picture to write: .png (libpng) or .svg");
  cmd->add_flag("--terminal", f.terminal, "Draw in the terminal (256 colours, half blocks)");
  return [flags] { return RunHeatmap(*flags); };
}

}  // namespace qkv::cli
