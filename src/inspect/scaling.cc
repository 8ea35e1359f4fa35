// The 1/sqrt(d_k) measurements (qkv/inspect/scaling.h).
//
// Monte-Carlo error of the measured variance of x = q.k (entries N(0, 1)):
// Var(x^2) = E x^4 - d^2 = 3 d (d + 2) - d^2 = 2d^2 + 6d; two pairs sharing a
// query (or a key) are dependent, Cov(x_ij^2, x_ij'^2) = E|q|^4 - d^2 = 2d;
// pairs sharing neither are independent. Over S samples of N x N pairs the
// mean of x^2 (the variance up to the squared mean, which is O(d / N^2 S))
// has standard error sqrt(((2d^2 + 6d) + 4d (N - 1)) / (N^2 S)).
// Cost per head_dim: the two attention passes (forward with weights,
// backward with d(mask)) at O(S N^2 d), and the same again in double for
// the dot-product statistics.
#include "qkv/inspect/scaling.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>

#include "qkv/attention.h"
#include "qkv/attention_backward.h"
#include "qkv/error.h"

namespace qkv::inspect {
namespace {

std::string S(int64_t v) { return std::to_string(v); }

}  // namespace

namespace {

// Per query row of one MeasureRows call: what SoftmaxStats averages.
struct RowValues {
  std::vector<double> max_weight, entropy, score_grad, query_grad, gain;
};

// Forward with weights and backward with a zero additive mask (its gradient
// is dS) of one head, appending each row with at least two visible keys.
void MeasureRows(const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView& dout, double scale, bool causal, int num_threads,
                 RowValues& rv) {
  const Shape4 shape = q.shape;
  const int64_t samples = shape[0], keys = shape[2], d = shape[3];
  const size_t plane = static_cast<size_t>(samples * keys * keys);
  const size_t rows = static_cast<size_t>(samples * keys), values = rows * static_cast<size_t>(d);
  std::vector<float> out(values), lse(rows), weights(plane), zero_mask(plane, 0.0f), ds(plane);
  std::vector<float> dq(values), dk(values), dv(values);
  const Shape4 wshape{samples, 1, keys, keys};

  AttentionParams a;
  a.q = q, a.k = k, a.v = v;
  a.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, shape);
  a.lse = MutableTensorView::Contiguous(lse.data(), DType::kFloat32, {samples, 1, keys, 1});
  a.weights = MutableTensorView::Contiguous(weights.data(), DType::kFloat32, wshape);
  a.mask.causal = causal;
  a.scale = scale;
  a.num_threads = num_threads;
  Attention(a);

  AttentionBackwardParams b;
  b.q = q, b.k = k, b.v = v, b.dout = dout;
  b.out = TensorView::Contiguous(out.data(), DType::kFloat32, shape);
  b.lse = TensorView::Contiguous(lse.data(), DType::kFloat32, {samples, 1, keys, 1});
  b.dq = MutableTensorView::Contiguous(dq.data(), DType::kFloat32, shape);
  b.dk = MutableTensorView::Contiguous(dk.data(), DType::kFloat32, shape);
  b.dv = MutableTensorView::Contiguous(dv.data(), DType::kFloat32, shape);
  // S = scale Q.K^T + M with M = 0: dL/dM is dL/dS.
  b.mask.mask = TensorView::Contiguous(zero_mask.data(), DType::kFloat32, wshape);
  b.mask.causal = causal;
  b.dmask = MutableTensorView::Contiguous(ds.data(), DType::kFloat32, wshape);
  b.scale = scale;
  b.num_threads = num_threads;
  AttentionBackward(b);

  // dP = dout . V^T over the visible keys, in double, for the softmax's gain.
  const float* dout_data = static_cast<const float*>(dout.data);
  const float* v_data = static_cast<const float*>(v.data);
  for (size_t r = 0; r < rows; ++r) {
    const size_t sample = r / static_cast<size_t>(keys);
    const int64_t i = static_cast<int64_t>(r % static_cast<size_t>(keys));
    const int64_t visible = causal ? i + 1 : keys;
    if (visible < 2) continue;  // one key: nothing to choose, no gradient
    double dp2 = 0;
    for (int64_t j = 0; j < visible; ++j) {
      const float* vj = v_data + (sample * static_cast<size_t>(keys) + static_cast<size_t>(j)) *
                                     static_cast<size_t>(d);
      const float* di = dout_data + r * static_cast<size_t>(d);
      double x = 0;
      for (int64_t e = 0; e < d; ++e) x += static_cast<double>(di[e]) * vj[e];
      dp2 += x * x;
    }
    const float* p = weights.data() + r * static_cast<size_t>(keys);
    const float* g = ds.data() + r * static_cast<size_t>(keys);
    double max_p = 0, entropy = 0, g2 = 0, dq2 = 0;
    for (int64_t j = 0; j < visible; ++j) {
      max_p = std::max<double>(max_p, p[j]);
      if (p[j] > 0) entropy -= p[j] * std::log(static_cast<double>(p[j]));
      g2 += static_cast<double>(g[j]) * g[j];
    }
    for (int64_t e = 0; e < d; ++e) {
      const double x = dq[r * static_cast<size_t>(d) + static_cast<size_t>(e)];
      dq2 += x * x;
    }
    rv.max_weight.push_back(max_p);
    rv.entropy.push_back(entropy);
    rv.score_grad.push_back(std::sqrt(g2));
    rv.query_grad.push_back(std::sqrt(dq2));
    rv.gain.push_back(dp2 > 0 ? std::sqrt(g2 / dp2) : 0.0);
  }
}

double Mean(const std::vector<double>& x) {
  double sum = 0;
  for (const double e : x) sum += e;
  return x.empty() ? 0.0 : sum / static_cast<double>(x.size());
}

SoftmaxStats Summarise(RowValues rv, double scale) {
  SoftmaxStats st;
  st.scale = scale;
  st.mean_max_weight = Mean(rv.max_weight);
  st.entropy = Mean(rv.entropy);
  double one_hot = 0;
  for (const double m : rv.max_weight) one_hot += m > 0.99 ? 1 : 0;
  st.one_hot_fraction = rv.max_weight.empty() ? 0.0 : one_hot / static_cast<double>(rv.max_weight.size());
  st.score_grad_norm = Mean(rv.score_grad);
  st.query_grad_norm = Mean(rv.query_grad);
  std::vector<double>& g = rv.gain;
  const size_t n = g.size();
  std::sort(g.begin(), g.end());
  st.softmax_gain = n == 0 ? 0.0 : n % 2 ? g[n / 2] : 0.5 * (g[n / 2 - 1] + g[n / 2]);
  return st;
}

}  // namespace

SoftmaxStats MeasureSoftmax(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& dout, double scale, int num_threads) {
  const Shape4 shape = q.shape;
  for (const TensorView* t : {&q, &k, &v, &dout}) {
    if (t->dtype != DType::kFloat32 || t->shape != shape || shape[1] != 1 ||
        t->strides != TensorView::Contiguous(nullptr, DType::kFloat32, shape).strides) {
      throw Error("MeasureSoftmax: q, k, v, dout " + ShapeString(t->shape) +
                  " (expected contiguous float32 [samples, 1, keys, head_dim], all the same)");
    }
  }
  RowValues rv;
  MeasureRows(q, k, v, dout, scale, /*causal=*/false, num_threads, rv);
  return Summarise(std::move(rv), scale);
}

std::vector<HeadScalingRow> ExplainScalingOnLayer(const LayerProjections& p, uint64_t seed,
                                                  int num_threads) {
  const int64_t hq = p.num_q_heads, hkv = p.num_kv_heads, d = p.head_dim;
  int64_t tokens = 0;
  for (const int64_t len : p.lengths) {
    if (len < 1) throw Error("ExplainScalingOnLayer: an input of " + S(len) + " tokens (expected >= 1)");
    tokens += len;
  }
  if (hq < 1 || hkv < 1 || hq % hkv != 0 || d < 1 ||
      p.q.size() != static_cast<size_t>(tokens * hq * d) ||
      p.k.size() != static_cast<size_t>(tokens * hkv * d) || p.v.size() != p.k.size()) {
    throw Error("ExplainScalingOnLayer: q, k, v sizes do not match " + S(tokens) + " tokens x " +
                S(hq) + "/" + S(hkv) + " heads x head_dim " + S(d));
  }
  const double model_scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 0x5CA11u);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<HeadScalingRow> out;
  for (int64_t h = 0; h < hq; ++h) {
    const int64_t kh = h / (hq / hkv);
    HeadScalingRow row;
    row.head = h, row.head_dim = d;
    RowValues scaled, unscaled;
    double q2 = 0, k2 = 0, dot_sum = 0, dot_sum2 = 0, pairs = 0;
    int64_t first = 0;
    for (const int64_t len : p.lengths) {
      // This input's head h: contiguous [1, 1, len, d] copies.
      const size_t n = static_cast<size_t>(len * d);
      std::vector<float> q(n), k(n), v(n), dout(n);
      for (int64_t t = 0; t < len; ++t) {
        const size_t tok = static_cast<size_t>(first + t);
        std::copy_n(p.q.data() + (tok * hq + h) * d, d, q.data() + t * d);
        std::copy_n(p.k.data() + (tok * hkv + kh) * d, d, k.data() + t * d);
        std::copy_n(p.v.data() + (tok * hkv + kh) * d, d, v.data() + t * d);
      }
      for (float& e : dout) e = normal(rng);
      for (int64_t t = 0; t < len; ++t)
        for (int64_t e = 0; e < d; ++e) {
          q2 += static_cast<double>(q[t * d + e]) * q[t * d + e];
          k2 += static_cast<double>(k[t * d + e]) * k[t * d + e];
        }
      for (int64_t i = 0; i < len; ++i)
        for (int64_t j = 0; j < (p.causal ? i + 1 : len); ++j) {
          double x = 0;
          for (int64_t e = 0; e < d; ++e) x += static_cast<double>(q[i * d + e]) * k[j * d + e];
          dot_sum += x, dot_sum2 += x * x, pairs += 1;
        }
      const Shape4 shape{1, 1, len, d};
      const auto view = [&](const std::vector<float>& x) {
        return TensorView::Contiguous(x.data(), DType::kFloat32, shape);
      };
      MeasureRows(view(q), view(k), view(v), view(dout), model_scale, p.causal, num_threads, scaled);
      MeasureRows(view(q), view(k), view(v), view(dout), 1.0, p.causal, num_threads, unscaled);
      first += len;
    }
    row.rows = static_cast<int64_t>(scaled.gain.size());
    row.q_mean_square = q2 / static_cast<double>(tokens * d);
    row.k_mean_square = k2 / static_cast<double>(tokens * d);
    row.pairs = static_cast<int64_t>(pairs);
    row.dot_mean = dot_sum / pairs;
    row.dot_variance = dot_sum2 / pairs - row.dot_mean * row.dot_mean;
    row.scaled = Summarise(std::move(scaled), model_scale);
    row.unscaled = Summarise(std::move(unscaled), 1.0);
    out.push_back(row);
  }
  return out;
}

std::vector<ScalingRow> ExplainScaling(const ScalingOptions& o) {
  if (o.keys < 2 || o.keys > 4096 || o.samples < 1 || o.samples > 1024) {
    throw Error("keys " + S(o.keys) + ", samples " + S(o.samples) +
                " (expected keys in 2..4096 and samples in 1..1024)");
  }
  // Weights, mask and its gradient: 3 [samples, keys, keys] float buffers.
  constexpr int64_t kMaxElements = int64_t{1} << 25;
  if (o.samples * o.keys * o.keys > kMaxElements) {
    throw Error("samples " + S(o.samples) + " x keys " + S(o.keys) + "^2 is over 2^25 weights " +
                "(expected a smaller problem: the measurement keeps every weight)");
  }
  std::vector<ScalingRow> rows;
  for (const int64_t d : o.dims) {
    if (d < 1 || d > 65536 || o.samples * o.keys * d > kMaxElements) {
      throw Error("head_dim " + S(d) + " (expected 1..65536, and samples x keys x head_dim at " +
                  "most 2^25)");
    }
    const Shape4 shape{o.samples, 1, o.keys, d};
    const size_t n = static_cast<size_t>(o.samples * o.keys * d);
    std::mt19937_64 rng(o.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(d));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(n), k(n), v(n), dout(n);
    for (std::vector<float>* x : {&q, &k, &v, &dout})
      for (float& e : *x) e = normal(rng);

    ScalingRow row;
    row.head_dim = d, row.keys = o.keys, row.samples = o.samples;
    row.log_keys = std::log(static_cast<double>(o.keys));
    double sum = 0, sum2 = 0;
    for (int64_t s = 0; s < o.samples; ++s)
      for (int64_t i = 0; i < o.keys; ++i)
        for (int64_t j = 0; j < o.keys; ++j) {
          const float* qi = q.data() + (s * o.keys + i) * d;
          const float* kj = k.data() + (s * o.keys + j) * d;
          double x = 0;
          for (int64_t e = 0; e < d; ++e) x += static_cast<double>(qi[e]) * kj[e];
          sum += x, sum2 += x * x;
        }
    const double pairs = static_cast<double>(o.samples * o.keys * o.keys);
    row.dot_mean = sum / pairs;
    row.dot_variance = sum2 / pairs - row.dot_mean * row.dot_mean;
    const double dd = static_cast<double>(d), nk = static_cast<double>(o.keys);
    row.dot_variance_stderr = std::sqrt((2 * dd * dd + 6 * dd + 4 * dd * (nk - 1)) / pairs);

    const auto view = [&](const std::vector<float>& x) {
      return TensorView::Contiguous(x.data(), DType::kFloat32, shape);
    };
    row.scaled =
        MeasureSoftmax(view(q), view(k), view(v), view(dout), 1.0 / std::sqrt(dd), o.num_threads);
    row.unscaled = MeasureSoftmax(view(q), view(k), view(v), view(dout), 1.0, o.num_threads);
    rows.push_back(row);
  }
  return rows;
}

}  // namespace qkv::inspect
