// The attention backward API: validates every argument once, recomputes the
// forward when out or lse is absent, then dispatches to a kernel that
// assumes valid input (as attention.cc does for the forward).
#include "qkv/attention_backward.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/flash_attention.h"
#include "kernels/flash_backward.h"
#include "qkv/error.h"
#include "reference/reference_attention.h"
#include "reference/reference_backward.h"
#include "reference/reference_util.h"
#include "validate.h"

namespace qkv {
namespace {

using internal::CheckShape;
using internal::CheckTensor;
using internal::IsFloat;
using internal::Problem;
using internal::S;

Problem Validate(const AttentionBackwardParams& p) {
  const Problem pr = internal::ValidateInputs(p.q, p.k, p.v, p.mask, p.scale, p.num_threads);
  const Shape4 rows_v{pr.batch, pr.num_q_heads, pr.seq_q, pr.head_dim_v};
  const char* rows_v_names = "[batch, num_q_heads, seq_q, head_dim_v]";
  CheckTensor("dout", p.dout.shape, p.dout.strides, p.dout.present(), p.dout.dtype, false);
  CheckShape("dout", p.dout.shape, rows_v, rows_v_names);
  if (p.out.present()) {
    CheckTensor("out", p.out.shape, p.out.strides, true, p.out.dtype, false);
    CheckShape("out", p.out.shape, rows_v, rows_v_names);
  }
  if (p.lse.present()) {
    CheckTensor("lse", p.lse.shape, p.lse.strides, true, p.lse.dtype, false);
    CheckShape("lse", p.lse.shape, {pr.batch, pr.num_q_heads, pr.seq_q, 1},
               "[batch, num_q_heads, seq_q, 1]");
  }
  CheckTensor("dq", p.dq.shape, p.dq.strides, p.dq.present(), p.dq.dtype, true);
  CheckShape("dq", p.dq.shape, p.q.shape, "q's shape [batch, num_q_heads, seq_q, head_dim]");
  CheckTensor("dk", p.dk.shape, p.dk.strides, p.dk.present(), p.dk.dtype, true);
  CheckShape("dk", p.dk.shape, p.k.shape, "k's shape [batch, num_kv_heads, seq_kv, head_dim]");
  CheckTensor("dv", p.dv.shape, p.dv.strides, p.dv.present(), p.dv.dtype, true);
  CheckShape("dv", p.dv.shape, p.v.shape, "v's shape [batch, num_kv_heads, seq_kv, head_dim_v]");
  if (p.dmask.present()) {
    if (!p.mask.mask.present() || !IsFloat(p.mask.mask.dtype)) {
      throw Error(std::string("dmask: ") +
                  (p.mask.mask.present() ? "the mask is boolean" : "no mask given") +
                  " (expected an additive float32/float16/float64 mask to differentiate)");
    }
    CheckTensor("dmask", p.dmask.shape, p.dmask.strides, true, p.dmask.dtype, true);
    CheckShape("dmask", p.dmask.shape, internal::MaskOwnShape(p.mask.mask),
               "the mask's own shape, 1 on each broadcast (stride 0) dim");
  }
  if (!p.dsink_logits.empty()) {
    if (p.mask.sink_logits.empty()) {
      throw Error("dsink_logits: no sink_logits given (expected mask.sink_logits to differentiate)");
    }
    if (static_cast<int64_t>(p.dsink_logits.size()) != pr.num_q_heads) {
      throw Error("dsink_logits: " + S(static_cast<int64_t>(p.dsink_logits.size())) +
                  " values (expected one per query head, num_q_heads = " + S(pr.num_q_heads) + ")");
    }
  }
  return pr;
}

// dsink[h] = -sum_{b,i} exp(sink[h] - lse) (dout . out), in double, rows in
// order (no dependence on threads).
void SinkGradient(const AttentionBackwardParams& p, const Problem& pr) {
  for (int64_t h = 0; h < pr.num_q_heads; ++h) {
    const double sink = p.mask.sink_logits[static_cast<size_t>(h)];
    double sum = 0.0;
    if (sink != -std::numeric_limits<double>::infinity()) {
      for (int64_t b = 0; b < pr.batch; ++b)
        for (int64_t i = 0; i < pr.seq_q; ++i) {
          const double lse = internal::LoadAs<double>(p.lse.data, p.lse.dtype, p.lse.Offset(b, h, i, 0));
          double d = 0.0;
          for (int64_t n = 0; n < pr.head_dim_v; ++n) {
            d += internal::LoadAs<double>(p.dout.data, p.dout.dtype, p.dout.Offset(b, h, i, n)) *
                 internal::LoadAs<double>(p.out.data, p.out.dtype, p.out.Offset(b, h, i, n));
          }
          sum += std::exp(sink - lse) * d;
        }
    }
    p.dsink_logits[static_cast<size_t>(h)] = static_cast<float>(-sum);
  }
}

// Picks the kernel and says why; float64 accumulation and dmask exist only in
// the reference backward, and asking the flash kernel for them is an error.
AttentionInfo Choose(const AttentionBackwardParams& p) {
  AttentionInfo info;
  const bool f64 = p.accumulate == Accumulate::kFloat64;
  const bool dmask = p.dmask.present();
  if (p.kernel == Kernel::kFlash && (f64 || dmask)) {
    throw Error(std::string("kernel flash: ") +
                (dmask ? "does not compute dmask" : "accumulates in float32 only") +
                " (expected kernel auto or reference for " +
                (dmask ? "dmask)" : "float64 accumulation)"));
  }
  if (p.kernel == Kernel::kReference) {
    info.kernel = Kernel::kReference;
    info.reason = "reference: requested";
  } else if (p.kernel == Kernel::kAuto && dmask) {
    info.kernel = Kernel::kReference;
    info.reason =
        "reference: dmask requested (the flash backward never forms dS outside its tiles)";
  } else if (p.kernel == Kernel::kAuto && f64) {
    info.kernel = Kernel::kReference;
    info.reason = "reference: float64 accumulation requested";
  } else {
    info.kernel = Kernel::kFlash;
    info.reason = p.kernel == Kernel::kFlash
                      ? "flash: requested"
                      : "flash: tiled recomputation, scratch independent of sequence length";
  }
  return info;
}

}  // namespace

double BackwardFlops(const MaskSpec& mask, int64_t batch, int64_t num_q_heads, int64_t seq_q,
                     int64_t seq_kv, int64_t head_dim, int64_t head_dim_v) {
  const double pairs = static_cast<double>(CountAllowedPairs(mask, batch, seq_q, seq_kv));
  return 2.5 * 2.0 * static_cast<double>(head_dim + head_dim_v) *
         static_cast<double>(num_q_heads) * pairs;
}

AttentionInfo AttentionBackward(const AttentionBackwardParams& params) {
  const Problem problem = Validate(params);
  AttentionInfo info = Choose(params);
  info.threads = problem.threads;
  const bool f64 = params.accumulate == Accumulate::kFloat64;
  const bool recompute = !params.out.present() || !params.lse.present();
  // The forward's out and lse in the accumulation type, when recomputed.
  const DType fwd_dtype = f64 ? DType::kFloat64 : DType::kFloat32;
  const double rows = static_cast<double>(problem.batch) * problem.num_q_heads * problem.seq_q;
  const double recompute_bytes =
      recompute ? rows * (problem.head_dim_v + 1) * static_cast<double>(DTypeSize(fwd_dtype)) : 0;
  if (info.kernel == Kernel::kFlash) {
    info.simd_target = internal::FlashSimdTarget();
    info.scratch_bytes = internal::FlashBackwardScratchBytes(problem, params);
  } else {
    info.simd_target = "baseline";
    info.scratch_bytes = internal::ReferenceBackwardScratchBytes(problem, params);
  }
  info.scratch_bytes += static_cast<int64_t>(std::min(recompute_bytes, 9.0e18));
  if (recompute) {
    info.reason += std::string("; forward recomputed (") +
                   (params.out.present() ? "lse" : params.lse.present() ? "out" : "out and lse") +
                   " not given)";
  }
  internal::CheckScratch(info);
  // Nothing to write: return before looping over dims that may be huge.
  if (params.dq.numel() == 0 && params.dk.numel() == 0 && params.dv.numel() == 0 &&
      (!params.dmask.present() || params.dmask.numel() == 0) && params.dsink_logits.empty()) {
    return info;
  }

  AttentionBackwardParams p = params;
  std::vector<unsigned char> out_buf, lse_buf;
  if (recompute) {
    const size_t esize = DTypeSize(fwd_dtype);
    out_buf.resize(static_cast<size_t>(rows) * problem.head_dim_v * esize);
    lse_buf.resize(static_cast<size_t>(rows) * esize);
    AttentionParams fwd;
    fwd.q = p.q, fwd.k = p.k, fwd.v = p.v, fwd.mask = p.mask, fwd.scale = problem.scale;
    fwd.accumulate = p.accumulate;
    fwd.num_threads = problem.threads;
    fwd.out = MutableTensorView::Contiguous(
        out_buf.data(), fwd_dtype,
        {problem.batch, problem.num_q_heads, problem.seq_q, problem.head_dim_v});
    fwd.lse = MutableTensorView::Contiguous(
        lse_buf.data(), fwd_dtype, {problem.batch, problem.num_q_heads, problem.seq_q, 1});
    if (info.kernel == Kernel::kFlash) {
      internal::FlashAttention(fwd, problem);
    } else {
      internal::ReferenceAttention(fwd, problem);
    }
    // A given out or lse is used as given; only the missing one is replaced.
    if (!p.out.present()) p.out = TensorView{fwd.out.data, fwd.out.dtype, fwd.out.shape, fwd.out.strides};
    if (!p.lse.present()) p.lse = TensorView{fwd.lse.data, fwd.lse.dtype, fwd.lse.shape, fwd.lse.strides};
  }
  if (info.kernel == Kernel::kFlash) {
    internal::FlashBackward(p, problem);
  } else {
    internal::ReferenceBackward(p, problem);
  }
  if (!p.dsink_logits.empty()) SinkGradient(p, problem);
  return info;
}

}  // namespace qkv
