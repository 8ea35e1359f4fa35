// Tests of the `qkv` command-line tool, run as a child process.
//
// The CLI's contract: every usage error or bad input gives exactly one line on
// stderr that names the problem and what was expected, exit status 2, nothing
// on stdout and no output file (nor a "*.qkv-tmp-*" temporary) left behind;
// nothing ever ends in a signal. Success paths are read back with
// qkv::ReadNpy and checked against a float64 attention computed here.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "qkv/npy.h"
#include "qkv/tensor.h"
#include "cli_test_util.h"

namespace qkv {
namespace {

namespace fs = std::filesystem;

using test::CliResult;
using test::ReadFile;
using test::RunCli;
using test::Describe;

// Deterministic values that are exact in float: multiples of 1/64 in [-2, 2).
std::vector<float> Values(size_t n, uint32_t seed) {
  std::vector<float> v(n);
  uint32_t x = seed * 2654435761u + 12345u;
  for (float& f : v) {
    x = x * 1664525u + 1013904223u;
    f = static_cast<float>(static_cast<int>((x >> 16) % 256) - 128) / 64.0f;
  }
  return v;
}

size_t Numel(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

std::vector<float> AsFloat(const NpyArray& a) {
  std::vector<float> v(static_cast<size_t>(a.numel()));
  for (size_t i = 0; i < v.size(); ++i) {
    switch (a.dtype) {
      case DType::kFloat32:
        v[i] = a.data<float>()[i];
        break;
      case DType::kFloat16:
        v[i] = HalfToFloat(a.data<uint16_t>()[i]);
        break;
      case DType::kFloat64:
        v[i] = static_cast<float>(a.data<double>()[i]);
        break;
      default:
        ADD_FAILURE() << "unexpected dtype " << DTypeName(a.dtype);
        return v;
    }
  }
  return v;
}

// Returns row-major [B, S, H, D] from row-major [B, H, S, D] (its own inverse
// with H and S swapped).
std::vector<float> SwapAxes12(const std::vector<float>& x, int64_t b, int64_t h, int64_t s,
                              int64_t d) {
  std::vector<float> y(x.size());
  for (int64_t i0 = 0; i0 < b; ++i0)
    for (int64_t i1 = 0; i1 < h; ++i1)
      for (int64_t i2 = 0; i2 < s; ++i2)
        for (int64_t i3 = 0; i3 < d; ++i3)
          y[((i0 * s + i2) * h + i1) * d + i3] = x[((i0 * h + i1) * s + i2) * d + i3];
  return y;
}

// Float64 attention without masks, bhsd, for checking the CLI's output:
// out [B,H,Nq,Dv], weights [B,H,Nq,Nk], lse [B,H,Nq].
struct Oracle {
  std::vector<double> out, weights, lse;
};
Oracle NaiveAttention(const std::vector<float>& q, const std::vector<float>& k,
                      const std::vector<float>& v, int64_t batch, int64_t heads, int64_t kv_heads,
                      int64_t seq_q, int64_t seq_kv, int64_t dim, int64_t dim_v) {
  Oracle o;
  o.out.assign(static_cast<size_t>(batch * heads * seq_q * dim_v), 0.0);
  o.weights.assign(static_cast<size_t>(batch * heads * seq_q * seq_kv), 0.0);
  o.lse.assign(static_cast<size_t>(batch * heads * seq_q), 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  const int64_t group = heads / kv_heads;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < seq_q; ++i) {
        const int64_t kh = h / group;
        const int64_t row = (b * heads + h) * seq_q + i;
        std::vector<double> s(static_cast<size_t>(seq_kv));
        double row_max = -INFINITY;
        for (int64_t j = 0; j < seq_kv; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < dim; ++d)
            dot += double{q[row * dim + d]} * k[((b * kv_heads + kh) * seq_kv + j) * dim + d];
          s[j] = dot * scale;
          row_max = std::max(row_max, s[j]);
        }
        double row_sum = 0.0;
        for (double& x : s) row_sum += (x = std::exp(x - row_max));
        o.lse[row] = row_max + std::log(row_sum);
        for (int64_t j = 0; j < seq_kv; ++j) {
          const double p = s[j] / row_sum;
          o.weights[row * seq_kv + j] = p;
          for (int64_t d = 0; d < dim_v; ++d)
            o.out[row * dim_v + d] += p * v[((b * kv_heads + kh) * seq_kv + j) * dim_v + d];
        }
      }
  return o;
}

// Expects |got - want| <= bound elementwise; prints the worst element.
void ExpectClose(const std::vector<float>& got, const std::vector<double>& want, double bound,
                 const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t worst = 0, bad = 0;
  double worst_err = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= bound)) ++bad;
    if (!(err <= worst_err)) worst_err = err, worst = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": worst index " << worst << " expected " << want[worst] << " got "
                     << got[worst] << " bound " << bound;
}

class CliTest : public ::testing::Test {
 protected:
  // Standard inputs: q [1,4,3,8], k [1,2,5,8], v [1,2,5,6] (GQA, group 2).
  static constexpr int64_t kB = 1, kH = 4, kHkv = 2, kNq = 3, kNk = 5, kD = 8, kDv = 6;

  void SetUp() override {
    char pattern[] = "/tmp/qkv_cli_test_XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr) << std::strerror(errno);
    dir_ = pattern;
    q_ = Path("q.npy");
    k_ = Path("k.npy");
    v_ = Path("v.npy");
    out_ = Path("out.npy");
    weights_ = Path("weights.npy");
    lse_ = Path("lse.npy");
    q_data_ = Values(Numel({kB, kH, kNq, kD}), 1);
    k_data_ = Values(Numel({kB, kHkv, kNk, kD}), 2);
    v_data_ = Values(Numel({kB, kHkv, kNk, kDv}), 3);
    WriteF32(q_, {kB, kH, kNq, kD}, q_data_);
    WriteF32(k_, {kB, kHkv, kNk, kD}, k_data_);
    WriteF32(v_, {kB, kHkv, kNk, kDv}, v_data_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  static void WriteF32(const std::string& path, const std::vector<int64_t>& shape,
                       const std::vector<float>& data) {
    ASSERT_EQ(Numel(shape), data.size());
    WriteNpy(path, DType::kFloat32, shape, data.data());
  }
  static void WriteF32(const std::string& path, const std::vector<int64_t>& shape) {
    WriteF32(path, shape, Values(Numel(shape), 7));
  }
  static void WriteI32(const std::string& path, const std::vector<int64_t>& shape,
                       const std::vector<int32_t>& data) {
    ASSERT_EQ(Numel(shape), data.size());
    WriteNpy(path, DType::kInt32, shape, data.data());
  }
  static void WriteBytes(const std::string& path, const std::string& bytes) {
    std::ofstream f(path, std::ios::binary);
    f << bytes;
  }

  CliResult Run(const std::vector<std::string>& args, double timeout_s = 20.0) {
    return RunCli(args, dir_, timeout_s);
  }

  // `qkv attend --q Q --k K --v V --out O --attn-weights W --lse L` plus `extra`,
  // with any of the three inputs replaced.
  std::vector<std::string> AttendArgs(const std::vector<std::string>& extra,
                                      const std::string& q = "", const std::string& k = "",
                                      const std::string& v = "") const {
    std::vector<std::string> a = {"attend", "--q", q.empty() ? q_ : q, "--k", k.empty() ? k_ : k};
    for (const std::string& s :
         {std::string("--v"), v.empty() ? v_ : v, std::string("--out"), out_,
          std::string("--attn-weights"), weights_, std::string("--lse"), lse_}) {
      a.push_back(s);
    }
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }

  // Returns the names of files in the temp dir that a failed run must not
  // leave: the three outputs and any "*.qkv-tmp-*" temporary.
  std::vector<std::string> LeftOutputs(const std::vector<std::string>& extra_paths) const {
    std::vector<std::string> left;
    for (const std::string& p : {out_, weights_, lse_}) {
      if (fs::exists(p)) left.push_back(p);
    }
    for (const std::string& p : extra_paths) {
      if (fs::exists(p)) left.push_back(p);
    }
    for (const auto& e : fs::recursive_directory_iterator(dir_)) {
      if (e.path().filename().string().find(".qkv-tmp-") != std::string::npos) {
        left.push_back(e.path().string());
      }
    }
    return left;
  }

  // Runs `args` and expects the usage-error contract: status 2, one line on
  // stderr containing `fragment`, empty stdout, no output left behind.
  void ExpectUsageError(const std::vector<std::string>& args, const std::string& fragment,
                        const std::vector<std::string>& extra_outputs = {},
                        double timeout_s = 20.0) {
    std::string cmd = "qkv";
    for (const std::string& a : args) cmd += " " + a;
    SCOPED_TRACE(cmd);
    const CliResult r = Run(args, timeout_s);
    EXPECT_TRUE(r.exited) << "ended by signal or timeout: " << Describe(r);
    EXPECT_EQ(r.status, 2) << Describe(r);
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "stderr: " << r.err;
    EXPECT_TRUE(!r.err.empty() && r.err.back() == '\n') << "stderr: " << r.err;
    EXPECT_NE(r.err.find(fragment), std::string::npos)
        << "stderr lacks '" << fragment << "': " << r.err;
    EXPECT_EQ(r.out, "") << "stdout must be empty";
    const std::vector<std::string> left = LeftOutputs(extra_outputs);
    EXPECT_TRUE(left.empty()) << "left behind: " << testing::PrintToString(left);
    for (const std::string& p : left) fs::remove(p);
  }

  std::string dir_, q_, k_, v_, out_, weights_, lse_;
  std::vector<float> q_data_, k_data_, v_data_;
};

// ---------------------------------------------------------------------------
// Flag errors (CLI11 parsing and the attend command's own checks).

TEST_F(CliTest, NoSubcommandIsUsageError) { ExpectUsageError({}, "subcommand"); }

// The message should name the unknown word, not only say one is required.
TEST_F(CliTest, UnknownSubcommandNamesIt) { ExpectUsageError({"frob"}, "frob"); }

TEST_F(CliTest, UnknownFlag) {
  ExpectUsageError(AttendArgs({"--bogus"}), "--bogus");
  ExpectUsageError({"attend", "--shape", "1,1,2,2", "--bogus", "3"}, "--bogus");
}

TEST_F(CliTest, MissingQkv) {
  ExpectUsageError({"attend", "--k", k_, "--v", v_, "--out", out_}, "required");
  ExpectUsageError({"attend", "--q", q_, "--v", v_, "--out", out_}, "required");
  ExpectUsageError({"attend", "--q", q_, "--k", k_, "--out", out_}, "required");
  ExpectUsageError({"attend"}, "--q, --k and --v");
}

TEST_F(CliTest, MissingOut) {
  ExpectUsageError({"attend", "--q", q_, "--k", k_, "--v", v_}, "--out");
  ExpectUsageError({"attend", "--q", q_, "--k", k_, "--v", v_, "--lse", lse_}, "--out");
}

TEST_F(CliTest, ShapeWithFiles) {
  ExpectUsageError(AttendArgs({"--shape", "1,4,3,8"}), "exclusive");
  ExpectUsageError({"attend", "--shape", "1,4,3,8", "--q", q_}, "--shape");
}

TEST_F(CliTest, BadShape) {
  ExpectUsageError({"attend", "--shape", "1,2,3"}, "--shape");
  ExpectUsageError({"attend", "--shape", "1,2,3,4,5"}, "expected 4");
  ExpectUsageError({"attend", "--shape", "a,b,c,d"}, "--shape");
  ExpectUsageError({"attend", "--shape", "0,1,1,1"}, "--shape");
  ExpectUsageError({"attend", "--shape", "-1,2,3,4"}, "--shape");
  ExpectUsageError({"attend", "--shape", "1,,2,3"}, "--shape");
  ExpectUsageError({"attend", "--shape", "1,2,3,4,"}, "--shape");
  ExpectUsageError({"attend", "--shape", "1.5,2,3,4"}, "--shape");
  ExpectUsageError({"attend", "--shape", ""}, "required");
}

TEST_F(CliTest, HugeShapeIsRefusedByMemoryCheck) {
  for (const char* shape : {"100000,100000,100000,100000", "1,1,4000000000,64",
                            "1099511627776,1099511627776,1099511627776,1099511627776"}) {
    const auto start = std::chrono::steady_clock::now();
    ExpectUsageError({"attend", "--shape", shape}, "would need", {}, 5.0);
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 2.0);
  }
  ExpectUsageError({"attend", "--shape", "1,1,1,1", "--seq-kv", "100000000000"}, "would need", {},
                   5.0);
  // Weights of 1e6 x 1e6 floats from small random inputs.
  ExpectUsageError({"attend", "--shape", "1,1,1000000,1", "--attn-weights", weights_}, "would need",
                   {}, 5.0);
}

TEST_F(CliTest, LayoutWithShape) {
  ExpectUsageError({"attend", "--shape", "1,2,4,8", "--layout", "bshd"}, "--layout");
}

TEST_F(CliTest, BothCausalAlignments) {
  ExpectUsageError(AttendArgs({"--causal", "--causal-top-left"}), "--causal");
  ExpectUsageError({"attend", "--shape", "1,2,4,8", "--causal-top-left", "--causal"}, "excludes");
}

TEST_F(CliTest, BadWindow) {
  ExpectUsageError(AttendArgs({"--window", "1"}), "--window");
  ExpectUsageError(AttendArgs({"--window"}), "--window");
  ExpectUsageError(AttendArgs({"--window", "-2", "0"}), "window");
  ExpectUsageError(AttendArgs({"--window", "0", "-5"}), "window");
  ExpectUsageError(AttendArgs({"--window", "x", "1"}), "--window");
  ExpectUsageError(AttendArgs({"--window", "1", "2", "3"}), "--window");
}

TEST_F(CliTest, BadLayoutKernelThreadsScale) {
  ExpectUsageError(AttendArgs({"--layout", "sbhd"}), "--layout");
  ExpectUsageError(AttendArgs({"--kernel", "flash9"}), "--kernel");
  ExpectUsageError(AttendArgs({"--threads", "-1"}), "threads");
  ExpectUsageError(AttendArgs({"--threads", "two"}), "--threads");
  ExpectUsageError(AttendArgs({"--scale", "inf"}), "scale");
  ExpectUsageError(AttendArgs({"--scale", "-inf"}), "scale");
  ExpectUsageError(AttendArgs({"--scale", "nan"}), "scale");
  ExpectUsageError(AttendArgs({"--scale", "abc"}), "--scale");
  ExpectUsageError({"attend", "--shape", "1,2,4,8", "--scale", "inf"}, "finite");
}

// A thread count far above the machine must be refused (or clamped), never
// crash: OpenMP aborts or segfaults when asked for 1e5 threads.
TEST_F(CliTest, HugeThreadCountIsRefused) {
  ExpectUsageError(AttendArgs({"--threads", "100000"}), "threads", {}, 10.0);
  ExpectUsageError(AttendArgs({"--threads", "2000000000"}), "threads", {}, 10.0);
}

// --kv-heads and --seq-kv below their meaningful range must be refused, not
// silently replaced by the defaults.
TEST_F(CliTest, NegativeKvHeadsOrSeqKvIsRefused) {
  ExpectUsageError({"attend", "--shape", "1,2,4,8", "--kv-heads", "-3"}, "--kv-heads");
  ExpectUsageError({"attend", "--shape", "1,2,4,8", "--seq-kv", "-5"}, "--seq-kv");
}

TEST_F(CliTest, KvHeadsNotDividingHeadsWithShape) {
  ExpectUsageError({"attend", "--shape", "1,4,4,8", "--kv-heads", "3"}, "divide");
}

// ---------------------------------------------------------------------------
// Bad input files.

TEST_F(CliTest, NonexistentInput) {
  ExpectUsageError(AttendArgs({}, Path("missing.npy")), "missing.npy");
  ExpectUsageError(AttendArgs({}, "", "", Path("nodir/v.npy")), "nodir/v.npy");
}

TEST_F(CliTest, DirectoryAsInput) {
  fs::create_directory(Path("adir"));
  ExpectUsageError(AttendArgs({}, "", Path("adir")), "directory");
}

TEST_F(CliTest, TruncatedNpy) {
  const std::string whole = ReadFile(q_);
  WriteBytes(Path("trunc.npy"), whole.substr(0, whole.size() - 5));
  ExpectUsageError(AttendArgs({}, Path("trunc.npy")), "trunc.npy");
  WriteBytes(Path("trunc_header.npy"), whole.substr(0, 20));
  ExpectUsageError(AttendArgs({}, Path("trunc_header.npy")), "trunc_header.npy");
  WriteBytes(Path("empty.npy"), "");
  ExpectUsageError(AttendArgs({}, "", Path("empty.npy")), "empty.npy");
}

TEST_F(CliTest, GarbageNpy) {
  std::string garbage;
  for (int i = 0; i < 300; ++i) garbage += static_cast<char>((i * 37 + 11) % 256);
  garbage[40] = '\n';
  WriteBytes(Path("garbage.npy"), garbage);
  ExpectUsageError(AttendArgs({}, Path("garbage.npy")), "garbage.npy");
  // A valid magic and a header with newlines and junk.
  std::string header = "{'descr': '<f4',\n 'fortran_order': False, 'shape': (1,\n2,3,4), }";
  header.resize(118, ' ');
  header += '\n';
  std::string bad = std::string("\x93NUMPY\x01\x00", 8);
  bad += static_cast<char>(header.size() & 0xff);
  bad += static_cast<char>(header.size() >> 8);
  WriteBytes(Path("junk_header.npy"), bad + header + "xyz");
  ExpectUsageError(AttendArgs({}, "", "", Path("junk_header.npy")), "junk_header.npy");
}

TEST_F(CliTest, WrongRank) {
  WriteF32(Path("q3.npy"), {4, 3, 8});
  ExpectUsageError(AttendArgs({}, Path("q3.npy")), "expected 4 dims");
  WriteF32(Path("k5.npy"), {1, 2, 5, 8, 1});
  ExpectUsageError(AttendArgs({}, "", Path("k5.npy")), "--k");
}

TEST_F(CliTest, IntegerQ) {
  WriteI32(Path("qi.npy"), {kB, kH, kNq, kD}, std::vector<int32_t>(Numel({kB, kH, kNq, kD}), 1));
  ExpectUsageError(AttendArgs({}, Path("qi.npy")), "int32");
  const std::vector<uint8_t> ones(Numel({kB, kHkv, kNk, kDv}), 1);
  WriteNpy(Path("vb.npy"), DType::kBool, std::vector<int64_t>{kB, kHkv, kNk, kDv}, ones.data());
  ExpectUsageError(AttendArgs({}, "", "", Path("vb.npy")), "bool");
}

TEST_F(CliTest, ShapeMismatches) {
  WriteF32(Path("k_batch.npy"), {2, kHkv, kNk, kD});
  WriteF32(Path("v_batch.npy"), {2, kHkv, kNk, kDv});
  ExpectUsageError(AttendArgs({}, "", Path("k_batch.npy"), Path("v_batch.npy")), "batch");
  WriteF32(Path("k_dim.npy"), {kB, kHkv, kNk, kD + 1});
  ExpectUsageError(AttendArgs({}, "", Path("k_dim.npy")), "head_dim");
  WriteF32(Path("v_seq.npy"), {kB, kHkv, kNk + 1, kDv});
  ExpectUsageError(AttendArgs({}, "", "", Path("v_seq.npy")), "seq_kv");
  WriteF32(Path("v_heads.npy"), {kB, 1, kNk, kDv});
  ExpectUsageError(AttendArgs({}, "", "", Path("v_heads.npy")), "num_kv_heads");
  WriteF32(Path("k3.npy"), {kB, 3, kNk, kD});
  WriteF32(Path("v3.npy"), {kB, 3, kNk, kDv});
  ExpectUsageError(AttendArgs({}, "", Path("k3.npy"), Path("v3.npy")), "divide");
}

TEST_F(CliTest, BadMask) {
  WriteF32(Path("mask_bad.npy"), {kNq, kNk + 1});
  ExpectUsageError(AttendArgs({"--mask", Path("mask_bad.npy")}), "broadcast");
  WriteF32(Path("mask_heads.npy"), {1, 3, kNq, kNk});
  ExpectUsageError(AttendArgs({"--mask", Path("mask_heads.npy")}), "broadcast");
  WriteF32(Path("mask_rank5.npy"), {1, 1, 1, kNq, kNk});
  ExpectUsageError(AttendArgs({"--mask", Path("mask_rank5.npy")}), "mask");
  WriteI32(Path("mask_i32.npy"), {kNq, kNk}, std::vector<int32_t>(kNq * kNk, 1));
  ExpectUsageError(AttendArgs({"--mask", Path("mask_i32.npy")}), "int32");
  const std::vector<int64_t> ones(kNq * kNk, 1);
  WriteNpy(Path("mask_i64.npy"), DType::kInt64, std::vector<int64_t>{kNq, kNk}, ones.data());
  ExpectUsageError(AttendArgs({"--mask", Path("mask_i64.npy")}), "--mask");
  ExpectUsageError(AttendArgs({"--mask", Path("no_mask.npy")}), "no_mask.npy");
}

TEST_F(CliTest, BadKeyLengths) {
  WriteI32(Path("kl_len.npy"), {2}, {1, 2});
  ExpectUsageError(AttendArgs({"--key-lengths", Path("kl_len.npy")}), "key_lengths");
  WriteF32(Path("kl_float.npy"), {1}, {2.0f});
  ExpectUsageError(AttendArgs({"--key-lengths", Path("kl_float.npy")}), "--key-lengths");
  WriteI32(Path("kl_2d.npy"), {1, 1}, {2});
  ExpectUsageError(AttendArgs({"--key-lengths", Path("kl_2d.npy")}), "--key-lengths");
  WriteI32(Path("kl_0d.npy"), {}, {2});
  ExpectUsageError(AttendArgs({"--key-lengths", Path("kl_0d.npy")}), "--key-lengths");
  WriteI32(Path("kl_big.npy"), {1}, {kNk + 1});
  ExpectUsageError(AttendArgs({"--key-lengths", Path("kl_big.npy")}), "seq_kv");
  WriteI32(Path("kl_neg.npy"), {1}, {-1});
  ExpectUsageError(AttendArgs({"--key-lengths", Path("kl_neg.npy")}), "key_lengths[0]");
  const int64_t huge = int64_t{1} << 40;
  WriteNpy(Path("kl_i64.npy"), DType::kInt64, std::vector<int64_t>{1}, &huge);
  ExpectUsageError(AttendArgs({"--key-lengths", Path("kl_i64.npy")}), "key_lengths[0]");
}

TEST_F(CliTest, OutputInNonexistentDirectory) {
  // --out fails; the valid --attn-weights and --lse must not be left behind.
  const std::string bad = Path("nodir/out.npy");
  ExpectUsageError({"attend", "--q", q_, "--k", k_, "--v", v_, "--out", bad, "--attn-weights",
                    weights_, "--lse", lse_},
                   "nodir/out.npy", {bad});
  // --lse fails after --out and --attn-weights were written to temporaries.
  const std::string bad_lse = Path("nodir/lse.npy");
  ExpectUsageError({"attend", "--q", q_, "--k", k_, "--v", v_, "--out", out_, "--attn-weights",
                    weights_, "--lse", bad_lse},
                   "nodir/lse.npy", {bad_lse});
  // With --shape too.
  ExpectUsageError({"attend", "--shape", "1,2,4,8", "--out", bad, "--lse", lse_}, "nodir", {bad});
}

// All-or-nothing: when the last output cannot be renamed into place (its path
// is an existing directory), the earlier outputs must not be left behind.
TEST_F(CliTest, OutputOntoDirectoryLeavesNothing) {
  fs::create_directory(Path("lse_dir"));
  ExpectUsageError({"attend", "--q", q_, "--k", k_, "--v", v_, "--out", out_, "--attn-weights",
                    weights_, "--lse", Path("lse_dir")},
                   "lse_dir");
  fs::create_directory(Path("out_dir"));
  ExpectUsageError({"attend", "--q", q_, "--k", k_, "--v", v_, "--out", Path("out_dir")},
                   "out_dir");
}

TEST_F(CliTest, SameOutputPathTwice) {
  ExpectUsageError({"attend", "--q", q_, "--k", k_, "--v", v_, "--out", out_, "--lse", out_},
                   "twice");
}

TEST_F(CliTest, BshdWrongShapes) {
  // bshd q [B, Nq, H, D] = [1, 3, 4, 8]; k given in bhsd order [1, 2, 5, 8] is
  // read as Nk = 2, Hkv = 5, which does not divide 4.
  WriteF32(Path("q_bshd.npy"), {kB, kNq, kH, kD});
  WriteF32(Path("k_bshd.npy"), {kB, kNk, kHkv, kD});
  WriteF32(Path("v_bshd.npy"), {kB, kNk, kHkv, kDv});
  ExpectUsageError(AttendArgs({"--layout", "bshd"}, Path("q_bshd.npy")), "divide");
  // k and v disagree on Nk.
  WriteF32(Path("v_bshd_seq.npy"), {kB, kNk + 2, kHkv, kDv});
  ExpectUsageError(AttendArgs({"--layout", "bshd"}, Path("q_bshd.npy"), Path("k_bshd.npy"),
                              Path("v_bshd_seq.npy")),
                   "seq_kv");
  // head_dim differs.
  WriteF32(Path("k_bshd_dim.npy"), {kB, kNk, kHkv, kD - 1});
  ExpectUsageError(AttendArgs({"--layout", "bshd"}, Path("q_bshd.npy"), Path("k_bshd_dim.npy"),
                              Path("v_bshd.npy")),
                   "head_dim");
  // 3-D q with bshd names the bshd order.
  WriteF32(Path("q_bshd3.npy"), {kNq, kH, kD});
  ExpectUsageError(
      AttendArgs({"--layout", "bshd"}, Path("q_bshd3.npy"), Path("k_bshd.npy"), Path("v_bshd.npy")),
      "[batch, seq, heads, dim]");
  // A bshd mask that does not broadcast against [B, H, Nq, Nk].
  WriteF32(Path("mask_bshd.npy"), {kB, kNq, kH, kNk});
  ExpectUsageError(AttendArgs({"--layout", "bshd", "--mask", Path("mask_bshd.npy")},
                              Path("q_bshd.npy"), Path("k_bshd.npy"), Path("v_bshd.npy")),
                   "broadcast");
}

// Zero-size arrays cost no file bytes but may declare huge other dims; every
// allocation and the work must still be bounded, with exit 2.
TEST_F(CliTest, ZeroHeadDimWithHugeSeqIsBounded) {
  const int64_t huge = int64_t{1} << 40;
  auto write_empty = [&](const std::string& name, std::vector<int64_t> shape) {
    WriteNpy(Path(name), DType::kFloat32, shape, nullptr);
    return Path(name);
  };
  const std::string q_long = write_empty("q_long.npy", {1, 1, huge, 0});
  const std::string q_one = write_empty("q_one.npy", {1, 1, 1, 0});
  const std::string kv_one = write_empty("kv_one.npy", {1, 1, 1, 0});
  const std::string kv_long = write_empty("kv_long.npy", {1, 1, huge, 0});
  // --lse [1,1,2^40] float32 = 4 TiB is allocated without the memory check.
  ExpectUsageError(
      {"attend", "--q", q_long, "--k", kv_one, "--v", kv_one, "--out", out_, "--lse", lse_},
      "expected", {}, 3.0);
  // 2^40 keys of head_dim 0: nothing to allocate, but the kernel loops over
  // every key of the one query row (hours), so the run must be refused.
  ExpectUsageError({"attend", "--q", q_one, "--k", kv_long, "--v", kv_long, "--out", out_},
                   "expected", {}, 3.0);
}

// --kv-heads, --seq-kv and --seed only apply to --shape, as --layout only
// applies to files (which is refused with --shape); with files they must be
// refused, not silently ignored.
TEST_F(CliTest, ShapeOnlyFlagsWithFilesAreRefused) {
  ExpectUsageError(AttendArgs({"--kv-heads", "1"}), "--kv-heads");
  ExpectUsageError(AttendArgs({"--seq-kv", "3"}), "--seq-kv");
  ExpectUsageError(AttendArgs({"--seed", "3"}), "--seed");
}

// ---------------------------------------------------------------------------
// Success paths.

TEST_F(CliTest, SmallRunWritesOutputsThatMatchFloat64) {
  const CliResult r = Run(AttendArgs({}));
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_EQ(r.err, "");
  const NpyArray out = ReadNpy(out_), weights = ReadNpy(weights_), lse = ReadNpy(lse_);
  EXPECT_EQ(out.dtype, DType::kFloat32);
  EXPECT_EQ(out.shape, (std::vector<int64_t>{kB, kH, kNq, kDv}));
  EXPECT_EQ(weights.dtype, DType::kFloat32);
  EXPECT_EQ(weights.shape, (std::vector<int64_t>{kB, kH, kNq, kNk}));
  EXPECT_EQ(lse.dtype, DType::kFloat32);
  EXPECT_EQ(lse.shape, (std::vector<int64_t>{kB, kH, kNq}));
  const Oracle o = NaiveAttention(q_data_, k_data_, v_data_, kB, kH, kHkv, kNq, kNk, kD, kDv);
  // |v|, |q.k * scale| <= 2 * 2 * 8 / sqrt(8) ~ 11; float32 rounding of an
  // 8-term dot, exp and a 5-term sum stays within a few dozen eps of that.
  const double eps = std::numeric_limits<float>::epsilon();
  ExpectClose(AsFloat(out), o.out, 64 * eps * 2.0, "out");
  ExpectClose(AsFloat(weights), o.weights, 64 * eps, "weights");
  ExpectClose(AsFloat(lse), o.lse, 64 * eps * 12.0, "lse");
  EXPECT_TRUE(LeftOutputs({}).size() == 3);  // exactly the three outputs, no temporaries
}

TEST_F(CliTest, Float16InputsGiveFloat16Output) {
  auto write_f16 = [&](const std::string& path, const std::vector<int64_t>& shape,
                       const std::vector<float>& data) {
    std::vector<uint16_t> half(data.size());
    for (size_t i = 0; i < data.size(); ++i) half[i] = FloatToHalf(data[i]);
    WriteNpy(path, DType::kFloat16, shape, half.data());
  };
  write_f16(Path("q16.npy"), {kB, kH, kNq, kD}, q_data_);  // multiples of 1/64: exact in half
  write_f16(Path("k16.npy"), {kB, kHkv, kNk, kD}, k_data_);
  write_f16(Path("v16.npy"), {kB, kHkv, kNk, kDv}, v_data_);
  const CliResult r = Run({"attend", "--q", Path("q16.npy"), "--k", Path("k16.npy"), "--v",
                           Path("v16.npy"), "--out", out_, "--attn-weights", weights_});
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  const NpyArray out = ReadNpy(out_);
  EXPECT_EQ(out.dtype, DType::kFloat16);
  EXPECT_EQ(out.shape, (std::vector<int64_t>{kB, kH, kNq, kDv}));
  EXPECT_EQ(ReadNpy(weights_).dtype, DType::kFloat32);
  const Oracle o = NaiveAttention(q_data_, k_data_, v_data_, kB, kH, kHkv, kNq, kNk, kD, kDv);
  // One float16 rounding (2^-11 relative) of values |out| <= 2, plus float32 error.
  ExpectClose(AsFloat(out), o.out, 2.0 * std::ldexp(1.0, -11) + 1e-5, "out float16");
}

TEST_F(CliTest, BshdEqualsBhsdTransposed) {
  const CliResult bhsd =
      Run({"attend", "--q", q_, "--k", k_, "--v", v_, "--out", out_, "--causal", "--lse", lse_});
  ASSERT_TRUE(bhsd.exited && bhsd.status == 0) << Describe(bhsd);
  WriteF32(Path("q_bshd.npy"), {kB, kNq, kH, kD}, SwapAxes12(q_data_, kB, kH, kNq, kD));
  WriteF32(Path("k_bshd.npy"), {kB, kNk, kHkv, kD}, SwapAxes12(k_data_, kB, kHkv, kNk, kD));
  WriteF32(Path("v_bshd.npy"), {kB, kNk, kHkv, kDv}, SwapAxes12(v_data_, kB, kHkv, kNk, kDv));
  const std::string out_bshd = Path("out_bshd.npy"), lse_bshd = Path("lse_bshd.npy");
  const CliResult bshd =
      Run({"attend", "--layout", "bshd", "--q", Path("q_bshd.npy"), "--k", Path("k_bshd.npy"),
           "--v", Path("v_bshd.npy"), "--out", out_bshd, "--causal", "--lse", lse_bshd});
  ASSERT_TRUE(bshd.exited && bshd.status == 0) << Describe(bshd);
  const NpyArray a = ReadNpy(out_), b = ReadNpy(out_bshd);
  EXPECT_EQ(b.shape, (std::vector<int64_t>{kB, kNq, kH, kDv}));
  EXPECT_EQ(b.dtype, DType::kFloat32);
  // Same rows, same arithmetic: equal up to a few eps of |out| <= 2.
  const std::vector<float> want = SwapAxes12(AsFloat(a), kB, kH, kNq, kDv);
  ExpectClose(AsFloat(b), std::vector<double>(want.begin(), want.end()),
              8 * std::numeric_limits<float>::epsilon() * 2.0, "bshd vs bhsd");
  // LSE stays [B, H, Nq] in both layouts.
  EXPECT_EQ(ReadNpy(lse_bshd).shape, (std::vector<int64_t>{kB, kH, kNq}));
  const std::vector<float> la = AsFloat(ReadNpy(lse_)), lb = AsFloat(ReadNpy(lse_bshd));
  ExpectClose(lb, std::vector<double>(la.begin(), la.end()),
              8 * std::numeric_limits<float>::epsilon() * 12.0, "lse bshd vs bhsd");
}

TEST_F(CliTest, MaskAndKeyLengthsRun) {
  std::vector<uint8_t> mask(kNq * kNk, 1);
  mask[0] = 0;
  WriteNpy(Path("mask.npy"), DType::kBool, std::vector<int64_t>{kNq, kNk}, mask.data());
  WriteI32(Path("kl.npy"), {kB}, {kNk - 1});
  const CliResult r = Run(AttendArgs(
      {"--mask", Path("mask.npy"), "--key-lengths", Path("kl.npy"), "--window", "-1", "3"}));
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  const NpyArray w = ReadNpy(weights_);
  const std::vector<float> wf = AsFloat(w);
  for (int64_t row = 0; row < kB * kH * kNq; ++row) {
    EXPECT_EQ(wf[row * kNk + kNk - 1], 0.0f) << "key past key_lengths, row " << row;
    if (row % kNq == 0) {
      EXPECT_EQ(wf[row * kNk], 0.0f) << "masked pair, row " << row;
    }
  }
}

TEST_F(CliTest, HelpListsEveryAttendFlag) {
  const CliResult top = Run({"--help"});
  ASSERT_TRUE(top.exited) << Describe(top);
  EXPECT_EQ(top.status, 0);
  EXPECT_NE(top.out.find("attend"), std::string::npos) << top.out;
  EXPECT_NE(top.out.find("demo"), std::string::npos) << top.out;
  const std::string all_flags =
      "--q --k --v --out --mask --causal --causal-top-left --window --key-lengths --scale "
      "--layout --attn-weights --lse --shape --seed --kernel --threads";
  std::vector<std::string> flags;
  std::istringstream words(all_flags);
  for (std::string w; words >> w;) flags.push_back(w);
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"attend", "--help"}, std::vector<std::string>{"--help-all"}}) {
    const CliResult r = Run(args);
    ASSERT_TRUE(r.exited) << Describe(r);
    EXPECT_EQ(r.status, 0) << args[0];
    EXPECT_EQ(r.err, "");
    for (const std::string& flag : flags) {
      EXPECT_NE(r.out.find(flag + " "), std::string::npos) << args[0] << " lacks " << flag << ":\n"
                                                           << r.out;
    }
  }
}

TEST_F(CliTest, RandomShapeRunPrintsSummary) {
  const CliResult r = Run({"attend", "--shape", "1,2,16,8", "--seed", "3"});
  ASSERT_TRUE(r.exited) << Describe(r);
  EXPECT_EQ(r.status, 0) << Describe(r);
  EXPECT_NE(r.out.find("peak memory"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("seed 3"), std::string::npos) << r.out;
  EXPECT_EQ(r.err, "");
  // GQA and cross-attention shapes through --kv-heads / --seq-kv, with outputs.
  const CliResult g = Run({"attend", "--shape", "2,4,3,8", "--kv-heads", "2", "--seq-kv", "7",
                           "--out", out_, "--attn-weights", weights_, "--lse", lse_, "--causal"});
  ASSERT_TRUE(g.exited && g.status == 0) << Describe(g);
  EXPECT_EQ(ReadNpy(out_).shape, (std::vector<int64_t>{2, 4, 3, 8}));
  EXPECT_EQ(ReadNpy(weights_).shape, (std::vector<int64_t>{2, 4, 3, 7}));
  EXPECT_EQ(ReadNpy(lse_).shape, (std::vector<int64_t>{2, 4, 3}));
  // Window sides far beyond the sequence (no overflow in i + d + R), seq_kv 0.
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"attend", "--shape", "1,2,4,8", "--window", "0",
                                 "9223372036854775807"},
        std::vector<std::string>{"attend", "--shape", "1,2,4,8", "--causal-top-left", "--window",
                                 "9223372036854775807", "9223372036854775807"},
        std::vector<std::string>{"attend", "--shape", "1,2,4,8", "--seq-kv", "0"}}) {
    const CliResult w = Run(args);
    EXPECT_TRUE(w.exited && w.status == 0) << args[4] << " " << Describe(w);
  }
}

// --verbose names the kernel and why; --kernel flash with weights is an
// error, never a silent switch to the reference.
TEST_F(CliTest, VerboseSaysWhichKernelRan) {
  const CliResult f = Run({"attend", "--shape", "1,2,16,8", "--verbose"});
  ASSERT_TRUE(f.exited && f.status == 0) << Describe(f);
  EXPECT_NE(f.out.find("kernel: flash"), std::string::npos) << f.out;
  // Issue 18, item 3: --verbose names the build (as qkv --version does).
  EXPECT_NE(f.out.find("build: qkv "), std::string::npos) << f.out;
  EXPECT_NE(f.out.find("SIMD targets built"), std::string::npos) << f.out;
  const CliResult r =
      Run({"attend", "--shape", "1,2,16,8", "--verbose", "--attn-weights", weights_});
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_NE(r.out.find("kernel: reference (reference: attention weights requested"),
            std::string::npos)
      << r.out;
  fs::remove(weights_);
  ExpectUsageError(
      {"attend", "--shape", "1,2,16,8", "--kernel", "flash", "--attn-weights", weights_},
      "kernel flash: cannot write attention weights");
  const CliResult b = Run({"bench", "--shape", "1,2,64,8", "--repeat", "1", "--json"});
  ASSERT_TRUE(b.exited && b.status == 0) << Describe(b);
  for (const char* key : {"\"median_s\"", "\"min_s\"", "\"max_s\"", "\"flops\"", "\"gflops\"",
                          "\"peak_rss_bytes\"", "\"kernel\"", "\"threads\"", "\"simd_target\""}) {
    EXPECT_NE(b.out.find(key), std::string::npos) << key << " missing in " << b.out;
  }
}

// qkv memory prints the worked example exactly; qkv decode and
// qkv bench --decode run and report; bad flags are usage errors.
TEST_F(CliTest, MemoryDecodeAndDecodeBench) {
  const CliResult m = Run(
      {"memory", "--heads", "32", "--head-dim", "128", "--seq", "32768", "--cache-dtype", "f16"});
  ASSERT_TRUE(m.exited && m.status == 0) << Describe(m);
  EXPECT_NE(m.out.find("68,719,476,736 bytes = 68.7 GB = 64 GiB"), std::string::npos) << m.out;
  const CliResult d = Run({"decode", "--prompt-tokens", "100", "--generate", "3", "--heads", "4",
                           "--kv-heads", "2", "--head-dim", "16", "--cache", "paged"});
  ASSERT_TRUE(d.exited && d.status == 0) << Describe(d);
  // Every figure labelled; the cold first step reported apart (issue 18, item 4).
  for (const char* label : {"time per token: median ", "mean ", "over 2 steps",
                            "the first, cold step took", "K/V read: median "}) {
    EXPECT_NE(d.out.find(label), std::string::npos) << label << " missing in " << d.out;
  }
  const CliResult b = Run({"bench", "--decode", "--cache-len", "300", "--heads", "4",
                           "--kv-heads", "1", "--head-dim", "8", "--cache-dtype", "i8",
                           "--repeat", "1", "--json"});
  ASSERT_TRUE(b.exited && b.status == 0) << Describe(b);
  for (const char* key : {"\"median_s\"", "\"bytes_per_token\"", "\"gbps\""}) {
    EXPECT_NE(b.out.find(key), std::string::npos) << key << " missing in " << b.out;
  }
  ExpectUsageError({"decode", "--heads", "6", "--kv-heads", "4"}, "--kv-heads");
  // Cache settings reach KvCache's validation (block size 0 once divided by zero here).
  for (const char* bs : {"0", "-3"}) {
    ExpectUsageError({"decode", "--cache", "paged", "--block-size", bs}, "block_size");
  }
  ExpectUsageError({"decode", "--cache", "sliding", "--cache-window", "0"}, "window");
  ExpectUsageError({"decode", "--cache", "sinks", "--sinks", "-1"}, "num_sinks");
  ExpectUsageError({"bench", "--decode"}, "--cache-len");
  ExpectUsageError({"bench", "--cache-len", "10"}, "--decode");
  ExpectUsageError({"memory", "--kv-heads", "3", "--heads", "32", "--head-dim", "64", "--seq", "8"}, "kv-heads");
}

// qkv memory answers what it can (issue 18): a score matrix beyond 2^63
// bytes is printed as such (null in JSON), the rest of the plan as usual.
TEST_F(CliTest, MemoryPrintsWhatFitsWhenOneFigureOverflows) {
  const CliResult m = Run({"memory", "--preset", "llama3-8b", "--seq", "2147483647"});
  ASSERT_TRUE(m.exited && m.status == 0) << Describe(m);
  EXPECT_NE(m.out.find("naive score matrix per layer (f16): > 2^63 bytes"), std::string::npos)
      << m.out;
  // 2 * 32 layers * 8 kv heads * 128 * 2 bytes = 131072 bytes per token.
  EXPECT_NE(m.out.find("131,072 bytes per token"), std::string::npos) << m.out;
  const CliResult j = Run({"memory", "--preset", "llama3-8b", "--seq", "2147483647", "--json"});
  ASSERT_TRUE(j.exited && j.status == 0) << Describe(j);
  EXPECT_NE(j.out.find("\"score_matrix_bytes_per_layer\":null"), std::string::npos) << j.out;
  EXPECT_NE(j.out.find("\"kv_cache_bytes\":" + std::to_string(int64_t{131072} * 2147483647)),
            std::string::npos)
      << j.out;
}

// --accumulate f64 (issue 18): float64 inputs give float64 outputs computed
// in float64 (lse and weights too), to float64 accuracy.
TEST_F(CliTest, AccumulateF64IsFloat64EndToEnd) {
  auto write_f64 = [&](const std::string& path, const std::vector<int64_t>& shape,
                       const std::vector<float>& data) {
    const std::vector<double> wide(data.begin(), data.end());
    WriteNpy(path, DType::kFloat64, shape, wide.data());
  };
  write_f64(Path("q64.npy"), {kB, kH, kNq, kD}, q_data_);
  write_f64(Path("k64.npy"), {kB, kHkv, kNk, kD}, k_data_);
  write_f64(Path("v64.npy"), {kB, kHkv, kNk, kDv}, v_data_);
  const CliResult r =
      Run(AttendArgs({"--accumulate", "f64"}, Path("q64.npy"), Path("k64.npy"), Path("v64.npy")));
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  const NpyArray out = ReadNpy(out_), weights = ReadNpy(weights_), lse = ReadNpy(lse_);
  ASSERT_EQ(out.dtype, DType::kFloat64);
  ASSERT_EQ(weights.dtype, DType::kFloat64);
  ASSERT_EQ(lse.dtype, DType::kFloat64);
  const Oracle o = NaiveAttention(q_data_, k_data_, v_data_, kB, kH, kHkv, kNq, kNk, kD, kDv);
  // Both sides compute in double from the same values: a few ulp of |x| <= 12.
  const double tol = 64 * std::numeric_limits<double>::epsilon() * 12.0;
  for (size_t i = 0; i < o.out.size(); ++i) EXPECT_NEAR(out.data<double>()[i], o.out[i], tol);
  for (size_t i = 0; i < o.weights.size(); ++i) {
    EXPECT_NEAR(weights.data<double>()[i], o.weights[i], tol);
  }
  for (size_t i = 0; i < o.lse.size(); ++i) EXPECT_NEAR(lse.data<double>()[i], o.lse[i], tol);
  for (const std::string& p : {out_, weights_, lse_}) fs::remove(p);
  ExpectUsageError(AttendArgs({"--accumulate", "f128"}), "--accumulate");
}

// qkv --version (issue 18): version, git revision, compiler, the SIMD
// targets compiled and the one running.
TEST_F(CliTest, VersionPrintsBuildFacts) {
  const CliResult r = Run({"--version"});
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_EQ(r.out.rfind("qkv 0.", 0), 0u) << r.out;
  for (const char* part : {"(git ", "SIMD targets built: ", "; running: "}) {
    EXPECT_NE(r.out.find(part), std::string::npos) << part << " missing in " << r.out;
  }
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
}

TEST_F(CliTest, DemoPrintsOk) {
  const CliResult r = Run({"demo"}, 60.0);
  ASSERT_TRUE(r.exited) << Describe(r);
  EXPECT_EQ(r.status, 0) << Describe(r);
  EXPECT_NE(r.out.find("OK"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("NOT OK"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace qkv
