// qkv sparse: prints a block-sparse layout (qkv/sparse.h) as a picture of
// its 64 x 64 tiles and its density, and writes it as the bool .npy that
// `qkv attend --block-mask` reads.
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.h"
#include "common.h"
#include "qkv/error.h"
#include "qkv/sparse.h"

namespace qkv::cli {
namespace {

struct SparseFlags {
  std::string spec, out;
  int64_t seq = 0, seq_kv = -1;
  bool json = false;
};

int RunSparse(const SparseFlags& f) {
  CheckDimFlag("--seq", f.seq, 0);
  if (f.seq_kv != -1) CheckDimFlag("--seq-kv", f.seq_kv, 0);
  const int64_t seq_kv = f.seq_kv >= 0 ? f.seq_kv : f.seq;
  CheckOutputPaths({}, {{"--out", f.out}});
  const BlockLayout layout = ParseSparseLayout(f.spec, f.seq, seq_kv, "sparse");
  if (!f.out.empty()) {
    OutputSet out;
    out.Add(f.out, DType::kBool, {layout.q_blocks, layout.kv_blocks}, layout.present.data());
    out.Commit();
  }
  const int64_t total = layout.q_blocks * layout.kv_blocks;
  if (f.json) {
    const nlohmann::json j = {{"layout", f.spec},
                              {"seq_q", f.seq},
                              {"seq_kv", seq_kv},
                              {"block", kSparseBlock},
                              {"q_blocks", layout.q_blocks},
                              {"kv_blocks", layout.kv_blocks},
                              {"tiles_present", layout.Count()},
                              {"density", total ? static_cast<double>(layout.Count()) / total : 0.0}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s: %lld queries x %lld keys, tiles of 64 x 64 (rows: query blocks)\n",
                f.spec.c_str(), static_cast<long long>(f.seq), static_cast<long long>(seq_kv));
    std::fputs(RenderLayout(layout).c_str(), stdout);
  }
  return FinishStdout(0);
}

}  // namespace

Runner AddSparseCommand(CLI::App& app) {
  auto flags = std::make_shared<SparseFlags>();
  SparseFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "sparse", "Show a block-sparse layout (the tiles qkv attend --sparse computes) or save it");
  cmd->add_option("layout", f.spec,
                  "bigbird:window=3,global=2,random=3,seed=0 | longformer:window=3,global=T1+T2 | "
                  "strided:stride=4 | fixed:stride=4,summary=1")
      ->required();
  cmd->add_option("--seq", f.seq, "Sequence length (tokens): queries")->required();
  cmd->add_option("--seq-kv", f.seq_kv, "Key count Nk (default --seq)");
  cmd->add_option("--out", f.out, "Write the layout .npy, bool [q_blocks, kv_blocks] (qkv attend --block-mask)");
  cmd->add_flag("--json", f.json, "Print sizes and density as one JSON object instead of the picture");
  return [flags] { return RunSparse(*flags); };
}

}  // namespace qkv::cli
