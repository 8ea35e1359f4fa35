// qkv demo: attention step by step on four tokens, then a causal attention
// over a few thousand random tokens checked against the float64 oracle.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "commands.h"
#include "common.h"
#include "qkv/attention.h"

namespace qkv::cli {
namespace {

using Matrix = std::vector<std::vector<double>>;

void Print(const char* name, const char* shape, const Matrix& m) {
  std::printf("%s %s\n", name, shape);
  for (const auto& row : m) {
    std::printf("   ");
    for (double x : row) std::printf(" %8.4f", x);
    std::printf("\n");
  }
}

Matrix MatMul(const Matrix& a, const Matrix& b) {
  Matrix c(a.size(), std::vector<double>(b[0].size(), 0.0));
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t k = 0; k < b.size(); ++k)
      for (size_t j = 0; j < b[0].size(); ++j) c[i][j] += a[i][k] * b[k][j];
  return c;
}

Matrix Transpose(const Matrix& a) {
  Matrix t(a[0].size(), std::vector<double>(a.size()));
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = 0; j < a[0].size(); ++j) t[j][i] = a[i][j];
  return t;
}

// Part 1: four tokens, model dim 4, head dim 3, causal self-attention, done
// by hand in double and then by the library.
bool WorkedExample() {
  std::printf("== Part 1: causal self-attention on 4 tokens, step by step ==\n\n");
  const Matrix x = {{1.0, 0.0, 1.0, 0.0},   // token 0 "the"
                    {0.0, 2.0, 0.0, 2.0},   // token 1 "cat"
                    {1.0, 1.0, 1.0, 1.0},   // token 2 "sat"
                    {0.5, 0.0, 0.0, 1.5}};  // token 3 "down"
  const Matrix w_q = {{1, 0, 1}, {0, 1, 0}, {1, 0, 0}, {0, 1, 1}};
  const Matrix w_k = {{0, 1, 1}, {1, 0, 0}, {0, 0, 1}, {1, 1, 0}};
  const Matrix w_v = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}, {1, 1, 1}};
  Print("X (token vectors)", "[seq 4, model_dim 4]", x);
  const Matrix q = MatMul(x, w_q), k = MatMul(x, w_k), v = MatMul(x, w_v);
  Print("\nQ = X.W_Q", "[seq 4, head_dim 3]", q);
  Print("K = X.W_K", "[seq 4, head_dim 3]", k);
  Print("V = X.W_V", "[seq 4, head_dim 3]", v);
  Matrix scores = MatMul(q, Transpose(k));
  const double scale = 1.0 / std::sqrt(3.0);
  std::printf("\nscale = 1/sqrt(head_dim) = 1/sqrt(3) = %.4f: keeps the variance of q.k near 1\n",
              scale);
  for (auto& row : scores)
    for (double& s : row) s *= scale;
  Print("S = Q.K^T * scale", "[seq_q 4, seq_kv 4]", scores);
  Matrix masked = scores;
  for (size_t i = 0; i < masked.size(); ++i)
    for (size_t j = i + 1; j < masked[i].size(); ++j) masked[i][j] = -INFINITY;
  Print("S + causal mask (query i sees keys j <= i)", "[seq_q 4, seq_kv 4]", masked);
  Matrix weights = scores;
  bool rows_ok = true;
  for (size_t i = 0; i < weights.size(); ++i) {
    double row_max = -INFINITY, row_sum = 0.0;
    for (size_t j = 0; j <= i; ++j) row_max = std::max(row_max, scores[i][j]);
    for (size_t j = 0; j < weights[i].size(); ++j) {
      weights[i][j] = j <= i ? std::exp(scores[i][j] - row_max) : 0.0;
      row_sum += weights[i][j];
    }
    for (double& w : weights[i]) w /= row_sum;
  }
  Print("P = softmax(S + mask) row by row", "[seq_q 4, seq_kv 4]", weights);
  for (size_t i = 0; i < weights.size(); ++i) {
    double sum = 0.0;
    for (double w : weights[i]) sum += w;
    std::printf("   row %zu sums to %.12f\n", i, sum);
    rows_ok &= std::fabs(sum - 1.0) < 1e-12;
  }
  const Matrix out = MatMul(weights, v);
  Print("\nO = P.V", "[seq_q 4, head_dim 3]", out);

  // The same through the library, float32 in and out.
  std::vector<float> qf, kf, vf, of(12);
  for (size_t i = 0; i < 4; ++i)
    for (size_t d = 0; d < 3; ++d) {
      qf.push_back(static_cast<float>(q[i][d]));
      kf.push_back(static_cast<float>(k[i][d]));
      vf.push_back(static_cast<float>(v[i][d]));
    }
  AttentionParams p;
  p.q = TensorView::Contiguous(qf.data(), DType::kFloat32, {1, 1, 4, 3});
  p.k = TensorView::Contiguous(kf.data(), DType::kFloat32, {1, 1, 4, 3});
  p.v = TensorView::Contiguous(vf.data(), DType::kFloat32, {1, 1, 4, 3});
  p.out = MutableTensorView::Contiguous(of.data(), DType::kFloat32, {1, 1, 4, 3});
  p.mask.causal = true;
  Attention(p);
  double max_diff = 0.0;
  for (size_t i = 0; i < 4; ++i)
    for (size_t d = 0; d < 3; ++d) max_diff = std::max(max_diff, std::fabs(of[i * 3 + d] - out[i][d]));
  std::printf("qkv::Attention (float32, causal) differs from the hand computation by at most "
              "%.2e\n\n", max_diff);
  return rows_ok && max_diff < 1e-5;  // float32 rounding of values of size ~4
}

// Part 2: causal attention on random tokens, float32 against float64.
bool RandomCausal() {
  const int64_t heads = 2, seq = 3000, dim = 64;
  std::printf("== Part 2: causal attention, B=1 H=%lld N=%lld D=%lld, random N(0,1) ==\n",
              (long long)heads, (long long)seq, (long long)dim);
  std::mt19937_64 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t n = static_cast<size_t>(heads * seq * dim);
  std::vector<float> q(n), k(n), v(n), out(n);
  std::vector<double> oracle(n);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);
  AttentionParams p;
  const Shape4 shape{1, heads, seq, dim};
  p.q = TensorView::Contiguous(q.data(), DType::kFloat32, shape);
  p.k = TensorView::Contiguous(k.data(), DType::kFloat32, shape);
  p.v = TensorView::Contiguous(v.data(), DType::kFloat32, shape);
  p.out = MutableTensorView::Contiguous(out.data(), DType::kFloat32, shape);
  p.mask.causal = true;
  const auto start = std::chrono::steady_clock::now();
  const AttentionInfo info = Attention(p);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  p.accumulate = Accumulate::kFloat64;
  p.out = MutableTensorView::Contiguous(oracle.data(), DType::kFloat64, shape);
  Attention(p);
  double max_err = 0.0;
  for (size_t i = 0; i < n; ++i) max_err = std::max(max_err, std::fabs(out[i] - oracle[i]));
  // Each output is a convex combination of |v| <~ 5 values; float32 rounding
  // of D-term dot products and N-term sums stays well under 1e-4 here.
  const bool ok = max_err < 1e-4;
  std::printf("kernel %s (%s), %d threads: %.3f s, peak memory %s\n", KernelName(info.kernel),
              info.reason.c_str(), info.threads, seconds,
              HumanBytes(static_cast<double>(PeakRssBytes())).c_str());
  std::printf("max |float32 - float64 oracle| = %.3e  %s\n", max_err, ok ? "OK" : "NOT OK");
  return ok;
}

}  // namespace

Runner AddDemoCommand(CLI::App& app) {
  app.add_subcommand("demo", "Worked example: attention step by step, then a checked causal run");
  return [] {
    const bool ok1 = WorkedExample();
    const bool ok2 = RandomCausal();
    return ok1 && ok2 ? 0 : 1;
  };
}

}  // namespace qkv::cli
