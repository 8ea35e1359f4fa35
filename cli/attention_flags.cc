#include "attention_flags.h"

#include <cmath>

#include "common.h"
#include "qkv/attention.h"
#include "qkv/error.h"

namespace qkv::cli {

void AddAttentionFlags(CLI::App* cmd, AttentionFlags& f, const std::string& tensors) {
  cmd->add_option("--mask", f.mask,
                  "Mask .npy broadcastable to [B,H,Nq,Nk]: bool (true = attend) or float "
                  "(added to the scores; -inf masks)");
  auto* causal = cmd->add_flag("--causal", f.causal,
                               "Causal, bottom-right aligned: query i sees keys j <= i + Nk - Nq");
  auto* top_left = cmd->add_flag("--causal-top-left", f.causal_top_left,
                                 "Causal, top-left aligned (torch is_causal): j <= i; "
                                 "--window then uses the same alignment");
  causal->excludes(top_left);
  cmd->add_option("--window", f.window,
                  "Sliding window LEFT RIGHT: i+Nk-Nq-LEFT <= j <= i+Nk-Nq+RIGHT; -1 = unbounded")
      ->expected(2);
  auto* sparse = cmd->add_option(
      "--sparse", f.sparse,
      "Block-sparse layout of 64 x 64 tiles, only those computed: bigbird:window=3,global=2,"
      "random=3,seed=0 | longformer:window=3,global=T1+T2 | strided:stride=4 | "
      "fixed:stride=4,summary=1 (docs/masks.md)");
  auto* block_mask = cmd->add_option(
      "--block-mask", f.block_mask,
      "Block-sparse layout .npy, bool [B|1,H|1,ceil(Nq/64),ceil(Nk/64)]: true = tile computed");
  sparse->excludes(block_mask);
  cmd->add_option("--softcap", f.softcap,
                  "Logit soft-capping C (Gemma 2): s = C tanh(scale q.k / C) before the mask; "
                  "0 = none")
      ->capture_default_str();
  cmd->add_option("--sink-logits", f.sink_logits,
                  "Learned sink logit per query head .npy, float [H] (gpt-oss): a key of value 0 "
                  "in every row's softmax denominator; -inf = none for that head");
  cmd->add_option("--key-lengths", f.key_lengths,
                  "Per-batch valid key counts .npy, int32/int64 [B]; keys j >= length are padding");
  cmd->add_option("--scale", f.scale, "Score scale (default 1/sqrt(Dk))");
  cmd->add_option("--layout", f.layout, "Memory layout of " + tensors)
      ->check(CLI::IsMember({"bhsd", "bshd"}))
      ->capture_default_str();
  auto* shape = cmd->add_option("--shape", f.shape,
                                "Run on random N(0,1) inputs of shape B,H,N,D instead of files");
  cmd->add_option("--kv-heads", f.kv_heads, "With --shape: KV heads (default H)")->needs(shape);
  cmd->add_option("--seq-kv", f.seq_kv, "With --shape: key count Nk (default N)")->needs(shape);
  cmd->add_option("--seed", f.seed, "With --shape: random seed (>= 0)")
      ->capture_default_str()
      ->check(CLI::Validator(
          [](std::string& text) {
            // A uint64 option would take -1 as 2^64 - 1.
            return text.find('-') == std::string::npos ? std::string()
                                                       : "'" + text + "' (expected an integer >= 0)";
          },
          "NONNEGATIVE"))
      ->needs(shape);
  cmd->add_option("--kernel", f.kernel, "Kernel (auto picks; --verbose says which ran and why)")
      ->check(CLI::IsMember(KernelNames()))
      ->capture_default_str();
  cmd->add_option("--accumulate", f.accumulate,
                  "Arithmetic: f32 (float16, float32 and float64 inputs all computed in float32) "
                  "or f64 (inputs widened to float64 and everything in float64: the reference "
                  "kernel, the tests' oracle; lse and weights then written as float64)")
      ->check(CLI::IsMember({"f32", "f64"}))
      ->capture_default_str();
  cmd->add_option("--threads", f.threads, "Threads (0 = all cores); results never depend on it")
      ->capture_default_str();
  cmd->add_flag("--verbose", f.verbose, "Print which kernel ran, why, and its scratch memory");
}

namespace {

// Reads a .npy file; a failure names the flag: "--q: Q.npy: cannot open ...".
NpyArray ReadFlag(const std::string& path, const char* flag) {
  try {
    return ReadNpy(path);
  } catch (const Error& e) {
    throw Error(std::string(flag) + ": " + e.what());
  }
}

}  // namespace

Input LoadTensor(const std::string& path, const char* flag, bool bshd) {
  Input in{ReadFlag(path, flag), {}};
  const NpyArray& a = in.array;
  if (a.shape.size() != 4) {
    throw Error(std::string(flag) + ": " + path + " has shape " + NpyShapeString(a.shape) +
                " (expected 4 dims, " + (bshd ? "[batch, seq, heads, dim]" :
                                                "[batch, heads, seq, dim]") + ")");
  }
  if (a.dtype != DType::kFloat32 && a.dtype != DType::kFloat16 && a.dtype != DType::kFloat64) {
    throw Error(std::string(flag) + ": " + path + " has dtype " + DTypeName(a.dtype) +
                " (expected float32, float16 or float64)");
  }
  const auto& s = a.shape;
  in.view = bshd ? TensorView::FromBSHD(a.bytes.data(), a.dtype, s[0], s[1], s[2], s[3])
                 : TensorView::Contiguous(a.bytes.data(), a.dtype, {s[0], s[1], s[2], s[3]});
  return in;
}

Input RandomInput(const Shape4& shape, std::mt19937_64& rng) {
  Input in;
  in.array.dtype = DType::kFloat32;
  in.array.shape.assign(shape.begin(), shape.end());
  in.array.bytes.resize(static_cast<size_t>(in.array.numel()) * 4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  float* p = in.array.data<float>();
  for (int64_t i = 0; i < in.array.numel(); ++i) p[i] = normal(rng);
  in.view = TensorView::Contiguous(p, DType::kFloat32, shape);
  return in;
}

RandomShapes ParseRandomShapes(const AttentionFlags& f) {
  const std::vector<int64_t> s = ParseIntList(f.shape, 4, "--shape", false);
  // Each flag is checked by its own name: a bad --seq-kv must not blame --shape.
  if (f.kv_heads < 0) CheckDimFlag("--kv-heads", f.kv_heads, 1);
  if (f.seq_kv < -1) CheckDimFlag("--seq-kv", f.seq_kv, 0);
  const int64_t kv_heads = f.kv_heads > 0 ? f.kv_heads : s[1];
  const int64_t seq_kv = f.seq_kv >= 0 ? f.seq_kv : s[2];
  return {{s[0], s[1], s[2], s[3]}, {s[0], kv_heads, seq_kv, s[3]}};
}

void CheckRandomShapeDims(const AttentionFlags& f) {
  const std::vector<int64_t> s = ParseIntList(f.shape, 4, "--shape", false);
  for (int d = 0; d < 4; ++d) CheckDimFlag("--shape", s[d], 1);
  if (f.kv_heads != 0) CheckDimFlag("--kv-heads", f.kv_heads, 1);
  if (f.seq_kv != -1) CheckDimFlag("--seq-kv", f.seq_kv, 0);
}

std::string RandomShapeFlags(const AttentionFlags& f) {
  std::string text = "--shape " + f.shape;
  if (f.kv_heads != 0) text += " --kv-heads " + std::to_string(f.kv_heads);
  if (f.seq_kv != -1) text += " --seq-kv " + std::to_string(f.seq_kv);
  return text;
}

void ResolveMask(const AttentionFlags& f, const Shape4& target, MaskInputs* in, MaskSpec* spec) {
  spec->causal = f.causal || f.causal_top_left;
  if (!(f.softcap >= 0.0) || !std::isfinite(f.softcap)) {
    throw Error("--softcap: " + std::to_string(f.softcap) + " (expected a finite cap > 0, or 0 for none)");
  }
  spec->softcap = f.softcap;
  spec->alignment = f.causal_top_left ? Alignment::kTopLeft : Alignment::kBottomRight;
  if (!f.window.empty()) {
    spec->window_left = f.window[0];
    spec->window_right = f.window[1];
  }
  if (!f.mask.empty()) {
    in->mask = ReadFlag(f.mask, "--mask");
    if (in->mask.dtype == DType::kInt32 || in->mask.dtype == DType::kInt64) {
      throw Error("--mask: " + f.mask + " has dtype " + DTypeName(in->mask.dtype) +
                  " (expected bool, or float32/float16/float64 additive)");
    }
    spec->mask = BroadcastMask(in->mask.bytes.data(), in->mask.dtype, in->mask.shape, target);
  }
  if (!f.sparse.empty()) {
    in->layout = ParseSparseLayout(f.sparse, target[2], target[3], "sparse");
    spec->block_mask = in->layout.View();
  }
  if (!f.block_mask.empty()) {
    in->block_mask = ReadFlag(f.block_mask, "--block-mask");
    const NpyArray& a = in->block_mask;
    const Shape4 want{target[0], target[1], SparseBlocks(target[2]), SparseBlocks(target[3])};
    if (a.dtype != DType::kBool) {
      throw Error("--block-mask: " + f.block_mask + " has dtype " + DTypeName(a.dtype) +
                  " (expected bool: true = the 64 x 64 tile is computed)");
    }
    try {
      // Batch and heads may broadcast (NumPy rules); the block dims may not.
      spec->block_mask = BroadcastMask(a.bytes.data(), a.dtype, a.shape, want);
      if (spec->block_mask.strides[2] == 0 && want[2] > 1) throw Error("");
      if (spec->block_mask.strides[3] == 0 && want[3] > 1) throw Error("");
    } catch (const Error&) {
      throw Error("--block-mask: " + f.block_mask + " has shape " + NpyShapeString(a.shape) +
                  " (expected [B|1, H|1, ceil(Nq/64), ceil(Nk/64)] = " + ShapeString(want) + ")");
    }
  }
  if (!f.sink_logits.empty()) {
    const NpyArray a = ReadFlag(f.sink_logits, "--sink-logits");
    if ((a.dtype != DType::kFloat32 && a.dtype != DType::kFloat64 && a.dtype != DType::kFloat16) ||
        a.shape.size() != 1 || a.shape[0] != target[1]) {
      throw Error("--sink-logits: " + f.sink_logits + " is " + DTypeName(a.dtype) + " " +
                  NpyShapeString(a.shape) + " (expected a float array of one logit per query head, [" +
                  std::to_string(target[1]) + "])");
    }
    for (int64_t h = 0; h < a.numel(); ++h) {
      in->sink_logits.push_back(a.dtype == DType::kFloat32   ? a.data<float>()[h]
                                : a.dtype == DType::kFloat64 ? static_cast<float>(a.data<double>()[h])
                                                             : HalfToFloat(a.data<uint16_t>()[h]));
    }
    spec->sink_logits = in->sink_logits;
  }
  if (!f.key_lengths.empty()) {
    in->lengths = ReadFlag(f.key_lengths, "--key-lengths");
    const NpyArray& l = in->lengths;
    if ((l.dtype != DType::kInt32 && l.dtype != DType::kInt64) || l.shape.size() != 1) {
      throw Error("--key-lengths: " + f.key_lengths + " is " + DTypeName(l.dtype) + " " +
                  NpyShapeString(l.shape) +
                  " (expected a 1-D int32 or int64 array of one length per batch)");
    }
    for (int64_t b = 0; b < l.numel(); ++b) {
      in->key_lengths.push_back(l.dtype == DType::kInt32 ? l.data<int32_t>()[b]
                                                         : l.data<int64_t>()[b]);
    }
    spec->key_lengths = in->key_lengths;
  }
}

}  // namespace qkv::cli
