// The decode API: validates every argument once, plans the split-KV work
// items, runs the kernel (kernels/decode_attention.cc) and merges each row's
// partials by log-sum-exp in split order.
#include "qkv/decode.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/decode_attention.h"
#include "validate.h"
#include "qkv/attention.h"
#include "qkv/error.h"

namespace qkv {
namespace {

using internal::CheckShape;
using internal::CheckTensor;
using internal::DecodePlan;
using internal::kMaxDim;
using internal::S;

// Default split: 2048 cached tokens. Measured (B = 1, 32 q heads, 8 KV
// heads, head_dim 128, KvCache's head-major layout; ms per step, the
// fastest of 3 interleaved runs of 10-step medians; 2-thread rows swing
// +-10% on the shared 2-core machine):
//   split                 512    2048   4096
//   16K float32 1 thr    12.1    11.7   12.1
//   16K int8    1 thr     3.61    3.46   3.45
//   64K float32 1 thr    44.2    46.4   44.9
//   64K int8    1 thr    18.1    17.0   16.9
//   64K float32 2 thr    23.4    26.0   26.3
//   64K int8    2 thr     9.2     9.5    9.8
// A split's fixed cost is packing Q, writing R partials and its first
// block, which nothing prefetches (the kernel prefetches the next block of
// the same item): int8, whose blocks are 4x shorter in time, pays it most.
// Smaller splits give the threads more items (16K / 2048 x 8 heads = 64)
// and cost partials memory, q's size per split. (512, measured on the
// token-major layout of the first version, was 6% slower for int8 at 64K.)
constexpr int64_t kDefaultSplitTokens = 2048;
constexpr float kInf = std::numeric_limits<float>::infinity();

bool IsCacheDType(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16 ||
         d == DType::kInt8;
}

// Checks view b against q and against sequences[0]; returns its kept tokens.
int64_t CheckSequence(const KvSequenceView& view, int64_t b, const KvSequenceView& first,
                      int64_t head_dim, int64_t seq_q) {
  const std::string name = "sequences[" + S(b) + "]";
  if (!IsCacheDType(view.dtype)) {
    throw Error(name + ": dtype " + DTypeName(view.dtype) +
                " (expected float32, float16, bfloat16 or int8)");
  }
  if (view.dtype != first.dtype) {
    throw Error(name + ": dtype " + DTypeName(view.dtype) + " (expected sequences[0]'s " +
                DTypeName(first.dtype) + ")");
  }
  if (view.num_kv_heads < 1 || view.num_kv_heads > kMaxDim) {
    throw Error(name + ": num_kv_heads " + S(view.num_kv_heads) + " (expected >= 1)");
  }
  if (view.num_kv_heads != first.num_kv_heads) {
    throw Error(name + ": num_kv_heads " + S(view.num_kv_heads) + " (expected sequences[0]'s " +
                S(first.num_kv_heads) + ")");
  }
  if (view.head_dim != head_dim) {
    throw Error(name + ": head_dim " + S(view.head_dim) + " (expected q's head_dim " +
                S(head_dim) + ")");
  }
  if (view.length < seq_q || view.length > kMaxDim) {
    throw Error(name + ": length " + S(view.length) + " (expected >= q's seq_q " + S(seq_q) +
                ": append the new tokens' K/V before decoding)");
  }
  int64_t kept = 0, next_position = 0;
  for (size_t c = 0; c < view.chunks.size(); ++c) {
    const KvChunk& chunk = view.chunks[c];
    const std::string cname = name + ".chunks[" + S(static_cast<int64_t>(c)) + "]";
    if (chunk.count < 0 || chunk.first_position < next_position ||
        chunk.first_position > view.length - chunk.count) {
      throw Error(cname + ": tokens [" + S(chunk.first_position) + ", " +
                  S(chunk.first_position + chunk.count) + ") (expected count >= 0, positions "
                  "increasing from " + S(next_position) + " and below length " + S(view.length) + ")");
    }
    if (chunk.count > 0 && view.head_dim > 0 && (chunk.k == nullptr || chunk.v == nullptr)) {
      throw Error(cname + ": k or v is null (expected data for " + S(chunk.count) + " tokens)");
    }
    if (chunk.count > 0 && view.dtype == DType::kInt8 &&
        (chunk.k_scale == nullptr || chunk.v_scale == nullptr)) {
      throw Error(cname + ": k_scale or v_scale is null (expected int8 scales)");
    }
    // Zero scale strides would silently read one scale for every token or
    // head (the fields are new; a caller that forgot them gets an error).
    if (chunk.count > 0 && view.dtype == DType::kInt8 &&
        ((chunk.count > 1 && chunk.scale_token_stride == 0) ||
         (view.num_kv_heads > 1 && chunk.scale_head_stride == 0))) {
      throw Error(cname + ": scale_token_stride " + S(chunk.scale_token_stride) +
                  ", scale_head_stride " + S(chunk.scale_head_stride) +
                  " (expected non-zero int8 scale strides)");
    }
    next_position = chunk.first_position + chunk.count;
    kept += chunk.count;
  }
  return kept;
}

DecodePlan Validate(const DecodeParams& p) {
  CheckTensor("q", p.q.shape, p.q.strides, p.q.present(), p.q.dtype, false);
  CheckTensor("out", p.out.shape, p.out.strides, p.out.present(), p.out.dtype, true);
  DecodePlan plan;
  plan.batch = p.q.shape[0];
  plan.num_q_heads = p.q.shape[1];
  plan.seq_q = p.q.shape[2];
  plan.head_dim = p.q.shape[3];
  if (static_cast<int64_t>(p.sequences.size()) != plan.batch) {
    throw Error("sequences: " + S(static_cast<int64_t>(p.sequences.size())) +
                " views (expected one per batch = " + S(plan.batch) + ")");
  }
  plan.kept.resize(plan.batch);
  for (int64_t b = 0; b < plan.batch; ++b) {
    plan.kept[b] = CheckSequence(p.sequences[b], b, p.sequences[0], plan.head_dim, plan.seq_q);
  }
  if (plan.batch > 0) {
    plan.num_kv_heads = p.sequences[0].num_kv_heads;
    plan.dtype = p.sequences[0].dtype;
    if (plan.num_q_heads % plan.num_kv_heads != 0) {
      throw Error("sequences: num_kv_heads " + S(plan.num_kv_heads) +
                  " must divide q's num_q_heads " + S(plan.num_q_heads) +
                  " (expected a divisor: MHA equal, GQA a divisor, MQA 1)");
    }
    plan.group_size = plan.num_q_heads / plan.num_kv_heads;
  }
  CheckShape("out", p.out.shape, {plan.batch, plan.num_q_heads, plan.seq_q, plan.head_dim},
             "[batch, num_q_heads, seq_q, head_dim]");
  if (p.lse.present()) {
    CheckTensor("lse", p.lse.shape, p.lse.strides, true, p.lse.dtype, true);
    CheckShape("lse", p.lse.shape, {plan.batch, plan.num_q_heads, plan.seq_q, 1},
               "[batch, num_q_heads, seq_q, 1]");
  }
  if (p.window < -1 || p.window == 0) {
    throw Error("window: " + S(p.window) + " (expected >= 1 recent tokens, or -1 for none)");
  }
  plan.window = p.window;
  if (p.split_tokens < 0) {
    throw Error("split_tokens: " + S(p.split_tokens) + " (expected >= 1, or 0 for the default " +
                S(kDefaultSplitTokens) + ")");
  }
  plan.split_tokens = p.split_tokens > 0 ? p.split_tokens : kDefaultSplitTokens;
  plan.scale = p.scale.value_or(DefaultScale(plan.head_dim));
  if (!std::isfinite(plan.scale)) {
    throw Error("scale: " + std::to_string(plan.scale) + " (expected a finite number)");
  }
  plan.threads = internal::ResolveThreads(p.num_threads);

  // Work items (b, g, split) and partial slots (b, h, i, split).
  plan.splits.resize(plan.batch);
  plan.part_base.assign(plan.batch + 1, 0);
  plan.item_base.assign(plan.batch + 1, 0);
  for (int64_t b = 0; b < plan.batch; ++b) {
    plan.splits[b] = (plan.kept[b] + plan.split_tokens - 1) / plan.split_tokens;
    plan.part_base[b + 1] = plan.part_base[b] + plan.num_q_heads * plan.seq_q * plan.splits[b];
    plan.item_base[b + 1] = plan.item_base[b] + plan.num_kv_heads * plan.splits[b];
  }
  return plan;
}

void Store(void* base, DType dtype, int64_t offset, float value) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[offset] = value; break;
    case DType::kFloat64: static_cast<double*>(base)[offset] = value; break;
    case DType::kFloat16: static_cast<uint16_t*>(base)[offset] = FloatToHalf(value); break;
    default: break;  // excluded by validation
  }
}

}  // namespace

namespace internal {

// lse = m + log(sum_i w_i) with m = max lse_i and w_i = exp(lse_i - m), in
// double; out = sum_i (w_i / sum) out_i in float, in index order. Subtracting
// the max keeps every exp in [0, 1]; -inf partials are skipped outright, so
// they change nothing, not even the sign of a zero.
void MergeRow(const float* out_parts, const float* lse_parts, int64_t n, int64_t head_dim_v,
              float* out, float* lse) {
  double m = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    nan |= std::isnan(lse_parts[i]);
    if (lse_parts[i] > m) m = lse_parts[i];
  }
  std::fill(out, out + head_dim_v, 0.0f);
  if (nan) {  // a NaN partial makes its row NaN, as a NaN score does
    std::fill(out, out + head_dim_v, std::numeric_limits<float>::quiet_NaN());
    if (lse) *lse = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (m == -std::numeric_limits<double>::infinity()) {  // nothing attended anywhere
    if (lse) *lse = -kInf;
    return;
  }
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (lse_parts[i] != -kInf) sum += std::exp(lse_parts[i] - m);  // sum = sum_i exp(lse_i - m)
  }
  for (int64_t i = 0; i < n; ++i) {
    if (lse_parts[i] == -kInf) continue;
    const float w = static_cast<float>(std::exp(lse_parts[i] - m) / sum);  // exp(lse_i - lse)
    const float* part = out_parts + i * head_dim_v;
    for (int64_t d = 0; d < head_dim_v; ++d) out[d] += w * part[d];
  }
  if (lse) *lse = static_cast<float>(m + std::log(sum));
}

}  // namespace internal

void MergeAttentionPartials(std::span<const float> out_parts, std::span<const float> lse_parts,
                            int64_t head_dim_v, std::span<float> out, float* lse) {
  if (head_dim_v < 0) {
    throw Error("head_dim_v: " + S(head_dim_v) + " (expected >= 0)");
  }
  const int64_t n = static_cast<int64_t>(lse_parts.size());
  if (static_cast<int64_t>(out_parts.size()) != n * head_dim_v) {
    throw Error("out_parts: " + S(static_cast<int64_t>(out_parts.size())) +
                " floats (expected lse_parts.size() * head_dim_v = " + S(n) + " * " +
                S(head_dim_v) + ")");
  }
  if (static_cast<int64_t>(out.size()) != head_dim_v) {
    throw Error("out: " + S(static_cast<int64_t>(out.size())) + " floats (expected head_dim_v = " +
                S(head_dim_v) + ")");
  }
  internal::MergeRow(out_parts.data(), lse_parts.data(), n, head_dim_v, out.data(), lse);
}

DecodeInfo Decode(const DecodeParams& params) {
  const DecodePlan plan = Validate(params);
  DecodeInfo info;
  info.threads = plan.threads;
  info.simd_target = internal::DecodeSimdTarget();
  const int64_t lanes = internal::DecodeSimdLanes();
  info.path = plan.head_dim % lanes == 0
                  ? std::string("in place (") + DTypeName(plan.dtype) + " rows read and converted in registers)"
                  : "float32 tiles (head_dim " + std::to_string(plan.head_dim) +
                        " is not a multiple of the " + std::to_string(lanes) + "-float " +
                        info.simd_target + " width: each K/V row is converted and padded first, slower)";
  const int64_t rows = plan.batch * plan.num_q_heads * plan.seq_q;
  if (rows == 0) return info;

  // Partials: [part_base[batch], head_dim] floats plus one lse each, about
  // q's size times the splits per sequence (2 MiB for 32 heads x 128 dims
  // at 64K tokens); refused, not allocated, beyond physical memory.
  const int64_t parts = plan.part_base[plan.batch];
  const double physical =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  if (4.0 * static_cast<double>(parts) * static_cast<double>(plan.head_dim + 1) > physical) {
    throw Error("split_tokens: " + S(plan.split_tokens) + " gives " + S(parts) +
                " partial rows (expected their memory to fit this machine's; use larger splits)");
  }
  std::vector<float> part_out(static_cast<size_t>(parts * plan.head_dim));
  std::vector<float> part_lse(static_cast<size_t>(parts));
  internal::DecodePartials(params, plan, part_out.data(), part_lse.data(), &info.splits,
                           &info.kv_bytes_read);

  // Merge each row's partials in split order (rows are independent, so the
  // thread count never changes a bit) and store in out's dtype.
  const int64_t nq = plan.seq_q, dim = plan.head_dim;
#pragma omp parallel num_threads(std::max(plan.threads, 1))
  {
    std::vector<float> row(static_cast<size_t>(dim));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / (plan.num_q_heads * nq), h = r / nq % plan.num_q_heads, i = r % nq;
      const int64_t n = plan.splits[b];
      const int64_t first = plan.part_base[b] + (h * nq + i) * n;
      float lse = 0.0f;
      internal::MergeRow(part_out.data() + first * dim, part_lse.data() + first, n, dim,
                         row.data(), &lse);
      for (int64_t d = 0; d < dim; ++d) {
        Store(params.out.data, params.out.dtype, params.out.Offset(b, h, i, d), row[d]);
      }
      if (params.lse.present()) {
        Store(params.lse.data, params.lse.dtype, params.lse.Offset(b, h, i, 0), lse);
      }
    }
  }
  return info;
}

}  // namespace qkv
