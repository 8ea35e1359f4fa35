// The reference attention backward kernel: the plain formulas of
// qkv/attention_backward.h, one block of query rows at a time, with P and dS
// materialised for the block. The path for float64 accumulation and for the
// gradient of an additive mask.
//
// Algorithm (per batch b and KV head g, serially; like llm.c's
// attention_backward):
//   1. Pack K [seq_kv, head_dim] and V [seq_kv, head_dim_v] of (b, g) into
//      the compute type T (float or double); zero dK, dV accumulators in T.
//   2. For each block of kRefRows rows t = h_local * seq_q + i of the group
//      (the group_size query heads of g, in head order):
//      a. per row, in parallel over rows:
//           D_i  = sum_d dout_id * out_id                    (in d order)
//           s_ij = scale * (q_i . k_j) + mask_ij              j allowed
//           P_ij = exp(s_ij - lse_i)
//           dP_ij = dout_i . v_j,   dS_ij = P_ij (dP_ij - D_i)
//           dq_i = scale * sum_j dS_ij k_j                    (in j order)
//      b. per key, in parallel over keys: over the block's rows in order,
//           dv_j += P_ij dout_i,   dk_j += scale * dS_ij q_i
//      c. dmask (when asked): each element owned by one thread, summed over
//         the block's rows (and broadcast keys) in order.
//   3. Write dK, dV of (b, g); after every (b, g), write dmask.
// A pair is "allowed" when the structural rules (mask_rules.h) and the
// explicit mask allow it and its score is not -inf; every other pair is
// skipped, never multiplied by zero, so a NaN it does not touch stays out. A
// row whose lse is -inf has no allowed key: dq = 0, it adds nothing.
//
// Memory: K, V and the dK, dV accumulators of one (b, g):
// 2 * seq_kv * (head_dim + head_dim_v) * T; the block's P, dS [kRefRows,
// seq_kv] in T and flags in bytes; the dmask accumulator (the mask's element
// count in T) when dmask is asked for.
//
// Determinism: every sum has one fixed order (rows in t order, keys in j
// order, (b, g) serially), and each element is owned by one thread per
// phase, so results are bitwise identical for any thread count.
#include "reference/reference_backward.h"

#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "mask_rules.h"
#include "reference/reference_attention.h"
#include "reference/reference_util.h"
#include "validate.h"

namespace qkv::internal {
namespace {

template <class T>
void Run(const AttentionBackwardParams& p, const Problem& pr) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t dk = pr.head_dim, dv = pr.head_dim_v, nk = pr.seq_kv, nq = pr.seq_q;
  const int64_t group_rows = pr.group_size * nq;
  const T scale = static_cast<T>(pr.scale);
  const TensorView& mask = p.mask.mask;
  const bool want_dmask = p.dmask.present();
  std::vector<T> k_p(static_cast<size_t>(nk * dk)), v_p(static_cast<size_t>(nk * dv));
  std::vector<T> dk_acc(k_p.size()), dv_acc(v_p.size());
  std::vector<T> prob(static_cast<size_t>(kRefRows * nk)), ds(prob.size());
  // Soft-capping: d(capped)/d(raw) per pair, 1 - tanh^2. dS stays the
  // gradient at the capped score (what dmask is: the mask is added after
  // the cap); dq and dk take dS times it.
  std::vector<T> cap_grads(p.mask.softcap > 0 ? prob.size() : 0);
  std::vector<uint8_t> allowed(prob.size());
  std::vector<T> q_blk(static_cast<size_t>(kRefRows * dk)), do_blk(static_cast<size_t>(kRefRows * dv));
  int64_t row_b[kRefRows], row_h[kRefRows], row_i[kRefRows];
  // dmask accumulator in the mask's own shape; element (b, h, i, j) maps to
  // (b or 0, h or 0, i or 0, j or 0) by the mask's broadcast dims.
  std::vector<T> dmask_acc(want_dmask ? static_cast<size_t>(p.dmask.numel()) : 0);
  const Shape4 ms = MaskOwnShape(mask);
  auto dmask_index = [&](int64_t b, int64_t h, int64_t i, int64_t j) {
    return ((std::min(b, ms[0] - 1) * ms[1] + std::min(h, ms[1] - 1)) * ms[2] +
            std::min(i, ms[2] - 1)) * ms[3] + std::min(j, ms[3] - 1);
  };

  for (int64_t b = 0; b < pr.batch; ++b) {
    const int64_t key_length = p.mask.key_lengths.empty() ? nk : p.mask.key_lengths[b];
    for (int64_t g = 0; g < pr.num_kv_heads; ++g) {
      // 1. Pack K, V of (b, g); zero the accumulators.
#pragma omp parallel for num_threads(pr.threads) schedule(static)
      for (int64_t j = 0; j < nk; ++j) {
        for (int64_t d = 0; d < dk; ++d) {
          k_p[j * dk + d] = LoadAs<T>(p.k.data, p.k.dtype, p.k.Offset(b, g, j, d));
          dk_acc[j * dk + d] = T(0);
        }
        for (int64_t d = 0; d < dv; ++d) {
          v_p[j * dv + d] = LoadAs<T>(p.v.data, p.v.dtype, p.v.Offset(b, g, j, d));
          dv_acc[j * dv + d] = T(0);
        }
      }
      // 2. Blocks of kRefRows rows of the group.
      for (int64_t t0 = 0; t0 < group_rows; t0 += kRefRows) {
        const int64_t rows = std::min(kRefRows, group_rows - t0);
        // a. P, dS and dq per row.
#pragma omp parallel for num_threads(pr.threads) schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t h = g * pr.group_size + (t0 + r) / nq, i = (t0 + r) % nq;
          row_b[r] = b, row_h[r] = h, row_i[r] = i;
          T* q_r = q_blk.data() + r * dk;
          T* do_r = do_blk.data() + r * dv;
          for (int64_t d = 0; d < dk; ++d) q_r[d] = LoadAs<T>(p.q.data, p.q.dtype, p.q.Offset(b, h, i, d));
          T d_i = T(0);
          for (int64_t d = 0; d < dv; ++d) {
            do_r[d] = LoadAs<T>(p.dout.data, p.dout.dtype, p.dout.Offset(b, h, i, d));
            d_i += do_r[d] * LoadAs<T>(p.out.data, p.out.dtype, p.out.Offset(b, h, i, d));
          }
          const T lse = LoadAs<T>(p.lse.data, p.lse.dtype, p.lse.Offset(b, h, i, 0));
          const KeyRange range = RowKeyRange(p.mask, nq, nk, i, key_length);
          T* p_r = prob.data() + r * nk;
          T* ds_r = ds.data() + r * nk;
          uint8_t* ok_r = allowed.data() + r * nk;
          std::fill(ok_r, ok_r + nk, uint8_t{0});
          std::vector<T> dq_r(static_cast<size_t>(dk), T(0));
          if (lse != kNegInf) {
            for (int64_t j = range.lo; j < range.hi; ++j) {
              if (!BlockPresent(p.mask, b, h, i, j / kSparseBlock)) continue;  // absent tile
              T s = T(0);
              for (int64_t d = 0; d < dk; ++d) s += q_r[d] * k_p[j * dk + d];
              s *= scale;
              // Soft-capping: s = C tanh(s / C); dS then carries its
              // derivative 1 - tanh^2 back to the raw score.
              T cap_grad = T(1);
              if (p.mask.softcap > 0) {
                const T cap = static_cast<T>(p.mask.softcap), t = std::tanh(s / cap);
                s = cap * t;
                cap_grad = T(1) - t * t;
              }
              if (mask.present()) {
                const T m = MaskValue<T>(mask, b, h, i, j);
                s = m == kNegInf ? kNegInf : s + m;
              }
              if (s == kNegInf) continue;  // skipped: contributes nothing
              ok_r[j] = 1;
              const T pj = std::exp(s - lse);
              T dp = T(0);
              for (int64_t d = 0; d < dv; ++d) dp += do_r[d] * v_p[j * dv + d];
              p_r[j] = pj;
              ds_r[j] = pj * (dp - d_i);
              if (!cap_grads.empty()) cap_grads[r * nk + j] = cap_grad;
              const T ds_raw = ds_r[j] * cap_grad;
              for (int64_t d = 0; d < dk; ++d) dq_r[d] += ds_raw * k_p[j * dk + d];
            }
          }
          for (int64_t d = 0; d < dk; ++d)
            StoreAs<T>(p.dq.data, p.dq.dtype, p.dq.Offset(b, h, i, d), scale * dq_r[d]);
        }
        // b. dK, dV per key, over the block's rows in order.
#pragma omp parallel for num_threads(pr.threads) schedule(static)
        for (int64_t j = 0; j < nk; ++j) {
          T* dk_j = dk_acc.data() + j * dk;
          T* dv_j = dv_acc.data() + j * dv;
          for (int64_t r = 0; r < rows; ++r) {
            if (!allowed[r * nk + j]) continue;
            const T pj = prob[r * nk + j];
            const T dsj = scale * ds[r * nk + j] * (cap_grads.empty() ? T(1) : cap_grads[r * nk + j]);
            for (int64_t d = 0; d < dv; ++d) dv_j[d] += pj * do_blk[r * dv + d];
            for (int64_t d = 0; d < dk; ++d) dk_j[d] += dsj * q_blk[r * dk + d];
          }
        }
        // c. dmask: each mask column j' is owned by one thread (column 0
        // takes every key when the mask broadcasts over keys).
        if (want_dmask) {
#pragma omp parallel for num_threads(pr.threads) schedule(static)
          for (int64_t jm = 0; jm < ms[3]; ++jm) {
            const int64_t j_lo = ms[3] == 1 ? 0 : jm, j_hi = ms[3] == 1 ? nk : jm + 1;
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t j = j_lo; j < j_hi; ++j)
                if (allowed[r * nk + j])
                  dmask_acc[dmask_index(row_b[r], row_h[r], row_i[r], j)] += ds[r * nk + j];
          }
        }
      }
      // 3. dK, dV of (b, g).
#pragma omp parallel for num_threads(pr.threads) schedule(static)
      for (int64_t j = 0; j < nk; ++j) {
        for (int64_t d = 0; d < dk; ++d)
          StoreAs<T>(p.dk.data, p.dk.dtype, p.dk.Offset(b, g, j, d), dk_acc[j * dk + d]);
        for (int64_t d = 0; d < dv; ++d)
          StoreAs<T>(p.dv.data, p.dv.dtype, p.dv.Offset(b, g, j, d), dv_acc[j * dv + d]);
      }
    }
  }
  if (want_dmask) {
    for (int64_t b = 0; b < ms[0]; ++b)
      for (int64_t h = 0; h < ms[1]; ++h)
        for (int64_t i = 0; i < ms[2]; ++i)
          for (int64_t j = 0; j < ms[3]; ++j)
            StoreAs<T>(p.dmask.data, p.dmask.dtype, p.dmask.Offset(b, h, i, j),
                       dmask_acc[dmask_index(b, h, i, j)]);
  }
}

}  // namespace

int64_t ReferenceBackwardScratchBytes(const Problem& pr, const AttentionBackwardParams& params) {
  // In double: zero-sized tensors can declare dims near 2^62 (saturates).
  const double t = params.accumulate == Accumulate::kFloat64 ? 8 : 4;
  const double kv = 2.0 * pr.seq_kv * (pr.head_dim + pr.head_dim_v) * t;
  const double block = kRefRows * (pr.seq_kv * (2.0 * t + 1.0) + (pr.head_dim + pr.head_dim_v) * t);
  const double dq_rows = pr.threads * pr.head_dim * t;
  const double dmask = params.dmask.present() ? static_cast<double>(params.dmask.numel()) * t : 0.0;
  const double bytes = kv + block + dq_rows + dmask;
  return bytes >= 9.2e18 ? INT64_MAX : static_cast<int64_t>(bytes);
}

void ReferenceBackward(const AttentionBackwardParams& params, const Problem& problem) {
  if (params.accumulate == Accumulate::kFloat64) {
    Run<double>(params, problem);
  } else {
    Run<float>(params, problem);
  }
}

}  // namespace qkv::internal
