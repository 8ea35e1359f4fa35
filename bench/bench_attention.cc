// Google Benchmark timings of qkv::Attention. Only useful for performance
// measurement: it checks nothing (tests do). GFLOP/s counts 4 * D flops per
// allowed (query, key) pair and head: 2 D for Q.K^T and 2 D for P.V.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "qkv/attention.h"

namespace {

void BM_Reference(benchmark::State& state) {
  const int64_t heads = 8, seq = state.range(0), dim = state.range(1);
  const bool causal = state.range(2) != 0;
  const size_t n = static_cast<size_t>(heads * seq * dim);
  std::vector<float> q(n), k(n), v(n), out(n);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);
  qkv::AttentionParams p;
  const qkv::Shape4 shape{1, heads, seq, dim};
  p.q = qkv::TensorView::Contiguous(q.data(), qkv::DType::kFloat32, shape);
  p.k = qkv::TensorView::Contiguous(k.data(), qkv::DType::kFloat32, shape);
  p.v = qkv::TensorView::Contiguous(v.data(), qkv::DType::kFloat32, shape);
  p.out = qkv::MutableTensorView::Contiguous(out.data(), qkv::DType::kFloat32, shape);
  p.mask.causal = causal;
  p.kernel = qkv::Kernel::kReference;
  for (auto _ : state) qkv::Attention(p);
  const double flops = 4.0 * dim * heads * qkv::CountAllowedPairs(p.mask, 1, seq, seq);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Reference)
    ->ArgsProduct({{512, 2048}, {64, 128}, {0, 1}})
    ->ArgNames({"N", "D", "causal"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
