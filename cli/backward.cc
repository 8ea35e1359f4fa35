// qkv backward: gradients of attention (dq, dk, dv and an additive mask's
// dmask) on .npy files or random inputs. Flags, masks and the error contract
// are `qkv attend`'s: every bad input is one line on stderr naming the flag or
// file, exit status 2, and no output file (OutputSet writes all or nothing).
//
// Memory: the inputs as read, the outputs, and the library's scratch (which
// holds the recomputed forward out and lse when --out / --lse are absent);
// no other copy is made, so --shape 1,1,131072,64 holds 7 x 32 MiB of
// tensors plus 32.5 MiB of recomputed out and lse.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "attention_flags.h"
#include "commands.h"
#include "common.h"
#include "qkv/attention.h"
#include "qkv/attention_backward.h"
#include "qkv/error.h"
#include "qkv/version.h"
#include "qkv/npy.h"

namespace qkv::cli {
namespace {

struct BackwardFlags : AttentionFlags {
  std::string q, k, v, dout, out, lse;  // inputs
  std::string dq, dk, dv, dmask, dsink;  // outputs
};

// Throws unless `in` (read from `path` by `flag`) has the [b, h, s, d]
// shape `want`; the message gives the file's own order.
void CheckRowsShape(const Input& in, const std::string& path, const char* flag,
                    const Shape4& want, bool bshd) {
  if (in.view.shape == want) return;
  const std::vector<int64_t> file =
      bshd ? std::vector<int64_t>{want[0], want[2], want[1], want[3]}
           : std::vector<int64_t>{want[0], want[1], want[2], want[3]};
  throw Error(std::string(flag) + ": " + path + " has shape " + NpyShapeString(in.array.shape) +
              " (expected " + NpyShapeString(file) + " = " +
              (bshd ? "[batch, seq_q, heads, head_dim_v]" : "[batch, heads, seq_q, head_dim_v]") +
              " from --q and --v)");
}

// An output tensor: its bytes, the view the library writes and the shape
// of the .npy file (in the file's layout).
struct Output {
  std::vector<unsigned char> bytes;
  MutableTensorView view;
  std::vector<int64_t> file_shape;
};

// Allocates a gradient of `like`'s shape, dtype and layout.
Output GradientLike(const TensorView& like, bool bshd) {
  const Shape4& s = like.shape;
  Output g;
  g.bytes.resize(static_cast<size_t>(like.numel()) * DTypeSize(like.dtype));
  g.view = bshd ? MutableTensorView::FromBSHD(g.bytes.data(), like.dtype, s[0], s[2], s[1], s[3])
                : MutableTensorView::Contiguous(g.bytes.data(), like.dtype, s);
  g.file_shape = bshd ? std::vector<int64_t>{s[0], s[2], s[1], s[3]}
                      : std::vector<int64_t>{s[0], s[1], s[2], s[3]};
  return g;
}

int RunBackward(const BackwardFlags& f) {
  const bool bshd = f.layout == "bshd";
  const bool random = !f.shape.empty();
  const bool any_file = !f.q.empty() || !f.k.empty() || !f.v.empty() || !f.dout.empty() ||
                        !f.out.empty() || !f.lse.empty();
  if (random && any_file) {
    throw Error("--shape and --q/--k/--v/--dout/--out/--lse are exclusive "
                "(expected random inputs or files)");
  }
  if (!random && (f.q.empty() || f.k.empty() || f.v.empty() || f.dout.empty())) {
    throw Error("--q, --k, --v and --dout are required "
                "(expected four .npy files, or --shape B,H,N,D)");
  }
  if (!random && (f.dq.empty() || f.dk.empty() || f.dv.empty())) {
    throw Error("--dq, --dk and --dv are required with --q/--k/--v/--dout "
                "(expected three output .npy paths)");
  }
  if (random && bshd) throw Error("--layout applies to files (expected no --layout with --shape)");
  if (!f.dmask.empty() && f.mask.empty()) {
    throw Error("--dmask: no --mask given (expected --mask M.npy with an additive float mask)");
  }
  if (!f.dmask.empty() && f.kernel == "flash") {
    throw Error("--kernel flash: does not compute --dmask "
                "(expected --kernel auto or reference with --dmask)");
  }

  CheckThreadsFlag(f.threads);
  CheckOutputPaths({{"--q", f.q}, {"--k", f.k}, {"--v", f.v}, {"--dout", f.dout}, {"--out", f.out},
                    {"--lse", f.lse}, {"--mask", f.mask}, {"--key-lengths", f.key_lengths},
                    {"--sink-logits", f.sink_logits}, {"--block-mask", f.block_mask}},
                   {{"--dq", f.dq}, {"--dk", f.dk}, {"--dv", f.dv}, {"--dmask", f.dmask},
                    {"--dsink-logits", f.dsink}});
  if (!f.dsink.empty() && f.sink_logits.empty()) {
    throw Error("--dsink-logits: no --sink-logits given (expected --sink-logits S.npy to differentiate)");
  }

  Input q, k, v, dout, out, lse;
  if (random) {
    const RandomShapes s = ParseRandomShapes(f);
    // q, dout, dq and the recomputed out (+ lse); k, v, dk, dv; float32.
    const double rows = 1.0 * s.q[0] * s.q[1] * s.q[2];
    const double kv_elems = 1.0 * s.kv[0] * s.kv[1] * s.kv[2] * s.kv[3];
    CheckFitsInMemory(RandomShapeFlags(f), 4.0 * (rows * (4.0 * s.q[3] + 1.0) + 4.0 * kv_elems));
    CheckRandomShapeDims(f);
    std::mt19937_64 rng(f.seed);
    q = RandomInput(s.q, rng);
    k = RandomInput(s.kv, rng);
    v = RandomInput(s.kv, rng);
    dout = RandomInput(s.q, rng);
  } else {
    q = LoadTensor(f.q, "--q", bshd);
    k = LoadTensor(f.k, "--k", bshd);
    v = LoadTensor(f.v, "--v", bshd);
    dout = LoadTensor(f.dout, "--dout", bshd);
  }
  const int64_t batch = q.view.shape[0], heads = q.view.shape[1], seq_q = q.view.shape[2];
  const int64_t seq_kv = k.view.shape[2], head_dim_v = v.view.shape[3];
  const Shape4 rows_v{batch, heads, seq_q, head_dim_v};
  CheckRowsShape(dout, f.dout, "--dout", rows_v, bshd);
  if (!f.out.empty()) {
    out = LoadTensor(f.out, "--out", bshd);
    CheckRowsShape(out, f.out, "--out", rows_v, bshd);
  }
  if (!f.lse.empty()) {
    // As `qkv attend --lse` writes it: [B, H, Nq] float32 in either layout.
    try {
      lse.array = ReadNpy(f.lse);
    } catch (const Error& e) {
      throw Error(std::string("--lse: ") + e.what());
    }
    const std::vector<int64_t>& s = lse.array.shape;
    const bool shape_ok = (s.size() == 3 || (s.size() == 4 && s[3] == 1)) && s[0] == batch &&
                          s[1] == heads && s[2] == seq_q;
    if (!shape_ok || (lse.array.dtype != DType::kFloat32 && lse.array.dtype != DType::kFloat64)) {
      throw Error("--lse: " + f.lse + " is " + DTypeName(lse.array.dtype) + " " +
                  NpyShapeString(s) + " (expected float32 " +
                  NpyShapeString(std::vector<int64_t>{batch, heads, seq_q}) +
                  " = [batch, heads, seq_q] as qkv attend --lse writes, or [..., 1])");
    }
    lse.view = TensorView::Contiguous(lse.array.bytes.data(), lse.array.dtype,
                                      {batch, heads, seq_q, 1});
  }

  AttentionBackwardParams p;
  p.q = q.view;
  p.k = k.view;
  p.v = v.view;
  p.dout = dout.view;
  if (!f.out.empty()) p.out = out.view;
  if (!f.lse.empty()) p.lse = lse.view;
  p.scale = f.scale;
  p.num_threads = f.threads;
  p.kernel = KernelFromName(f.kernel);
  p.accumulate = f.accumulate == "f64" ? Accumulate::kFloat64 : Accumulate::kFloat32;
  MaskInputs mask_inputs;
  ResolveMask(f, {batch, heads, seq_q, seq_kv}, &mask_inputs, &p.mask);
  const NpyArray& mask_array = mask_inputs.mask;
  if (!f.dmask.empty() && mask_array.dtype == DType::kBool) {
    throw Error("--dmask: --mask " + f.mask + " is bool (expected an additive float32/"
                "float16/float64 mask to differentiate)");
  }

  // Outputs: dq, dk, dv in their input's dtype and layout; dmask float32 in
  // the mask file's own shape (its broadcast dims summed).
  auto bytes = [](const TensorView& t) { return 1.0 * t.numel() * DTypeSize(t.dtype); };
  const double grad_bytes = bytes(q.view) + bytes(k.view) + bytes(v.view) +
                            (f.dmask.empty() ? 0.0 : 4.0 * static_cast<double>(mask_array.numel()));
  if (!random) CheckFitsInMemory("the output", grad_bytes);
  Output dq = GradientLike(q.view, bshd), dk = GradientLike(k.view, bshd),
         dv = GradientLike(v.view, bshd), dmask;
  p.dq = dq.view;
  p.dk = dk.view;
  p.dv = dv.view;
  if (!f.dmask.empty()) {
    dmask.bytes.resize(static_cast<size_t>(mask_array.numel()) * 4);
    // The mask's own shape (1 on its broadcast dims): dmask sums over them.
    Shape4 own = p.mask.mask.shape;
    for (int d = 0; d < 4; ++d) {
      if (p.mask.mask.strides[d] == 0) own[d] = 1;
    }
    dmask.view = MutableTensorView::Contiguous(dmask.bytes.data(), DType::kFloat32, own);
    dmask.file_shape = mask_array.shape;
    p.dmask = dmask.view;
  }

  std::vector<float> dsink(f.dsink.empty() ? 0 : mask_inputs.sink_logits.size());
  p.dsink_logits = dsink;
  const auto start = std::chrono::steady_clock::now();
  const AttentionInfo info =
      WithElapsedProgress("qkv backward", [&] { return AttentionBackward(p); });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  OutputSet outputs;
  if (!f.dq.empty()) outputs.Add(f.dq, q.view.dtype, dq.file_shape, dq.bytes.data());
  if (!f.dk.empty()) outputs.Add(f.dk, k.view.dtype, dk.file_shape, dk.bytes.data());
  if (!f.dv.empty()) outputs.Add(f.dv, v.view.dtype, dv.file_shape, dv.bytes.data());
  if (!f.dmask.empty()) {
    outputs.Add(f.dmask, DType::kFloat32, dmask.file_shape, dmask.bytes.data());
  }
  if (!f.dsink.empty()) {
    outputs.Add(f.dsink, DType::kFloat32, {static_cast<int64_t>(dsink.size())}, dsink.data());
  }
  outputs.Commit();

  if (f.verbose) {
    std::printf("kernel: %s (%s); %s; threads %d; scratch %s\n", KernelName(info.kernel),
                info.reason.c_str(), info.simd_target.c_str(), info.threads,
                HumanBytes(static_cast<double>(info.scratch_bytes)).c_str());
    std::printf("build: %s\n", BuildInfo().c_str());
  }
  if (random) {
    const double flops =
        BackwardFlops(p.mask, batch, heads, seq_q, seq_kv, q.view.shape[3], head_dim_v);
    std::printf("q, dout [%lld,%lld,%lld,%lld]  k, v [%lld,%lld,%lld,%lld]  "
                "(random N(0,1), seed %llu)\n",
                (long long)batch, (long long)heads, (long long)seq_q, (long long)q.view.shape[3],
                (long long)batch, (long long)k.view.shape[1], (long long)seq_kv,
                (long long)head_dim_v, (unsigned long long)f.seed);
    // The time includes the forward the library recomputes (no --out/--lse
    // here); `qkv bench --backward` times the backward alone.
    std::printf("backward: kernel %s, %d threads: %.4f s incl. the recomputed forward, "
                "%.2f GFLOP/s (%.3g flops = 2.5 x the forward's 4*D per allowed pair), "
                "peak memory %s\n",
                KernelName(info.kernel), info.threads, seconds, flops / seconds * 1e-9, flops,
                HumanBytes(static_cast<double>(PeakRssBytes())).c_str());
    // Root mean square of each gradient (random inputs are float32): how much
    // gradient reaches q, k and v (docs/backward.md uses it for the 1/sqrt(d)
    // argument).
    auto rms = [](const Output& g) {
      const float* x = reinterpret_cast<const float*>(g.bytes.data());
      const size_t n = g.bytes.size() / sizeof(float);
      double sum = 0.0;
      for (size_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
      return n ? std::sqrt(sum / static_cast<double>(n)) : 0.0;
    };
    std::printf("rms: dq %.4g  dk %.4g  dv %.4g\n", rms(dq), rms(dk), rms(dv));
  }
  return 0;
}

}  // namespace

Runner AddBackwardCommand(CLI::App& app) {
  auto flags = std::make_shared<BackwardFlags>();
  BackwardFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "backward", "Attention gradients: dq, dk, dv (and dmask) from dout = dL/dout");
  cmd->add_option("--q", f.q, "Queries .npy, [B,H,Nq,Dk] (bhsd) or [B,Nq,H,Dk] (bshd)");
  cmd->add_option("--k", f.k, "Keys .npy, [B,Hkv,Nk,Dk] or [B,Nk,Hkv,Dk]; Hkv divides H (GQA/MQA)");
  cmd->add_option("--v", f.v, "Values .npy, [B,Hkv,Nk,Dv] or [B,Nk,Hkv,Dv]");
  cmd->add_option("--dout", f.dout, "Gradient of the output .npy, [B,H,Nq,Dv] or [B,Nq,H,Dv]");
  cmd->add_option("--dq", f.dq, "Write dL/dq .npy in Q's layout and dtype");
  cmd->add_option("--dk", f.dk, "Write dL/dk .npy in K's layout and dtype (summed over the group)");
  cmd->add_option("--dv", f.dv, "Write dL/dv .npy in V's layout and dtype (summed over the group)");
  cmd->add_option("--out", f.out,
                  "The forward's output .npy (qkv attend --out); recomputed when absent");
  cmd->add_option("--lse", f.lse,
                  "The forward's log-sum-exp .npy, float32 [B,H,Nq] (qkv attend --lse) or "
                  "[B,H,Nq,1]; recomputed when absent");
  cmd->add_option("--dmask", f.dmask,
                  "Write the gradient of the float --mask .npy, float32 in the mask's own shape "
                  "(summed over its broadcast dims; reference kernel)");
  cmd->add_option("--dsink-logits", f.dsink,
                  "Write the gradient of --sink-logits .npy, float32 [H]");
  AddAttentionFlags(cmd, f, "Q, K, V, out, dout and the gradients");
  return [flags] { return RunBackward(*flags); };
}

}  // namespace qkv::cli
