// The linear-attention API: validates every argument once (with the checks
// and messages of attention.cc), then dispatches to the kernels of
// kernels/linear_attention.cc, which assume valid input.
#include "qkv/linear_attention.h"

#include <unistd.h>

#include <algorithm>
#include <optional>
#include <string>

#include "kernels/linear_attention.h"
#include "qkv/error.h"
#include "validate.h"

namespace qkv {
namespace {

using internal::CheckShape;
using internal::CheckTensor;
using internal::LinearPlan;
using internal::LinearProblem;
using internal::LinearViews;
using internal::Problem;
using internal::S;

void CheckFeatureMap(FeatureMap fm) {
  if (fm != FeatureMap::kElu && fm != FeatureMap::kRelu && fm != FeatureMap::kIdentity) {
    throw Error("feature_map: " + S(static_cast<int>(fm)) +
                " is not a feature map (expected elu, relu or identity)");
  }
}

void CheckChunk(int64_t chunk) {
  if (chunk < 1) {
    throw Error("chunk: " + S(chunk) + " (expected >= 1 keys per causal chunk)");
  }
}

// Resolves q, k, v (attention.cc's checks: no mask, no scale), the feature
// map, the chunk and the thread count.
LinearProblem Resolve(const TensorView& q, const TensorView& k, const TensorView& v, FeatureMap fm,
                      bool causal, int64_t chunk, int num_threads) {
  LinearProblem pr;
  pr.dims = internal::ValidateInputs(q, k, v, MaskSpec{}, std::nullopt, num_threads);
  CheckFeatureMap(fm);
  CheckChunk(chunk);
  pr.feature_map = fm;
  pr.causal = causal;
  // A chunk longer than seq_kv computes the same as seq_kv (one chunk).
  pr.chunk = std::min(chunk, std::max<int64_t>(pr.dims.seq_kv, 1));
  return pr;
}

// Refuses a plan whose memory exceeds this machine's (e.g. chunk = 2^30).
void CheckMemory(const LinearPlan& plan, const LinearProblem& pr) {
  const double physical =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  if (static_cast<double>(plan.scratch_bytes) > physical) {
    throw Error("linear attention: needs " + S(plan.scratch_bytes) + " bytes of scratch (chunk " +
                S(pr.chunk) + ", head_dim " + S(pr.dims.head_dim) + ", head_dim_v " +
                S(pr.dims.head_dim_v) + "; expected at most the " +
                S(static_cast<int64_t>(physical)) + " bytes of this machine's memory)");
  }
}

LinearAttentionInfo MakeInfo(const LinearPlan& plan, const LinearProblem& pr) {
  LinearAttentionInfo info;
  info.path = pr.causal ? "causal chunked" : "non-causal";
  info.chunk = pr.causal ? pr.chunk : 0;
  info.threads = plan.threads;
  info.state_bytes = plan.state_bytes;
  info.scratch_bytes = plan.scratch_bytes;
  info.simd_target = internal::LinearSimdTarget();
  return info;
}

Shape4 OutShape(const Problem& pr) { return {pr.batch, pr.num_q_heads, pr.seq_q, pr.head_dim_v}; }

}  // namespace

const char* FeatureMapName(FeatureMap feature_map) {
  switch (feature_map) {
    case FeatureMap::kElu:
      return "elu";
    case FeatureMap::kRelu:
      return "relu";
    case FeatureMap::kIdentity:
      return "identity";
  }
  return "unknown";
}

FeatureMap FeatureMapFromName(const std::string& name) {
  for (FeatureMap fm : {FeatureMap::kElu, FeatureMap::kRelu, FeatureMap::kIdentity}) {
    if (name == FeatureMapName(fm)) return fm;
  }
  throw Error("feature map: '" + name + "' (expected one of elu, relu, identity)");
}

LinearAttentionInfo LinearAttention(const LinearAttentionParams& p) {
  const LinearProblem pr = Resolve(p.q, p.k, p.v, p.feature_map, p.causal, p.chunk, p.num_threads);
  CheckTensor("out", p.out.shape, p.out.strides, p.out.present(), p.out.dtype, true);
  CheckShape("out", p.out.shape, OutShape(pr.dims), "[batch, num_q_heads, seq_q, head_dim_v]");
  const LinearPlan plan = internal::PlanLinear(pr, false, false);
  CheckMemory(plan, pr);
  const LinearAttentionInfo info = MakeInfo(plan, pr);
  if (p.out.numel() == 0) return info;  // nothing to write (seq_q or head_dim_v 0)
  LinearViews views;
  views.q = p.q, views.k = p.k, views.v = p.v, views.out = p.out;
  internal::LinearForward(views, pr, nullptr);
  return info;
}

LinearAttentionInfo LinearAttentionBackward(const LinearAttentionBackwardParams& p) {
  const LinearProblem pr = Resolve(p.q, p.k, p.v, p.feature_map, p.causal, p.chunk, p.num_threads);
  CheckTensor("dout", p.dout.shape, p.dout.strides, p.dout.present(), p.dout.dtype, false);
  CheckShape("dout", p.dout.shape, OutShape(pr.dims), "[batch, num_q_heads, seq_q, head_dim_v]");
  CheckTensor("dq", p.dq.shape, p.dq.strides, p.dq.present(), p.dq.dtype, true);
  CheckShape("dq", p.dq.shape, p.q.shape, "q's shape [batch, num_q_heads, seq_q, head_dim]");
  CheckTensor("dk", p.dk.shape, p.dk.strides, p.dk.present(), p.dk.dtype, true);
  CheckShape("dk", p.dk.shape, p.k.shape, "k's shape [batch, num_kv_heads, seq_kv, head_dim]");
  CheckTensor("dv", p.dv.shape, p.dv.strides, p.dv.present(), p.dv.dtype, true);
  CheckShape("dv", p.dv.shape, p.v.shape, "v's shape [batch, num_kv_heads, seq_kv, head_dim_v]");
  const LinearPlan plan = internal::PlanLinear(pr, true, false);
  CheckMemory(plan, pr);
  const LinearAttentionInfo info = MakeInfo(plan, pr);
  if (p.dq.numel() == 0 && p.dk.numel() == 0 && p.dv.numel() == 0) return info;
  LinearViews views;
  views.q = p.q, views.k = p.k, views.v = p.v, views.dout = p.dout;
  views.dq = p.dq, views.dk = p.dk, views.dv = p.dv;
  internal::LinearBackward(views, pr);
  return info;
}

LinearAttentionState::LinearAttentionState(int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                                           int64_t head_dim, int64_t head_dim_v,
                                           FeatureMap feature_map, int num_threads)
    : batch_(batch),
      num_q_heads_(num_q_heads),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      head_dim_v_(head_dim_v),
      ld_(0),
      feature_map_(feature_map),
      num_threads_(num_threads) {
  for (int64_t x : {batch, num_q_heads, num_kv_heads, head_dim, head_dim_v}) {
    if (x < 0 || x > internal::kMaxDim) {
      throw Error("LinearAttentionState: dimension " + internal::S(x) +
                  " (expected 0 <= batch, heads, head_dim, head_dim_v <= 2^31 - 1)");
    }
  }
  if (num_kv_heads == 0 ? num_q_heads != 0 : num_q_heads % num_kv_heads != 0) {
    throw Error("LinearAttentionState: num_kv_heads " + internal::S(num_kv_heads) +
                " must divide num_q_heads " + internal::S(num_q_heads) +
                " (expected a divisor: MHA equal, GQA a divisor, MQA 1)");
  }
  CheckFeatureMap(feature_map);
  internal::CheckThreads(num_threads);
  ld_ = internal::LinearStateLd(head_dim_v);
  const double bytes = static_cast<double>(batch) * num_kv_heads * head_dim * ld_ * 8.0;
  const double physical =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  if (bytes > physical) {
    throw Error("LinearAttentionState: needs " +
                internal::S(static_cast<int64_t>(std::min(bytes, 9e18))) +
                " bytes (expected at most the " + internal::S(static_cast<int64_t>(physical)) +
                " bytes of this machine's memory)");
  }
  state_.assign(static_cast<size_t>(batch * num_kv_heads * head_dim * ld_), 0.0);
}

void LinearAttentionState::Step(const TensorView& q_t, const TensorView& k_t, const TensorView& v_t,
                                const MutableTensorView& out_t) {
  if (q_t.shape[2] != 1 || k_t.shape[2] != 1) {
    throw Error("Step: seq " + internal::S(q_t.shape[2] != 1 ? q_t.shape[2] : k_t.shape[2]) +
                " (expected one token: q_t, k_t, v_t, out_t of seq 1; Prefill takes more)");
  }
  Prefill(q_t, k_t, v_t, out_t, 1);
}

LinearAttentionInfo LinearAttentionState::Prefill(const TensorView& q, const TensorView& k,
                                                  const TensorView& v, const MutableTensorView& out,
                                                  int64_t chunk) {
  const int64_t n = k.shape[2];
  // Without out, q is not read: validate k and v against a stand-in q.
  TensorView qq = q;
  if (!out.present()) {
    CheckTensor("k", k.shape, k.strides, k.present(), k.dtype, false);
    qq = TensorView{k.data, k.dtype, {k.shape[0], num_q_heads_, n, k.shape[3]}, k.strides};
  }
  LinearProblem pr = Resolve(qq, k, v, feature_map_, true, chunk, num_threads_);
  const Problem& d = pr.dims;
  const Shape4 want_q{batch_, num_q_heads_, n, head_dim_};
  if (out.present()) {
    CheckShape("q", q.shape, want_q, "[batch, num_q_heads, seq, head_dim] of this state");
  }
  CheckShape("k", k.shape, {batch_, num_kv_heads_, n, head_dim_},
             "[batch, num_kv_heads, seq, head_dim] of this state");
  CheckShape("v", v.shape, {batch_, num_kv_heads_, n, head_dim_v_},
             "[batch, num_kv_heads, seq, head_dim_v] of this state");
  if (out.present()) {
    CheckTensor("out", out.shape, out.strides, true, out.dtype, true);
    CheckShape("out", out.shape, OutShape(d), "[batch, num_q_heads, seq, head_dim_v]");
  }
  // A decode step of a few heads is microseconds of work (2^20
  // multiply-adds ~ 0.1 ms): an OpenMP region per step would cost more than
  // it saves (measured: LinearAttentionTest.EverySimdTargetMatchesOracle,
  // 555 steps of 2 kv heads, took 5.6 s with 2 threads on a loaded 2-core
  // machine, 0.18 s with 1). Results never depend on threads.
  const double work = static_cast<double>(n) * batch_ * (num_q_heads_ + num_kv_heads_) *
                      static_cast<double>(head_dim_) * ld_;
  if (work < 1048576.0) pr.dims.threads = 1;
  const LinearPlan plan = internal::PlanLinear(pr, false, true);
  CheckMemory(plan, pr);
  LinearAttentionInfo info = MakeInfo(plan, pr);
  info.state_bytes = state_bytes();
  LinearViews views;
  views.q = q, views.k = k, views.v = v;
  if (out.present()) views.out = out;
  internal::LinearForward(views, pr, state_.data());
  tokens_ += n;
  return info;
}

void LinearAttentionState::Reset() {
  std::fill(state_.begin(), state_.end(), 0.0);
  tokens_ = 0;
}

double LinearAttentionState::S(int64_t b, int64_t g, int64_t a, int64_t e) const {
  return state_[static_cast<size_t>(((b * num_kv_heads_ + g) * head_dim_ + a) * ld_ + e)];
}

double LinearAttentionState::z(int64_t b, int64_t g, int64_t a) const {
  return S(b, g, a, head_dim_v_);
}

}  // namespace qkv
