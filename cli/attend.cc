// qkv attend: scaled dot-product attention on .npy files or random inputs.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "attention_flags.h"
#include "commands.h"
#include "common.h"
#include "qkv/attention.h"
#include "qkv/error.h"
#include "qkv/linear_attention.h"
#include "qkv/version.h"
#include "qkv/npy.h"

namespace qkv::cli {
namespace {

struct AttendFlags : AttentionFlags {
  std::string q, k, v, out, weights, lse;
  std::string linear;  // feature map: linear attention instead of softmax
};

// --linear: Katharopoulos et al.'s linear attention (qkv/linear_attention.h)
// on the same inputs. It has no scale, mask rule but causal, lse or weights:
// each of those flags is refused by name rather than ignored.
int RunLinear(const AttendFlags& f, const Input& q, const Input& k, const Input& v, bool bshd,
              bool random) {
  const std::vector<std::pair<const char*, bool>> refused = {
      {"--mask", !f.mask.empty()},          {"--key-lengths", !f.key_lengths.empty()},
      {"--window", !f.window.empty()},      {"--causal-top-left", f.causal_top_left},
      {"--scale", f.scale.has_value()},     {"--sparse", !f.sparse.empty()},
      {"--block-mask", !f.block_mask.empty()}, {"--sink-logits", !f.sink_logits.empty()},
      {"--softcap", f.softcap > 0},         {"--attn-weights", !f.weights.empty()},
      {"--lse", !f.lse.empty()},            {"--kernel", f.kernel != "auto"},
      {"--accumulate", f.accumulate != "f32"}};
  for (const auto& [flag, given] : refused) {
    if (given) {
      throw Error(std::string(flag) + ": not with --linear (linear attention has no scale, " +
                  "softmax, lse or weights, and only --causal of the mask rules)");
    }
  }
  const int64_t batch = q.view.shape[0], heads = q.view.shape[1], seq_q = q.view.shape[2];
  const int64_t head_dim_v = v.view.shape[3];
  const DType out_dtype = q.view.dtype;
  const double out_elems = 1.0 * batch * heads * seq_q * head_dim_v;
  CheckFitsInMemory("the output (--out)", out_elems * DTypeSize(out_dtype));
  std::vector<unsigned char> out(static_cast<size_t>(out_elems) * DTypeSize(out_dtype));
  LinearAttentionParams p;
  p.q = q.view, p.k = k.view, p.v = v.view;
  p.out = bshd ? MutableTensorView::FromBSHD(out.data(), out_dtype, batch, seq_q, heads, head_dim_v)
               : MutableTensorView::Contiguous(out.data(), out_dtype, {batch, heads, seq_q, head_dim_v});
  try {
    p.feature_map = FeatureMapFromName(f.linear);
  } catch (const Error& e) {
    throw Error("--linear: " + std::string(e.what()));
  }
  p.causal = f.causal;
  p.num_threads = f.threads;
  const auto start = std::chrono::steady_clock::now();
  const LinearAttentionInfo info = LinearAttention(p);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!f.out.empty()) {
    OutputSet outputs;
    outputs.Add(f.out, out_dtype,
                bshd ? std::vector<int64_t>{batch, seq_q, heads, head_dim_v}
                     : std::vector<int64_t>{batch, heads, seq_q, head_dim_v},
                out.data());
    outputs.Commit();
  }
  if (f.verbose || random) {
    std::printf("linear attention (%s): %s, chunk %lld; %s; threads %d; state %s, scratch %s; "
                "%.4f s, peak memory %s\n",
                f.linear.c_str(), info.path.c_str(), static_cast<long long>(info.chunk),
                info.simd_target.c_str(), info.threads,
                HumanBytes(static_cast<double>(info.state_bytes)).c_str(),
                HumanBytes(static_cast<double>(info.scratch_bytes)).c_str(), seconds,
                HumanBytes(static_cast<double>(PeakRssBytes())).c_str());
  }
  return 0;
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
  CheckThreadsFlag(f.threads);
  CheckOutputPaths({{"--q", f.q}, {"--k", f.k}, {"--v", f.v}, {"--mask", f.mask},
                    {"--key-lengths", f.key_lengths}, {"--sink-logits", f.sink_logits},
                    {"--block-mask", f.block_mask}},
                   {{"--out", f.out}, {"--attn-weights", f.weights}, {"--lse", f.lse}});

  Input q, k, v;
  if (random) {
    const RandomShapes s = ParseRandomShapes(f);
    const double q_elems = 1.0 * s.q[0] * s.q[1] * s.q[2] * s.q[3];
    const double kv_elems = 1.0 * s.kv[0] * s.kv[1] * s.kv[2] * s.kv[3];
    CheckFitsInMemory(RandomShapeFlags(f), 4.0 * (2.0 * q_elems + 2.0 * kv_elems));
    CheckRandomShapeDims(f);
    std::mt19937_64 rng(f.seed);
    q = RandomInput(s.q, rng);
    k = RandomInput(s.kv, rng);
    v = RandomInput(s.kv, rng);
  } else {
    q = LoadTensor(f.q, "--q", bshd);
    k = LoadTensor(f.k, "--k", bshd);
    v = LoadTensor(f.v, "--v", bshd);
  }
  if (!f.linear.empty()) return RunLinear(f, q, k, v, bshd, random);
  const int64_t batch = q.view.shape[0], heads = q.view.shape[1], seq_q = q.view.shape[2];
  const int64_t seq_kv = k.view.shape[2], head_dim_v = v.view.shape[3];

  AttentionParams p;
  p.q = q.view;
  p.k = k.view;
  p.v = v.view;
  p.scale = f.scale;
  p.num_threads = f.threads;
  p.kernel = KernelFromName(f.kernel);
  p.accumulate = f.accumulate == "f64" ? Accumulate::kFloat64 : Accumulate::kFloat32;
  MaskInputs mask_inputs;
  ResolveMask(f, {batch, heads, seq_q, seq_kv}, &mask_inputs, &p.mask);

  // Outputs: O in Q's layout and dtype; weights and LSE float32 (float64
  // with --accumulate f64).
  const DType out_dtype = q.view.dtype;
  const DType stat_dtype = f.accumulate == "f64" ? DType::kFloat64 : DType::kFloat32;
  const double out_elems = 1.0 * batch * heads * seq_q * head_dim_v;
  const double weight_elems = f.weights.empty() ? 0.0 : 1.0 * batch * heads * seq_q * seq_kv;
  const double lse_elems = f.lse.empty() ? 0.0 : 1.0 * batch * heads * seq_q;
  CheckFitsInMemory(std::string("the outputs (--out") + (f.weights.empty() ? "" : ", --attn-weights") +
                        (f.lse.empty() ? "" : ", --lse") + ")",
                    out_elems * DTypeSize(out_dtype) +
                        DTypeSize(stat_dtype) * (weight_elems + lse_elems));
  std::vector<unsigned char> out(static_cast<size_t>(out_elems) * DTypeSize(out_dtype));
  std::vector<unsigned char> weights(static_cast<size_t>(weight_elems) * DTypeSize(stat_dtype));
  std::vector<unsigned char> lse(static_cast<size_t>(lse_elems) * DTypeSize(stat_dtype));
  p.out = bshd ? MutableTensorView::FromBSHD(out.data(), out_dtype, batch, seq_q, heads, head_dim_v)
               : MutableTensorView::Contiguous(out.data(), out_dtype,
                                               {batch, heads, seq_q, head_dim_v});
  if (!f.weights.empty()) {
    p.weights = MutableTensorView::Contiguous(weights.data(), stat_dtype,
                                              {batch, heads, seq_q, seq_kv});
  }
  if (!f.lse.empty()) {
    p.lse = MutableTensorView::Contiguous(lse.data(), stat_dtype, {batch, heads, seq_q, 1});
  }

  const auto start = std::chrono::steady_clock::now();
  const AttentionInfo info = WithElapsedProgress("qkv attend", [&] { return Attention(p); });
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
    outputs.Add(f.weights, stat_dtype, {batch, heads, seq_q, seq_kv}, weights.data());
  }
  if (!f.lse.empty()) outputs.Add(f.lse, stat_dtype, {batch, heads, seq_q}, lse.data());
  outputs.Commit();

  if (f.verbose) {
    std::printf("kernel: %s (%s); %s; threads %d; scratch %s\n", KernelName(info.kernel),
                info.reason.c_str(), info.simd_target.c_str(), info.threads,
                HumanBytes(static_cast<double>(info.scratch_bytes)).c_str());
    if (info.kernel == Kernel::kFlash) {
      std::printf("tiles: %lld of 64 query rows x 64 keys computed (causal, window, key-length "
                  "and block-sparse skipping applied)\n",
                  static_cast<long long>(info.tiles));
    }
    std::printf("build: %s\n", BuildInfo().c_str());
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
  cmd->add_option("--attn-weights", f.weights, "Write attention weights .npy, float32 [B,H,Nq,Nk]");
  cmd->add_option("--lse", f.lse, "Write log-sum-exp of each row .npy, float32 [B,H,Nq]");
  cmd->add_option("--linear", f.linear,
                  "Linear attention (Katharopoulos et al. 2020) with this feature map instead of "
                  "softmax: O(n) time, --causal chunked (docs/complexity.md)")
      ->check(CLI::IsMember({"elu", "relu", "identity"}));
  AddAttentionFlags(cmd, f, "Q, K, V and the output");
  return [flags] { return RunAttend(*flags); };
}

}  // namespace qkv::cli
