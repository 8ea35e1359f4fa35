// qkv classic: one decoder step of Bahdanau / Luong attention on .npy files.
// See docs/classic.md.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
#include "qkv/classic_attention.h"
#include "qkv/error.h"
#include "qkv/npy.h"

namespace qkv::cli {
namespace {

struct ClassicFlags {
  std::string score;
  std::string state, encoder, w1, w2, v, w, mask;
  std::string context, weights, scores;
};

// A float input converted to float32, with its .npy shape.
struct Input {
  std::vector<float> data;
  std::vector<int64_t> shape;
};

// Reads a .npy file; a failure names the flag: "--x: X.npy: cannot open ...".
NpyArray ReadFlag(const std::string& path, const char* flag) {
  try {
    return ReadNpy(path);
  } catch (const Error& e) {
    throw Error(std::string(flag) + ": " + e.what());
  }
}

std::string Shape(const std::vector<int64_t>& shape) { return NpyShapeString(shape); }

// Reads `path` (float32 or float16, `rank` dims) as float32; an empty path
// gives an empty input.
Input Load(const std::string& path, const char* flag, size_t rank, const std::string& expected) {
  Input in;
  if (path.empty()) return in;
  const NpyArray a = ReadFlag(path, flag);
  if (a.dtype != DType::kFloat32 && a.dtype != DType::kFloat16) {
    throw Error(std::string(flag) + ": " + path + " has dtype " + DTypeName(a.dtype) +
                " (expected float32 or float16)");
  }
  if (a.shape.size() != rank) {
    throw Error(std::string(flag) + ": " + path + " has shape " + Shape(a.shape) + " (expected " +
                expected + ")");
  }
  in.shape = a.shape;
  in.data.resize(a.numel());
  for (int64_t i = 0; i < a.numel(); ++i) {
    in.data[i] =
        a.dtype == DType::kFloat32 ? a.data<float>()[i] : HalfToFloat(a.data<uint16_t>()[i]);
  }
  return in;
}

// Throws unless `in` has the expected shape (-1 matches any size).
void CheckShape(const Input& in, const char* flag, const std::string& path,
                const std::vector<int64_t>& want, const std::string& names) {
  bool ok = in.shape.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = want[i] < 0 || in.shape[i] == want[i];
  if (!ok) {
    throw Error(std::string(flag) + ": " + path + " has shape " + Shape(in.shape) + " (expected " +
                names + ")");
  }
}

// Which weight flags each score takes, in the order w1, w2, v, w.
struct ScoreFlags {
  const char* name;
  ClassicScore score;
  bool w1, w2, v, w;
};
constexpr ScoreFlags kScores[] = {
    {"bahdanau", ClassicScore::kBahdanau, true, true, true, false},
    {"dot", ClassicScore::kDot, false, false, false, false},
    {"general", ClassicScore::kGeneral, false, false, false, true},
    {"concat", ClassicScore::kConcat, false, false, true, true},
};

int RunClassic(const ClassicFlags& f) {
  const ScoreFlags* sf = &kScores[0];
  for (const ScoreFlags& s : kScores) {
    if (f.score == s.name) sf = &s;
  }
  const std::pair<const std::string*, bool> weight_flags[] = {
      {&f.w1, sf->w1}, {&f.w2, sf->w2}, {&f.v, sf->v}, {&f.w, sf->w}};
  const char* weight_names[] = {"--w1", "--w2", "--va", "--w"};
  for (int i = 0; i < 4; ++i) {
    const bool given = !weight_flags[i].first->empty();
    if (given != weight_flags[i].second) {
      throw Error(std::string(weight_names[i]) + (given ? ": not used by" : ": required by") +
                  " --score " + sf->name + " (expected " +
                  (sf->score == ClassicScore::kBahdanau  ? "--w1, --w2 and --va"
                   : sf->score == ClassicScore::kDot     ? "no weights"
                   : sf->score == ClassicScore::kGeneral ? "--w only"
                                                         : "--w and --va") +
                  ")");
    }
  }

  CheckOutputPaths({{"--state", f.state}, {"--encoder", f.encoder}, {"--w1", f.w1},
                    {"--w2", f.w2}, {"--va", f.v}, {"--w", f.w}, {"--mask", f.mask}},
                   {{"--out", f.context}, {"--attn-weights", f.weights}, {"--scores", f.scores}});

  const Input state = Load(f.state, "--state", 1, "1 dim, [dec_dim]");
  const Input encoder = Load(f.encoder, "--encoder", 2, "2 dims, [seq_kv, enc_dim]");
  const int64_t dec_dim = state.shape[0], seq_kv = encoder.shape[0], enc_dim = encoder.shape[1];
  // A zero-size encoder costs no file bytes whatever its other dim, which
  // sizes the weights (and every score buffer) or the context: a 128-byte
  // (4294967296, 0) would ask for 100 GB. An encoder has at least one state
  // of at least one feature.
  if (seq_kv < 1 || enc_dim < 1) {
    throw Error("--encoder: " + f.encoder + " has shape " + Shape(encoder.shape) +
                " (expected [seq_kv, enc_dim] with seq_kv >= 1 and enc_dim >= 1)");
  }
  // Every buffer of the step: the outputs (weights always, for the library),
  // and the library's scores, weights and context in double.
  CheckFitsInMemory("--encoder " + f.encoder + " (seq_kv " + std::to_string(seq_kv) + ")",
                    4.0 * (enc_dim + 2.0 * seq_kv) + 8.0 * (2.0 * seq_kv + enc_dim));
  const std::string dec = std::to_string(dec_dim), enc = std::to_string(enc_dim);
  const Input v = Load(f.v, "--va", 1, "1 dim, [attn_dim]");
  const int64_t attn_dim = v.shape.empty() ? 0 : v.shape[0];
  const std::string attn = std::to_string(attn_dim);
  const Input w1 = Load(f.w1, "--w1", 2, "2 dims, [attn_dim, dec_dim]");
  const Input w2 = Load(f.w2, "--w2", 2, "2 dims, [attn_dim, enc_dim]");
  const Input w =
      Load(f.w, "--w", 2,
           sf->score == ClassicScore::kGeneral ? "2 dims, [dec_dim, enc_dim]"
                                               : "2 dims, [attn_dim, dec_dim + enc_dim]");
  if (sf->score == ClassicScore::kDot && dec_dim != enc_dim) {
    throw Error("--state: " + f.state + " has dec_dim " + dec + " but --encoder has enc_dim " +
                enc + " (expected equal for --score dot; use general for a W between them)");
  }
  if (sf->w1) {
    CheckShape(w1, "--w1", f.w1, {attn_dim, dec_dim},
               "[attn_dim, dec_dim] = [" + attn + ", " + dec + "] from --va and --state");
    CheckShape(w2, "--w2", f.w2, {attn_dim, enc_dim},
               "[attn_dim, enc_dim] = [" + attn + ", " + enc + "] from --va and --encoder");
  }
  if (sf->score == ClassicScore::kGeneral) {
    CheckShape(w, "--w", f.w, {dec_dim, enc_dim},
               "[dec_dim, enc_dim] = [" + dec + ", " + enc + "] from --state and --encoder");
  }
  if (sf->score == ClassicScore::kConcat) {
    CheckShape(w, "--w", f.w, {attn_dim, dec_dim + enc_dim},
               "[attn_dim, dec_dim + enc_dim] = [" + attn + ", " +
                   std::to_string(dec_dim + enc_dim) + "] from --va, --state and --encoder");
  }
  NpyArray mask;
  if (!f.mask.empty()) {
    mask = ReadFlag(f.mask, "--mask");
    if (mask.dtype != DType::kBool || mask.shape != std::vector<int64_t>{seq_kv}) {
      throw Error("--mask: " + f.mask + " is " + DTypeName(mask.dtype) + " " + Shape(mask.shape) +
                  " (expected bool [seq_kv] = (" + std::to_string(seq_kv) + ",), true = attend)");
    }
  }

  ClassicAttentionParams p;
  p.score = sf->score;
  p.seq_kv = seq_kv, p.enc_dim = enc_dim, p.dec_dim = dec_dim;
  p.attn_dim = sf->v ? attn_dim : 0;
  p.state = state.data;
  p.encoder = encoder.data;
  p.w1 = w1.data, p.w2 = w2.data, p.w = w.data, p.v = v.data;
  if (!f.mask.empty()) p.mask = std::span<const uint8_t>(mask.bytes.data(), mask.bytes.size());
  std::vector<float> context(enc_dim), weights(seq_kv), scores(f.scores.empty() ? 0 : seq_kv);
  p.context = context;
  p.weights = weights;
  p.scores = scores;
  ClassicAttention(p);  // the shapes are checked above; a library error is a bug

  OutputSet outputs;
  outputs.Add(f.context, DType::kFloat32, {enc_dim}, context.data());
  if (!f.weights.empty()) outputs.Add(f.weights, DType::kFloat32, {seq_kv}, weights.data());
  if (!f.scores.empty()) outputs.Add(f.scores, DType::kFloat32, {seq_kv}, scores.data());
  outputs.Commit();
  return 0;
}

}  // namespace

Runner AddClassicCommand(CLI::App& app) {
  auto flags = std::make_shared<ClassicFlags>();
  ClassicFlags& f = *flags;
  CLI::App* cmd = app.add_subcommand(
      "classic", "Seq2seq attention, one decoder step: context = sum_j softmax(e)_j h_j");
  cmd->add_option("--score", f.score,
                  "bahdanau: v.tanh(W1 s + W2 h_j), s = previous decoder state; dot: s.h_j; "
                  "general: s.(W h_j); concat: v.tanh(W [s; h_j]) (Luong: s = current state)")
      ->required()
      ->check(CLI::IsMember({"bahdanau", "dot", "general", "concat"}));
  cmd->add_option("--state", f.state, "Decoder state s .npy, [dec_dim]")->required();
  cmd->add_option("--encoder", f.encoder, "Encoder states h .npy, [seq_kv, enc_dim]")->required();
  cmd->add_option("--w1", f.w1, "bahdanau: W1 .npy [attn_dim, dec_dim]");
  cmd->add_option("--w2", f.w2, "bahdanau: W2 .npy [attn_dim, enc_dim]");
  cmd->add_option("--va", f.v, "bahdanau, concat: the score vector v_a .npy [attn_dim]");
  cmd->add_option("--w", f.w,
                  "general: W .npy [dec_dim, enc_dim]; concat: [attn_dim, dec_dim + enc_dim]");
  cmd->add_option("--mask", f.mask, "Source mask .npy, bool [seq_kv], true = attend");
  cmd->add_option("--out", f.context, "Output context vector .npy, float32 [enc_dim]")
      ->required();
  cmd->add_option("--attn-weights", f.weights, "Write the weights alpha .npy, float32 [seq_kv]");
  cmd->add_option("--scores", f.scores, "Write the scores e .npy, float32 [seq_kv] (-inf masked)");
  return [flags] { return RunClassic(*flags); };
}

}  // namespace qkv::cli
