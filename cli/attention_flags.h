// The flags and inputs that `qkv attend` and `qkv backward` share, declared
// once so that each name has one meaning and one help text in both commands
// (llama.cpp's common/arg.cpp idea): the mask rules, scale, layout, kernel,
// threads and the random-input mode.
#ifndef QKV_CLI_ATTENTION_FLAGS_H_
#define QKV_CLI_ATTENTION_FLAGS_H_

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "qkv/mask.h"
#include "qkv/npy.h"
#include "qkv/sparse.h"
#include "qkv/tensor.h"

namespace qkv::cli {

struct AttentionFlags {
  std::string mask, key_lengths;
  std::string sparse, block_mask;  // block-sparse layout: a spec (qkv/sparse.h) or a .npy
  std::string sink_logits;         // learned sinks .npy [num_q_heads]
  double softcap = 0.0;            // logit soft-capping (0: none)
  bool causal = false;
  bool causal_top_left = false;
  std::vector<int64_t> window;
  std::optional<double> scale;
  std::string layout = "bhsd";
  std::string kernel = "auto";
  std::string accumulate = "f32";  // f32 or f64 (Accumulate::kFloat64, reference kernel)
  int threads = 0;
  bool verbose = false;
  // Random mode: --shape B,H,N,D [--kv-heads G] [--seq-kv N] [--seed S].
  std::string shape;
  int64_t kv_heads = 0;
  int64_t seq_kv = -1;
  uint64_t seed = 0;
};

// Declares the shared flags on `cmd`, bound to `f` (which must outlive it).
// `tensors` names the tensors --layout applies to, for its help text.
void AddAttentionFlags(CLI::App* cmd, AttentionFlags& f, const std::string& tensors);

// An input tensor: the .npy array it came from and its [b, h, s, d] view.
struct Input {
  NpyArray array;
  TensorView view;
};

// Reads the 4-D float32/float16/float64 .npy at `path` (given by `flag`) as
// a [b, h, s, d] view of bhsd or bshd memory; throws qkv::Error naming both.
Input LoadTensor(const std::string& path, const char* flag, bool bshd);

// Fills a float32 [b, h, s, d] array with N(0, 1) values from `rng`.
Input RandomInput(const Shape4& shape, std::mt19937_64& rng);

// The random-mode shapes: q [B, H, N, D] and k, v [B, G, Nk, D] from --shape,
// --kv-heads and --seq-kv; throws naming the flag.
struct RandomShapes {
  Shape4 q, kv;
};
RandomShapes ParseRandomShapes(const AttentionFlags& f);

// Returns "--shape B,H,N,D" plus " --kv-heads G" and " --seq-kv N" when given:
// the flags a memory check of random inputs names.
std::string RandomShapeFlags(const AttentionFlags& f);

// Throws naming the flag unless every random-mode dim is at most 2^31 - 1
// (called after the memory check, whose message names all of them).
void CheckRandomShapeDims(const AttentionFlags& f);

// The arrays behind a MaskSpec, kept alive while it is used.
struct MaskInputs {
  NpyArray mask, lengths, block_mask;
  std::vector<int64_t> key_lengths;
  std::vector<float> sink_logits;
  BlockLayout layout;  // from --sparse
};

// Fills `spec` from the mask flags for attention of shape `target` = [batch,
// num_q_heads, seq_q, seq_kv], reading --mask and --key-lengths into
// `inputs`; throws qkv::Error naming the flag and file.
void ResolveMask(const AttentionFlags& f, const Shape4& target, MaskInputs* inputs,
                 MaskSpec* spec);

}  // namespace qkv::cli

#endif  // QKV_CLI_ATTENTION_FLAGS_H_
