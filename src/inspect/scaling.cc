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

SoftmaxStats MeasureSoftmax(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& dout, double scale, int num_threads) {
  const Shape4 shape = q.shape;
  const int64_t samples = shape[0], keys = shape[2], d = shape[3];
  for (const TensorView* t : {&q, &k, &v, &dout}) {
    if (t->dtype != DType::kFloat32 || t->shape != shape || shape[1] != 1 ||
        t->strides != TensorView::Contiguous(nullptr, DType::kFloat32, shape).strides) {
      throw Error("MeasureSoftmax: q, k, v, dout " + ShapeString(t->shape) +
                  " (expected contiguous float32 [samples, 1, keys, head_dim], all the same)");
    }
  }
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
  b.dmask = MutableTensorView::Contiguous(ds.data(), DType::kFloat32, wshape);
  b.scale = scale;
  b.num_threads = num_threads;
  AttentionBackward(b);

  // dP = dout . V^T, in double, for the softmax's gain.
  const float* dout_data = static_cast<const float*>(dout.data);
  const float* v_data = static_cast<const float*>(v.data);
  SoftmaxStats st;
  st.scale = scale;
  std::vector<double> gains(rows);
  for (size_t r = 0; r < rows; ++r) {
    const size_t sample = r / static_cast<size_t>(keys);
    double dp2 = 0;
    for (int64_t j = 0; j < keys; ++j) {
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
    for (int64_t j = 0; j < keys; ++j) {
      max_p = std::max<double>(max_p, p[j]);
      if (p[j] > 0) entropy -= p[j] * std::log(static_cast<double>(p[j]));
      g2 += static_cast<double>(g[j]) * g[j];
    }
    for (int64_t e = 0; e < d; ++e) {
      const double x = dq[r * static_cast<size_t>(d) + static_cast<size_t>(e)];
      dq2 += x * x;
    }
    st.mean_max_weight += max_p;
    st.entropy += entropy;
    st.one_hot_fraction += max_p > 0.99 ? 1 : 0;
    st.score_grad_norm += std::sqrt(g2);
    st.query_grad_norm += std::sqrt(dq2);
    gains[r] = dp2 > 0 ? std::sqrt(g2 / dp2) : 0.0;
  }
  for (double* m : {&st.mean_max_weight, &st.entropy, &st.one_hot_fraction, &st.score_grad_norm,
                    &st.query_grad_norm}) {
    *m /= static_cast<double>(rows);
  }
  std::sort(gains.begin(), gains.end());
  st.softmax_gain = rows % 2 ? gains[rows / 2] : 0.5 * (gains[rows / 2 - 1] + gains[rows / 2]);
  return st;
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
