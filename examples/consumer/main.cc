// A program outside the qkv tree that uses an installed qkv (issue 18):
// causal attention over four tokens through qkv::Attention.
//
//   cmake -S examples/consumer -B build/consumer -DCMAKE_PREFIX_PATH=<prefix>
//   g++ -std=c++20 main.cc -o consumer $(pkg-config --cflags --libs qkv)
//
// Every key is the same vector, so each query scores all its keys equally and
// the softmax weights are uniform: with the causal mask, query i averages the
// values 1..i+1, and the output 1 1.5 2 2.5 is exact in float32.
#include <cstdio>
#include <vector>

#include "qkv/attention.h"
#include "qkv/error.h"
#include "qkv/version.h"

int main() {
  const int64_t seq = 4, head_dim = 2, head_dim_v = 1;
  // q [1, 1, seq, head_dim], k [1, 1, seq, head_dim], v [1, 1, seq, head_dim_v].
  const std::vector<float> q = {0.5f, -1.0f, 2.0f, 0.25f, -3.0f, 1.0f, 1.5f, 0.75f};
  const std::vector<float> k = {1.0f, 0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 1.0f, 0.0f};
  const std::vector<float> v = {1.0f, 2.0f, 3.0f, 4.0f};
  std::vector<float> out(seq * head_dim_v);

  qkv::AttentionParams params;
  params.q = qkv::TensorView::Contiguous(q.data(), qkv::DType::kFloat32, {1, 1, seq, head_dim});
  params.k = qkv::TensorView::Contiguous(k.data(), qkv::DType::kFloat32, {1, 1, seq, head_dim});
  params.v = qkv::TensorView::Contiguous(v.data(), qkv::DType::kFloat32, {1, 1, seq, head_dim_v});
  params.out =
      qkv::MutableTensorView::Contiguous(out.data(), qkv::DType::kFloat32, {1, 1, seq, head_dim_v});
  params.mask.causal = true;
  try {
    qkv::Attention(params);
  } catch (const qkv::Error& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
  std::printf("qkv %s causal attention: %g %g %g %g\n", qkv::Version(), out[0], out[1], out[2],
              out[3]);
  return 0;
}
