// Tests of `qkv backward` and `qkv bench --backward`, run as a child process.
//
// The contract is `qkv attend`'s (tests/cli_test.cc): every usage error or bad
// input gives exactly one line on stderr naming the flag or file, exit status
// 2, nothing on stdout and no output file (nor a "*.qkv-tmp-*" temporary);
// nothing ends in a signal. Success paths are read back and compared bitwise
// with qkv::AttentionBackward called here on the same inputs (results never
// depend on the thread count), with --kernel reference and auto (flash).
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
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "qkv/attention.h"
#include "qkv/attention_backward.h"
#include "qkv/mask.h"
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

// Returns row-major [B, S, H, D] from row-major [B, H, S, D].
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

// Returns the number after "\"key\":" in a one-line JSON object (NaN if absent).
double JsonNumber(const std::string& json, const std::string& key) {
  const size_t at = json.find("\"" + key + "\":");
  return at == std::string::npos ? NAN : std::strtod(json.c_str() + at + key.size() + 3, nullptr);
}

// What qkv::AttentionBackward is called with, mirroring the CLI's flags.
struct Call {
  std::string q, k, v, dout, out, lse, mask;
  bool dmask = false, causal = false, top_left = false, bshd = false;
  Kernel kernel = Kernel::kReference;
};

// The raw bytes of the gradients the library writes for `call`, in the CLI's
// output dtypes and layouts.
struct Grads {
  std::vector<unsigned char> dq, dk, dv, dmask;
};

Grads CallLibrary(const Call& c) {
  const NpyArray q = ReadNpy(c.q), k = ReadNpy(c.k), v = ReadNpy(c.v), dout = ReadNpy(c.dout);
  auto view = [&](const NpyArray& a) {
    const auto& s = a.shape;
    return c.bshd ? TensorView::FromBSHD(a.bytes.data(), a.dtype, s[0], s[1], s[2], s[3])
                  : TensorView::Contiguous(a.bytes.data(), a.dtype, {s[0], s[1], s[2], s[3]});
  };
  Grads g;
  auto grad = [&](const NpyArray& a, std::vector<unsigned char>& bytes) {
    bytes.resize(a.bytes.size());
    const auto& s = a.shape;
    return c.bshd ? MutableTensorView::FromBSHD(bytes.data(), a.dtype, s[0], s[1], s[2], s[3])
                  : MutableTensorView::Contiguous(bytes.data(), a.dtype, {s[0], s[1], s[2], s[3]});
  };
  AttentionBackwardParams p;
  p.q = view(q), p.k = view(k), p.v = view(v), p.dout = view(dout);
  p.dq = grad(q, g.dq), p.dk = grad(k, g.dk), p.dv = grad(v, g.dv);
  NpyArray out, lse, mask;
  if (!c.out.empty()) out = ReadNpy(c.out), p.out = view(out);
  if (!c.lse.empty()) {
    lse = ReadNpy(c.lse);
    p.lse = TensorView::Contiguous(lse.data<float>(), DType::kFloat32,
                                   {p.q.shape[0], p.q.shape[1], p.q.shape[2], 1});
  }
  if (!c.mask.empty()) {
    mask = ReadNpy(c.mask);
    p.mask.mask = BroadcastMask(mask.bytes.data(), mask.dtype, mask.shape,
                                {p.q.shape[0], p.q.shape[1], p.q.shape[2], p.k.shape[2]});
    for (int d = 0; d < 4; ++d) {
      if (p.mask.mask.strides[d] == 0) p.mask.mask.shape[d] = 1;  // the mask's own shape
    }
  }
  if (c.dmask) {
    g.dmask.resize(static_cast<size_t>(mask.numel()) * 4);
    p.dmask = MutableTensorView::Contiguous(g.dmask.data(), DType::kFloat32, p.mask.mask.shape);
  }
  p.mask.causal = c.causal || c.top_left;
  p.mask.alignment = c.top_left ? Alignment::kTopLeft : Alignment::kBottomRight;
  p.kernel = c.kernel;
  AttentionBackward(p);
  return g;
}

class CliBackwardTest : public ::testing::Test {
 protected:
  // Standard inputs: q [1,4,3,8], k [1,2,5,8], v [1,2,5,6] (GQA, group 2),
  // dout [1,4,3,6].
  static constexpr int64_t kB = 1, kH = 4, kHkv = 2, kNq = 3, kNk = 5, kD = 8, kDv = 6;

  void SetUp() override {
    char pattern[] = "/tmp/qkv_cli_backward_test_XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr) << std::strerror(errno);
    dir_ = pattern;
    q_ = Path("q.npy"), k_ = Path("k.npy"), v_ = Path("v.npy"), dout_ = Path("dout.npy");
    dq_ = Path("dq.npy"), dk_ = Path("dk.npy"), dv_ = Path("dv.npy"), dmask_ = Path("dmask.npy");
    q_data_ = Values(Numel({kB, kH, kNq, kD}), 1);
    k_data_ = Values(Numel({kB, kHkv, kNk, kD}), 2);
    v_data_ = Values(Numel({kB, kHkv, kNk, kDv}), 3);
    dout_data_ = Values(Numel({kB, kH, kNq, kDv}), 4);
    WriteF32(q_, {kB, kH, kNq, kD}, q_data_);
    WriteF32(k_, {kB, kHkv, kNk, kD}, k_data_);
    WriteF32(v_, {kB, kHkv, kNk, kDv}, v_data_);
    WriteF32(dout_, {kB, kH, kNq, kDv}, dout_data_);
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

  CliResult Run(const std::vector<std::string>& args, double timeout_s = 30.0) {
    return RunCli(args, dir_, timeout_s);
  }

  // `qkv backward --q Q --k K --v V --dout DO --dq DQ --dk DK --dv DV` plus `extra`.
  std::vector<std::string> Args(const std::vector<std::string>& extra) const {
    std::vector<std::string> a = {"backward", "--q", q_, "--k", k_, "--v", v_, "--dout", dout_,
                                  "--dq", dq_, "--dk", dk_, "--dv", dv_};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  // Args with input `flag` (e.g. "--dout") replaced by `path`.
  std::vector<std::string> ArgsWith(const std::string& flag, const std::string& path,
                                    const std::vector<std::string>& extra = {}) const {
    std::vector<std::string> a = Args(extra);
    for (size_t i = 0; i + 1 < a.size(); ++i) {
      if (a[i] == flag) a[i + 1] = path;
    }
    return a;
  }

  // Returns the outputs a failed run must not leave: dq, dk, dv, dmask,
  // `extra_paths` and any "*.qkv-tmp-*" temporary.
  std::vector<std::string> LeftOutputs(const std::vector<std::string>& extra_paths) const {
    std::vector<std::string> left;
    for (const std::string& p : {dq_, dk_, dv_, dmask_}) {
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
  // stderr containing every fragment, empty stdout, no output left behind.
  void ExpectUsageError(const std::vector<std::string>& args,
                        const std::vector<std::string>& fragments,
                        const std::vector<std::string>& extra_outputs = {}) {
    std::string cmd = "qkv";
    for (const std::string& a : args) cmd += " " + a;
    SCOPED_TRACE(cmd);
    const CliResult r = Run(args, 10.0);
    EXPECT_TRUE(r.exited) << "ended by signal or timeout: " << Describe(r);
    EXPECT_EQ(r.status, 2) << Describe(r);
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "stderr: " << r.err;
    EXPECT_TRUE(!r.err.empty() && r.err.back() == '\n') << "stderr: " << r.err;
    for (const std::string& fragment : fragments) {
      EXPECT_NE(r.err.find(fragment), std::string::npos)
          << "stderr lacks '" << fragment << "': " << r.err;
    }
    EXPECT_EQ(r.out, "") << "stdout must be empty";
    const std::vector<std::string> left = LeftOutputs(extra_outputs);
    EXPECT_TRUE(left.empty()) << "left behind: " << testing::PrintToString(left);
    for (const std::string& p : left) fs::remove(p);
  }

  // Expects dq, dk, dv (and dmask) on disk to equal `want` bit for bit, with
  // the given .npy shapes and dtype float32.
  void ExpectFilesEqual(const Grads& want, const std::vector<std::vector<int64_t>>& shapes,
                        bool dmask = false) {
    const std::vector<std::pair<std::string, const std::vector<unsigned char>*>> files = {
        {dq_, &want.dq}, {dk_, &want.dk}, {dv_, &want.dv}, {dmask_, &want.dmask}};
    for (size_t n = 0; n < (dmask ? 4u : 3u); ++n) {
      const NpyArray a = ReadNpy(files[n].first);
      EXPECT_EQ(a.dtype, DType::kFloat32) << files[n].first;
      EXPECT_EQ(a.shape, shapes[n]) << files[n].first;
      EXPECT_TRUE(a.bytes == *files[n].second) << files[n].first << " differs from the library's";
    }
  }

  Call BaseCall() const {
    Call c;
    c.q = q_, c.k = k_, c.v = v_, c.dout = dout_;
    return c;
  }

  std::string dir_, q_, k_, v_, dout_, dq_, dk_, dv_, dmask_;
  std::vector<float> q_data_, k_data_, v_data_, dout_data_;
};

const std::vector<std::vector<int64_t>> kBhsdShapes = {
    {1, 4, 3, 8}, {1, 2, 5, 8}, {1, 2, 5, 6}};

// Runs each success path with --kernel reference and --kernel auto (the flash
// backward).
class CliBackwardKernelTest : public CliBackwardTest,
                              public ::testing::WithParamInterface<const char*> {
 protected:
  Kernel kernel() const { return KernelFromName(GetParam()); }
};

TEST_P(CliBackwardKernelTest, WritesTheLibrarysGradientsBitwise) {
  const CliResult r = Run(Args({"--causal", "--kernel", GetParam()}));
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.err, "");
  Call c = BaseCall();
  c.causal = true;
  c.kernel = kernel();
  ExpectFilesEqual(CallLibrary(c), kBhsdShapes);
  EXPECT_EQ(LeftOutputs({}).size(), 3u);  // exactly dq, dk, dv; no temporaries
}

// --out/--lse from `qkv attend` give the same gradients as recomputing them
// (the same kernel computes the forward either way), and --verbose says which.
TEST_P(CliBackwardKernelTest, GivenOutAndLseEqualRecomputed) {
  const std::string out = Path("out.npy"), lse = Path("lse.npy"), lse4 = Path("lse4.npy");
  const std::string fwd_kernel = std::string(GetParam()) == "auto" ? "flash" : "reference";
  const CliResult a = Run({"attend", "--q", q_, "--k", k_, "--v", v_, "--out", out, "--lse", lse,
                           "--causal-top-left", "--kernel", fwd_kernel});
  ASSERT_TRUE(a.exited && a.status == 0) << Describe(a);
  const CliResult given =
      Run(Args({"--causal-top-left", "--kernel", GetParam(), "--out", out, "--lse", lse,
                "--verbose"}));
  ASSERT_TRUE(given.exited && given.status == 0) << Describe(given);
  EXPECT_EQ(given.out.find("recomputed"), std::string::npos) << given.out;
  Call c = BaseCall();
  c.top_left = true;
  c.kernel = kernel();
  c.out = out, c.lse = lse;
  const Grads want = CallLibrary(c);
  ExpectFilesEqual(want, kBhsdShapes);
  // Recomputed: the same bits.
  const CliResult rec = Run(Args({"--causal-top-left", "--kernel", GetParam(), "--verbose"}));
  ASSERT_TRUE(rec.exited && rec.status == 0) << Describe(rec);
  EXPECT_NE(rec.out.find("forward recomputed (out and lse not given)"), std::string::npos)
      << rec.out;
  ExpectFilesEqual(want, kBhsdShapes);
  // lse as [B, H, Nq, 1] is accepted too.
  const NpyArray l = ReadNpy(lse);
  WriteNpy(lse4, DType::kFloat32, std::vector<int64_t>{kB, kH, kNq, 1}, l.bytes.data());
  const CliResult l4 = Run(Args({"--causal-top-left", "--kernel", GetParam(), "--out", out,
                                 "--lse", lse4}));
  ASSERT_TRUE(l4.exited && l4.status == 0) << Describe(l4);
  ExpectFilesEqual(want, kBhsdShapes);
}

// --layout bshd reads q, k, v, dout and writes dq, dk, dv as [B, N, H, D].
TEST_P(CliBackwardKernelTest, BshdLayout) {
  const std::string qb = Path("q_bshd.npy"), kb = Path("k_bshd.npy"), vb = Path("v_bshd.npy"),
                    db = Path("dout_bshd.npy");
  WriteF32(qb, {kB, kNq, kH, kD}, SwapAxes12(q_data_, kB, kH, kNq, kD));
  WriteF32(kb, {kB, kNk, kHkv, kD}, SwapAxes12(k_data_, kB, kHkv, kNk, kD));
  WriteF32(vb, {kB, kNk, kHkv, kDv}, SwapAxes12(v_data_, kB, kHkv, kNk, kDv));
  WriteF32(db, {kB, kNq, kH, kDv}, SwapAxes12(dout_data_, kB, kH, kNq, kDv));
  const CliResult r = Run({"backward", "--layout", "bshd", "--q", qb, "--k", kb, "--v", vb,
                           "--dout", db, "--dq", dq_, "--dk", dk_, "--dv", dv_, "--causal",
                           "--kernel", GetParam()});
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  Call c;
  c.q = qb, c.k = kb, c.v = vb, c.dout = db;
  c.bshd = c.causal = true;
  c.kernel = kernel();
  ExpectFilesEqual(CallLibrary(c), {{1, 3, 4, 8}, {1, 5, 2, 8}, {1, 5, 2, 6}});
  // The same gradients as bhsd, transposed (equal up to a few ulps of the
  // largest gradient: only the memory order of the operands differs).
  const NpyArray dq_bshd = ReadNpy(dq_);
  const CliResult h = Run(Args({"--causal", "--kernel", GetParam()}));
  ASSERT_TRUE(h.exited && h.status == 0) << Describe(h);
  const NpyArray dq_bhsd = ReadNpy(dq_);
  const std::vector<float> a(dq_bhsd.data<float>(), dq_bhsd.data<float>() + dq_bhsd.numel());
  const std::vector<float> b = SwapAxes12(a, kB, kH, kNq, kD);
  float max_abs = 0.0f;
  for (float x : b) max_abs = std::max(max_abs, std::fabs(x));
  for (size_t n = 0; n < b.size(); ++n) {
    EXPECT_NEAR(dq_bshd.data<float>()[n], b[n], 16 * 0x1p-24 * max_abs) << n;
  }
}

INSTANTIATE_TEST_SUITE_P(CliBackward, CliBackwardKernelTest,
                         ::testing::Values("reference", "auto"));

// --dmask: the additive mask's gradient in the mask file's own shape
// ([Nq, Nk] here, summed over batch and heads), float32; auto runs the
// reference kernel for it and says why.
TEST_F(CliBackwardTest, DmaskInTheMasksOwnShape) {
  const std::string mask = Path("mask.npy");
  std::vector<float> m = Values(kNq * kNk, 9);
  m[1] = -INFINITY;
  WriteF32(mask, {kNq, kNk}, m);
  const CliResult r = Run(Args({"--mask", mask, "--dmask", dmask_, "--verbose"}));
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_NE(r.out.find("kernel: reference (reference: dmask requested"), std::string::npos)
      << r.out;
  Call c = BaseCall();
  c.mask = mask;
  c.dmask = true;
  ExpectFilesEqual(CallLibrary(c), {kBhsdShapes[0], kBhsdShapes[1], kBhsdShapes[2], {kNq, kNk}},
                   /*dmask=*/true);
  EXPECT_EQ(ReadNpy(dmask_).data<float>()[1], 0.0f) << "a -inf mask entry has no gradient";
}

// --shape: random q, k, v, dout; a summary line; optional outputs.
TEST_F(CliBackwardTest, RandomShapeRunPrintsSummary) {
  const CliResult r = Run({"backward", "--shape", "1,2,16,8", "--seed", "3", "--kernel",
                           "reference", "--verbose"});
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_EQ(r.err, "");
  for (const char* text : {"kernel: reference (reference: requested; forward recomputed",
                           "threads", "scratch", "seed 3", "GFLOP/s", "2.5 x", "peak memory"}) {
    EXPECT_NE(r.out.find(text), std::string::npos) << text << " missing in " << r.out;
  }
  // GQA and cross-attention shapes, with outputs.
  const CliResult g = Run({"backward", "--shape", "2,4,3,8", "--kv-heads", "2", "--seq-kv", "7",
                           "--causal", "--kernel", "reference", "--dq", dq_, "--dk", dk_,
                           "--dv", dv_});
  ASSERT_TRUE(g.exited && g.status == 0) << Describe(g);
  EXPECT_EQ(ReadNpy(dq_).shape, (std::vector<int64_t>{2, 4, 3, 8}));
  EXPECT_EQ(ReadNpy(dk_).shape, (std::vector<int64_t>{2, 2, 7, 8}));
  EXPECT_EQ(ReadNpy(dv_).shape, (std::vector<int64_t>{2, 2, 7, 8}));
  // The default kernel (auto: flash).
  const CliResult a = Run({"backward", "--shape", "1,2,16,8", "--verbose"});
  ASSERT_TRUE(a.exited && a.status == 0) << Describe(a);
  EXPECT_NE(a.out.find("kernel: flash"), std::string::npos) << a.out;
}

// bench --backward: the forward bench's JSON keys, flops = 2.5 x the
// forward's for the same shape.
TEST_F(CliBackwardTest, BenchBackwardJson) {
  for (const char* causal : {"", "--causal"}) {
    std::vector<std::string> fwd = {"bench", "--shape", "1,2,64,8", "--repeat", "1", "--json",
                                    "--kernel", "reference"};
    if (*causal) fwd.push_back(causal);
    std::vector<std::string> bwd = fwd;
    bwd.push_back("--backward");
    const CliResult f = Run(fwd), b = Run(bwd);
    ASSERT_TRUE(f.exited && f.status == 0) << Describe(f);
    ASSERT_TRUE(b.exited && b.status == 0) << Describe(b);
    for (const char* key : {"\"median_s\"", "\"min_s\"", "\"max_s\"", "\"flops\"", "\"gflops\"",
                            "\"peak_rss_bytes\"", "\"kernel\"", "\"threads\"", "\"simd_target\"",
                            "\"kernel_reason\"", "\"scratch_bytes\"", "\"backward\""}) {
      EXPECT_NE(b.out.find(key), std::string::npos) << key << " missing in " << b.out;
      EXPECT_NE(f.out.find(key), std::string::npos) << key << " missing in " << f.out;
    }
    EXPECT_NE(b.out.find("\"backward\":true"), std::string::npos) << b.out;
    EXPECT_NE(f.out.find("\"backward\":false"), std::string::npos) << f.out;
    EXPECT_EQ(JsonNumber(b.out, "flops"), 2.5 * JsonNumber(f.out, "flops")) << causal;
    EXPECT_GT(JsonNumber(b.out, "gflops"), 0.0);
  }
  const CliResult t = Run({"bench", "--backward", "--shape", "1,2,64,8", "--repeat", "1",
                           "--kernel", "reference"});
  ASSERT_TRUE(t.exited && t.status == 0) << Describe(t);
  EXPECT_EQ(t.out.rfind("backward: reference", 0), 0u) << t.out;
  const CliResult a = Run({"bench", "--backward", "--shape", "1,2,64,8", "--repeat", "1"});
  ASSERT_TRUE(a.exited && a.status == 0) << Describe(a);
}

TEST_F(CliBackwardTest, HelpListsEveryFlag) {
  const CliResult r = Run({"backward", "--help"});
  ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
  // Every mask / scale / layout / kernel / threads flag of attend, and backward's own.
  for (const char* flag : {"--q", "--k", "--v", "--dout", "--dq", "--dk", "--dv", "--out",
                           "--lse", "--mask", "--dmask", "--causal", "--causal-top-left",
                           "--window", "--key-lengths", "--scale", "--layout", "--shape",
                           "--kv-heads", "--seq-kv", "--seed", "--kernel", "--threads",
                           "--verbose"}) {
    EXPECT_NE(r.out.find(std::string(flag) + " "), std::string::npos) << flag << ":\n" << r.out;
  }
  const CliResult b = Run({"bench", "--help"});
  ASSERT_TRUE(b.exited && b.status == 0) << Describe(b);
  EXPECT_NE(b.out.find("2.5 x the forward's 4*Nq*Nk*D"), std::string::npos) << b.out;
  const CliResult top = Run({"--help"});
  EXPECT_NE(top.out.find("backward"), std::string::npos) << top.out;
  ExpectUsageError({"frob"}, {"frob", "backward"});
}

// ---------------------------------------------------------------------------
// Usage errors: exit 2, one line naming the flag or file, nothing written.

TEST_F(CliBackwardTest, MissingRequiredFlags) {
  ExpectUsageError({"backward"}, {"--q, --k, --v and --dout"});
  ExpectUsageError({"backward", "--q", q_, "--k", k_, "--v", v_, "--dq", dq_, "--dk", dk_, "--dv",
                    dv_},
                   {"--dout", "required"});
  ExpectUsageError({"backward", "--k", k_, "--v", v_, "--dout", dout_, "--dq", dq_, "--dk", dk_,
                    "--dv", dv_},
                   {"--q", "required"});
  ExpectUsageError({"backward", "--q", q_, "--k", k_, "--v", v_, "--dout", dout_, "--dk", dk_,
                    "--dv", dv_},
                   {"--dq", "required"});
  ExpectUsageError({"backward", "--q", q_, "--k", k_, "--v", v_, "--dout", dout_, "--dq", dq_},
                   {"--dk", "required"});
}

TEST_F(CliBackwardTest, ShapeWithFiles) {
  ExpectUsageError(Args({"--shape", "1,4,3,8"}), {"--shape", "exclusive"});
  ExpectUsageError({"backward", "--shape", "1,4,3,8", "--dout", dout_}, {"exclusive"});
  ExpectUsageError({"backward", "--shape", "1,4,3,8", "--out", Path("o.npy")}, {"exclusive"});
  ExpectUsageError({"backward", "--shape", "1,4,3,8", "--layout", "bshd"}, {"--layout"});
  ExpectUsageError({"backward", "--shape", "1,2,3"}, {"--shape"});
  ExpectUsageError({"backward", "--shape", "1,1,4000000000,64"}, {"would need"});
  ExpectUsageError(Args({"--kv-heads", "1"}), {"--kv-heads"});
  ExpectUsageError(Args({"--seed", "3"}), {"--seed"});
}

TEST_F(CliBackwardTest, BadShapes) {
  WriteF32(Path("dout_dv.npy"), {kB, kH, kNq, kDv + 1});
  ExpectUsageError(ArgsWith("--dout", Path("dout_dv.npy")),
                   {"--dout", "dout_dv.npy", "(1, 4, 3, 6)"});
  WriteF32(Path("dout_heads.npy"), {kB, kHkv, kNq, kDv});
  ExpectUsageError(ArgsWith("--dout", Path("dout_heads.npy")), {"--dout", "dout_heads.npy"});
  WriteF32(Path("dout3.npy"), {kH, kNq, kDv});
  ExpectUsageError(ArgsWith("--dout", Path("dout3.npy")), {"--dout", "expected 4 dims"});
  // bshd: dout given in bhsd order; the message gives the bshd shape.
  const std::string qb = Path("q_bshd.npy"), kb = Path("k_bshd.npy"), vb = Path("v_bshd.npy");
  WriteF32(qb, {kB, kNq, kH, kD});
  WriteF32(kb, {kB, kNk, kHkv, kD});
  WriteF32(vb, {kB, kNk, kHkv, kDv});
  ExpectUsageError({"backward", "--layout", "bshd", "--q", qb, "--k", kb, "--v", vb, "--dout",
                    dout_, "--dq", dq_, "--dk", dk_, "--dv", dv_},
                   {"--dout", "(1, 3, 4, 6)", "[batch, seq_q, heads, head_dim_v]"});
  // --out and --lse of the wrong shape or dtype.
  WriteF32(Path("out_bad.npy"), {kB, kH, kNq + 1, kDv});
  ExpectUsageError(Args({"--out", Path("out_bad.npy")}), {"--out", "out_bad.npy"});
  WriteF32(Path("lse_bad.npy"), {kB, kH, kNq + 1});
  ExpectUsageError(Args({"--lse", Path("lse_bad.npy")}), {"--lse", "lse_bad.npy", "(1, 4, 3)"});
  const std::vector<int32_t> ints(kB * kH * kNq, 0);
  WriteNpy(Path("lse_i32.npy"), DType::kInt32, std::vector<int64_t>{kB, kH, kNq}, ints.data());
  ExpectUsageError(Args({"--lse", Path("lse_i32.npy")}), {"--lse", "int32"});
  // q, k, v that disagree (checked by the library, named as attend names them).
  WriteF32(Path("k_dim.npy"), {kB, kHkv, kNk, kD + 1});
  ExpectUsageError(ArgsWith("--k", Path("k_dim.npy")), {"head_dim"});
  WriteF32(Path("k3.npy"), {kB, 3, kNk, kD});
  WriteF32(Path("v3.npy"), {kB, 3, kNk, kDv});
  std::vector<std::string> gqa3 = ArgsWith("--k", Path("k3.npy"));
  for (size_t i = 0; i + 1 < gqa3.size(); ++i) {
    if (gqa3[i] == "--v") gqa3[i + 1] = Path("v3.npy");
  }
  ExpectUsageError(gqa3, {"divide"});
}

TEST_F(CliBackwardTest, MissingOrWrongDtypeFile) {
  ExpectUsageError(ArgsWith("--q", Path("missing.npy")), {"missing.npy"});
  ExpectUsageError(ArgsWith("--dout", Path("nodir/dout.npy")), {"nodir/dout.npy"});
  ExpectUsageError(Args({"--out", Path("no_out.npy")}), {"no_out.npy"});
  ExpectUsageError(Args({"--mask", Path("no_mask.npy")}), {"no_mask.npy"});
  const std::vector<int32_t> ints(Numel({kB, kH, kNq, kD}), 1);
  WriteNpy(Path("qi.npy"), DType::kInt32, std::vector<int64_t>{kB, kH, kNq, kD}, ints.data());
  ExpectUsageError(ArgsWith("--q", Path("qi.npy")), {"--q", "qi.npy", "int32"});
  const std::vector<uint8_t> ones(Numel({kB, kH, kNq, kDv}), 1);
  WriteNpy(Path("dout_b.npy"), DType::kBool, std::vector<int64_t>{kB, kH, kNq, kDv}, ones.data());
  ExpectUsageError(ArgsWith("--dout", Path("dout_b.npy")), {"--dout", "bool"});
  std::ofstream(Path("garbage.npy")) << "not a numpy file";
  ExpectUsageError(ArgsWith("--v", Path("garbage.npy")), {"garbage.npy"});
}

TEST_F(CliBackwardTest, DmaskErrors) {
  const std::vector<uint8_t> ones(kNq * kNk, 1);
  WriteNpy(Path("bool_mask.npy"), DType::kBool, std::vector<int64_t>{kNq, kNk}, ones.data());
  ExpectUsageError(Args({"--mask", Path("bool_mask.npy"), "--dmask", dmask_}),
                   {"--dmask", "bool_mask.npy", "bool"});
  ExpectUsageError(Args({"--dmask", dmask_}), {"--dmask", "--mask"});
  WriteF32(Path("mask.npy"), {kNq, kNk});
  ExpectUsageError(Args({"--mask", Path("mask.npy"), "--dmask", dmask_, "--kernel", "flash"}),
                   {"--kernel flash", "--dmask"});
  WriteF32(Path("mask_bad.npy"), {kNq, kNk + 1});
  ExpectUsageError(Args({"--mask", Path("mask_bad.npy"), "--dmask", dmask_}), {"broadcast"});
}

TEST_F(CliBackwardTest, OutputInMissingDirectory) {
  // Each output in turn fails; the others must not be left behind.
  for (const char* flag : {"--dq", "--dk", "--dv"}) {
    const std::string bad = Path(std::string("nodir/") + (flag + 2) + ".npy");
    ExpectUsageError(ArgsWith(flag, bad, {"--kernel", "reference"}), {bad}, {bad});
  }
  WriteF32(Path("mask.npy"), {kNq, kNk});
  const std::string bad = Path("nodir/dmask.npy");
  ExpectUsageError(Args({"--mask", Path("mask.npy"), "--dmask", bad}), {"nodir/dmask.npy"}, {bad});
  ExpectUsageError({"backward", "--shape", "1,2,4,8", "--kernel", "reference", "--dq", dq_,
                    "--dv", bad},
                   {"nodir"}, {bad});
  ExpectUsageError(ArgsWith("--dk", dq_, {"--kernel", "reference"}), {"twice"});
}

TEST_F(CliBackwardTest, BadMaskAndRuleFlags) {
  ExpectUsageError(Args({"--causal", "--causal-top-left"}), {"--causal"});
  ExpectUsageError(Args({"--window", "1"}), {"--window"});
  ExpectUsageError(Args({"--window", "-2", "0"}), {"window"});
  ExpectUsageError(Args({"--scale", "inf"}), {"scale"});
  ExpectUsageError(Args({"--layout", "sbhd"}), {"--layout"});
  ExpectUsageError(Args({"--kernel", "flash9"}), {"--kernel"});
  ExpectUsageError(Args({"--threads", "-1"}), {"threads"});
  ExpectUsageError(Args({"--bogus"}), {"--bogus"});
  const std::vector<int32_t> too_long = {kNk + 1};
  WriteNpy(Path("kl.npy"), DType::kInt32, std::vector<int64_t>{1}, too_long.data());
  ExpectUsageError(Args({"--key-lengths", Path("kl.npy")}), {"key_lengths"});
  WriteF32(Path("kl_f.npy"), {1});
  ExpectUsageError(Args({"--key-lengths", Path("kl_f.npy")}), {"--key-lengths", "kl_f.npy"});
}

TEST_F(CliBackwardTest, BenchBackwardRefusesDecode) {
  ExpectUsageError({"bench", "--backward", "--decode", "--cache-len", "10"},
                   {"--backward", "--decode"});
  ExpectUsageError({"bench", "--backward"}, {"--shape"});
}

}  // namespace
}  // namespace qkv
