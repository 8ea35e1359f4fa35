// The reference attention kernel: the oracle every faster kernel is tested
// against, and the path that returns attention weights.
//
// Algorithm (per batch b and KV head g, like llm.c's attention_forward):
//   1. Pack K^T [head_dim, seq_kv] and V [seq_kv, head_dim_v] of (b, g) into
//      contiguous arrays of the compute type T (float or double), converting
//      from any input dtype and strides.
//   2. For each of the group_size query heads sharing g and each block of
//      kRefRows query rows (one work item, run by one thread):
//      a. scores:  S[r, j] = scale * (q_r . k_j) + mask[r, j]   for j allowed,
//         summed over head_dim in order (vectorises over j: no reassociation);
//      b. row_max m = max_j S[r, j] over allowed j (NaN never wins, so a NaN
//         score reaches exp and makes the row NaN);
//      c. p_j = exp(S[r, j] - m), row_sum l = sum_j p_j in key order;
//      d. out_r = (sum_j p_j v_j) / l, weights p_j / l, lse = m + log(l).
//   Disallowed pairs (qkv/mask.h) are skipped everywhere, never multiplied by
//   zero: 0 * NaN would leak a masked NaN/inf key or value into the row.
//   A row with no allowed key writes zeros and lse = -inf.
//
// Memory: K^T and V once per (b, g): seq_kv * (head_dim + head_dim_v) * T;
// per thread a [kRefRows, seq_kv] score block plus [head_dim] and
// [head_dim_v] rows. The full seq_q x seq_kv matrix is never held at once,
// but every score is computed and stored (per block): the cost is
// O(seq_q * seq_kv * head_dim) time and memory traffic for S of
// O(seq_q * seq_kv) per head.
//
// Determinism: each output row is computed by one thread with a fixed order
// of operations, so results are bitwise identical for any thread count.
#include "reference/reference_attention.h"

#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "mask_rules.h"
#include "reference/reference_util.h"

namespace qkv::internal {
namespace {

template <class T>
void Run(const AttentionParams& p, const Problem& pr) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t dk = pr.head_dim, dv = pr.head_dim_v, nk = pr.seq_kv, nq = pr.seq_q;
  const int64_t num_blocks = (nq + kRefRows - 1) / kRefRows;
  const int64_t items = pr.group_size * num_blocks;
  const T scale = static_cast<T>(pr.scale);
  std::vector<T> k_t(static_cast<size_t>(dk * nk));  // [head_dim, seq_kv]
  std::vector<T> v_p(static_cast<size_t>(nk * dv));  // [seq_kv, head_dim_v]

  for (int64_t b = 0; b < pr.batch; ++b) {
    const int64_t key_length = p.mask.key_lengths.empty() ? nk : p.mask.key_lengths[b];
    for (int64_t g = 0; g < pr.num_kv_heads; ++g) {
      // 1. Pack K^T and V of (b, g).
#pragma omp parallel for num_threads(pr.threads) schedule(static)
      for (int64_t j = 0; j < nk; ++j) {
        for (int64_t d = 0; d < dk; ++d) {
          k_t[d * nk + j] = LoadAs<T>(p.k.data, p.k.dtype, p.k.Offset(b, g, j, d));
        }
        for (int64_t d = 0; d < dv; ++d) {
          v_p[j * dv + d] = LoadAs<T>(p.v.data, p.v.dtype, p.v.Offset(b, g, j, d));
        }
      }
      // 2. One work item = (query head in the group, block of query rows).
#pragma omp parallel num_threads(pr.threads)
      {
        std::vector<T> scores(static_cast<size_t>(kRefRows * nk));
        std::vector<T> q_row(static_cast<size_t>(dk));
        std::vector<T> acc(static_cast<size_t>(dv));
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
          const int64_t h = g * pr.group_size + item / num_blocks;
          const int64_t i0 = (item % num_blocks) * kRefRows;
          const int64_t i1 = std::min(nq, i0 + kRefRows);
          for (int64_t i = i0; i < i1; ++i) {
            T* s = scores.data() + (i - i0) * nk;
            const KeyRange range = RowKeyRange(p.mask, nq, nk, i, key_length);
            // a. S[j] = scale * sum_d q[d] * K^T[d, j] (+ mask), j in range.
            for (int64_t d = 0; d < dk; ++d) {
              q_row[d] = LoadAs<T>(p.q.data, p.q.dtype, p.q.Offset(b, h, i, d));
            }
            for (int64_t j = range.lo; j < range.hi; ++j) s[j] = T(0);
            for (int64_t d = 0; d < dk; ++d) {
              const T qd = q_row[d];
              const T* kd = k_t.data() + d * nk;
              for (int64_t j = range.lo; j < range.hi; ++j) s[j] += qd * kd[j];
            }
            for (int64_t j = range.lo; j < range.hi; ++j) s[j] *= scale;
            if (p.mask.softcap > 0) {  // s = C tanh(s / C), before the mask
              const T cap = static_cast<T>(p.mask.softcap);
              for (int64_t j = range.lo; j < range.hi; ++j) s[j] = cap * std::tanh(s[j] / cap);
            }
            if (p.mask.mask.present()) {
              for (int64_t j = range.lo; j < range.hi; ++j) {
                const T m = MaskValue<T>(p.mask.mask, b, h, i, j);
                s[j] = m == kNegInf ? kNegInf : s[j] + m;  // -inf masks exactly
              }
            }
            if (p.mask.block_mask.present()) {  // absent tiles: masked, never attended
              for (int64_t j = range.lo; j < range.hi; ++j) {
                if (!BlockPresent(p.mask, b, h, i, j / kSparseBlock)) s[j] = kNegInf;
              }
            }
            // b. row_max over allowed keys; NaN never wins the comparison.
            T row_max = kNegInf;
            bool any_allowed = false;
            for (int64_t j = range.lo; j < range.hi; ++j) {
              any_allowed |= s[j] != kNegInf;
              if (s[j] > row_max) row_max = s[j];
            }
            // c, d. p_j = exp(s_j - row_max); row_sum; acc = sum_j p_j v_j.
            T row_sum = T(0);
            for (int64_t d = 0; d < dv; ++d) acc[d] = T(0);
            if (any_allowed) {
              for (int64_t j = range.lo; j < range.hi; ++j) {
                if (s[j] == kNegInf) {  // masked: skipped, weight 0
                  s[j] = T(0);
                  continue;
                }
                const T pj = std::exp(s[j] - row_max);
                s[j] = pj;
                row_sum += pj;
                const T* vj = v_p.data() + j * dv;
                for (int64_t d = 0; d < dv; ++d) acc[d] += pj * vj[d];
              }
            }
            // Fully masked row: zeros and lse = -inf (row_sum stays 0).
            const bool empty = !any_allowed;
            T lse = empty ? kNegInf : row_max + std::log(row_sum);
            // A learned sink joins the denominator: row_sum + exp(sink -
            // row_max), taken with the larger of the two as the max.
            if (!p.mask.sink_logits.empty() && p.mask.sink_logits[h] != -std::numeric_limits<float>::infinity()) {
              const T sink = static_cast<T>(p.mask.sink_logits[h]);
              if (empty) {
                lse = sink;
              } else {
                const T m = std::max(row_max, sink);
                const T l = row_sum * std::exp(row_max - m) + std::exp(sink - m);
                lse = m + std::log(l);
                row_sum = l / std::exp(row_max - m);  // the denominator relative to row_max
              }
            }
            for (int64_t d = 0; d < dv; ++d) {
              StoreAs<T>(p.out.data, p.out.dtype, p.out.Offset(b, h, i, d),
                         empty ? T(0) : acc[d] / row_sum);
            }
            if (p.lse.present()) {
              StoreAs<T>(p.lse.data, p.lse.dtype, p.lse.Offset(b, h, i, 0), lse);
            }
            if (p.weights.present()) {
              for (int64_t j = 0; j < nk; ++j) {
                const bool in = !empty && j >= range.lo && j < range.hi;
                StoreAs<T>(p.weights.data, p.weights.dtype, p.weights.Offset(b, h, i, j),
                           in ? s[j] / row_sum : T(0));
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace

int64_t ReferenceScratchBytes(const Problem& pr, Accumulate accumulate) {
  // In double: zero-sized tensors can declare dims near 2^62 (saturates).
  const double t = accumulate == Accumulate::kFloat64 ? 8 : 4;
  const double shared = 1.0 * pr.seq_kv * (pr.head_dim + pr.head_dim_v) * t;
  const double per_thread = (1.0 * kRefRows * pr.seq_kv + pr.head_dim + pr.head_dim_v) * t;
  const double bytes = shared + per_thread * pr.threads;
  return bytes >= 9.2e18 ? INT64_MAX : static_cast<int64_t>(bytes);
}

void ReferenceAttention(const AttentionParams& params, const Problem& problem) {
  if (params.accumulate == Accumulate::kFloat64) {
    Run<double>(params, problem);
  } else {
    Run<float>(params, problem);
  }
}

}  // namespace qkv::internal
