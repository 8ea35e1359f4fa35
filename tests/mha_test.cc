// Tests of qkv::MultiHeadAttention (qkv/mha.h): parity with
// torch.nn.MultiheadAttention fixtures (tests/gen_mha_fixtures.py, written by
// PyTorch 1.13 into tests/testdata/mha/), GQA / MQA against a float64
// computation written here, parameter counts, mask conversion and errors.
//
// Oracle: MhaOracle below recomputes a layer in double from the same float32
// weights and inputs (sharing no code with src/mha.cc) and carries, next to
// each value, a first-order bound E(u) on the forward error of any float32
// implementation (unit roundoff u = 2^-24) that computes the same sums in any
// order (derivation at MhaOracle). Each fixture test then checks
//   |torch - exact| <= E(u)   (else the fixture or the bound is wrong, not qkv)
//   |qkv   - exact| <= E(u)   and   |qkv - torch| <= 2 E(u).
// Measured margin on these fixtures: the worst |qkv - exact| is 0.1-3.4% of E
// and torch's 0.2-3.3% (worst-case first-order bounds add every rounding with
// the same sign); MhaTest.BoundIsTightEnoughToCatchAScaleError shows that a
// 2^-15 relative change of the query already exceeds it.
#include "qkv/mha.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "qkv/error.h"
#include "qkv/npy.h"
#include "qkv/safetensors.h"

namespace qkv {
namespace {

namespace fs = std::filesystem;

constexpr double kU = 0x1p-24;  // float32 unit roundoff
constexpr double kInf = INFINITY;

std::string CaseDir(const std::string& name) {
  return std::string(QKV_TESTDATA_DIR) + "/mha/" + name;
}

// gamma_n = n u / (1 - n u): the relative error bound of an n-term sum or
// product chain (Higham, Accuracy and Stability, 3.1).
double Gamma(double n) { return n * kU / (1.0 - n * kU); }

// ---------------------------------------------------------------------------
// The float64 oracle and its error bound.

// One layer in double, torch layout ([out, in] weights); empty bias = none.
struct Layer {
  int64_t embed_dim = 0, num_heads = 0, num_kv_heads = 0, kdim = 0, vdim = 0;
  std::vector<double> wq, wk, wv, wo, bq, bk, bv, bo;
};

struct Inputs {
  int64_t batch = 0, seq_q = 0, seq_kv = 0;
  std::vector<double> query, key, value;  // key/value empty: self-attention
  std::vector<double> mask;               // full additive [B,H,Nq,Nk] (-inf masks); empty: none
  bool causal = false;                    // top-left: j <= i
};

struct Exact {
  std::vector<double> out, out_err;          // [B,Nq,E]
  std::vector<double> weights, weights_err;  // [B,H,Nq,Nk]
  std::vector<double> avg, avg_err;          // [B,Nq,Nk]
};

// y[r, n] = b[n] + sum_k W[n, k] x[r, k] in double, with the float32 bound
//   |dy| <= gamma_{K+1} (|b_n| + sum_k |W_nk| (|x_k| + ex_k)) + sum_k |W_nk| ex_k
// where ex is the error already in x (none for the inputs): K products and
// K - 1 + 1 additions (bias) in any order, FMA or not.
void Project(const std::vector<double>& x, const std::vector<double>* x_err, int64_t rows,
             int64_t in, const std::vector<double>& w, const std::vector<double>& b, int64_t out,
             std::vector<double>* y, std::vector<double>* err) {
  y->assign(rows * out, 0.0);
  err->assign(rows * out, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < out; ++n) {
      double sum = b.empty() ? 0.0 : b[n], mag = b.empty() ? 0.0 : std::fabs(b[n]), prop = 0.0;
      for (int64_t k = 0; k < in; ++k) {
        const double xe = x_err ? (*x_err)[r * in + k] : 0.0;
        sum += w[n * in + k] * x[r * in + k];
        mag += std::fabs(w[n * in + k]) * (std::fabs(x[r * in + k]) + xe);
        prop += std::fabs(w[n * in + k]) * xe;
      }
      (*y)[r * out + n] = sum;
      (*err)[r * out + n] = Gamma(in + 1) * mag + prop;
    }
}

// Computes the layer in double plus a first-order bound of a float32
// implementation's error on every output. Per (b, h, i), with q, k, v the
// exact projections and eq, ek, ev their bounds from Project:
//   1. scores s_j = c q.k_j + m_j (c = 1/sqrt(hd)). Input errors move s_j by
//      c sum_d (eq_d |k_jd| + |q_d| ek_jd + eq_d ek_jd); rounding adds
//      gamma_{hd+3} (c sum_d |q_d||k_jd| + |m_j|) (hd products/sums, the
//      scale (torch scales q first, qkv the dot; both round c once more) and
//      the mask add). ds = max over allowed j.
//   2. p_j = exp(s_j - m) / sum: d log p_j = ds_j - sum_k p_k ds_k, so
//      |dp_j| / p_j <= rp = 2 ds + 2 u R + (Nk + 5) u, R = max_j |s_j - m|
//      (the rounding of s_j - m), 2u for exp, Nk u for the sum and u for the
//      division; plus FLT_MIN absolute for underflowed weights.
//   3. o_d = sum_j p_j v_jd: |do_d| <= (rp + (Nk + 1) u) sum_j p_j (|v_jd| +
//      ev_jd) + sum_j p_j ev_jd + Nk FLT_MIN max|v|.
//   4. out = O.W_o^T + b_o: Project with the o errors as input errors.
//   Averaged weights: (sum_h p_h) / H adds gamma_H of the average.
Exact MhaOracle(const Layer& l, const Inputs& in) {
  const int64_t B = in.batch, NQ = in.seq_q, NK = in.seq_kv, E = l.embed_dim;
  const int64_t H = l.num_heads, G = l.num_kv_heads, HD = E / H, GS = H / G;
  const bool self = in.key.empty();
  std::vector<double> q, k, v, eq, ek, ev;
  Project(in.query, nullptr, B * NQ, E, l.wq, l.bq, E, &q, &eq);
  Project(self ? in.query : in.key, nullptr, B * NK, self ? E : l.kdim, l.wk, l.bk, G * HD, &k,
          &ek);
  Project(self ? in.query : in.value, nullptr, B * NK, self ? E : l.vdim, l.wv, l.bv, G * HD, &v,
          &ev);
  const double c = 1.0 / std::sqrt(static_cast<double>(HD));
  std::vector<double> o(B * NQ * E, 0.0), eo(B * NQ * E, 0.0);
  Exact r;
  r.weights.assign(B * H * NQ * NK, 0.0);
  r.weights_err.assign(r.weights.size(), 0.0);
  double max_v = 0.0;
  for (double x : v) max_v = std::max(max_v, std::fabs(x));
  std::vector<double> s(NK), ds(NK);
  std::vector<bool> allowed(NK);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < NQ; ++i) {
        const int64_t g = h / GS;
        const double* qi = &q[(b * NQ + i) * E + h * HD];
        const double* eqi = &eq[(b * NQ + i) * E + h * HD];
        double m = -kInf, ds_max = 0.0;
        bool any = false;
        for (int64_t j = 0; j < NK; ++j) {  // 1. scores
          const double mj = in.mask.empty() ? 0.0 : in.mask[((b * H + h) * NQ + i) * NK + j];
          allowed[j] = mj != -kInf && !(in.causal && j > i);
          if (!allowed[j]) continue;
          const double* kj = &k[(b * NK + j) * G * HD + g * HD];
          const double* ekj = &ek[(b * NK + j) * G * HD + g * HD];
          double dot = 0.0, mag = 0.0, prop = 0.0;
          for (int64_t d = 0; d < HD; ++d) {
            dot += qi[d] * kj[d];
            mag += (std::fabs(qi[d]) + eqi[d]) * (std::fabs(kj[d]) + ekj[d]);
            prop += eqi[d] * std::fabs(kj[d]) + std::fabs(qi[d]) * ekj[d] + eqi[d] * ekj[d];
          }
          s[j] = c * dot + mj;
          ds_max = std::max(ds_max, c * prop + Gamma(HD + 3) * (c * mag + std::fabs(mj)));
          m = std::max(m, s[j]);
          any = true;
        }
        if (!any) continue;  // fully masked: qkv gives zeros (torch NaN; no fixture has one)
        double sum = 0.0, spread = 0.0;
        for (int64_t j = 0; j < NK; ++j) {
          if (!allowed[j]) continue;
          sum += std::exp(s[j] - m);
          spread = std::max(spread, m - s[j]);
        }
        const double rp = 2.0 * ds_max + 2.0 * kU * spread + (NK + 5) * kU;  // 2.
        for (int64_t d = 0; d < HD; ++d) {                                   // 3.
          double od = 0.0, pv = 0.0, pev = 0.0;
          for (int64_t j = 0; j < NK; ++j) {
            if (!allowed[j]) continue;
            const double p = std::exp(s[j] - m) / sum;
            const int64_t f = (b * NK + j) * G * HD + g * HD + d;
            od += p * v[f];
            pv += p * (std::fabs(v[f]) + ev[f]);
            pev += p * ev[f];
          }
          const int64_t f = (b * NQ + i) * E + h * HD + d;
          o[f] = od;
          eo[f] = (rp + (NK + 1) * kU) * pv + pev + NK * FLT_MIN * max_v;
        }
        for (int64_t j = 0; j < NK; ++j) {
          if (!allowed[j]) continue;
          const int64_t f = ((b * H + h) * NQ + i) * NK + j;
          r.weights[f] = std::exp(s[j] - m) / sum;
          r.weights_err[f] = rp * r.weights[f] + FLT_MIN;
        }
      }
  Project(o, &eo, B * NQ, E, l.wo, l.bo, E, &r.out, &r.out_err);  // 4.
  r.avg.assign(B * NQ * NK, 0.0);
  r.avg_err.assign(r.avg.size(), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t f = 0; f < NQ * NK; ++f) {
        r.avg[b * NQ * NK + f] += r.weights[(b * H + h) * NQ * NK + f] / H;
        r.avg_err[b * NQ * NK + f] += r.weights_err[(b * H + h) * NQ * NK + f] / H;
      }
  for (size_t f = 0; f < r.avg.size(); ++f) r.avg_err[f] += Gamma(H + 1) * r.avg[f];
  return r;
}

// ---------------------------------------------------------------------------
// Comparison with a bound, reporting the worst element (STYLE.md 6).

::testing::AssertionResult WithinBound(const std::string& what, const std::vector<double>& got,
                                       const std::vector<double>& want,
                                       const std::vector<double>& bound, double* worst_ratio) {
  if (got.size() != want.size() || got.size() != bound.size()) {
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " values, expected " << want.size();
  }
  int64_t bad = 0, worst = 0;
  double ratio_max = 0.0;
  for (size_t f = 0; f < got.size(); ++f) {
    const double err = got[f] == want[f] ? 0.0 : std::fabs(got[f] - want[f]);
    const double ratio = std::isnan(err) ? kInf : err / bound[f];
    if (ratio > 1.0) ++bad;
    if (ratio > ratio_max || f == 0) ratio_max = ratio, worst = static_cast<int64_t>(f);
  }
  if (worst_ratio != nullptr) *worst_ratio = std::max(*worst_ratio, ratio_max);
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << bad << " of " << got.size() << " out of bound; worst index " << worst
         << " got " << got[worst] << " want " << want[worst] << " bound " << bound[worst]
         << " (ratio " << ratio_max << ")";
}

std::vector<double> ToDouble(const NpyArray& a) {
  EXPECT_EQ(a.dtype, DType::kFloat32);
  const float* p = a.data<float>();
  return std::vector<double>(p, p + a.numel());
}

std::vector<double> ToDouble(const std::vector<float>& x) { return {x.begin(), x.end()}; }

// ---------------------------------------------------------------------------
// Fixtures.

struct Fixture {
  std::string name;
  std::map<std::string, int64_t> cfg;  // the manifest line's key=value pairs
  NpyArray query, key, value, out, attn_weights;
  std::optional<NpyArray> kpm, attn_mask;
};

std::map<std::string, int64_t> ManifestLine(const std::string& name) {
  std::ifstream in(CaseDir("manifest.txt"));
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line.substr(0, line.find(':')));
    std::string first, word;
    words >> first;
    if (first != name) continue;
    std::map<std::string, int64_t> cfg;
    while (words >> word) {
      const size_t eq = word.find('=');
      cfg[word.substr(0, eq)] = std::stoll(word.substr(eq + 1));
    }
    return cfg;
  }
  ADD_FAILURE() << name << ": not in " << CaseDir("manifest.txt")
                << " (hint: /usr/bin/python3 tests/gen_mha_fixtures.py)";
  return {};
}

Fixture LoadFixture(const std::string& name) {
  const std::string dir = CaseDir(name);
  Fixture f;
  f.name = name;
  f.cfg = ManifestLine(name);
  f.query = ReadNpy(dir + "/query.npy");
  f.out = ReadNpy(dir + "/out.npy");
  f.attn_weights = ReadNpy(dir + "/attn_weights.npy");
  if (f.cfg["cross"]) {
    f.key = ReadNpy(dir + "/key.npy");
    f.value = ReadNpy(dir + "/value.npy");
  }
  if (fs::exists(dir + "/key_padding_mask.npy")) f.kpm = ReadNpy(dir + "/key_padding_mask.npy");
  if (fs::exists(dir + "/attn_mask.npy")) f.attn_mask = ReadNpy(dir + "/attn_mask.npy");
  return f;
}

MhaMask MaskOf(const std::optional<NpyArray>& a) {
  if (!a) return {};
  return {a->bytes.data(), a->dtype, a->shape};
}

// Reads the torch state_dict names directly (not through src/mha.cc).
Layer LayerFromFile(const SafetensorsFile& file, const std::map<std::string, int64_t>& cfg) {
  Layer l;
  l.embed_dim = cfg.at("embed_dim");
  l.num_heads = cfg.at("num_heads");
  l.num_kv_heads = l.num_heads;
  l.kdim = cfg.at("kdim");
  l.vdim = cfg.at("vdim");
  const int64_t e = l.embed_dim;
  auto load = [&](const char* name, std::vector<int64_t> shape) {
    const std::vector<float> x = file.LoadFloat32(name, shape);
    return std::vector<double>(x.begin(), x.end());
  };
  if (file.Find("in_proj_weight")) {
    const std::vector<double> w = load("in_proj_weight", {3 * e, e});
    l.wq.assign(w.begin(), w.begin() + e * e);
    l.wk.assign(w.begin() + e * e, w.begin() + 2 * e * e);
    l.wv.assign(w.begin() + 2 * e * e, w.end());
  } else {
    l.wq = load("q_proj_weight", {e, e});
    l.wk = load("k_proj_weight", {e, l.kdim});
    l.wv = load("v_proj_weight", {e, l.vdim});
  }
  if (file.Find("in_proj_bias")) {
    const std::vector<double> b = load("in_proj_bias", {3 * e});
    l.bq.assign(b.begin(), b.begin() + e);
    l.bk.assign(b.begin() + e, b.begin() + 2 * e);
    l.bv.assign(b.begin() + 2 * e, b.end());
  }
  l.wo = load("out_proj.weight", {e, e});
  if (file.Find("out_proj.bias")) l.bo = load("out_proj.bias", {e});
  return l;
}

// Returns the torch masks of `f` as one full additive [B,H,Nq,Nk] mask.
std::vector<double> FullMask(const Fixture& f) {
  const int64_t B = f.cfg.at("batch"), H = f.cfg.at("num_heads"), NQ = f.cfg.at("seq_q"),
                NK = f.cfg.at("seq_kv");
  if (!f.kpm && !f.attn_mask) return {};
  auto value = [](const NpyArray& a, int64_t flat) {
    return a.dtype == DType::kBool ? (a.data<uint8_t>()[flat] ? -kInf : 0.0)
                                   : static_cast<double>(a.data<float>()[flat]);
  };
  std::vector<double> m(B * H * NQ * NK, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < NQ; ++i)
        for (int64_t j = 0; j < NK; ++j) {
          double x = 0.0;
          if (f.attn_mask) {
            const bool three = f.attn_mask->shape.size() == 3;
            x += value(*f.attn_mask, ((three ? b * H + h : 0) * NQ + i) * NK + j);
          }
          if (f.kpm) x += value(*f.kpm, b * NK + j);
          m[((b * H + h) * NQ + i) * NK + j] = x;
        }
  return m;
}

struct QkvRun {
  bool use_attn_mask = true;
  bool causal = false;
  int threads = 0;
  float scale_perturbation = 1.0f;  // multiplies the query (for the tightness test)
  bool want_weights = true;         // without weights qkv::Attention may pick a faster kernel
};

// Runs qkv on fixture `f`; returns out and the weights in the fixture's form.
std::pair<std::vector<double>, std::vector<double>> RunQkv(const Fixture& f, const QkvRun& run) {
  const SafetensorsFile file = SafetensorsFile::Read(CaseDir(f.name) + "/weights.safetensors");
  MhaConfig config;
  config.embed_dim = f.cfg.at("embed_dim");
  config.num_heads = f.cfg.at("num_heads");
  config.kdim = f.cfg.at("kdim");
  config.vdim = f.cfg.at("vdim");
  const MultiHeadAttention mha = MultiHeadAttention::FromSafetensors(file, config);
  std::vector<float> query(f.query.data<float>(), f.query.data<float>() + f.query.numel());
  for (float& x : query) x *= run.scale_perturbation;
  MhaParams p;
  p.query = query;
  if (f.cfg.at("cross")) {
    p.key = {f.key.data<float>(), static_cast<size_t>(f.key.numel())};
    p.value = {f.value.data<float>(), static_cast<size_t>(f.value.numel())};
  }
  p.batch = f.cfg.at("batch");
  p.seq_q = f.cfg.at("seq_q");
  p.seq_kv = f.cfg.at("cross") ? f.cfg.at("seq_kv") : -1;  // -1: self-attention
  p.key_padding_mask = MaskOf(f.kpm);
  if (run.use_attn_mask) p.attn_mask = MaskOf(f.attn_mask);
  p.causal = run.causal;
  p.num_threads = run.threads;
  std::vector<float> out(f.out.numel()), weights(f.attn_weights.numel());
  p.out = out;
  if (run.want_weights) p.attn_weights = weights;
  p.average_attn_weights = !f.cfg.at("per_head");
  mha.Forward(p);
  return {ToDouble(out), ToDouble(weights)};
}

// Returns the exact result of fixture `f` with its error bounds.
Exact FixtureOracle(const Fixture& f) {
  const SafetensorsFile file = SafetensorsFile::Read(CaseDir(f.name) + "/weights.safetensors");
  Inputs in;
  in.batch = f.cfg.at("batch");
  in.seq_q = f.cfg.at("seq_q");
  in.seq_kv = f.cfg.at("seq_kv");
  in.query = ToDouble(f.query);
  if (f.cfg.at("cross")) in.key = ToDouble(f.key), in.value = ToDouble(f.value);
  in.mask = FullMask(f);
  return MhaOracle(LayerFromFile(file, f.cfg), in);
}

// Returns the worst |qkv - exact| / E over out and weights of one run.
double QkvWorstRatio(const Fixture& f, const Exact& x, const QkvRun& run) {
  const bool per_head = f.cfg.at("per_head") != 0;
  const auto [out, weights] = RunQkv(f, run);
  double worst = 0.0;
  (void)WithinBound("out", out, x.out, x.out_err, &worst);
  (void)WithinBound("weights", weights, per_head ? x.weights : x.avg,
                    per_head ? x.weights_err : x.avg_err, &worst);
  return worst;
}

// Checks torch and qkv against the oracle for fixture `name`.
void CheckFixture(const std::string& name, const QkvRun& run = {}) {
  SCOPED_TRACE("fixture " + name);
  const Fixture f = LoadFixture(name);
  const Exact x = FixtureOracle(f);
  const bool per_head = f.cfg.at("per_head") != 0;
  const std::vector<double>& w_exact = per_head ? x.weights : x.avg;
  const std::vector<double>& w_err = per_head ? x.weights_err : x.avg_err;
  const std::vector<double> torch_out = ToDouble(f.out), torch_w = ToDouble(f.attn_weights);
  EXPECT_TRUE(WithinBound("out (torch vs exact: fixture or bound problem)", torch_out, x.out,
                          x.out_err, nullptr));
  EXPECT_TRUE(WithinBound("attn_weights (torch vs exact: fixture or bound problem)", torch_w,
                          w_exact, w_err, nullptr));
  const auto [out, weights] = RunQkv(f, run);
  EXPECT_TRUE(WithinBound("out (qkv vs exact)", out, x.out, x.out_err, nullptr));
  EXPECT_TRUE(WithinBound("attn_weights (qkv vs exact)", weights, w_exact, w_err, nullptr));
  std::vector<double> out_2e(x.out_err), w_2e(w_err);
  for (double& e : out_2e) e *= 2.0;
  for (double& e : w_2e) e *= 2.0;
  EXPECT_TRUE(WithinBound("out (qkv vs torch)", out, torch_out, out_2e, nullptr));
  EXPECT_TRUE(WithinBound("attn_weights (qkv vs torch)", weights, torch_w, w_2e, nullptr));
  QkvRun no_weights = run;
  no_weights.want_weights = false;
  EXPECT_TRUE(WithinBound("out without weights (qkv vs exact)", RunQkv(f, no_weights).first, x.out,
                          x.out_err, nullptr));
}

TEST(MhaTest, ManifestHasMagicAndVersion) {
  std::ifstream in(CaseDir("manifest.txt"));
  ASSERT_TRUE(in) << CaseDir("manifest.txt")
                  << ": missing (hint: /usr/bin/python3 tests/gen_mha_fixtures.py)";
  std::string magic, versions;
  std::getline(in, magic);
  std::getline(in, versions);
  EXPECT_EQ(magic, "qkv-mha-fixtures 1");
  EXPECT_EQ(versions.rfind("torch 1.13", 0), 0u) << versions;
}

TEST(MhaTest, SelfAttentionPackedWeightsWithBias) { CheckFixture("self_bias"); }
TEST(MhaTest, SelfAttentionNoBiasKeyPadding) { CheckFixture("self_nobias_kpm"); }
TEST(MhaTest, CrossKdimVdimKeyPadding) { CheckFixture("cross_kdim_vdim_kpm"); }
TEST(MhaTest, CrossKdimVdimNoBiasBoolMask2d) { CheckFixture("cross_kdim_vdim_nobias"); }
TEST(MhaTest, CrossFloatMask2dAndKeyPadding) { CheckFixture("cross_float_mask_2d"); }
TEST(MhaTest, BoolMask3dPerHeadWeights) { CheckFixture("bool_mask_3d"); }
TEST(MhaTest, FloatMask3dAndKeyPadding) { CheckFixture("float_mask_3d_kpm"); }
TEST(MhaTest, FloatKeyPaddingMaskIsAdded) { CheckFixture("float_kpm"); }
TEST(MhaTest, SingleHead) { CheckFixture("single_head"); }
TEST(MhaTest, HeadDimOne) { CheckFixture("head_dim_one"); }

// torch ran these with the top-left mask triu(1) (its is_causal); qkv's
// causal flag alone, the mask alone, and both (AND) must all match.
TEST(MhaTest, CausalIsTopLeftAsTorch) {
  for (const char* name : {"causal_self", "causal_cross"}) {
    CheckFixture(name, {.use_attn_mask = false, .causal = true});
    CheckFixture(name, {.use_attn_mask = true, .causal = false});
    CheckFixture(name, {.use_attn_mask = true, .causal = true});
  }
}

// The bound is not vacuous. Measured on this fixture: qkv uses 1.2% of it;
// scaling the query by 1 + 2^-16 (256 float32 ulps) already gives 1.13x the
// bound, 1 + 2^-15 gives 2.3x and 1 + 2^-12 18x.
TEST(MhaTest, BoundIsTightEnoughToCatchAScaleError) {
  const Fixture f = LoadFixture("cross_float_mask_2d");
  const Exact x = FixtureOracle(f);
  EXPECT_LT(QkvWorstRatio(f, x, {}), 0.1);
  EXPECT_GT(QkvWorstRatio(f, x, {.scale_perturbation = 1.0f + 0x1p-15f}), 1.5);
}

TEST(MhaTest, ThreadCountDoesNotChangeResults) {
  const Fixture f = LoadFixture("cross_float_mask_2d");
  const auto [out1, w1] = RunQkv(f, {.threads = 1});
  const auto [out3, w3] = RunQkv(f, {.threads = 3});
  EXPECT_EQ(out1, out3);
  EXPECT_EQ(w1, w3);
}

// ---------------------------------------------------------------------------
// Parameter counts.

TEST(MhaTest, ParamCountIs4ESquaredWhateverHeads) {
  for (int64_t e : {64, 96}) {
    for (int64_t h : {1, 2, 4, 8, 16, 32}) {
      if (e % h != 0) continue;
      EXPECT_EQ(MhaParamCount({.embed_dim = e, .num_heads = h}, false), 4 * e * e) << h;
      EXPECT_EQ(MhaParamCount({.embed_dim = e, .num_heads = h}, true), 4 * e * e + 4 * e) << h;
    }
  }
  // GQA: K and V shrink to G * hd rows. E = 64, H = 8 (hd 8), G = 2: 16 rows.
  EXPECT_EQ(MhaParamCount({.embed_dim = 64, .num_heads = 8, .num_kv_heads = 2}, true),
            2 * 64 * 64 + 2 * 16 * 64 + 2 * 64 + 2 * 16);
  // kdim / vdim change only W_k and W_v.
  EXPECT_EQ(MhaParamCount({.embed_dim = 16, .num_heads = 4, .kdim = 10, .vdim = 12}, false),
            2 * 16 * 16 + 16 * 10 + 16 * 12);
}

// The count equals the number of values torch saved (sum(p.numel() for p in
// mha.parameters())) for every fixture.
TEST(MhaTest, ParamCountMatchesTorchStateDicts) {
  for (const auto& entry : fs::directory_iterator(std::string(QKV_TESTDATA_DIR) + "/mha")) {
    if (!entry.is_directory()) continue;
    const std::string name = entry.path().filename();
    SCOPED_TRACE(name);
    const auto cfg = ManifestLine(name);
    const SafetensorsFile file = SafetensorsFile::Read(entry.path() / "weights.safetensors");
    int64_t saved = 0;
    for (const auto& t : file.tensors()) {
      int64_t n = 1;
      for (int64_t d : t.shape) n *= d;
      saved += n;
    }
    const MhaConfig c{.embed_dim = cfg.at("embed_dim"),
                      .num_heads = cfg.at("num_heads"),
                      .kdim = cfg.at("kdim"),
                      .vdim = cfg.at("vdim")};
    EXPECT_EQ(MhaParamCount(c, cfg.at("bias") != 0), saved);
  }
}

// ---------------------------------------------------------------------------
// Grouped-query and multi-query attention (not in torch: float64 oracle).

struct GqaSetup {
  Layer layer;
  MhaWeights weights;  // the same values in float32
  Inputs in;
  std::vector<float> query, key, value, kpm, attn_mask;
};

std::vector<float> RandomFloats(int64_t n, std::mt19937_64& rng, double sigma) {
  std::normal_distribution<double> normal(0.0, sigma);
  std::vector<float> x(n);
  for (float& v : x) v = static_cast<float>(normal(rng));
  return x;
}

// E = 32, H = 8 (hd 4), G kv heads; cross-attention with kdim 24, vdim 20,
// Nq = 5, Nk = 9; a float key_padding_mask and a 3-D float attn_mask with
// -inf (key 0 always visible).
GqaSetup MakeGqa(int64_t g, uint64_t seed) {
  std::mt19937_64 rng(seed);
  GqaSetup s;
  const int64_t e = 32, h = 8, hd = 4, kdim = 24, vdim = 20, b = 2, nq = 5, nk = 9;
  s.weights.q_proj = RandomFloats(e * e, rng, 0.3);
  s.weights.k_proj = RandomFloats(g * hd * kdim, rng, 0.3);
  s.weights.v_proj = RandomFloats(g * hd * vdim, rng, 0.3);
  s.weights.out_proj = RandomFloats(e * e, rng, 0.3);
  s.weights.q_bias = RandomFloats(e, rng, 0.5);
  s.weights.k_bias = RandomFloats(g * hd, rng, 0.5);
  s.weights.v_bias = RandomFloats(g * hd, rng, 0.5);
  s.weights.out_bias = RandomFloats(e, rng, 0.5);
  Layer& l = s.layer;
  l.embed_dim = e, l.num_heads = h, l.num_kv_heads = g, l.kdim = kdim, l.vdim = vdim;
  l.wq = ToDouble(s.weights.q_proj), l.wk = ToDouble(s.weights.k_proj);
  l.wv = ToDouble(s.weights.v_proj), l.wo = ToDouble(s.weights.out_proj);
  l.bq = ToDouble(s.weights.q_bias), l.bk = ToDouble(s.weights.k_bias);
  l.bv = ToDouble(s.weights.v_bias), l.bo = ToDouble(s.weights.out_bias);
  s.query = RandomFloats(b * nq * e, rng, 1.0);
  s.key = RandomFloats(b * nk * kdim, rng, 1.0);
  s.value = RandomFloats(b * nk * vdim, rng, 1.0);
  s.kpm = RandomFloats(b * nk, rng, 1.0);
  s.attn_mask = RandomFloats(b * h * nq * nk, rng, 2.0);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (size_t f = 0; f < s.attn_mask.size(); ++f) {
    if (f % nk != 0 && unit(rng) < 0.3) s.attn_mask[f] = -INFINITY;
  }
  s.in.batch = b, s.in.seq_q = nq, s.in.seq_kv = nk;
  s.in.query = ToDouble(s.query), s.in.key = ToDouble(s.key), s.in.value = ToDouble(s.value);
  s.in.mask.resize(s.attn_mask.size());
  for (int64_t f = 0; f < static_cast<int64_t>(s.attn_mask.size()); ++f) {
    const int64_t bb = f / (h * nq * nk), j = f % nk;
    s.in.mask[f] = double{s.attn_mask[f]} + double{s.kpm[bb * nk + j]};
  }
  return s;
}

MhaParams GqaParams(const GqaSetup& s, std::vector<float>& out, std::vector<float>& weights) {
  MhaParams p;
  p.query = s.query, p.key = s.key, p.value = s.value;
  p.batch = s.in.batch, p.seq_q = s.in.seq_q, p.seq_kv = s.in.seq_kv;
  p.key_padding_mask = {s.kpm.data(), DType::kFloat32, {s.in.batch, s.in.seq_kv}};
  p.attn_mask = {s.attn_mask.data(),
                 DType::kFloat32,
                 {s.in.batch * s.layer.num_heads, s.in.seq_q, s.in.seq_kv}};
  p.causal = s.in.causal;
  out.assign(s.in.batch * s.in.seq_q * s.layer.embed_dim, NAN);
  weights.assign(s.in.batch * s.layer.num_heads * s.in.seq_q * s.in.seq_kv, NAN);
  p.out = out;
  p.attn_weights = weights;
  p.average_attn_weights = false;
  return p;
}

// Writes the GQA weights with the documented names (docs/mha.md) and loads
// them back through FromSafetensors.
MultiHeadAttention SaveAndLoadGqa(const GqaSetup& s, const std::string& path) {
  const Layer& l = s.layer;
  const int64_t kv = l.num_kv_heads * (l.embed_dim / l.num_heads);
  std::vector<float> in_proj_bias = s.weights.q_bias;
  in_proj_bias.insert(in_proj_bias.end(), s.weights.k_bias.begin(), s.weights.k_bias.end());
  in_proj_bias.insert(in_proj_bias.end(), s.weights.v_bias.begin(), s.weights.v_bias.end());
  const std::vector<SafetensorsEntry> entries = {
      {"q_proj_weight", {l.embed_dim, l.embed_dim}, s.weights.q_proj},
      {"k_proj_weight", {kv, l.kdim}, s.weights.k_proj},
      {"v_proj_weight", {kv, l.vdim}, s.weights.v_proj},
      {"in_proj_bias", {l.embed_dim + 2 * kv}, in_proj_bias},
      {"out_proj.weight", {l.embed_dim, l.embed_dim}, s.weights.out_proj},
      {"out_proj.bias", {l.embed_dim}, s.weights.out_bias},
  };
  WriteSafetensors(path, entries);
  return MultiHeadAttention::FromSafetensors(SafetensorsFile::Read(path),
                                             {.embed_dim = l.embed_dim,
                                              .num_heads = l.num_heads,
                                              .num_kv_heads = l.num_kv_heads,
                                              .kdim = l.kdim,
                                              .vdim = l.vdim});
}

TEST(MhaTest, GqaAndMqaMatchFloat64) {
  const std::string path = ::testing::TempDir() + "/mha_gqa.safetensors";
  for (int64_t g : {8, 4, 2, 1}) {
    for (bool causal : {false, true}) {
      SCOPED_TRACE("num_kv_heads " + std::to_string(g) + (causal ? " causal" : ""));
      GqaSetup s = MakeGqa(g, 7 + g);
      s.in.causal = causal;
      const Exact x = MhaOracle(s.layer, s.in);
      const MultiHeadAttention mha = SaveAndLoadGqa(s, path);
      EXPECT_EQ(mha.config().num_kv_heads, g);
      std::vector<float> out, weights;
      mha.Forward(GqaParams(s, out, weights));
      EXPECT_TRUE(WithinBound("out", ToDouble(out), x.out, x.out_err, nullptr));
      EXPECT_TRUE(WithinBound("weights", ToDouble(weights), x.weights, x.weights_err, nullptr));
    }
  }
  std::remove(path.c_str());
}

// GQA is MHA with each K/V head's projection rows repeated for the group_size
// query heads that read it (flash-attention's `repeat` check). The
// projections run on OpenBLAS's SGEMM, whose micro-kernels may sum a product
// in another order at another column position (8 K/V columns here, 32
// there), so the two agree to float32 rounding, not bitwise: each projected
// value within gamma_(kdim+1) of the exact one, and attention's condition
// number on these O(1) inputs is small, so 1e-5 relative is a wide margin.
TEST(MhaTest, GqaEqualsMhaWithRepeatedKvProjections) {
  const GqaSetup s = MakeGqa(2, 99);
  const int64_t h = 8, g = 2, hd = 4, group_size = h / g;
  const MultiHeadAttention gqa(
      {.embed_dim = 32, .num_heads = h, .num_kv_heads = g, .kdim = 24, .vdim = 20}, s.weights);
  MhaWeights w = s.weights;
  const auto repeat = [&](const std::vector<float>& x, int64_t cols) {
    std::vector<float> r;
    for (int64_t head = 0; head < h; ++head) {
      const int64_t kv_head = head / group_size;
      r.insert(r.end(), x.begin() + kv_head * hd * cols, x.begin() + (kv_head + 1) * hd * cols);
    }
    return r;
  };
  w.k_proj = repeat(s.weights.k_proj, 24), w.v_proj = repeat(s.weights.v_proj, 20);
  w.k_bias = repeat(s.weights.k_bias, 1), w.v_bias = repeat(s.weights.v_bias, 1);
  const MultiHeadAttention mha({.embed_dim = 32, .num_heads = h, .kdim = 24, .vdim = 20}, w);
  std::vector<float> out_gqa, w_gqa, out_mha, w_mha;
  gqa.Forward(GqaParams(s, out_gqa, w_gqa));
  mha.Forward(GqaParams(s, out_mha, w_mha));
  ASSERT_EQ(out_gqa.size(), out_mha.size());
  ASSERT_EQ(w_gqa.size(), w_mha.size());
  for (size_t i = 0; i < out_gqa.size(); ++i) {
    ASSERT_NEAR(out_gqa[i], out_mha[i], 1e-5 * (1 + std::abs(out_mha[i]))) << "out " << i;
  }
  for (size_t i = 0; i < w_gqa.size(); ++i) {
    ASSERT_NEAR(w_gqa[i], w_mha[i], 1e-5 * (1 + w_mha[i])) << "weights " << i;
  }
}

// ---------------------------------------------------------------------------
// qkv-only behaviour and mask conversion.

// torch gives NaN for a query row with no visible key; qkv gives a zero
// attention row, so the layer's output is exactly out_proj.bias there.
TEST(MhaTest, FullyMaskedRowGivesOutputBias) {
  GqaSetup s = MakeGqa(8, 3);
  for (int64_t j = 0; j < s.in.seq_kv; ++j) s.kpm[j] = -INFINITY;  // batch 0: every key
  const MultiHeadAttention mha({.embed_dim = 32, .num_heads = 8, .kdim = 24, .vdim = 20},
                               s.weights);
  std::vector<float> out, weights;
  mha.Forward(GqaParams(s, out, weights));
  for (int64_t i = 0; i < s.in.seq_q; ++i)
    for (int64_t c = 0; c < 32; ++c) ASSERT_EQ(out[i * 32 + c], s.weights.out_bias[c]);
  const int64_t batch0 = 8 * s.in.seq_q * s.in.seq_kv;
  for (int64_t f = 0; f < batch0; ++f) ASSERT_EQ(weights[f], 0.0f);
  for (size_t f = batch0; f < weights.size(); ++f) ASSERT_FALSE(std::isnan(weights[f]));
}

// Cross-attention with no keys at all (seq_kv = 0) is the same case for every
// row; empty batches and query sequences are no-ops.
TEST(MhaTest, EmptySizesWork) {
  const GqaSetup s = MakeGqa(4, 11);
  const MultiHeadAttention mha(
      {.embed_dim = 32, .num_heads = 8, .num_kv_heads = 4, .kdim = 24, .vdim = 20}, s.weights);
  std::vector<float> out(2 * 5 * 32, NAN);
  MhaParams p;
  p.query = s.query, p.batch = 2, p.seq_q = 5, p.seq_kv = 0, p.out = out;
  mha.Forward(p);
  for (size_t f = 0; f < out.size(); ++f) ASSERT_EQ(out[f], s.weights.out_bias[f % 32]);
  p.batch = 0, p.query = {}, p.out = {};
  mha.Forward(p);
  p.batch = 2, p.seq_q = 0, p.seq_kv = 9, p.key = s.key, p.value = s.value;
  mha.Forward(p);
}

TEST(MhaTest, MaskConversionBroadcastsAndCountsMemory) {
  const int64_t B = 2, H = 3, NQ = 4, NK = 5;
  const std::vector<uint8_t> kpm = {0, 1, 0, 0, 0, /**/ 0, 0, 0, 0, 1};
  std::vector<float> attn2(NQ * NK, 0.5f);
  attn2[1] = -INFINITY;
  const MhaMask kpm_mask{kpm.data(), DType::kBool, {B, NK}};
  const MhaMask attn_mask{attn2.data(), DType::kFloat32, {NQ, NK}};

  const MhaMaskSpec none = ConvertMhaMasks({}, {}, true, B, H, NQ, NK);
  EXPECT_FALSE(none.spec.mask.present());
  EXPECT_TRUE(none.spec.causal);
  EXPECT_EQ(none.spec.alignment, Alignment::kTopLeft);

  const MhaMaskSpec in_place = ConvertMhaMasks({}, attn_mask, false, B, H, NQ, NK);
  EXPECT_EQ(in_place.spec.mask.data, attn2.data());  // no copy
  EXPECT_TRUE(in_place.buffer.empty());
  EXPECT_EQ(in_place.spec.mask.shape, (Shape4{1, 1, NQ, NK}));
  EXPECT_EQ(in_place.spec.mask.strides, (Shape4{0, 0, NK, 1}));

  const MhaMaskSpec padding = ConvertMhaMasks(kpm_mask, {}, false, B, H, NQ, NK);
  EXPECT_EQ(padding.buffer.size(), static_cast<size_t>(B * NK));  // [B,1,1,Nk]
  EXPECT_EQ(padding.spec.mask.strides, (Shape4{NK, 0, 0, 1}));
  EXPECT_EQ(padding.buffer[1], -INFINITY);
  EXPECT_EQ(padding.buffer[NK + 4], -INFINITY);
  EXPECT_EQ(padding.buffer[0], 0.0f);

  const MhaMaskSpec both = ConvertMhaMasks(kpm_mask, attn_mask, false, B, H, NQ, NK);
  EXPECT_EQ(both.buffer.size(), static_cast<size_t>(B * NQ * NK));  // [B,1,Nq,Nk]
  EXPECT_EQ(both.spec.mask.strides, (Shape4{NQ * NK, 0, NK, 1}));
  EXPECT_EQ(both.buffer[0], 0.5f);
  EXPECT_EQ(both.buffer[1], -INFINITY);       // attn_mask and the padding
  EXPECT_EQ(both.buffer[NK + 1], -INFINITY);  // padding of batch 0, row 1

  std::vector<uint8_t> attn3(B * H * NQ * NK, 0);
  attn3[(1 * H + 2) * NQ * NK + 7] = 1;  // b 1, h 2, i 1, j 2
  const MhaMaskSpec three =
      ConvertMhaMasks({}, {attn3.data(), DType::kBool, {B * H, NQ, NK}}, false, B, H, NQ, NK);
  EXPECT_EQ(three.buffer.size(), attn3.size());
  EXPECT_EQ(three.spec.mask.shape, (Shape4{B, H, NQ, NK}));
  EXPECT_EQ(three.buffer[(1 * H + 2) * NQ * NK + 7], -INFINITY);
  EXPECT_EQ(three.buffer[(1 * H + 1) * NQ * NK + 7], 0.0f);

  // A moved result still views its own buffer.
  MhaMaskSpec moved = ConvertMhaMasks(kpm_mask, {}, false, B, H, NQ, NK);
  const void* data = moved.buffer.data();
  const MhaMaskSpec target = std::move(moved);
  EXPECT_EQ(target.spec.mask.data, data);
}

// ---------------------------------------------------------------------------
// Errors: one line naming the argument or tensor.

template <class F>
std::string ErrorOf(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(MhaTest, EmbedDimNotMultipleOfHeadsIsAnError) {
  const std::string m = ErrorOf([] { MhaParamCount({.embed_dim = 10, .num_heads = 4}, true); });
  EXPECT_NE(m.find("num_heads: 4 does not divide embed_dim 10"), std::string::npos) << m;
  EXPECT_NE(
      ErrorOf([] { MultiHeadAttention({.embed_dim = 10, .num_heads = 3}, {}); }).find("num_heads"),
      std::string::npos);
  EXPECT_NE(ErrorOf([] {
              MhaParamCount({.embed_dim = 16, .num_heads = 4, .num_kv_heads = 3}, true);
            }).find("num_kv_heads: 3"),
            std::string::npos);
  EXPECT_NE(
      ErrorOf([] { MhaParamCount({.embed_dim = 0, .num_heads = 1}, true); }).find("embed_dim"),
      std::string::npos);
}

TEST(MhaTest, BadWeightShapesNameTheTensor) {
  const std::string path = ::testing::TempDir() + "/mha_bad.safetensors";
  const std::vector<float> zeros(3 * 16 * 16 + 64, 0.0f);
  const auto data = [&](int64_t n) { return std::span<const float>(zeros.data(), n); };
  const auto load_error = [&](std::vector<SafetensorsEntry> entries, MhaConfig config) {
    WriteSafetensors(path, entries);
    return ErrorOf(
        [&] { MultiHeadAttention::FromSafetensors(SafetensorsFile::Read(path), config); });
  };
  const MhaConfig std16{.embed_dim = 16, .num_heads = 4};
  const SafetensorsEntry out_w{"out_proj.weight", {16, 16}, data(256)};
  const SafetensorsEntry packed{"in_proj_weight", {48, 16}, data(768)};
  std::string m = load_error({{"in_proj_weight", {16, 48}, data(768)}, out_w}, std16);
  EXPECT_NE(m.find("in_proj_weight"), std::string::npos) << m;
  m = load_error({packed, {"out_proj.weight", {16, 15}, data(240)}}, std16);
  EXPECT_NE(m.find("out_proj.weight"), std::string::npos) << m;
  m = load_error({packed}, std16);
  EXPECT_NE(m.find("out_proj.weight"), std::string::npos) << m;
  m = load_error({packed, out_w, {"in_proj_bias", {47}, data(47)}}, std16);
  EXPECT_NE(m.find("in_proj_bias"), std::string::npos) << m;
  m = load_error({packed, out_w, {"bias_k", {1, 1, 16}, data(16)}}, std16);
  EXPECT_NE(m.find("bias_k"), std::string::npos) << m;
  m = load_error({out_w}, std16);
  EXPECT_NE(m.find("in_proj_weight: missing, and no q_proj_weight"), std::string::npos) << m;
  EXPECT_NE(m.find("the file has out_proj.weight"), std::string::npos) << m;
  // Saved under a prefix (a whole model's state_dict): the prefix that
  // would find them is named.
  m = load_error({{"layers.0.self_attn.in_proj_weight", {48, 16}, data(768)},
                  {"layers.0.self_attn.out_proj.weight", {16, 16}, data(256)}},
                 std16);
  EXPECT_NE(m.find("layers.0.self_attn.in_proj_weight (prefix \"layers.0.self_attn.\")"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("--prefix"), std::string::npos) << m;
  // kdim = 10: torch saves q/k/v_proj_weight; a wrong k shape is named.
  const MhaConfig kdim10{.embed_dim = 16, .num_heads = 4, .kdim = 10};
  m = load_error({{"q_proj_weight", {16, 16}, data(256)},
                  {"k_proj_weight", {16, 16}, data(256)},
                  {"v_proj_weight", {16, 16}, data(256)},
                  out_w},
                 kdim10);
  EXPECT_NE(m.find("k_proj_weight"), std::string::npos) << m;
  m = load_error({packed, out_w}, kdim10);  // packed weights cannot have kdim != E
  EXPECT_NE(m.find("in_proj_weight: present, but kdim 10"), std::string::npos) << m;
  // GQA: k_proj_weight is [G*hd, kdim] = [8, 16] for G = 2.
  m = load_error({{"q_proj_weight", {16, 16}, data(256)},
                  {"k_proj_weight", {16, 16}, data(256)},
                  {"v_proj_weight", {8, 16}, data(128)},
                  out_w},
                 {.embed_dim = 16, .num_heads = 4, .num_kv_heads = 2});
  EXPECT_NE(m.find("k_proj_weight"), std::string::npos) << m;
  std::remove(path.c_str());
  // In-memory weights: the constructor names the vector.
  MhaWeights w;
  w.q_proj.assign(256, 0.0f), w.k_proj.assign(255, 0.0f), w.v_proj.assign(256, 0.0f);
  w.out_proj.assign(256, 0.0f);
  m = ErrorOf([&] { MultiHeadAttention(std16, w); });
  EXPECT_NE(m.find("k_proj: 255 floats (expected [16,16])"), std::string::npos) << m;
}

TEST(MhaTest, BadForwardArgumentsNameTheArgument) {
  const GqaSetup s = MakeGqa(4, 5);
  const MultiHeadAttention mha(
      {.embed_dim = 32, .num_heads = 8, .num_kv_heads = 4, .kdim = 24, .vdim = 20}, s.weights);
  std::vector<float> out, weights;
  const auto error = [&](auto edit) {
    MhaParams p = GqaParams(s, out, weights);
    edit(p);
    return ErrorOf([&] { mha.Forward(p); });
  };
  EXPECT_NE(error([](MhaParams& p) { p.query = p.query.first(7); }).find("query: 7 floats"),
            std::string::npos);
  EXPECT_NE(error([](MhaParams& p) { p.seq_kv = -1; }).find("key, value: self-attention"),
            std::string::npos);  // kdim 24 != E, and key given
  EXPECT_NE(error([](MhaParams& p) { p.key = {}, p.value = {}; }).find("key: 0 floats"),
            std::string::npos);
  EXPECT_NE(error([](MhaParams& p) { p.seq_kv = 8; }).find("key:"), std::string::npos);
  EXPECT_NE(error([](MhaParams& p) { p.average_attn_weights = true; }).find("attn_weights:"),
            std::string::npos);
  EXPECT_NE(error([](MhaParams& p) {
              p.attn_mask.shape = {5, 8};
            }).find("attn_mask: shape [5,8]"),
            std::string::npos);
  EXPECT_NE(error([](MhaParams& p) {
              p.key_padding_mask.shape = {9, 2};
            }).find("key_padding_mask: shape [9,2]"),
            std::string::npos);
  EXPECT_NE(error([](MhaParams& p) {
              p.key_padding_mask.dtype = DType::kInt32;
            }).find("key_padding_mask: dtype int32"),
            std::string::npos);
  // Nothing was written by the failed calls.
  for (float x : out) ASSERT_TRUE(std::isnan(x));
}

// ---------------------------------------------------------------------------
// The `qkv mha` command (built into qkv_tests only, with QKV_CLI_PATH).

#ifdef QKV_CLI_PATH
struct Cli {
  int status = -1;
  std::string err;
};

Cli RunMha(const std::string& args, const std::string& dir) {
  const std::string err_path = dir + "/stderr.txt";
  const std::string command =
      std::string(QKV_CLI_PATH) + " mha " + args + " >/dev/null 2>" + err_path;
  const int raw = std::system(command.c_str());
  Cli r;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  std::ifstream in(err_path);
  r.err.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return r;
}

// The CLI runs the library: its files equal Forward's result bitwise.
TEST(MhaTest, CliMatchesLibrary) {
  const std::string dir = ::testing::TempDir() + "/mha_cli";
  fs::create_directories(dir);
  for (const char* name : {"cross_float_mask_2d", "bool_mask_3d", "causal_cross"}) {
    SCOPED_TRACE(name);
    const Fixture f = LoadFixture(name);
    const std::string c = CaseDir(name);
    std::string args = "--query " + c + "/query.npy --params " + c + "/weights.safetensors" +
                       " --heads " + std::to_string(f.cfg.at("num_heads")) + " --out " + dir +
                       "/out.npy --attn-weights " + dir + "/w.npy";
    if (f.cfg.at("cross")) args += " --key " + c + "/key.npy --value " + c + "/value.npy";
    if (f.kpm) args += " --key-padding-mask " + c + "/key_padding_mask.npy";
    if (f.cfg.at("causal")) {
      args += " --causal-top-left";
    } else if (f.attn_mask) {
      args += " --attn-mask " + c + "/attn_mask.npy";
    }
    if (f.cfg.at("per_head")) args += " --per-head-weights";
    const Cli r = RunMha(args, dir);
    ASSERT_EQ(r.status, 0) << r.err;
    const auto [out, weights] =
        RunQkv(f, {.use_attn_mask = !f.cfg.at("causal"), .causal = f.cfg.at("causal") != 0});
    EXPECT_EQ(ToDouble(ReadNpy(dir + "/out.npy")), out);
    EXPECT_EQ(ToDouble(ReadNpy(dir + "/w.npy")), weights);
  }
  fs::remove_all(dir);
}

TEST(MhaTest, CliErrorsNameTheFlag) {
  const std::string dir = ::testing::TempDir() + "/mha_cli_err";
  fs::create_directories(dir);
  const std::string c = CaseDir("cross_kdim_vdim_kpm");
  const std::string base = "--query " + c + "/query.npy --key " + c + "/key.npy --value " + c +
                           "/value.npy --params " + c + "/weights.safetensors --out " + dir +
                           "/out.npy";
  const std::pair<std::string, std::string> cases[] = {
      {base + " --heads 3", "--heads"},
      {base + " --heads 4 --kv-heads 3", "--kv-heads"},
      {"--query " + c + "/query.npy --key " + c + "/key.npy --params " + c +
           "/weights.safetensors --heads 4 --out " + dir + "/out.npy",
       "--value"},
      {base + " --heads 4 --key-padding-mask " + c + "/query.npy", "--key-padding-mask"},
      {base + " --heads 4 --attn-mask " + c + "/key_padding_mask.npy", "--attn-mask"},
      {"--query " + c + "/query.npy --params " + c + "/weights.safetensors --heads 4 --out " +
           dir + "/out.npy",
       "--params"},  // self-attention with a kdim=10 file
      {base + " --heads 4 --params " + c + "/query.npy", "--params"},
  };
  for (const auto& [args, flag] : cases) {
    SCOPED_TRACE(args);
    const Cli r = RunMha(args, dir);
    EXPECT_EQ(r.status, 2);
    EXPECT_NE(r.err.find(flag), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_FALSE(fs::exists(dir + "/out.npy"));
  }
  fs::remove_all(dir);
}

// Writes a raw safetensors file: 8-byte little-endian header length (or
// `claimed_len` when nonzero), the header text, then `data_bytes` zero bytes.
void WriteRawSafetensors(const std::string& path, const std::string& header, size_t data_bytes,
                         uint64_t claimed_len = 0) {
  std::ofstream f(path, std::ios::binary);
  const uint64_t len = claimed_len ? claimed_len : header.size();
  for (int i = 0; i < 8; ++i) f.put(static_cast<char>((len >> (8 * i)) & 0xff));
  f << header << std::string(data_bytes, '\0');
}

// Corrupt or hostile weight files: each is exit status 2 with one line that
// names the file, and no output. E = 4, H = 2: in_proj_weight [12, 4] is 192
// bytes, out_proj.weight [4, 4] 64 bytes.
TEST(MhaTest, CliCorruptSafetensorsAreRefused) {
  const std::string dir = ::testing::TempDir() + "/mha_cli_corrupt";
  fs::create_directories(dir);
  const std::vector<float> x(1 * 3 * 4, 0.5f);
  const int64_t x_shape[] = {1, 3, 4};
  WriteNpy(dir + "/x.npy", DType::kFloat32, x_shape, x.data());
  auto entry = [](const std::string& name, const std::string& dtype, const std::string& shape,
                  int begin, int end) {
    return "\"" + name + "\": {\"dtype\": \"" + dtype + "\", \"shape\": " + shape +
           ", \"data_offsets\": [" + std::to_string(begin) + ", " + std::to_string(end) + "]}";
  };
  const std::string good = "{" + entry("in_proj_weight", "F32", "[12, 4]", 0, 192) + ", " +
                           entry("out_proj.weight", "F32", "[4, 4]", 192, 256) + "}";
  struct Bad {
    const char* what;
    std::string header;
    size_t data;
    uint64_t claimed_len;
    const char* fragment;
  };
  const Bad cases[] = {
      {"truncated data", good, 100, 0, "bad.safetensors"},
      {"huge header length", good, 256, uint64_t{1} << 62, "header"},
      {"offsets out of the file",
       "{" + entry("in_proj_weight", "F32", "[12, 4]", 0, 192) + ", " +
           entry("out_proj.weight", "F32", "[4, 4]", 192, 256) + "}",
       200, 0, "bad.safetensors"},
      {"overlapping tensors",
       "{" + entry("in_proj_weight", "F32", "[12, 4]", 0, 192) + ", " +
           entry("out_proj.weight", "F32", "[4, 4]", 128, 192) + "}",
       256, 0, "overlap"},
      {"wrong dtype",
       "{" + entry("in_proj_weight", "I32", "[12, 4]", 0, 192) + ", " +
           entry("out_proj.weight", "F32", "[4, 4]", 192, 256) + "}",
       256, 0, "I32"},
      {"wrong shape",
       "{" + entry("in_proj_weight", "F32", "[12, 3]", 0, 144) + ", " +
           entry("out_proj.weight", "F32", "[4, 4]", 144, 208) + "}",
       208, 0, "in_proj_weight"},
  };
  for (const Bad& b : cases) {
    SCOPED_TRACE(b.what);
    WriteRawSafetensors(dir + "/bad.safetensors", b.header, b.data, b.claimed_len);
    const Cli r = RunMha("--query " + dir + "/x.npy --params " + dir +
                             "/bad.safetensors --heads 2 --out " + dir + "/out.npy",
                         dir);
    EXPECT_EQ(r.status, 2) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(b.fragment), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(dir + "/out.npy"));
  }
  // The good header with its data runs (so the cases above fail for their
  // one defect only).
  WriteRawSafetensors(dir + "/good.safetensors", good, 256);
  const Cli ok = RunMha("--query " + dir + "/x.npy --params " + dir +
                            "/good.safetensors --heads 2 --out " + dir + "/out.npy",
                        dir);
  EXPECT_EQ(ok.status, 0) << ok.err;
  fs::remove_all(dir);
}
#endif  // QKV_CLI_PATH

}  // namespace
}  // namespace qkv
