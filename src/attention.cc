// The attention API: validates every argument once, then dispatches to a
// kernel that assumes valid input (flash-attention's flash_api.cpp split).
#include "qkv/attention.h"

#include <omp.h>
#include <unistd.h>

#include <cmath>
#include <limits>
#include <string>

#include "qkv/error.h"
#include "kernels/flash_attention.h"
#include "mask_rules.h"
#include "reference/reference_attention.h"
#include "reference/reference_util.h"
#include "validate.h"

namespace qkv {
namespace {

using internal::CheckShape;
using internal::CheckTensor;
using internal::IsFloat;
using internal::Problem;
using internal::S;

using internal::CheckScratch;

}  // namespace

namespace internal {

Problem ValidateInputs(const TensorView& q, const TensorView& k, const TensorView& v,
                       const MaskSpec& mask, const std::optional<double>& scale,
                       int num_threads) {
  CheckTensor("q", q.shape, q.strides, q.present(), q.dtype, false);
  CheckTensor("k", k.shape, k.strides, k.present(), k.dtype, false);
  CheckTensor("v", v.shape, v.strides, v.present(), v.dtype, false);
  Problem pr;
  pr.batch = q.shape[0];
  pr.num_q_heads = q.shape[1];
  pr.seq_q = q.shape[2];
  pr.head_dim = q.shape[3];
  pr.num_kv_heads = k.shape[1];
  pr.seq_kv = k.shape[2];
  pr.head_dim_v = v.shape[3];
  if (k.shape[0] != pr.batch || v.shape[0] != pr.batch) {
    throw Error("k, v: batch " + S(k.shape[0]) + ", " + S(v.shape[0]) +
                " (expected q's batch " + S(pr.batch) + ")");
  }
  if (k.shape[3] != pr.head_dim) {
    throw Error("k: head_dim " + S(k.shape[3]) + " (expected q's head_dim " +
                S(pr.head_dim) + ")");
  }
  if (v.shape[1] != pr.num_kv_heads || v.shape[2] != pr.seq_kv) {
    throw Error("v: shape " + ShapeString(v.shape) + " (expected num_kv_heads " +
                S(pr.num_kv_heads) + " and seq_kv " + S(pr.seq_kv) + " as in k)");
  }
  if (pr.num_kv_heads == 0 ? pr.num_q_heads != 0 : pr.num_q_heads % pr.num_kv_heads != 0) {
    throw Error("k: num_kv_heads " + S(pr.num_kv_heads) +
                " must divide q's num_q_heads " + S(pr.num_q_heads) +
                " (expected a divisor: MHA equal, GQA a divisor, MQA 1)");
  }
  pr.group_size = pr.num_kv_heads == 0 ? 1 : pr.num_q_heads / pr.num_kv_heads;
  const MaskSpec& m = mask;
  if (m.window_left < -1 || m.window_right < -1) {
    throw Error("window: (" + S(m.window_left) + ", " + S(m.window_right) +
                ") (expected each side >= 0, or -1 for unbounded)");
  }
  if (!m.key_lengths.empty()) {
    if (static_cast<int64_t>(m.key_lengths.size()) != pr.batch) {
      throw Error("key_lengths: " + S(static_cast<int64_t>(m.key_lengths.size())) +
                  " entries (expected one per batch = " + S(pr.batch) + ")");
    }
    for (size_t b = 0; b < m.key_lengths.size(); ++b) {
      if (m.key_lengths[b] < 0 || m.key_lengths[b] > pr.seq_kv) {
        throw Error("key_lengths[" + S(static_cast<int64_t>(b)) + "]: " +
                    S(m.key_lengths[b]) + " (expected 0 <= length <= seq_kv = " +
                    S(pr.seq_kv) + ")");
      }
    }
  }
  if (m.mask.present()) {
    if (m.mask.dtype != DType::kBool && !IsFloat(m.mask.dtype)) {
      throw Error(std::string("mask: dtype ") + DTypeName(m.mask.dtype) +
                  " (expected bool, or float32/float16/float64 additive)");
    }
    const Shape4 target{pr.batch, pr.num_q_heads, pr.seq_q, pr.seq_kv};
    for (int d = 0; d < 4; ++d) {
      if (m.mask.shape[d] != target[d] && !(m.mask.shape[d] == 1 && m.mask.strides[d] == 0)) {
        throw Error("mask: shape " + ShapeString(m.mask.shape) + " does not broadcast to " +
                    ShapeString(target) + " (expected each dim equal, or 1 with stride 0)");
      }
    }
  }
  if (m.block_mask.data != nullptr) {
    const TensorView& bm = m.block_mask;
    const auto blocks = [](int64_t n) { return (n + kSparseBlock - 1) / kSparseBlock; };
    const Shape4 target{pr.batch, pr.num_q_heads, blocks(pr.seq_q), blocks(pr.seq_kv)};
    if (bm.dtype != DType::kBool) {
      throw Error(std::string("block_mask: dtype ") + DTypeName(bm.dtype) +
                  " (expected bool: nonzero = the 64 x 64 tile is present)");
    }
    for (int d = 0; d < 4; ++d) {
      const bool broadcast = bm.shape[d] == 1 && bm.strides[d] == 0 && d < 2;
      if (bm.shape[d] != target[d] && !broadcast) {
        throw Error("block_mask: shape " + ShapeString(bm.shape) + " (expected " +
                    ShapeString(target) + ": [batch|1, num_q_heads|1, ceil(seq_q / 64), " +
                    "ceil(seq_kv / 64)])");
      }
      if (bm.strides[d] < 0) {
        throw Error("block_mask: negative stride (expected a row-major or broadcast view)");
      }
    }
  }
  if (!(m.softcap >= 0.0) || !std::isfinite(m.softcap)) {
    throw Error("softcap: " + std::to_string(m.softcap) + " (expected a finite cap > 0, or 0 for none)");
  }
  if (!m.sink_logits.empty()) {
    if (static_cast<int64_t>(m.sink_logits.size()) != pr.num_q_heads) {
      throw Error("sink_logits: " + S(static_cast<int64_t>(m.sink_logits.size())) +
                  " values (expected one per query head, num_q_heads = " + S(pr.num_q_heads) + ")");
    }
    for (size_t h = 0; h < m.sink_logits.size(); ++h) {
      const float x = m.sink_logits[h];
      if (std::isnan(x) || x == std::numeric_limits<float>::infinity()) {
        throw Error("sink_logits[" + S(static_cast<int64_t>(h)) + "]: " + std::to_string(x) +
                    " (expected a finite logit, or -inf for no sink)");
      }
    }
  }
  pr.scale = scale.value_or(DefaultScale(pr.head_dim));
  if (!std::isfinite(pr.scale)) {
    throw Error("scale: " + std::to_string(pr.scale) + " (expected a finite number)");
  }
  pr.threads = internal::ResolveThreads(num_threads);
  return pr;
}

// E.g. a [64, seq_kv] score block with seq_kv = 2^40 from zero-sized head
// dims.
void CheckScratch(const AttentionInfo& info) {
  const double physical =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  if (static_cast<double>(info.scratch_bytes) > physical) {
    throw Error(std::string(KernelName(info.kernel)) + " kernel: needs " +
                std::to_string(info.scratch_bytes) + " bytes of scratch (expected at most the " +
                std::to_string(static_cast<int64_t>(physical)) + " bytes of this machine's memory)");
  }
}

}  // namespace internal

namespace {

Problem Validate(const AttentionParams& p) {
  Problem pr = internal::ValidateInputs(p.q, p.k, p.v, p.mask, p.scale, p.num_threads);
  CheckTensor("out", p.out.shape, p.out.strides, p.out.present(), p.out.dtype, true);
  CheckShape("out", p.out.shape, {pr.batch, pr.num_q_heads, pr.seq_q, pr.head_dim_v},
             "[batch, num_q_heads, seq_q, head_dim_v]");
  if (p.lse.present()) {
    CheckTensor("lse", p.lse.shape, p.lse.strides, true, p.lse.dtype, true);
    CheckShape("lse", p.lse.shape, {pr.batch, pr.num_q_heads, pr.seq_q, 1},
               "[batch, num_q_heads, seq_q, 1]");
  }
  if (p.weights.present()) {
    CheckTensor("weights", p.weights.shape, p.weights.strides, true, p.weights.dtype, true);
    CheckShape("weights", p.weights.shape, {pr.batch, pr.num_q_heads, pr.seq_q, pr.seq_kv},
               "[batch, num_q_heads, seq_q, seq_kv]");
  }
  return pr;
}

// Picks the kernel and says why. Weights and float64 accumulation exist
// only in the reference; asking the flash kernel for them is an error, never
// a silent switch.
AttentionInfo Choose(const AttentionParams& params) {
  AttentionInfo info;
  const bool weights = params.weights.present();
  const bool f64 = params.accumulate == Accumulate::kFloat64;
  if (params.kernel == Kernel::kFlash && (weights || f64)) {
    throw Error(std::string("kernel flash: ") +
                (weights ? "cannot write attention weights" : "accumulates in float32 only") +
                " (expected kernel auto or reference for " +
                (weights ? "weights)" : "float64 accumulation)"));
  }
  if (params.kernel == Kernel::kReference) {
    info.kernel = Kernel::kReference;
    info.reason = "reference: requested";
  } else if (params.kernel == Kernel::kAuto && weights) {
    info.kernel = Kernel::kReference;
    info.reason = "reference: attention weights requested (the flash kernel never forms them)";
  } else if (params.kernel == Kernel::kAuto && f64) {
    info.kernel = Kernel::kReference;
    info.reason = "reference: float64 accumulation requested";
  } else {
    info.kernel = Kernel::kFlash;
    info.reason = params.kernel == Kernel::kFlash
                      ? "flash: requested"
                      : "flash: tiled online softmax, scratch independent of sequence length";
  }
  return info;
}

// True when only lse is asked of a problem whose head dims are both 0 and
// whose explicit mask (if any) is constant along seq_kv: every allowed score is
// then scale * 0 + m with the same m across the row, so lse has a closed form.
// Then seq_kv may be 2^31 - 1 keys that cost no memory (zero-size k and v in a
// 128-byte file), and the kernels would loop over all of them for every row.
bool LseOnlyClosedForm(const AttentionParams& params, const Problem& pr) {
  if (pr.head_dim != 0 || pr.head_dim_v != 0 || params.weights.present()) return false;
  if (params.mask.block_mask.data != nullptr) return false;  // n would need the blocks
  if (!params.mask.sink_logits.empty() || params.mask.softcap > 0) return false;
  if (!params.lse.present() || params.lse.numel() == 0) return false;
  const TensorView& m = params.mask.mask;
  return !m.present() || pr.seq_kv <= 1 || m.strides[3] == 0;
}

// lse[b,h,i] = m + log(n) for the n keys the causal, window and key-length
// rules allow (the reference kernel's arithmetic on n equal scores m): -inf
// when n = 0 or m = -inf (a masked row), NaN when m is NaN or +inf (as
// exp(m - max) is). Work: one pass over the lse rows, bounded by its size.
void LseClosedForm(const AttentionParams& params, const Problem& pr) {
  const double inf = std::numeric_limits<double>::infinity();
  const TensorView& mask = params.mask.mask;
  for (int64_t b = 0; b < pr.batch; ++b) {
    const int64_t key_length =
        params.mask.key_lengths.empty() ? pr.seq_kv : params.mask.key_lengths[b];
    for (int64_t i = 0; i < pr.seq_q; ++i) {
      const internal::KeyRange r =
          internal::RowKeyRange(params.mask, pr.seq_q, pr.seq_kv, i, key_length);
      const int64_t n = r.hi - r.lo;
      for (int64_t h = 0; h < pr.num_q_heads; ++h) {
        const double m =
            mask.present() && n > 0 ? internal::MaskValue<double>(mask, b, h, i, r.lo) : 0.0;
        double lse = m + std::log(static_cast<double>(n));
        if (n == 0 || m == -inf) {
          lse = -inf;
        } else if (std::isnan(m) || m == inf) {
          lse = std::numeric_limits<double>::quiet_NaN();
        }
        internal::StoreAs<double>(params.lse.data, params.lse.dtype, params.lse.Offset(b, h, i, 0),
                                  lse);
      }
    }
  }
}

}  // namespace

double DefaultScale(int64_t head_dim) {
  return head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

const char* KernelName(Kernel kernel) {
  switch (kernel) {
    case Kernel::kAuto: return "auto";
    case Kernel::kReference: return "reference";
    case Kernel::kFlash: return "flash";
  }
  return "unknown";
}

std::vector<std::string> KernelNames() {
  std::vector<std::string> names;
  for (Kernel k : {Kernel::kAuto, Kernel::kReference, Kernel::kFlash}) {
    names.push_back(KernelName(k));
  }
  return names;
}

Kernel KernelFromName(const std::string& name) {
  for (Kernel k : {Kernel::kAuto, Kernel::kReference, Kernel::kFlash}) {
    if (name == KernelName(k)) return k;
  }
  throw Error("kernel: '" + name + "' (expected one of auto, reference, flash)");
}

AttentionInfo Attention(const AttentionParams& params) {
  const Problem problem = Validate(params);
  AttentionInfo info = Choose(params);
  info.threads = problem.threads;
  if (info.kernel == Kernel::kFlash) {
    info.simd_target = internal::FlashSimdTarget();
    info.scratch_bytes = internal::FlashScratchBytes(problem);
  } else {
    info.simd_target = "baseline";  // compiler-vectorised for the build's base ISA
    info.scratch_bytes = internal::ReferenceScratchBytes(problem, params.accumulate);
  }
  if (LseOnlyClosedForm(params, problem)) {
    info.scratch_bytes = 0;
    info.reason += "; lse in closed form (head dims 0: every score is 0 plus the mask)";
    LseClosedForm(params, problem);
    return info;
  }
  CheckScratch(info);
  // Nothing to write (e.g. seq_q = 0, or head_dim_v = 0 without lse or
  // weights): return before looping over dims that may be huge.
  if (params.out.numel() == 0 && (!params.lse.present() || params.lse.numel() == 0) &&
      (!params.weights.present() || params.weights.numel() == 0)) {
    return info;
  }
  if (info.kernel == Kernel::kFlash) {
    info.tiles = internal::FlashAttention(params, problem);
  } else {
    internal::ReferenceAttention(params, problem);
  }
  return info;
}

}  // namespace qkv
