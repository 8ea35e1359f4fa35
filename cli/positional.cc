// qkv positions: positional encodings on .npy files (sinusoidal table,
// learned table add, RoPE, ALiBi bias and slopes). See docs/positional.md.
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
#include "qkv/error.h"
#include "qkv/npy.h"
#include "qkv/positional.h"

namespace qkv::cli {
namespace {

struct PositionsFlags {
  std::string kind;
  std::optional<int64_t> seq, dim;              // sinusoidal
  std::string x, table, out, slopes_out;        // learned, rope; outputs
  std::string layout = "bhsd", style = "neox";  // rope
  double base = kDefaultRopeBase;               // sinusoidal, rope
  int64_t offset = 0, rotary_dim = 0;           // offset: sinusoidal, learned, rope
  std::optional<int64_t> heads, seq_q, seq_kv;  // alibi
  bool symmetric = false;                       // alibi
  // Each kind-specific flag, with the kinds that use it, to refuse the rest.
  struct KindFlag {
    CLI::Option* option;
    std::vector<std::string> kinds;
  };
  std::vector<KindFlag> kind_flags;
};

// Reads a .npy file; a failure names the flag: "--x: X.npy: cannot open ...".
NpyArray ReadFlag(const std::string& path, const char* flag) {
  try {
    return ReadNpy(path);
  } catch (const Error& e) {
    throw Error(std::string(flag) + ": " + e.what());
  }
}

// Renames the argument that opens a library message to its flag:
// "rotary_dim: 63 (...)" -> "--rotary-dim: 63 (...)".
[[noreturn]] void RethrowWithFlag(const Error& e) {
  const std::string what = e.what();
  const std::string name = what.substr(0, what.find(':'));
  const std::pair<const char*, const char*> flags[] = {
      {"x", "--x"},       {"table", "--table"},   {"rotary_dim", "--rotary-dim"},
      {"base", "--base"}, {"offset", "--offset"}, {"num_heads", "--heads"}};
  for (const auto& [arg, flag] : flags) {
    if (name == arg) throw Error(flag + what.substr(name.size()));
  }
  throw e;
}

// Reads a float32 or float16 .npy of rank min_rank..max_rank as float32.
std::vector<float> LoadFloat(const std::string& path, const char* flag, size_t min_rank,
                             size_t max_rank, const char* expected_shape,
                             std::vector<int64_t>* shape, DType* dtype) {
  const NpyArray a = ReadFlag(path, flag);
  if (a.dtype != DType::kFloat32 && a.dtype != DType::kFloat16) {
    throw Error(std::string(flag) + ": " + path + " has dtype " + DTypeName(a.dtype) +
                " (expected float32 or float16)");
  }
  if (a.shape.size() < min_rank || a.shape.size() > max_rank) {
    throw Error(std::string(flag) + ": " + path + " has shape " + NpyShapeString(a.shape) +
                " (expected " + expected_shape + ")");
  }
  std::vector<float> x(a.numel());
  for (int64_t i = 0; i < a.numel(); ++i) {
    x[i] = a.dtype == DType::kFloat32 ? a.data<float>()[i] : HalfToFloat(a.data<uint16_t>()[i]);
  }
  *shape = a.shape;
  *dtype = a.dtype;
  return x;
}

// Writes float32 results in `dtype` (float16 rounds to nearest even).
void AddOutput(OutputSet& outputs, std::vector<uint16_t>& half, const std::string& path,
               DType dtype, const std::vector<int64_t>& shape, const std::vector<float>& x) {
  if (dtype == DType::kFloat16) {
    half.resize(x.size());
    for (size_t i = 0; i < x.size(); ++i) half[i] = FloatToHalf(x[i]);
    outputs.Add(path, dtype, shape, half.data());
  } else {
    outputs.Add(path, DType::kFloat32, shape, x.data());
  }
}

int RunSinusoidal(const PositionsFlags& f) {
  if (!f.seq || !f.dim || f.out.empty()) {
    throw Error(
        "--seq, --dim and --out are required with --kind sinusoidal (expected --seq N "
        "--dim D --out PE.npy)");
  }
  const int64_t seq = *f.seq, dim = *f.dim;
  CheckDimFlag("--seq", seq, 0);
  CheckDimFlag("--dim", dim, 0);
  CheckFitsInMemory("--seq * --dim", 4.0 * seq * dim);
  std::vector<float> pe(seq * dim);
  try {
    FillSinusoidalPositions(
        MutableTensorView::Contiguous(pe.data(), DType::kFloat32, {1, 1, seq, dim}), f.offset,
        f.base);
  } catch (const Error& e) {
    RethrowWithFlag(e);
  }
  OutputSet outputs;
  outputs.Add(f.out, DType::kFloat32, {seq, dim}, pe.data());
  outputs.Commit();
  return 0;
}

int RunLearned(const PositionsFlags& f) {
  if (f.x.empty() || f.table.empty() || f.out.empty()) {
    throw Error("--x, --table and --out are required with --kind learned");
  }
  std::vector<int64_t> x_shape, t_shape;
  DType x_dtype, t_dtype;
  std::vector<float> x = LoadFloat(f.x, "--x", 2, 4,
                                   "[seq, dim], [batch, seq, dim] or "
                                   "[batch, heads, seq, dim]",
                                   &x_shape, &x_dtype);
  const std::vector<float> table =
      LoadFloat(f.table, "--table", 2, 2, "[num_positions, dim]", &t_shape, &t_dtype);
  // Leading dims of x all act as batch: [lead, 1, seq, dim].
  const size_t r = x_shape.size();
  int64_t lead = 1;
  for (size_t i = 0; i + 2 < r; ++i) lead *= x_shape[i];
  const int64_t seq = x_shape[r - 2], dim = x_shape[r - 1];
  if (t_shape[1] != dim) {
    throw Error("--table: " + f.table + " has shape " + NpyShapeString(t_shape) +
                " (expected [num_positions, " + std::to_string(dim) + "] with --x's dim)");
  }
  try {
    AddLearnedPositions(
        MutableTensorView::Contiguous(x.data(), DType::kFloat32, {lead, 1, seq, dim}),
        TensorView{table.data(), DType::kFloat32, {1, 1, t_shape[0], dim}, {0, 0, dim, 1}},
        f.offset);
  } catch (const Error& e) {
    RethrowWithFlag(e);
  }
  OutputSet outputs;
  std::vector<uint16_t> half;
  AddOutput(outputs, half, f.out, x_dtype, x_shape, x);
  outputs.Commit();
  return 0;
}

int RunRope(const PositionsFlags& f) {
  if (f.x.empty() || f.out.empty()) throw Error("--x and --out are required with --kind rope");
  const bool bshd = f.layout == "bshd";
  std::vector<int64_t> s;
  DType dtype;
  std::vector<float> x = LoadFloat(f.x, "--x", 4, 4,
                                   bshd ? "4 dims, [batch, seq, heads, head_dim] (--layout bshd)"
                                        : "4 dims, [batch, heads, seq, head_dim] (--layout bhsd)",
                                   &s, &dtype);
  const MutableTensorView view =
      bshd ? MutableTensorView::FromBSHD(x.data(), DType::kFloat32, s[0], s[1], s[2], s[3])
           : MutableTensorView::Contiguous(x.data(), DType::kFloat32, {s[0], s[1], s[2], s[3]});
  RopeParams params;
  params.style = f.style == "gptj" ? RopeStyle::kGptJ : RopeStyle::kNeox;
  params.base = f.base;
  params.rotary_dim = f.rotary_dim;
  params.offset = f.offset;
  try {
    ApplyRope(view, params);
  } catch (const Error& e) {
    RethrowWithFlag(e);
  }
  OutputSet outputs;
  std::vector<uint16_t> half;
  AddOutput(outputs, half, f.out, dtype, s, x);  // same layout and dtype as --x
  outputs.Commit();
  return 0;
}

int RunAlibi(const PositionsFlags& f) {
  if (!f.heads || (!f.out.empty() && !f.seq_q)) {
    throw Error(
        "--heads, and --seq-q with --out, are required with --kind alibi (expected "
        "--heads H --seq-q N [--seq-kv M] --out BIAS.npy and/or --slopes-out S.npy)");
  }
  if (f.out.empty() && f.slopes_out.empty()) {
    throw Error("--out or --slopes-out is required with --kind alibi (expected at least one)");
  }
  if (f.out.empty() && (f.seq_q || f.seq_kv)) {
    throw Error("--seq-q / --seq-kv: size the bias of --out (expected them only with --out)");
  }
  const int64_t heads = *f.heads;
  CheckDimFlag("--heads", heads, 1);
  std::vector<double> slopes;
  try {
    slopes = AlibiSlopes(heads);
  } catch (const Error& e) {
    RethrowWithFlag(e);
  }
  OutputSet outputs;
  std::vector<float> bias, slopes_f(slopes.begin(), slopes.end());
  if (!f.out.empty()) {
    const int64_t seq_q = *f.seq_q, seq_kv = f.seq_kv.value_or(seq_q);
    CheckDimFlag("--seq-q", seq_q, 0);
    CheckDimFlag("--seq-kv", seq_kv, 0);
    CheckFitsInMemory("--heads * --seq-q * --seq-kv", 4.0 * heads * seq_q * seq_kv);
    bias.resize(heads * seq_q * seq_kv);
    AlibiParams params;
    params.causal = !f.symmetric;
    params.slopes = slopes;
    FillAlibiBias(
        MutableTensorView::Contiguous(bias.data(), DType::kFloat32, {1, heads, seq_q, seq_kv}),
        params);
    outputs.Add(f.out, DType::kFloat32, {1, heads, seq_q, seq_kv}, bias.data());
  }
  if (!f.slopes_out.empty()) outputs.Add(f.slopes_out, DType::kFloat32, {heads}, slopes_f.data());
  outputs.Commit();
  return 0;
}

int RunPositions(const PositionsFlags& f) {
  for (const auto& [option, kinds] : f.kind_flags) {
    if (option->count() == 0) continue;
    bool used = false;
    std::string list;
    for (const std::string& k : kinds) {
      used = used || k == f.kind;
      list += (list.empty() ? "" : "|") + k;
    }
    if (!used) {
      throw Error(option->get_name() + ": not used by --kind " + f.kind + " (expected it only " +
                  "with --kind " + list + ")");
    }
  }
  CheckOutputPaths({{"--x", f.x}, {"--table", f.table}},
                   {{"--out", f.out}, {"--slopes-out", f.slopes_out}});
  if (f.kind == "sinusoidal") return RunSinusoidal(f);
  if (f.kind == "learned") return RunLearned(f);
  if (f.kind == "rope") return RunRope(f);
  return RunAlibi(f);
}

}  // namespace

Runner AddPositionalCommand(CLI::App& app) {
  auto flags = std::make_shared<PositionsFlags>();
  PositionsFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "positions", "Positional encodings: sinusoidal table, learned table add, RoPE, ALiBi bias");
  cmd->add_option("--kind", f.kind, "Which encoding")
      ->required()
      ->check(CLI::IsMember({"sinusoidal", "learned", "rope", "alibi"}));
  auto add = [&](CLI::Option* option, std::vector<std::string> kinds) {
    f.kind_flags.push_back({option, std::move(kinds)});
    return option;
  };
  add(cmd->add_option("--seq", f.seq, "sinusoidal: number of positions N"), {"sinusoidal"});
  add(cmd->add_option("--dim", f.dim, "sinusoidal: width D"), {"sinusoidal"});
  add(cmd->add_option("--x", f.x,
                      "learned: .npy [N,D], [B,N,D] or [B,H,N,D]; rope: .npy [B,H,N,D] (bhsd) or "
                      "[B,N,H,D] (bshd); float32 or float16"),
      {"learned", "rope"});
  add(cmd->add_option("--table", f.table,
                      "learned: position table .npy [P,D]; row offset+s is "
                      "added to row s of --x"),
      {"learned"});
  add(cmd->add_option("--offset", f.offset,
                      "Position of the first row (tokens already decoded, e.g. the KV-cache "
                      "length)")
          ->capture_default_str(),
      {"sinusoidal", "learned", "rope"});
  add(cmd->add_option("--base", f.base, "sinusoidal, rope: frequency base")->capture_default_str(),
      {"sinusoidal", "rope"});
  add(cmd->add_option("--layout", f.layout, "rope: memory layout of --x and --out")
          ->check(CLI::IsMember({"bhsd", "bshd"}))
          ->capture_default_str(),
      {"rope"});
  add(cmd->add_option("--style", f.style,
                      "rope: neox (pairs i, i+R/2: GPT-NeoX, Llama) or gptj (pairs 2i, 2i+1)")
          ->check(CLI::IsMember({"neox", "gptj"}))
          ->capture_default_str(),
      {"rope"});
  add(cmd->add_option("--rotary-dim", f.rotary_dim,
                      "rope: rotate the first R dims only, even, <= D (default: all)"),
      {"rope"});
  add(cmd->add_option("--heads", f.heads, "alibi: number of heads H"), {"alibi"});
  add(cmd->add_option("--seq-q", f.seq_q, "alibi: queries N"), {"alibi"});
  add(cmd->add_option("--seq-kv", f.seq_kv, "alibi: keys M (default N)"), {"alibi"});
  add(cmd->add_flag("--symmetric", f.symmetric,
                    "alibi: bias -m|j-i'| on every key instead of the causal m(j-i'), -inf ahead"),
      {"alibi"});
  add(cmd->add_option("--slopes-out", f.slopes_out, "alibi: write the slopes .npy, float32 [H]"),
      {"alibi"});
  cmd->add_option("--out", f.out,
                  "Output .npy: sinusoidal float32 [N,D]; learned, rope: --x's shape, layout and "
                  "dtype; alibi: float32 [1,H,N,M] bias for qkv attend --mask");
  return [flags] { return RunPositions(*flags); };
}

}  // namespace qkv::cli
