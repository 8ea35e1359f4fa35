// qkv attend: scaled dot-product attention on .npy files or random inputs.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
#include "qkv/attention.h"
#include "qkv/error.h"
#include "qkv/npy.h"

namespace qkv::cli {
namespace {

struct AttendFlags {
  std::string q, k, v, out, mask, key_lengths, weights, lse;
  std::string shape;
  int64_t kv_heads = 0;
  int64_t seq_kv = -1;
  uint64_t seed = 0;
  bool causal = false;
  bool causal_top_left = false;
  std::vector<int64_t> window;
  std::optional<double> scale;
  std::string layout = "bhsd";
  std::string kernel = "auto";
  int threads = 0;
  bool verbose = false;
};

// An input tensor: the .npy array it came from and its [b, h, s, d] view.
struct Input {
  NpyArray array;
  TensorView view;
};

Input LoadQkv(const std::string& path, const char* name, bool bshd) {
  Input in{ReadNpy(path), {}};
  const NpyArray& a = in.array;
  if (a.shape.size() != 4) {
    throw Error(std::string(name) + ": " + path + " has shape " + NpyShapeString(a.shape) +
                " (expected 4 dims, " + (bshd ? "[batch, seq, heads, dim]" :
                                                "[batch, heads, seq, dim]") + ")");
  }
  if (a.dtype != DType::kFloat32 && a.dtype != DType::kFloat16 && a.dtype != DType::kFloat64) {
    throw Error(std::string(name) + ": " + path + " has dtype " + DTypeName(a.dtype) +
                " (expected float32, float16 or float64)");
  }
  const auto& s = a.shape;
  in.view = bshd ? TensorView::FromBSHD(a.bytes.data(), a.dtype, s[0], s[1], s[2], s[3])
                 : TensorView::Contiguous(a.bytes.data(), a.dtype, {s[0], s[1], s[2], s[3]});
  return in;
}

// Fills a float32 [b, h, s, d] array with N(0, 1) values from `rng`.
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

int RunAttend(const AttendFlags& f) {
  const bool bshd = f.layout == "bshd";
  const bool random = !f.shape.empty();
  if (random && (!f.q.empty() || !f.k.empty() || !f.v.empty())) {
    throw Error("--shape and --q/--k/--v are exclusive (expected random inputs or files)");
  }
  if (!random && (f.q.empty() || f.k.empty() || f.v.empty())) {
    throw Error("--q, --k and --v are required (expected three .npy files, or --shape B,H,N,D)");
  }
  if (!random && f.out.empty()) throw Error("--out is required with --q/--k/--v");
  if (random && bshd) throw Error("--layout applies to files (expected no --layout with --shape)");

  Input q, k, v;
  if (random) {
    const std::vector<int64_t> s = ParseIntList(f.shape, 4, "--shape", false);
    if (f.kv_heads < 0 || f.seq_kv < -1) {
      throw Error("--kv-heads / --seq-kv: negative value (expected --kv-heads >= 1, --seq-kv >= 0)");
    }
    const int64_t kv_heads = f.kv_heads > 0 ? f.kv_heads : s[1];
    const int64_t seq_kv = f.seq_kv >= 0 ? f.seq_kv : s[2];
    CheckFitsInMemory("--shape " + f.shape,
                      4.0 * (2.0 * s[0] * s[1] * s[2] * s[3] + 2.0 * s[0] * kv_heads * seq_kv * s[3]));
    std::mt19937_64 rng(f.seed);
    q = RandomInput({s[0], s[1], s[2], s[3]}, rng);
    k = RandomInput({s[0], kv_heads, seq_kv, s[3]}, rng);
    v = RandomInput({s[0], kv_heads, seq_kv, s[3]}, rng);
  } else {
    q = LoadQkv(f.q, "--q", bshd);
    k = LoadQkv(f.k, "--k", bshd);
    v = LoadQkv(f.v, "--v", bshd);
  }
  const int64_t batch = q.view.shape[0], heads = q.view.shape[1], seq_q = q.view.shape[2];
  const int64_t seq_kv = k.view.shape[2], head_dim_v = v.view.shape[3];

  AttentionParams p;
  p.q = q.view;
  p.k = k.view;
  p.v = v.view;
  p.scale = f.scale;
  p.num_threads = f.threads;
  p.kernel = KernelFromName(f.kernel);
  p.mask.causal = f.causal || f.causal_top_left;
  p.mask.alignment = f.causal_top_left ? Alignment::kTopLeft : Alignment::kBottomRight;
  if (!f.window.empty()) {
    p.mask.window_left = f.window[0];
    p.mask.window_right = f.window[1];
  }
  NpyArray mask_array, lengths_array;
  std::vector<int64_t> key_lengths;
  if (!f.mask.empty()) {
    mask_array = ReadNpy(f.mask);
    if (mask_array.dtype == DType::kInt32 || mask_array.dtype == DType::kInt64) {
      throw Error("--mask: " + f.mask + " has dtype " + DTypeName(mask_array.dtype) +
                  " (expected bool, or float32/float16/float64 additive)");
    }
    p.mask.mask = BroadcastMask(mask_array.bytes.data(), mask_array.dtype, mask_array.shape,
                                {batch, heads, seq_q, seq_kv});
  }
  if (!f.key_lengths.empty()) {
    lengths_array = ReadNpy(f.key_lengths);
    if ((lengths_array.dtype != DType::kInt32 && lengths_array.dtype != DType::kInt64) ||
        lengths_array.shape.size() != 1) {
      throw Error("--key-lengths: " + f.key_lengths + " is " + DTypeName(lengths_array.dtype) +
                  " " + NpyShapeString(lengths_array.shape) +
                  " (expected a 1-D int32 or int64 array of one length per batch)");
    }
    for (int64_t b = 0; b < lengths_array.numel(); ++b) {
      key_lengths.push_back(lengths_array.dtype == DType::kInt32
                                ? lengths_array.data<int32_t>()[b]
                                : lengths_array.data<int64_t>()[b]);
    }
    p.mask.key_lengths = key_lengths;
  }

  // Outputs: O in Q's layout and dtype; weights and LSE float32.
  const DType out_dtype = q.view.dtype;
  const double out_elems = 1.0 * batch * heads * seq_q * head_dim_v;
  const double weight_elems = f.weights.empty() ? 0.0 : 1.0 * batch * heads * seq_q * seq_kv;
  const double lse_elems = f.lse.empty() ? 0.0 : 1.0 * batch * heads * seq_q;
  CheckFitsInMemory("the output",
                    out_elems * DTypeSize(out_dtype) + 4.0 * (weight_elems + lse_elems));
  std::vector<unsigned char> out(static_cast<size_t>(out_elems) * DTypeSize(out_dtype));
  std::vector<float> weights(static_cast<size_t>(weight_elems));
  std::vector<float> lse(static_cast<size_t>(lse_elems));
  p.out = bshd ? MutableTensorView::FromBSHD(out.data(), out_dtype, batch, seq_q, heads, head_dim_v)
               : MutableTensorView::Contiguous(out.data(), out_dtype,
                                               {batch, heads, seq_q, head_dim_v});
  if (!f.weights.empty()) {
    p.weights = MutableTensorView::Contiguous(weights.data(), DType::kFloat32,
                                              {batch, heads, seq_q, seq_kv});
  }
  if (!f.lse.empty()) {
    p.lse = MutableTensorView::Contiguous(lse.data(), DType::kFloat32, {batch, heads, seq_q, 1});
  }

  const auto start = std::chrono::steady_clock::now();
  const AttentionInfo info = Attention(p);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  OutputSet outputs;
  if (!f.out.empty()) {
    outputs.Add(f.out, out_dtype,
                bshd ? std::vector<int64_t>{batch, seq_q, heads, head_dim_v}
                     : std::vector<int64_t>{batch, heads, seq_q, head_dim_v},
                out.data());
  }
  if (!f.weights.empty()) {
    outputs.Add(f.weights, DType::kFloat32, {batch, heads, seq_q, seq_kv}, weights.data());
  }
  if (!f.lse.empty()) outputs.Add(f.lse, DType::kFloat32, {batch, heads, seq_q}, lse.data());
  outputs.Commit();

  if (f.verbose) {
    std::printf("kernel: %s (%s); %s; threads %d; scratch %s\n", KernelName(info.kernel),
                info.reason.c_str(), info.simd_target.c_str(), info.threads,
                HumanBytes(static_cast<double>(info.scratch_bytes)).c_str());
  }
  if (random) {
    const int64_t pairs = CountAllowedPairs(p.mask, batch, seq_q, seq_kv);
    const double flops = 2.0 * (q.view.shape[3] + head_dim_v) * heads * pairs;
    std::printf("q [%lld,%lld,%lld,%lld]  k, v [%lld,%lld,%lld,%lld]  (random N(0,1), seed %llu)\n",
                (long long)batch, (long long)heads, (long long)seq_q, (long long)q.view.shape[3],
                (long long)batch, (long long)k.view.shape[1], (long long)seq_kv,
                (long long)head_dim_v, (unsigned long long)f.seed);
    std::printf("kernel %s, %d threads: %.4f s, %.2f GFLOP/s (%.3g flops = 4*D per allowed pair), "
                "peak memory %s\n",
                KernelName(info.kernel), info.threads, seconds, flops / seconds * 1e-9, flops,
                HumanBytes(static_cast<double>(PeakRssBytes())).c_str());
  }
  return 0;
}

}  // namespace

Runner AddAttendCommand(CLI::App& app) {
  auto flags = std::make_shared<AttendFlags>();
  AttendFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "attend", "Scaled dot-product attention: out = softmax(scale * Q.K^T + mask) . V");
  cmd->add_option("--q", f.q, "Queries .npy, [B,H,Nq,Dk] (bhsd) or [B,Nq,H,Dk] (bshd)");
  cmd->add_option("--k", f.k, "Keys .npy, [B,Hkv,Nk,Dk] or [B,Nk,Hkv,Dk]; Hkv divides H (GQA/MQA)");
  cmd->add_option("--v", f.v, "Values .npy, [B,Hkv,Nk,Dv] or [B,Nk,Hkv,Dv]");
  cmd->add_option("--out", f.out, "Output .npy in Q's layout and dtype, [B,H,Nq,Dv] or [B,Nq,H,Dv]");
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
  cmd->add_option("--key-lengths", f.key_lengths,
                  "Per-batch valid key counts .npy, int32/int64 [B]; keys j >= length are padding");
  cmd->add_option("--scale", f.scale, "Score scale (default 1/sqrt(Dk))");
  cmd->add_option("--layout", f.layout, "Memory layout of Q, K, V and the output")
      ->check(CLI::IsMember({"bhsd", "bshd"}))
      ->capture_default_str();
  cmd->add_option("--weights", f.weights, "Write attention weights .npy, float32 [B,H,Nq,Nk]");
  cmd->add_option("--lse", f.lse, "Write log-sum-exp of each row .npy, float32 [B,H,Nq]");
  auto* shape =
      cmd->add_option("--shape", f.shape, "Run on random N(0,1) inputs of shape B,H,N,D instead of files");
  cmd->add_option("--kv-heads", f.kv_heads, "With --shape: KV heads (default H)")->needs(shape);
  cmd->add_option("--seq-kv", f.seq_kv, "With --shape: key count Nk (default N)")->needs(shape);
  cmd->add_option("--seed", f.seed, "With --shape: random seed")->capture_default_str()->needs(shape);
  cmd->add_option("--kernel", f.kernel, "Kernel (auto picks; --verbose says which ran and why)")
      ->check(CLI::IsMember(KernelNames()))
      ->capture_default_str();
  cmd->add_option("--threads", f.threads, "Threads (0 = all cores); results never depend on it")
      ->capture_default_str();
  cmd->add_flag("--verbose", f.verbose, "Print which kernel ran, why, and its scratch memory");
  return [flags] { return RunAttend(*flags); };
}

}  // namespace qkv::cli
