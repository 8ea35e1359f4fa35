// qkv bench: times qkv::Attention on random inputs. Only useful for
// performance measurement: correctness is the tests' job.
//
// flops = 2 * (head_dim + head_dim_v) * num_q_heads * allowed pairs, i.e.
// 4 * B * H * Nq * Nk * D without masks (2 D for Q.K^T, 2 D for P.V), and
// only the pairs that causal / window rules allow when they are on.
// --backward times qkv::AttentionBackward alone (out and lse come from one
// forward before timing) and counts qkv::BackwardFlops, 2.5 times the
// forward's flops as FlashAttention's benchmarks do (Q.K^T and dout.V^T
// recomputed, dV, dQ and dK: 5 matmuls against the forward's 2).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "common.h"
#include "qkv/attention.h"
#include "qkv/attention_backward.h"
#include "qkv/error.h"
#include "qkv/sparse.h"

namespace qkv::cli {
namespace {

struct BenchFlags {
  std::string shape;
  int64_t kv_heads = 0;
  int64_t seq_kv = -1;
  bool causal = false;
  std::string sparse;  // block-sparse layout spec (qkv/sparse.h)
  double softcap = 0.0;
  int threads = 0;
  std::string kernel = "auto";
  std::string dtype = "f32";
  int repeat = 5;
  bool json = false;
  bool backward = false;  // time the backward pass instead of the forward
  // --decode: one decode step over a filled cache instead of a prefill.
  bool decode = false;
  int64_t cache_len = 0;
  int64_t heads = 32, head_dim = 128;
  std::string cache_dtype = "f32";
  // The prefill-only options, refused with --decode (which would ignore them).
  std::vector<const CLI::Option*> prefill_only;
  const CLI::Option* kv_heads_option = nullptr;
};

int RunBench(const BenchFlags& f) {
  if (f.backward && f.decode) {
    throw Error("--backward times the prefill backward (expected --shape without --decode)");
  }
  CheckThreadsFlag(f.threads);
  if (f.repeat < 1 || f.repeat > 10000) {
    throw Error("--repeat: " + std::to_string(f.repeat) + " (expected 1 to 10000)");
  }
  if (f.decode) {
    if (!f.shape.empty()) throw Error("--shape is for prefill (expected --cache-len with --decode)");
    for (const CLI::Option* option : f.prefill_only) {
      if (option->count() > 0) {
        throw Error(option->get_name() + ": does not apply to --decode (expected it only with " +
                    "--shape; --decode takes --cache-len, --heads, --kv-heads, --head-dim, " +
                    "--cache-dtype, --threads, --repeat and --json)");
      }
    }
    CheckDimFlag("--cache-len", f.cache_len, 1);
    const bool kv_given = f.kv_heads_option != nullptr && f.kv_heads_option->count() > 0;
    if (kv_given) CheckDimFlag("--kv-heads", f.kv_heads, 1);
    DecodeBenchArgs a;
    a.cache_len = f.cache_len;
    a.heads = f.heads;
    a.kv_heads = kv_given ? f.kv_heads : 8;
    a.head_dim = f.head_dim;
    a.cache_dtype = f.cache_dtype;
    a.threads = f.threads;
    a.repeat = f.repeat;
    a.json = f.json;
    return RunDecodeBenchmark(a);
  }
  if (f.shape.empty()) throw Error("--shape is required (expected B,H,N,D, or --decode)");
  const std::vector<int64_t> s = ParseIntList(f.shape, 4, "--shape", false);
  if (f.kv_heads < 0) CheckDimFlag("--kv-heads", f.kv_heads, 1);
  if (f.seq_kv < -1) CheckDimFlag("--seq-kv", f.seq_kv, 0);
  const int64_t batch = s[0], heads = s[1], seq_q = s[2], dim = s[3];
  const int64_t kv_heads = f.kv_heads > 0 ? f.kv_heads : heads;
  const int64_t seq_kv = f.seq_kv >= 0 ? f.seq_kv : seq_q;
  const DType dtype = f.dtype == "f16" ? DType::kFloat16 : DType::kFloat32;
  const double q_elems = 1.0 * batch * heads * seq_q * dim;
  const double kv_elems = 1.0 * batch * kv_heads * seq_kv * dim;
  // Forward: q, out; k, v. Backward adds dout, dq; dk, dv; lse (float32).
  const double copies = f.backward ? 4 : 2;
  std::string flags = "--shape " + f.shape;
  if (f.kv_heads != 0) flags += " --kv-heads " + std::to_string(f.kv_heads);
  if (f.seq_kv != -1) flags += " --seq-kv " + std::to_string(f.seq_kv);
  CheckFitsInMemory(flags, copies * (q_elems + kv_elems) * DTypeSize(dtype) +
                                              (f.backward ? 4.0 * batch * heads * seq_q : 0.0));

  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](double n) {
    std::vector<unsigned char> bytes(static_cast<size_t>(n) * DTypeSize(dtype));
    for (size_t i = 0; i < static_cast<size_t>(n); ++i) {
      const float x = normal(rng);
      if (dtype == DType::kFloat16) {
        reinterpret_cast<uint16_t*>(bytes.data())[i] = FloatToHalf(x);
      } else {
        reinterpret_cast<float*>(bytes.data())[i] = x;
      }
    }
    return bytes;
  };
  std::vector<unsigned char> q = fill(q_elems), k = fill(kv_elems), v = fill(kv_elems),
                             out(static_cast<size_t>(q_elems) * DTypeSize(dtype));
  AttentionParams p;
  p.q = TensorView::Contiguous(q.data(), dtype, {batch, heads, seq_q, dim});
  p.k = TensorView::Contiguous(k.data(), dtype, {batch, kv_heads, seq_kv, dim});
  p.v = TensorView::Contiguous(v.data(), dtype, {batch, kv_heads, seq_kv, dim});
  p.out = MutableTensorView::Contiguous(out.data(), dtype, {batch, heads, seq_q, dim});
  p.mask.causal = f.causal;
  if (!(f.softcap >= 0.0) || !std::isfinite(f.softcap)) {
    throw Error("--softcap: " + std::to_string(f.softcap) + " (expected a finite cap > 0, or 0 for none)");
  }
  p.mask.softcap = f.softcap;
  BlockLayout layout;
  if (!f.sparse.empty()) {
    layout = ParseSparseLayout(f.sparse, seq_q, seq_kv, "sparse");
    p.mask.block_mask = layout.View();
  }
  p.kernel = KernelFromName(f.kernel);
  p.num_threads = f.threads;

  // --backward: the forward runs once, untimed, for out and lse.
  std::vector<float> lse(f.backward ? static_cast<size_t>(batch * heads * seq_q) : 0);
  std::vector<unsigned char> dout, dq, dk, dv;
  AttentionBackwardParams bp;
  if (f.backward) {
    p.lse = MutableTensorView::Contiguous(lse.data(), DType::kFloat32, {batch, heads, seq_q, 1});
    Attention(p);
    dout = fill(q_elems);
    dq.resize(q.size());
    dk.resize(k.size());
    dv.resize(v.size());
    bp.q = p.q, bp.k = p.k, bp.v = p.v, bp.mask = p.mask, bp.kernel = p.kernel;
    bp.num_threads = p.num_threads;
    bp.out = TensorView::Contiguous(out.data(), dtype, {batch, heads, seq_q, dim});
    bp.lse = TensorView::Contiguous(lse.data(), DType::kFloat32, {batch, heads, seq_q, 1});
    bp.dout = TensorView::Contiguous(dout.data(), dtype, {batch, heads, seq_q, dim});
    bp.dq = MutableTensorView::Contiguous(dq.data(), dtype, {batch, heads, seq_q, dim});
    bp.dk = MutableTensorView::Contiguous(dk.data(), dtype, {batch, kv_heads, seq_kv, dim});
    bp.dv = MutableTensorView::Contiguous(dv.data(), dtype, {batch, kv_heads, seq_kv, dim});
  }
  auto run = [&] { return f.backward ? AttentionBackward(bp) : Attention(p); };
  AttentionInfo info = run();  // warm-up: page faults, thread pool start
  std::vector<double> times;
  Progress progress("qkv bench", "timed runs", f.repeat);
  for (int r = 0; r < f.repeat; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    info = run();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    progress.Done(r + 1);
  }
  const double median = Median(times);
  std::sort(times.begin(), times.end());  // for min_s / max_s below
  const double flops =
      f.backward ? BackwardFlops(p.mask, batch, heads, seq_q, seq_kv, dim, dim)
                 : 2.0 * (dim + dim) * heads * CountAllowedPairs(p.mask, batch, seq_q, seq_kv);
  nlohmann::json j = {
      {"batch", batch}, {"num_q_heads", heads}, {"num_kv_heads", kv_heads},
      {"seq_q", seq_q}, {"seq_kv", seq_kv}, {"head_dim", dim}, {"causal", f.causal},
      {"dtype", f.dtype}, {"backward", f.backward}, {"repeat", f.repeat}, {"median_s", median},
      {"min_s", times.front()}, {"max_s", times.back()}, {"flops", flops},
      {"gflops", flops / median * 1e-9},
      {"peak_rss_bytes", PeakRssBytes()}, {"kernel", KernelName(info.kernel)},
      {"kernel_reason", info.reason}, {"threads", info.threads},
      {"simd_target", info.simd_target}, {"scratch_bytes", info.scratch_bytes},
      {"sparse", f.sparse}, {"softcap", f.softcap}, {"tiles", info.tiles},
      {"tiles_present", f.sparse.empty() ? nlohmann::json(nullptr) : nlohmann::json(layout.Count())}};
  if (f.json) {
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s%s (%s), %d threads, %s: median %.4f s (min %.4f, max %.4f) over %d runs, "
                "%.2f GFLOP/s, peak memory %s\n",
                f.backward ? "backward: " : "", KernelName(info.kernel), info.reason.c_str(),
                info.threads, info.simd_target.c_str(), median, times.front(), times.back(),
                f.repeat, flops / median * 1e-9,
                HumanBytes(static_cast<double>(PeakRssBytes())).c_str());
  }
  return 0;
}

}  // namespace

Runner AddBenchCommand(CLI::App& app) {
  auto flags = std::make_shared<BenchFlags>();
  BenchFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand("bench", "Time attention on random inputs (GFLOP/s, memory)");
  cmd->add_option("--shape", f.shape, "Prefill B,H,N,D: batch, query heads, sequence, head dim");
  f.kv_heads_option =
      cmd->add_option("--kv-heads", f.kv_heads, "KV heads (default H; fewer = GQA/MQA; --decode: 8)");
  f.prefill_only.push_back(cmd->add_option("--seq-kv", f.seq_kv, "Key count Nk (default N)"));
  f.prefill_only.push_back(
      cmd->add_flag("--causal", f.causal, "Causal (bottom-right); flops count allowed pairs only"));
  f.prefill_only.push_back(cmd->add_option(
      "--sparse", f.sparse,
      "Block-sparse layout of 64 x 64 tiles, only those computed (as qkv attend --sparse); "
      "flops count the pairs of the tiles present"));
  f.prefill_only.push_back(cmd->add_option(
      "--softcap", f.softcap,
      "Logit soft-capping C (Gemma 2): s = C tanh(scale q.k / C) before the mask; 0 = none"));
  cmd->add_option("--threads", f.threads, "Threads (0 = all cores)")->capture_default_str();
  f.prefill_only.push_back(cmd->add_option("--kernel", f.kernel, "Kernel")
                               ->check(CLI::IsMember(KernelNames()))
                               ->capture_default_str());
  f.prefill_only.push_back(cmd->add_option("--dtype", f.dtype, "Input and output dtype")
                               ->check(CLI::IsMember({"f32", "f16"}))
                               ->capture_default_str());
  cmd->add_option("--repeat", f.repeat, "Timed runs after one warm-up")->capture_default_str();
  cmd->add_flag("--json", f.json,
                "Print one JSON object: median_s, min_s, max_s, flops, gflops, peak_rss_bytes, "
                "kernel, threads, simd_target, ...");
  cmd->add_flag("--backward", f.backward,
                "Time the backward pass (dq, dk, dv; out and lse from one untimed forward); "
                "flops count it as 2.5 x the forward's 4*Nq*Nk*D (halved for causal), as "
                "FlashAttention does");
  auto* decode = cmd->add_flag("--decode", f.decode,
                               "Time one decode step (1 query per head) over a filled KV cache; "
                               "JSON: median_s per token, bytes_per_token, gbps");
  cmd->add_option("--cache-len", f.cache_len, "--decode: cached tokens")->needs(decode);
  cmd->add_option("--heads", f.heads, "--decode: query heads")->needs(decode)->capture_default_str();
  cmd->add_option("--head-dim", f.head_dim, "--decode: head dim")->needs(decode)->capture_default_str();
  cmd->add_option("--cache-dtype", f.cache_dtype, "--decode: cache storage dtype")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "i8"}))
      ->needs(decode)
      ->capture_default_str();
  return [flags] { return RunBench(*flags); };
}

}  // namespace qkv::cli
