// qkv patterns: what each head of a model looks at, from the folder
// `qkv embed --attn-weights` writes (docs/inspect.md).
#include "qkv/inspect/patterns.h"

#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.h"
#include "inspect/markup.h"
#include "common.h"
#include "qkv/error.h"

namespace qkv::cli {
namespace {

struct PatternsFlags {
  std::string attn_dir;
  bool json = false;
};

// A short cell for the layer x head grid.
const char* Short(const std::string& label) {
  if (label == "diagonal") return "diag";
  if (label == "previous") return "prev";
  if (label == "next") return "next";
  if (label == "column:[CLS]") return "[CLS]";
  if (label == "column:[SEP]") return "[SEP]";
  if (label == "column:punct") return "punct";
  if (label == "local block") return "local";
  return label.c_str();  // sparse, broad, mixed
}

int RunPatterns(const PatternsFlags& f) {
  inspect::AttentionDump dump;
  try {
    dump = inspect::ReadAttentionDir(f.attn_dir);
  } catch (const Error& e) {
    throw Error("--attn-dir: " + std::string(e.what()));
  }
  const std::vector<inspect::HeadPattern> heads = inspect::ClassifyHeads(dump);
  std::string text;
  if (f.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const inspect::HeadPattern& p : heads) {
      list.push_back(inspect::internal::PatternJson(p));
    }
    text = list.dump(1) + "\n";
  } else {
    char line[512];
    std::snprintf(line, sizeof line,
                  "%lld layers x %lld heads, %lld inputs (%lld real query rows per head)\n\n",
                  static_cast<long long>(dump.num_layers), static_cast<long long>(dump.num_heads),
                  static_cast<long long>(dump.num_inputs),
                  static_cast<long long>(heads.empty() ? 0 : heads[0].rows));
    text += line;
    text +=
        "layer head label         self  prev  next first  last punct local entropy norm  sparse\n";
    for (const inspect::HeadPattern& p : heads) {
      std::snprintf(
          line, sizeof line,
          "%5lld %4lld %-12s %5.2f %5.2f %5.2f %5.2f %5.2f %5.2f %5.2f %7.2f %5.2f %6.2f\n",
          static_cast<long long>(p.layer), static_cast<long long>(p.head), p.label.c_str(), p.self,
          p.previous, p.next, p.first, p.last, p.punct, p.local, p.entropy, p.normalized_entropy,
          p.sparse);
      text += line;
    }
    text += "\nlayer x head:\n      ";
    for (int64_t h = 0; h < dump.num_heads; ++h) {
      std::snprintf(line, sizeof line, " %6lld", static_cast<long long>(h));
      text += line;
    }
    for (const inspect::HeadPattern& p : heads) {
      if (p.head == 0) {
        std::snprintf(line, sizeof line, "\n%5lld ", static_cast<long long>(p.layer));
        text += line;
      }
      std::snprintf(line, sizeof line, " %6s", Short(p.label));
      text += line;
    }
    text += "\n";
  }
  std::fputs(text.c_str(), stdout);
  return FinishStdout(0);
}

}  // namespace

Runner AddPatternsCommand(CLI::App& app) {
  auto flags = std::make_shared<PatternsFlags>();
  PatternsFlags& f = *flags;
  CLI::App* cmd =
      app.add_subcommand("patterns",
                         "What each attention head looks at (Clark et al. 2019), from `qkv embed "
                         "--attn-weights` output; labels and metrics in docs/inspect.md");
  cmd->add_option("--attn-dir", f.attn_dir,
                  "Folder with layer{L}.npy [inputs, heads, seq, seq] and tokens.json")
      ->required();
  cmd->add_flag("--json", f.json, "Print a JSON list, one object per head");
  return [flags] { return RunPatterns(*flags); };
}

}  // namespace qkv::cli
