// qkv mha: a torch.nn.MultiheadAttention layer (batch_first=True) on .npy
// inputs, with weights from a safetensors state_dict (docs/mha.md).
#include "qkv/mha.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
#include "qkv/error.h"
#include "qkv/npy.h"
#include "qkv/safetensors.h"
#include "validate.h"

namespace qkv::cli {
namespace {

struct MhaFlags {
  std::string query, key, value, weights, prefix, key_padding_mask, attn_mask, out, attn_weights;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  bool causal = false, causal_top_left = false;
  bool per_head_weights = false;
  int threads = 0;
};

// A 3-D float input as float32 (float16 and float64 converted; float32 kept).
struct Input {
  NpyArray array;
  std::vector<float> converted;
  std::span<const float> data;
  std::vector<int64_t> shape;
};

// Reads a .npy file; errors name `flag`.
NpyArray ReadFlag(const std::string& path, const char* flag) {
  try {
    return ReadNpy(path);
  } catch (const Error& e) {
    throw Error(std::string(flag) + ": " + e.what());
  }
}

Input LoadInput(const std::string& path, const char* flag, const char* dims) {
  Input in;
  in.array = ReadFlag(path, flag);
  const NpyArray& a = in.array;
  if (a.shape.size() != 3) {
    throw Error(std::string(flag) + ": " + path + " has shape " + NpyShapeString(a.shape) +
                " (expected 3 dims, " + dims + ")");
  }
  const int64_t n = a.numel();
  if (a.dtype == DType::kFloat32) {
    in.data = {a.data<float>(), static_cast<size_t>(n)};
  } else if (a.dtype == DType::kFloat16 || a.dtype == DType::kFloat64) {
    in.converted.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      in.converted[i] = a.dtype == DType::kFloat16 ? HalfToFloat(a.data<uint16_t>()[i])
                                                   : static_cast<float>(a.data<double>()[i]);
    }
    in.data = in.converted;
  } else {
    throw Error(std::string(flag) + ": " + path + " has dtype " + DTypeName(a.dtype) +
                " (expected float32, float16 or float64)");
  }
  // Zero-size inputs cost no file bytes; a dim past 2^31 - 1 is refused
  // here, by the flag's name, not later as the library's "q:".
  for (const int64_t dim : a.shape) {
    if (dim > internal::kMaxDim) {
      throw Error(std::string(flag) + ": " + path + " has shape " + NpyShapeString(a.shape) +
                  " (expected each dim at most 2^31 - 1)");
    }
  }
  in.shape = a.shape;
  return in;
}

// Reads a torch-style mask and checks it against the allowed shapes.
NpyArray LoadMask(const std::string& path, const char* flag,
                  const std::vector<std::vector<int64_t>>& shapes, const std::string& expected) {
  NpyArray m = ReadFlag(path, flag);
  if (m.dtype != DType::kBool && m.dtype != DType::kFloat32 && m.dtype != DType::kFloat64 &&
      m.dtype != DType::kFloat16) {
    throw Error(std::string(flag) + ": " + path + " has dtype " + DTypeName(m.dtype) +
                " (expected bool, True = masked out, or float32/float64/float16 added)");
  }
  for (const auto& s : shapes) {
    if (m.shape == s) return m;
  }
  throw Error(std::string(flag) + ": " + path + " has shape " + NpyShapeString(m.shape) +
              " (expected " + expected + ")");
}

int RunMha(const MhaFlags& f) {
  if (f.key.empty() != f.value.empty()) {
    throw Error(std::string(f.key.empty() ? "--value" : "--key") + " without " +
                (f.key.empty() ? "--key" : "--value") +
                " (expected both for cross-attention, or neither for self-attention)");
  }
  CheckThreadsFlag(f.threads);
  CheckOutputPaths({{"--query", f.query}, {"--key", f.key}, {"--value", f.value},
                    {"--params", f.weights}, {"--key-padding-mask", f.key_padding_mask},
                    {"--attn-mask", f.attn_mask}},
                   {{"--out", f.out}, {"--attn-weights", f.attn_weights}});
  const Input query = LoadInput(f.query, "--query", "[batch, seq_q, embed_dim]");
  const int64_t batch = query.shape[0], seq_q = query.shape[1], embed_dim = query.shape[2];
  const bool cross = !f.key.empty();
  Input key, value;
  int64_t seq_kv = seq_q, kdim = embed_dim, vdim = embed_dim;
  if (cross) {
    key = LoadInput(f.key, "--key", "[batch, seq_kv, kdim]");
    value = LoadInput(f.value, "--value", "[batch, seq_kv, vdim]");
    if (key.shape[0] != batch || value.shape[0] != batch || value.shape[1] != key.shape[1]) {
      throw Error("--key, --value: shapes " + NpyShapeString(key.shape) + ", " +
                  NpyShapeString(value.shape) + " (expected [batch=" + std::to_string(batch) +
                  ", seq_kv, kdim] and [batch, seq_kv, vdim] with the same seq_kv)");
    }
    seq_kv = key.shape[1], kdim = key.shape[2], vdim = value.shape[2];
  }
  if (embed_dim < 1 || kdim < 1 || vdim < 1) {
    throw Error(std::string(embed_dim < 1 ? "--query"
                            : kdim < 1    ? "--key"
                                          : "--value") +
                ": last dim is 0 (expected embed_dim, kdim and vdim >= 1)");
  }
  if (f.heads < 1 || embed_dim % f.heads != 0) {
    throw Error("--heads: " + std::to_string(f.heads) + " (expected a divisor of embed_dim " +
                std::to_string(embed_dim) + ", the last dim of --query)");
  }
  if (f.kv_heads < 0 || (f.kv_heads > 0 && f.heads % f.kv_heads != 0)) {
    throw Error("--kv-heads: " + std::to_string(f.kv_heads) + " (expected a divisor of --heads " +
                std::to_string(f.heads) + ")");
  }
  const MhaConfig config{.embed_dim = embed_dim,
                         .num_heads = f.heads,
                         .num_kv_heads = f.kv_heads,
                         .kdim = kdim,
                         .vdim = vdim};
  std::optional<SafetensorsFile> file;
  try {
    file.emplace(SafetensorsFile::Read(f.weights));
  } catch (const Error& e) {
    throw Error("--params: " + std::string(e.what()));
  }
  // A query of another embedding size than the weights is the query's
  // mistake as often as the weights': name both, before the shape checks
  // of the loader blame the weights alone.
  for (const char* name : {"in_proj_weight", "q_proj_weight"}) {
    const SafetensorsFile::Tensor* t = file->Find(f.prefix + name);
    if (t != nullptr && t->shape.size() == 2 && t->shape[1] != embed_dim) {
      throw Error("--query: " + f.query + " has embed_dim " + std::to_string(embed_dim) +
                  ", but --params " + f.weights + " has " + f.prefix + name + " of shape " +
                  NpyShapeString(t->shape) + " (expected the query's last dim to be " +
                  std::to_string(t->shape[1]) + ")");
    }
  }
  std::optional<MultiHeadAttention> mha;
  try {
    mha.emplace(MultiHeadAttention::FromSafetensors(*file, config, f.prefix));
  } catch (const Error& e) {
    throw Error("--params: " + std::string(e.what()));
  }

  MhaParams p;
  p.query = query.data;
  p.key = key.data;
  p.value = value.data;
  p.batch = batch, p.seq_q = seq_q, p.seq_kv = cross ? seq_kv : -1;
  p.causal = f.causal || f.causal_top_left;
  p.causal_alignment = f.causal ? Alignment::kBottomRight : Alignment::kTopLeft;
  p.num_threads = f.threads;
  const std::string nq = std::to_string(seq_q), nk = std::to_string(seq_kv);
  NpyArray kpm, attn;
  if (!f.key_padding_mask.empty()) {
    kpm = LoadMask(f.key_padding_mask, "--key-padding-mask", {{batch, seq_kv}},
                   "[batch, seq_kv] = [" + std::to_string(batch) + "," + nk + "]");
    p.key_padding_mask = {kpm.bytes.data(), kpm.dtype, kpm.shape};
  }
  if (!f.attn_mask.empty()) {
    if (batch > INT64_MAX / f.heads) {
      throw Error("--attn-mask: batch * heads overflows (expected a smaller --query batch)");
    }
    const int64_t bh = batch * f.heads;
    attn =
        LoadMask(f.attn_mask, "--attn-mask", {{seq_q, seq_kv}, {bh, seq_q, seq_kv}},
                 "[seq_q, seq_kv] = [" + nq + "," + nk + "] or [batch*heads, seq_q, seq_kv] = [" +
                     std::to_string(bh) + "," + nq + "," + nk + "]");
    p.attn_mask = {attn.bytes.data(), attn.dtype, attn.shape};
  }

  // Outputs and working memory (projections, O, the mask and per-head weights).
  const double weight_elems = f.attn_weights.empty() ? 0.0 : 1.0 * batch * seq_q * seq_kv;
  const double per_head_elems = f.attn_weights.empty() ? 0.0 : weight_elems * f.heads;
  CheckFitsInMemory("--query " + f.query + (cross ? " with --key " + f.key : std::string()) +
                        (f.attn_weights.empty() ? "" : " and --attn-weights") + ": this layer",
                    4.0 * (3.0 * batch * seq_q * embed_dim + 2.0 * batch * seq_kv * embed_dim +
                           1.0 * batch * seq_q * seq_kv + per_head_elems + weight_elems));
  std::vector<float> out(static_cast<size_t>(batch * seq_q * embed_dim));
  std::vector<float> weights(
      static_cast<size_t>(f.per_head_weights ? per_head_elems : weight_elems));
  p.out = out;
  p.attn_weights = weights;
  p.average_attn_weights = !f.per_head_weights;
  mha->Forward(p);

  OutputSet outputs;
  outputs.Add(f.out, DType::kFloat32, {batch, seq_q, embed_dim}, out.data());
  if (!f.attn_weights.empty()) {
    outputs.Add(f.attn_weights, DType::kFloat32,
                f.per_head_weights ? std::vector<int64_t>{batch, f.heads, seq_q, seq_kv}
                                   : std::vector<int64_t>{batch, seq_q, seq_kv},
                weights.data());
  }
  outputs.Commit();
  return 0;
}

}  // namespace

Runner AddMhaCommand(CLI::App& app) {
  auto flags = std::make_shared<MhaFlags>();
  MhaFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "mha", "Multi-head attention layer (torch.nn.MultiheadAttention, batch_first=True)");
  cmd->add_option("--query", f.query, "Queries .npy [B,Nq,E] (float32/16/64)")->required();
  cmd->add_option("--key", f.key, "Keys .npy [B,Nk,kdim] (default: --query, self-attention)");
  cmd->add_option("--value", f.value, "Values .npy [B,Nk,vdim] (with --key)");
  cmd->add_option("--params", f.weights,
                  "Layer parameters (input), a safetensors state_dict: in_proj_weight or q/k/v_proj_weight, in_proj_bias, "
                  "out_proj.weight, out_proj.bias")
      ->required();
  cmd->add_option("--prefix", f.prefix,
                  "Prefix of the tensor names in --params, e.g. layers.0.self_attn.");
  cmd->add_option("--heads", f.heads, "Query heads H; head_dim = E / H")->required();
  cmd->add_option("--kv-heads", f.kv_heads,
                  "Key/value heads G dividing H (GQA; 1 = MQA; default H)");
  cmd->add_option("--key-padding-mask", f.key_padding_mask,
                  "Mask .npy [B,Nk]: bool (True = padding, masked out) or float (added)");
  cmd->add_option("--attn-mask", f.attn_mask,
                  "Mask .npy [Nq,Nk] or [B*H,Nq,Nk]: bool (True = masked OUT, torch MHA) or "
                  "float (added; -inf masks)");
  // The names and meanings of qkv attend (cli/attention_flags.cc): torch's
  // is_causal is --causal-top-left; for self-attention both are the same.
  auto* causal = cmd->add_flag("--causal", f.causal,
                               "Causal, bottom-right aligned: query i sees keys j <= i + Nk - Nq");
  auto* top_left = cmd->add_flag("--causal-top-left", f.causal_top_left,
                                 "Causal, top-left aligned (torch is_causal): j <= i");
  causal->excludes(top_left);
  cmd->add_option("--out", f.out, "Output .npy, float32 [B,Nq,E]")->required();
  auto* weights = cmd->add_option("--attn-weights", f.attn_weights,
                                  "Write attention weights .npy, float32 [B,Nq,Nk] averaged "
                                  "over heads");
  cmd->add_flag("--per-head-weights", f.per_head_weights,
                "Write --attn-weights per head, [B,H,Nq,Nk] (average_attn_weights=False)")
      ->needs(weights);
  cmd->add_option("--threads", f.threads, "Threads (0 = all cores); results never depend on it")
      ->capture_default_str();
  return [flags] { return RunMha(*flags); };
}

}  // namespace qkv::cli
