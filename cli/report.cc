// qkv report: one self-contained HTML page of a model's attention, from the
// folder `qkv embed --attn-weights` writes (docs/inspect.md).
#include "qkv/inspect/report.h"

#include <sys/stat.h>

#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
#include "qkv/error.h"
#include "qkv/inspect/patterns.h"

namespace qkv::cli {
namespace {

struct ReportFlags {
  std::string attn_dir, out;
};

bool EndsWith(const std::string& s, const char* suffix) {
  const std::string t = suffix;
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

bool Exists(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0;
}

int RunReport(const ReportFlags& f) {
  if (!EndsWith(f.out, ".html") && !EndsWith(f.out, ".htm")) {
    throw Error("--out: " + f.out + " (expected a path ending in .html or .htm)");
  }
  // The files ReadAttentionDir will read: --out must be none of them (a
  // link named report.html to tokens.json, say).
  std::vector<FlagPath> inputs = {{"--attn-dir", f.attn_dir + "/tokens.json"}};
  for (int layer = 0; Exists(f.attn_dir + "/layer" + std::to_string(layer) + ".npy"); ++layer) {
    inputs.push_back({"--attn-dir", f.attn_dir + "/layer" + std::to_string(layer) + ".npy"});
  }
  CheckOutputPaths(inputs, {{"--out", f.out}});
  inspect::AttentionDump dump;
  try {
    dump = inspect::ReadAttentionDir(f.attn_dir);
    inspect::CheckReportSize(dump, f.attn_dir);
  } catch (const Error& e) {
    throw Error("--attn-dir: " + std::string(e.what()));
  }
  // Bytes per weight while the page is built: 2 as uint16, then 8/3 each for
  // the base64, the JSON text, its escaped copy and the page: about 13.
  CheckFitsInMemory("--attn-dir " + f.attn_dir + ": the page",
                    16.0 * inspect::ReportWeightCount(dump));
  const std::vector<inspect::HeadPattern> heads = inspect::ClassifyHeads(dump);
  OutputSet out;
  out.AddText(f.out, inspect::RenderReport(dump, heads, f.attn_dir), "<!DOCTYPE html");
  try {
    out.Commit();
  } catch (const Error& e) {
    throw Error("--out: " + std::string(e.what()));
  }
  return 0;
}

}  // namespace

Runner AddReportCommand(CLI::App& app) {
  auto flags = std::make_shared<ReportFlags>();
  ReportFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand("report",
                                     "One self-contained HTML page of a model's attention: "
                                     "heatmaps, head view, head patterns (docs/inspect.md)");
  cmd->add_option("--attn-dir", f.attn_dir,
                  "Folder with layer{L}.npy [inputs, heads, seq, seq] and tokens.json (qkv embed "
                  "--attn-weights)")
      ->required();
  cmd->add_option("--out", f.out, "Page to write (.html or .htm); no network needed to view it")
      ->required();
  return [flags] { return RunReport(*flags); };
}

}  // namespace qkv::cli
