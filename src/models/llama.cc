// The Llama decoder on GGUF weights and qkv's KV caches (qkv/models/llama.h).
//
// Activations are row-major float32 [n, features] for the n tokens of one
// call; every product reads its quantised weight in place (QuantLinear:
// dot products for a few rows, SGEMM on dequantised tiles for prefill), so a
// decode step reads the ~85 MB of SmolLM2-135M's Q4_1 weights once plus the
// cache. RMSNorm sums squares in double; SiLU, residual adds and RoPE are
// elementwise float32. Attention is qkv's: the flash kernel for a prompt on an
// empty float32 cache, the decode kernel over the cache otherwise.
#include "qkv/models/llama.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "qkv/attention.h"
#include "qkv/decode.h"
#include "qkv/error.h"
#include "qkv/positional.h"
#include "validate.h"

namespace qkv::models {

struct LlamaModel::Impl {
  struct Layer {
    std::vector<float> attn_norm, ffn_norm;
    QuantWeight wq, wk, wv, wo, gate, up, down;
  };
  explicit Impl(GgufFile f) : file(std::move(f)) {}
  GgufFile file;
  LlamaConfig config;
  QuantWeight token_embd, output;
  std::vector<float> output_norm;
  std::vector<Layer> layers;
  int64_t weight_bytes = 0;
};

namespace {

using S = std::string;

std::string Str(int64_t v) { return std::to_string(v); }

// Tensor `name` as a [rows, cols] weight (cols = ne[0]); a vector when rows == 0.
QuantWeight Weight(const GgufFile& file, const std::string& name, int64_t rows, int64_t cols,
                   int64_t* bytes) {
  const GgufFile::Tensor* t = file.Find(name);
  if (t == nullptr) throw Error(file.name() + ": tensor " + name + " missing (expected for llama)");
  const bool vector = rows == 0;
  const bool ok = vector ? (t->ne.size() == 1 && t->ne[0] == cols)
                         : (t->ne.size() == 2 && t->ne[0] == cols && t->ne[1] == rows);
  if (!ok) {
    std::string ne;
    for (size_t i = 0; i < t->ne.size(); ++i) ne += (i ? ", " : "") + Str(t->ne[i]);
    throw Error(file.name() + ": tensor " + name + " has ne {" + ne + "} (expected {" + Str(cols) +
                (vector ? "" : ", " + Str(rows)) + "} from the model's metadata)");
  }
  *bytes += static_cast<int64_t>(t->bytes.size());
  return MakeQuantWeight(t->type, vector ? 1 : rows, cols, t->bytes, file.name() + ": " + name);
}

std::vector<float> Vector(const GgufFile& file, const std::string& name, int64_t cols,
                          int64_t* bytes) {
  const QuantWeight w = Weight(file, name, 0, cols, bytes);
  std::vector<float> out(static_cast<size_t>(cols));
  DequantizeRows(w, 0, 1, out.data());
  return out;
}

int64_t Positive(const GgufFile& file, const std::string& key, int64_t max) {
  const int64_t v = file.GetInt(key);
  if (v < 1 || v > max) {
    throw Error(file.name() + ": metadata " + key + " = " + Str(v) + " (expected 1.." + Str(max) +
                ")");
  }
  return v;
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, rows of `cols` values.
void RmsNorm(const float* x, int64_t rows, int64_t cols, const float* w, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    double ss = 0;
    for (int64_t j = 0; j < cols; ++j) ss += static_cast<double>(xr[j]) * xr[j];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(cols) + eps));
    float* o = out + r * cols;
    for (int64_t j = 0; j < cols; ++j) o[j] = (xr[j] * inv) * w[j];
  }
}

void AddInPlace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace

LlamaModel::LlamaModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LlamaModel::LlamaModel(LlamaModel&&) noexcept = default;
LlamaModel& LlamaModel::operator=(LlamaModel&&) noexcept = default;
LlamaModel::~LlamaModel() = default;
const LlamaConfig& LlamaModel::config() const { return impl_->config; }
const GgufFile& LlamaModel::file() const { return impl_->file; }
int64_t LlamaModel::WeightBytes() const { return impl_->weight_bytes; }

LlamaModel LlamaModel::Load(const std::string& path) {
  auto impl = std::make_unique<Impl>(GgufFile::Open(path));
  const GgufFile& f = impl->file;
  const std::string arch = f.GetString("general.architecture");
  if (arch != "llama") {
    throw Error(f.name() + ": general.architecture is \"" + arch + "\" (expected \"llama\")");
  }
  LlamaConfig& c = impl->config;
  constexpr int64_t kMaxWidth = int64_t{1} << 20;
  c.num_layers = Positive(f, "llama.block_count", 4096);
  c.hidden = Positive(f, "llama.embedding_length", kMaxWidth);
  c.ffn = Positive(f, "llama.feed_forward_length", kMaxWidth);
  c.num_q_heads = Positive(f, "llama.attention.head_count", 4096);
  c.num_kv_heads = f.FindMetadata("llama.attention.head_count_kv") != nullptr
                       ? Positive(f, "llama.attention.head_count_kv", 4096)
                       : c.num_q_heads;
  c.context = Positive(f, "llama.context_length", int64_t{1} << 31);
  if (c.hidden % c.num_q_heads != 0 || c.num_q_heads % c.num_kv_heads != 0) {
    throw Error(f.name() + ": " + Str(c.hidden) + " hidden, " + Str(c.num_q_heads) + " heads, " +
                Str(c.num_kv_heads) +
                " kv heads (expected heads to divide hidden and kv heads to divide heads)");
  }
  c.head_dim = c.hidden / c.num_q_heads;
  c.rotary_dim = f.FindMetadata("llama.rope.dimension_count") != nullptr
                     ? Positive(f, "llama.rope.dimension_count", c.head_dim)
                     : c.head_dim;
  if (c.rotary_dim % 2 != 0) {
    throw Error(f.name() + ": llama.rope.dimension_count " + Str(c.rotary_dim) + " (expected even)");
  }
  if (f.FindMetadata("llama.rope.freq_base") != nullptr) c.rope_base = f.GetFloat("llama.rope.freq_base");
  if (!(c.rope_base > 0) || !std::isfinite(c.rope_base)) {
    throw Error(f.name() + ": llama.rope.freq_base (expected a positive finite number)");
  }
  c.rms_eps = static_cast<float>(f.GetFloat("llama.attention.layer_norm_rms_epsilon"));
  if (!(c.rms_eps > 0) || !std::isfinite(c.rms_eps)) {
    throw Error(f.name() + ": llama.attention.layer_norm_rms_epsilon (expected > 0)");
  }
  const GgufFile::Tensor* embd = f.Find("token_embd.weight");
  if (embd == nullptr || embd->ne.size() != 2 || embd->ne[1] < 1) {
    throw Error(f.name() + ": tensor token_embd.weight missing or not 2-D (expected for llama)");
  }
  c.vocab = embd->ne[1];
  int64_t& bytes = impl->weight_bytes;
  impl->token_embd = Weight(f, "token_embd.weight", c.vocab, c.hidden, &bytes);
  c.tied_output = f.Find("output.weight") == nullptr;
  impl->output = c.tied_output ? impl->token_embd : Weight(f, "output.weight", c.vocab, c.hidden, &bytes);
  impl->output_norm = Vector(f, "output_norm.weight", c.hidden, &bytes);
  const int64_t q_out = c.num_q_heads * c.head_dim, kv_out = c.num_kv_heads * c.head_dim;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "blk." + Str(l) + ".";
    Impl::Layer layer;
    layer.attn_norm = Vector(f, p + "attn_norm.weight", c.hidden, &bytes);
    layer.ffn_norm = Vector(f, p + "ffn_norm.weight", c.hidden, &bytes);
    layer.wq = Weight(f, p + "attn_q.weight", q_out, c.hidden, &bytes);
    layer.wk = Weight(f, p + "attn_k.weight", kv_out, c.hidden, &bytes);
    layer.wv = Weight(f, p + "attn_v.weight", kv_out, c.hidden, &bytes);
    layer.wo = Weight(f, p + "attn_output.weight", c.hidden, q_out, &bytes);
    layer.gate = Weight(f, p + "ffn_gate.weight", c.ffn, c.hidden, &bytes);
    layer.up = Weight(f, p + "ffn_up.weight", c.ffn, c.hidden, &bytes);
    layer.down = Weight(f, p + "ffn_down.weight", c.hidden, c.ffn, &bytes);
    impl->layers.push_back(std::move(layer));
  }
  return LlamaModel(std::move(impl));
}

LlamaCache::LlamaCache(const LlamaConfig& config, KvCacheConfig cache) {
  cache.num_kv_heads = config.num_kv_heads;
  cache.head_dim = config.head_dim;
  layers_.reserve(static_cast<size_t>(config.num_layers));
  for (int64_t l = 0; l < config.num_layers; ++l) layers_.emplace_back(cache);
}

int64_t LlamaCache::AddSequence() {
  int64_t id = -1;
  for (KvCache& c : layers_) id = c.AddSequence();
  return id;
}

int64_t LlamaCache::ForkSequence(int64_t parent) {
  int64_t id = -1;
  for (KvCache& c : layers_) id = c.ForkSequence(parent);
  return id;
}

void LlamaCache::FreeSequence(int64_t seq) {
  for (KvCache& c : layers_) c.FreeSequence(seq);
}

int64_t LlamaCache::Length(int64_t seq) const { return layers_.front().Length(seq); }

int64_t LlamaCache::BytesAllocated() const {
  int64_t total = 0;
  for (const KvCache& c : layers_) total += c.BytesAllocated();
  return total;
}

ForwardInfo LlamaForward(const LlamaModel& model, LlamaCache& cache, int64_t seq,
                         std::span<const int32_t> tokens, Logits mode, std::vector<float>& logits,
                         int num_threads, LlamaProbe* probe) {
  const LlamaModel::Impl& m = model.impl();
  const LlamaConfig& c = m.config;
  const KvCacheConfig& cc = cache.cache_config();
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int threads = qkv::internal::ResolveThreads(num_threads);
  for (int64_t t = 0; t < n; ++t) {
    if (tokens[static_cast<size_t>(t)] < 0 || tokens[static_cast<size_t>(t)] >= c.vocab) {
      throw Error("token " + Str(t) + ": id " + Str(tokens[static_cast<size_t>(t)]) +
                  " (expected 0.." + Str(c.vocab - 1) + ")");
    }
  }
  const int64_t start = cache.Length(seq);
  if (cc.kind == CacheKind::kContiguous && start + n > cc.capacity) {
    throw Error("context full: " + Str(start) + " + " + Str(n) + " tokens (expected at most " +
                Str(cc.capacity) + ", the contiguous cache's capacity)");
  }
  if (cc.kind == CacheKind::kPaged) {
    const int64_t bs = cc.block_size;
    const int64_t needed = (start + n + bs - 1) / bs - (start + bs - 1) / bs + 1;
    for (const KvCache& layer : cache.layers()) {
      if (layer.FreeBlocks() < needed) {
        throw Error("paged cache exhausted: " + Str(needed) + " blocks needed, " +
                    Str(layer.FreeBlocks()) + " free (expected a pool with more num_blocks)");
      }
    }
  }
  const bool prefill = start == 0 && cc.dtype == DType::kFloat32 &&
                       (cc.kind == CacheKind::kContiguous || cc.kind == CacheKind::kPaged);
  if (probe && (probe->want_weights || probe->want_qkv) && !prefill) {
    throw Error("attention weights and projections are handed out only for a prefill of an empty "
                "float32 contiguous or paged cache (this call: " + Str(start) +
                " tokens already cached)");
  }
  // Caches that evict run a chunk one token at a time (llama.h).
  if (n > 1 && (cc.kind == CacheKind::kSliding || cc.kind == CacheKind::kSinks)) {
    ForwardInfo info;
    std::vector<float> step;
    if (mode == Logits::kAll) logits.assign(static_cast<size_t>(n * c.vocab), 0.0f);
    for (int64_t t = 0; t < n; ++t) {
      const Logits step_mode = mode == Logits::kAll || (mode == Logits::kLast && t == n - 1)
                                   ? Logits::kLast : Logits::kNone;
      const ForwardInfo s = LlamaForward(model, cache, seq, tokens.subspan(static_cast<size_t>(t), 1),
                                         step_mode, step, num_threads);
      info.attention_seconds += s.attention_seconds;
      if (mode == Logits::kAll) {
        std::copy(step.begin(), step.end(), logits.begin() + t * c.vocab);
      }
    }
    if (mode == Logits::kLast) logits = std::move(step);
    if (mode == Logits::kNone) logits.clear();
    info.attention_path = "decode, one token at a time (the cache evicts)";
    return info;
  }

  const int64_t H = c.hidden, D = c.head_dim, Hq = c.num_q_heads, Hkv = c.num_kv_heads;
  const int64_t q_w = Hq * D, kv_w = Hkv * D;
  std::vector<float> x(static_cast<size_t>(n * H)), h(x.size()), tmp(x.size());
  std::vector<float> q(static_cast<size_t>(n * q_w)), att(q.size());
  std::vector<float> k(static_cast<size_t>(n * kv_w)), v(k.size());
  std::vector<float> gate(static_cast<size_t>(n * c.ffn)), up(gate.size());
  for (int64_t t = 0; t < n; ++t) {
    DequantizeRows(m.token_embd, tokens[static_cast<size_t>(t)], 1, x.data() + t * H);
  }
  RopeParams rope;
  rope.style = RopeStyle::kGptJ;
  rope.base = c.rope_base;
  rope.rotary_dim = c.rotary_dim;
  rope.offset = start;
  const bool want_weights = probe && probe->want_weights;
  const bool want_qkv = probe && probe->want_qkv;
  const bool flash = prefill;
  ForwardInfo info;
  info.attention_path = !flash ? "decode"
                        : want_weights ? "reference prefill (attention weights asked; the flash "
                                         "kernel does not write them)"
                                       : "flash prefill";
  if (want_weights) probe->weights.assign(m.layers.size(), {});
  if (want_qkv) probe->q.assign(m.layers.size(), {}), probe->k = probe->q, probe->v = probe->q;
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const LlamaModel::Impl::Layer& L = m.layers[l];
    RmsNorm(x.data(), n, H, L.attn_norm.data(), c.rms_eps, h.data());
    QuantLinear(h.data(), n, L.wq, q.data(), threads);
    QuantLinear(h.data(), n, L.wk, k.data(), threads);
    QuantLinear(h.data(), n, L.wv, v.data(), threads);
    const auto qv = MutableTensorView::FromBSHD(q.data(), DType::kFloat32, 1, n, Hq, D);
    const auto kv = MutableTensorView::FromBSHD(k.data(), DType::kFloat32, 1, n, Hkv, D);
    const auto vv = TensorView::FromBSHD(v.data(), DType::kFloat32, 1, n, Hkv, D);
    ApplyRope(qv, rope);
    const TensorView kview{kv.data, kv.dtype, kv.shape, kv.strides};
    AppendWithRope(cache.layers()[l], seq, kview, vv, rope);
    const auto out = MutableTensorView::FromBSHD(att.data(), DType::kFloat32, 1, n, Hq, D);
    const TensorView qview{qv.data, qv.dtype, qv.shape, qv.strides};
    const double t0 = omp_get_wtime();
    if (flash) {
      ApplyRope(kv, rope);  // the keys as the cache now holds them (float32: bitwise)
      AttentionParams p;
      p.q = qview;
      p.k = kview;
      p.v = vv;
      p.out = out;
      p.mask.causal = true;
      p.num_threads = threads;
      if (want_weights) {
        std::vector<float>& w = probe->weights[l];
        w.assign(static_cast<size_t>(Hq * n * n), 0.0f);
        p.weights = MutableTensorView::Contiguous(w.data(), DType::kFloat32, {1, Hq, n, n});
      }
      if (want_qkv) probe->q[l] = q, probe->k[l] = k, probe->v[l] = v;
      Attention(p);
    } else {
      const KvSequenceView view = cache.layers()[l].View(seq);
      DecodeParams p;
      p.q = qview;
      p.sequences = std::span<const KvSequenceView>(&view, 1);
      p.out = out;
      p.num_threads = threads;
      Decode(p);
    }
    info.attention_seconds += omp_get_wtime() - t0;
    QuantLinear(att.data(), n, L.wo, tmp.data(), threads);
    AddInPlace(x.data(), tmp.data(), n * H);
    RmsNorm(x.data(), n, H, L.ffn_norm.data(), c.rms_eps, h.data());
    QuantLinear(h.data(), n, L.gate, gate.data(), threads);
    QuantLinear(h.data(), n, L.up, up.data(), threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (n * c.ffn > 65536)
    for (int64_t i = 0; i < n * c.ffn; ++i) {
      const float g = gate[static_cast<size_t>(i)];
      gate[static_cast<size_t>(i)] = g / (1.0f + std::exp(-g)) * up[static_cast<size_t>(i)];
    }
    QuantLinear(gate.data(), n, L.down, tmp.data(), threads);
    AddInPlace(x.data(), tmp.data(), n * H);
  }
  if (mode == Logits::kNone) {
    logits.clear();
  } else {
    const int64_t first = mode == Logits::kAll ? 0 : n - 1, rows = n - first;
    RmsNorm(x.data() + first * H, rows, H, m.output_norm.data(), c.rms_eps, h.data());
    logits.assign(static_cast<size_t>(rows * c.vocab), 0.0f);
    QuantLinear(h.data(), rows, m.output, logits.data(), threads);
  }
  return info;
}

}  // namespace qkv::models
