// Multi-head attention (qkv/mha.h): projections, torch-mask conversion, the
// per-head core through qkv::Attention, and the output projection.
//
// Data flow for one call (float32 throughout, B = batch, E = embed_dim,
// G = num_kv_heads, hd = head_dim):
//   1. q_proj [B*Nq, E]    = query [B*Nq, E]    . W_q^T (+ b_q)
//      k_proj [B*Nk, G*hd] = key   [B*Nk, kdim] . W_k^T (+ b_k), v_proj alike.
//      Row r of q_proj is [H, hd], so q_proj is [B, Nq, H, hd] memory: the
//      "bshd" layout, which TensorView::FromBSHD views as [B, H, Nq, hd]
//      without a copy (heads are strided by hd, rows by E).
//   2. qkv::Attention writes O through the same kind of view, [B, Nq, H, hd]
//      memory = the concatenation of the heads, row-major [B*Nq, E].
//   3. out [B*Nq, E] = O . W_o^T (+ b_o).
// Working memory: (2*B*Nq*E + 2*B*Nk*G*hd) floats for the projections and O,
// the converted mask (ConvertMhaMasks), and B*H*Nq*Nk floats of per-head
// weights when averaged weights are requested.
#include "qkv/mha.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "qkv/attention.h"
#include "qkv/error.h"
#include "qkv/models/layers.h"
#include "validate.h"

namespace qkv {
namespace {

std::string S(int64_t v) { return std::to_string(v); }

std::string ShapeText(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + S(shape[i]);
  return s + "]";
}

// Returns a * b * c, or throws naming `what` when it overflows int64.
int64_t Product(const char* what, int64_t a, int64_t b, int64_t c = 1) {
  int64_t ab = 0, abc = 0;
  if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc)) {
    throw Error(std::string(what) + ": size overflows (expected a tensor that fits in memory)");
  }
  return abc;
}

// Returns `config` with defaults resolved, after checking it.
MhaConfig Resolve(MhaConfig c) {
  if (c.num_kv_heads == 0) c.num_kv_heads = c.num_heads;
  if (c.kdim == 0) c.kdim = c.embed_dim;
  if (c.vdim == 0) c.vdim = c.embed_dim;
  if (c.embed_dim < 1) throw Error("embed_dim: " + S(c.embed_dim) + " (expected >= 1)");
  if (c.num_heads < 1) throw Error("num_heads: " + S(c.num_heads) + " (expected >= 1)");
  if (c.embed_dim % c.num_heads != 0) {
    throw Error("num_heads: " + S(c.num_heads) + " does not divide embed_dim " + S(c.embed_dim) +
                " (expected embed_dim % num_heads == 0; head_dim = embed_dim / num_heads)");
  }
  if (c.num_kv_heads < 1 || c.num_heads % c.num_kv_heads != 0) {
    throw Error("num_kv_heads: " + S(c.num_kv_heads) + " (expected a divisor of num_heads " +
                S(c.num_heads) + ": equal for MHA, 1 for MQA)");
  }
  if (c.kdim < 1 || c.vdim < 1) {
    throw Error("kdim, vdim: " + S(c.kdim) + ", " + S(c.vdim) + " (expected >= 1)");
  }
  // Every weight count below fits in int64 (W_q, W_o: E*E; W_k, W_v: at most E*kdim, E*vdim).
  const double params =
      2.0 * c.embed_dim * c.embed_dim + 1.0 * c.embed_dim * (c.kdim + 1.0 * c.vdim);
  if (params > 0x1p62) {
    throw Error("embed_dim, kdim, vdim: " + S(c.embed_dim) + ", " + S(c.kdim) + ", " + S(c.vdim) +
                " (expected a layer with fewer than 2^62 parameters)");
  }
  return c;
}

void CheckSize(const char* name, const std::vector<float>& w, int64_t rows, int64_t cols,
               bool optional) {
  if (optional && w.empty()) return;
  if (static_cast<int64_t>(w.size()) != rows * cols) {
    throw Error(std::string(name) + ": " + S(static_cast<int64_t>(w.size())) +
                " floats (expected " +
                (cols == 1 ? "[" + S(rows) + "]" : "[" + S(rows) + "," + S(cols) + "]") +
                (optional ? ", or none for no bias)" : ")"));
  }
}

// y = x . W^T + bias on the BLAS path of qkv/models/layers.h (deterministic
// for any thread count, as the attention).
void Project(const float* x, int64_t rows, int64_t in, const std::vector<float>& w,
             const std::vector<float>& bias, int64_t out, float* y, int threads) {
  models::Linear(x, rows, in, w.data(), bias.empty() ? nullptr : bias.data(), out, y, threads);
}

// Throws unless `bytes` of working memory fit in this machine's memory.
void CheckWorkingMemory(double bytes) {
  const double physical =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  if (bytes > physical) {
    throw Error("mha: needs " + std::to_string(bytes) +
                " bytes of working memory (expected at "
                "most the " +
                std::to_string(physical) + " bytes of this machine's memory)");
  }
}

// Checks a torch mask's dtype and shape; returns false when absent.
bool CheckMask(const char* name, const MhaMask& m, const std::vector<std::vector<int64_t>>& ok,
               const char* expected) {
  if (m.data == nullptr) return false;
  if (m.dtype != DType::kBool && m.dtype != DType::kFloat32 && m.dtype != DType::kFloat64 &&
      m.dtype != DType::kFloat16) {
    throw Error(std::string(name) + ": dtype " + DTypeName(m.dtype) +
                " (expected bool, True = masked out, or float32/float64/float16 added)");
  }
  if (std::find(ok.begin(), ok.end(), m.shape) == ok.end()) {
    throw Error(std::string(name) + ": shape " + ShapeText(m.shape) + " (expected " + expected +
                ")");
  }
  return true;
}

// Returns element `flat` of a torch mask as an additive float: -inf for a
// True boolean, 0 for False, the value (rounded to float32) otherwise.
float AdditiveAt(const MhaMask& m, int64_t flat) {
  switch (m.dtype) {
    case DType::kBool:
      return static_cast<const uint8_t*>(m.data)[flat] ? -std::numeric_limits<float>::infinity()
                                                       : 0.0f;
    case DType::kFloat64:
      return static_cast<float>(static_cast<const double*>(m.data)[flat]);
    case DType::kFloat16:
      return HalfToFloat(static_cast<const uint16_t*>(m.data)[flat]);
    default:
      return static_cast<const float*>(m.data)[flat];
  }
}

}  // namespace

MhaMaskSpec ConvertMhaMasks(const MhaMask& key_padding_mask, const MhaMask& attn_mask, bool causal,
                            int64_t batch, int64_t num_heads, int64_t seq_q, int64_t seq_kv,
                            Alignment alignment) {
  const int64_t bh = attn_mask.data ? Product("attn_mask", batch, num_heads) : 0;
  const std::string nk = S(seq_kv), nq = S(seq_q);
  const bool has_kpm = CheckMask("key_padding_mask", key_padding_mask, {{batch, seq_kv}},
                                 ("[batch, seq_kv] = [" + S(batch) + "," + nk + "]").c_str());
  const bool has_attn =
      CheckMask("attn_mask", attn_mask, {{seq_q, seq_kv}, {bh, seq_q, seq_kv}},
                ("[seq_q, seq_kv] = [" + nq + "," + nk +
                 "] or [batch*num_heads, seq_q, seq_kv] = [" + S(bh) + "," + nq + "," + nk + "]")
                    .c_str());
  const bool attn_3d = has_attn && attn_mask.shape.size() == 3;
  MhaMaskSpec r;
  r.spec.causal = causal;
  r.spec.alignment = alignment;  // default kTopLeft, torch's is_causal: j <= i
  if (!has_kpm && !has_attn) return r;
  // The buffer (or in-place view) shape: each dim full only when some mask varies along it.
  const Shape4 shape{has_kpm || attn_3d ? batch : 1, attn_3d ? num_heads : 1, has_attn ? seq_q : 1,
                     seq_kv};
  Shape4 strides{shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1};
  for (int d = 0; d < 4; ++d) {
    if (shape[d] == 1) strides[d] = 0;  // broadcast
  }
  const MhaMask& single = has_kpm ? key_padding_mask : attn_mask;
  if (has_kpm != has_attn && single.dtype == DType::kFloat32) {
    r.spec.mask = {single.data, DType::kFloat32, shape, strides};  // viewed in place
    return r;
  }
  CheckWorkingMemory(4.0 * shape[0] * shape[1] * shape[2] * shape[3]);
  r.buffer.resize(static_cast<size_t>(shape[0] * shape[1] * shape[2] * shape[3]));
  int64_t flat = 0;
  for (int64_t b = 0; b < shape[0]; ++b)
    for (int64_t h = 0; h < shape[1]; ++h)
      for (int64_t i = 0; i < shape[2]; ++i)
        for (int64_t j = 0; j < shape[3]; ++j, ++flat) {
          float v = 0.0f;
          if (has_attn)
            v = AdditiveAt(attn_mask, ((attn_3d ? b * num_heads + h : 0) * seq_q + i) * seq_kv + j);
          if (has_kpm) {
            // A True boolean padding entry masks whatever attn_mask says (torch's
            // masked_fill); a float one is added.
            const float p = AdditiveAt(key_padding_mask, b * seq_kv + j);
            v = key_padding_mask.dtype == DType::kBool ? (p == 0.0f ? v : p) : v + p;
          }
          r.buffer[flat] = v;
        }
  r.spec.mask = {r.buffer.data(), DType::kFloat32, shape, strides};
  return r;
}

int64_t MhaParamCount(const MhaConfig& config, bool bias) {
  const MhaConfig c = Resolve(config);
  const int64_t kv_out = c.num_kv_heads * (c.embed_dim / c.num_heads);  // G * hd
  // W_q [E,E] + W_k [G*hd,kdim] + W_v [G*hd,vdim] + W_o [E,E]; biases E + 2*G*hd + E.
  const int64_t weights = 2 * c.embed_dim * c.embed_dim + kv_out * (c.kdim + c.vdim);
  return weights + (bias ? 2 * c.embed_dim + 2 * kv_out : 0);
}

MultiHeadAttention::MultiHeadAttention(const MhaConfig& config, const MhaWeights& w)
    : config_(Resolve(config)) {
  const int64_t e = config_.embed_dim, kv_out = config_.num_kv_heads * head_dim();
  CheckSize("q_proj", w.q_proj, e, e, false);
  CheckSize("k_proj", w.k_proj, kv_out, config_.kdim, false);
  CheckSize("v_proj", w.v_proj, kv_out, config_.vdim, false);
  CheckSize("out_proj", w.out_proj, e, e, false);
  CheckSize("q_bias", w.q_bias, e, 1, true);
  CheckSize("k_bias", w.k_bias, kv_out, 1, true);
  CheckSize("v_bias", w.v_bias, kv_out, 1, true);
  CheckSize("out_bias", w.out_bias, e, 1, true);
  if (w.q_bias.empty() != w.k_bias.empty() || w.q_bias.empty() != w.v_bias.empty()) {
    throw Error(
        "q_bias, k_bias, v_bias: some given, some empty (expected all three or none, "
        "as torch's one in_proj_bias)");
  }
  q_proj_ = w.q_proj;
  k_proj_ = w.k_proj;
  v_proj_ = w.v_proj;
  out_proj_ = w.out_proj;
  q_bias_ = w.q_bias;
  k_bias_ = w.k_bias;
  v_bias_ = w.v_bias;
  out_bias_ = w.out_bias;
}

namespace {

// What a file holds instead, for the "missing" error: the names that end in
// a projection weight's name (and the prefix that would find them), else
// the first few names.
std::string FoundNames(const SafetensorsFile& file, const std::string& prefix) {
  std::string found;
  for (const auto& t : file.tensors()) {
    for (const std::string suffix : {"in_proj_weight", "q_proj_weight"}) {
      if (t.name.size() > suffix.size() &&
          t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix) == 0) {
        found += (found.empty() ? "" : ", ") + t.name + " (prefix \"" +
                 t.name.substr(0, t.name.size() - suffix.size()) + "\")";
      }
    }
  }
  if (!found.empty()) {
    return "; the file has " + found + " with prefix \"" + prefix +
           "\" given (qkv mha: --prefix)";
  }
  std::string names;
  const auto& all = file.tensors();
  for (size_t i = 0; i < all.size() && i < 5; ++i) names += (i ? ", " : "") + all[i].name;
  if (all.size() > 5) names += ", ... (" + S(static_cast<int64_t>(all.size())) + " tensors)";
  return "; the file has " + (names.empty() ? std::string("no tensors") : names);
}

}  // namespace

MultiHeadAttention MultiHeadAttention::FromSafetensors(const SafetensorsFile& file,
                                                       const MhaConfig& config,
                                                       const std::string& prefix) {
  const MhaConfig c = Resolve(config);
  const int64_t e = c.embed_dim, kv_out = c.num_kv_heads * (e / c.num_heads);
  const std::string packed = prefix + "in_proj_weight", q_name = prefix + "q_proj_weight";
  for (const char* unsupported : {"bias_k", "bias_v"}) {
    if (file.Find(prefix + unsupported) != nullptr) {
      throw Error(prefix + unsupported +
                  ": present (expected none: add_bias_kv=True is not "
                  "supported)");
    }
  }
  MhaWeights w;
  if (file.Find(packed) != nullptr) {
    if (file.Find(q_name) != nullptr) {
      throw Error(packed + " and " + q_name + ": both present (expected one set of projections)");
    }
    if (c.kdim != e || c.vdim != e || c.num_kv_heads != c.num_heads) {
      throw Error(packed + ": present, but kdim " + S(c.kdim) + ", vdim " + S(c.vdim) +
                  ", num_kv_heads " + S(c.num_kv_heads) +
                  " (expected q_proj_weight, "
                  "k_proj_weight, v_proj_weight unless kdim = vdim = embed_dim " +
                  S(e) + " and num_kv_heads = num_heads " + S(c.num_heads) + ")");
    }
    const std::vector<float> in_proj = file.LoadFloat32(packed, std::vector<int64_t>{3 * e, e});
    const auto rows = [&](int part) {  // rows [part*E, (part+1)*E) of [3E, E]
      return std::vector<float>(in_proj.begin() + part * e * e,
                                in_proj.begin() + (part + 1) * e * e);
    };
    w.q_proj = rows(0), w.k_proj = rows(1), w.v_proj = rows(2);
  } else if (file.Find(q_name) != nullptr) {
    w.q_proj = file.LoadFloat32(q_name, std::vector<int64_t>{e, e});
    w.k_proj = file.LoadFloat32(prefix + "k_proj_weight", std::vector<int64_t>{kv_out, c.kdim});
    w.v_proj = file.LoadFloat32(prefix + "v_proj_weight", std::vector<int64_t>{kv_out, c.vdim});
  } else {
    throw Error(packed + ": missing, and no " + q_name +
                " either (expected torch.nn."
                "MultiheadAttention state_dict names: in_proj_weight [3E,E], or q_proj_weight, "
                "k_proj_weight, v_proj_weight)" + FoundNames(file, prefix));
  }
  if (file.Find(prefix + "in_proj_bias") != nullptr) {
    const std::vector<float> b =
        file.LoadFloat32(prefix + "in_proj_bias", std::vector<int64_t>{e + 2 * kv_out});
    w.q_bias.assign(b.begin(), b.begin() + e);  // [b_q (E), b_k (G*hd), b_v (G*hd)]
    w.k_bias.assign(b.begin() + e, b.begin() + e + kv_out);
    w.v_bias.assign(b.begin() + e + kv_out, b.end());
  }
  w.out_proj = file.LoadFloat32(prefix + "out_proj.weight", std::vector<int64_t>{e, e});
  if (file.Find(prefix + "out_proj.bias") != nullptr) {
    w.out_bias = file.LoadFloat32(prefix + "out_proj.bias", std::vector<int64_t>{e});
  }
  return MultiHeadAttention(c, w);
}

AttentionInfo MultiHeadAttention::Forward(const MhaParams& p) const {
  const int64_t e = config_.embed_dim, h = config_.num_heads, g = config_.num_kv_heads;
  const int64_t hd = head_dim(), kv_out = g * hd;
  const bool self = p.seq_kv == -1;
  const int64_t batch = p.batch, seq_q = p.seq_q, seq_kv = self ? seq_q : p.seq_kv;
  if (batch < 0 || seq_q < 0 || p.seq_kv < -1) {
    throw Error("batch, seq_q, seq_kv: " + S(batch) + ", " + S(seq_q) + ", " + S(p.seq_kv) +
                " (expected >= 0; seq_kv -1 for self-attention)");
  }
  const auto check = [](const char* name, size_t got, int64_t want, const std::string& shape) {
    if (static_cast<int64_t>(got) != want) {
      throw Error(std::string(name) + ": " + S(static_cast<int64_t>(got)) + " floats (expected " +
                  shape + " = " + S(want) + ")");
    }
  };
  check("query", p.query.size(), Product("query", batch, seq_q, e),
        "[batch, seq_q, embed_dim] = [" + S(batch) + "," + S(seq_q) + "," + S(e) + "]");
  if (self) {
    if (config_.kdim != e || config_.vdim != e || !p.key.empty() || !p.value.empty()) {
      throw Error("key, value: self-attention (seq_kv -1) with kdim " + S(config_.kdim) +
                  ", vdim " + S(config_.vdim) + " and " + S(p.key.size()) + ", " +
                  S(p.value.size()) +
                  " floats (expected empty key and value, kdim = vdim = "
                  "embed_dim " +
                  S(e) + "; or seq_kv >= 0 for cross-attention)");
    }
  } else {
    check("key", p.key.size(), Product("key", batch, seq_kv, config_.kdim),
          "[batch, seq_kv, kdim] = [" + S(batch) + "," + S(seq_kv) + "," + S(config_.kdim) + "]");
    check("value", p.value.size(), Product("value", batch, seq_kv, config_.vdim),
          "[batch, seq_kv, vdim] = [" + S(batch) + "," + S(seq_kv) + "," + S(config_.vdim) + "]");
  }
  check("out", p.out.size(), batch * seq_q * e,
        "[batch, seq_q, embed_dim] = [" + S(batch) + "," + S(seq_q) + "," + S(e) + "]");
  int64_t per_head = 0;  // B*H*Nq*Nk, computed only when weights are requested
  if (!p.attn_weights.empty()) {
    per_head = Product("attn_weights", Product("attn_weights", batch, h), seq_q, seq_kv);
    if (p.average_attn_weights) {
      check("attn_weights", p.attn_weights.size(), Product("attn_weights", batch, seq_q, seq_kv),
            "[batch, seq_q, seq_kv] = [" + S(batch) + "," + S(seq_q) + "," + S(seq_kv) + "]");
    } else {
      check("attn_weights", p.attn_weights.size(), per_head,
            "[batch, num_heads, seq_q, seq_kv] = [" + S(batch) + "," + S(h) + "," + S(seq_q) + "," +
                S(seq_kv) + "]");
    }
  }
  if (p.num_threads < 0) throw Error("num_threads: " + S(p.num_threads) + " (expected >= 0)");
  const MhaMaskSpec mask =
      ConvertMhaMasks(p.key_padding_mask, p.attn_mask, p.causal, batch, h, seq_q, seq_kv,
                      p.causal_alignment);
  const bool averaged = !p.attn_weights.empty() && p.average_attn_weights;
  CheckWorkingMemory(4.0 * (2.0 * batch * seq_q * e + 2.0 * batch * seq_kv * kv_out +
                            (averaged ? 1.0 * per_head : 0.0)));
  const int threads = internal::ResolveThreads(p.num_threads);

  // 1. Projections: [B*N, in] -> [B*N, H*hd] / [B*N, G*hd] = bshd memory.
  std::vector<float> q(static_cast<size_t>(batch * seq_q * e));
  std::vector<float> k(static_cast<size_t>(batch * seq_kv * kv_out));
  std::vector<float> v(k.size());
  const float* key = self ? p.query.data() : p.key.data();
  const float* value = self ? p.query.data() : p.value.data();
  Project(p.query.data(), batch * seq_q, e, q_proj_, q_bias_, e, q.data(), threads);
  Project(key, batch * seq_kv, config_.kdim, k_proj_, k_bias_, kv_out, k.data(), threads);
  Project(value, batch * seq_kv, config_.vdim, v_proj_, v_bias_, kv_out, v.data(), threads);

  // 2. Attention per head on strided views; O is written as [B, Nq, H, hd].
  std::vector<float> o(q.size());
  std::vector<float> head_weights(averaged ? static_cast<size_t>(per_head) : 0);
  AttentionParams a;
  a.q = TensorView::FromBSHD(q.data(), DType::kFloat32, batch, seq_q, h, hd);
  a.k = TensorView::FromBSHD(k.data(), DType::kFloat32, batch, seq_kv, g, hd);
  a.v = TensorView::FromBSHD(v.data(), DType::kFloat32, batch, seq_kv, g, hd);
  a.out = MutableTensorView::FromBSHD(o.data(), DType::kFloat32, batch, seq_q, h, hd);
  if (!p.attn_weights.empty()) {
    float* w = averaged ? head_weights.data() : p.attn_weights.data();
    a.weights = MutableTensorView::Contiguous(w, DType::kFloat32, {batch, h, seq_q, seq_kv});
  }
  a.mask = mask.spec;
  a.num_threads = threads;  // scale: the default 1/sqrt(head_dim), as torch
  const AttentionInfo info = Attention(a);

  // 3. Output projection of the concatenated heads.
  Project(o.data(), batch * seq_q, e, out_proj_, out_bias_, e, p.out.data(), threads);

  // 4. Averaged weights: sum over heads in order, then / H (torch: sum(dim=1) / num_heads).
  if (averaged) {
    const int64_t plane = seq_q * seq_kv;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      float* dst = p.attn_weights.data() + b * plane;
      std::fill(dst, dst + plane, 0.0f);
      for (int64_t head = 0; head < h; ++head) {
        const float* src = head_weights.data() + (b * h + head) * plane;
        for (int64_t f = 0; f < plane; ++f) dst[f] += src[f];
      }
      for (int64_t f = 0; f < plane; ++f) dst[f] /= static_cast<float>(h);
    }
  }
  return info;
}

}  // namespace qkv
