// Regression tests of issue 12 (hardening): each hostile input a review found
// must give one line on stderr naming the flag or file, exit status 2, and
// leave no output, in bounded time; never a crash, a hang, an unbounded
// allocation or a silently overwritten file. Also the inputs the fuzz targets
// found (tests/testdata/fuzz/), replayed through the same code.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <omp.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "../fuzz/cli_fixtures.h"
#include "file_test_util.h"
#include "qkv/attention.h"
#include "qkv/error.h"
#include "qkv/npy.h"
#include "qkv/safetensors.h"

extern char** environ;

namespace qkv {
namespace {

namespace fs = std::filesystem;

struct Result {
  bool exited = false;
  int status = -1;
  bool timed_out = false;
  double seconds = 0.0;
  std::string out, err;
};

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Runs qkv with `args` and extra environment entries ("NAME=value"); stdout
// goes to `stdout_path` (a file in `dir` when empty). SIGKILL after timeout_s.
Result RunQkv(const std::vector<std::string>& args, const std::string& dir,
           const std::vector<std::string>& env = {}, const std::string& stdout_path = "",
           double timeout_s = 20.0, bool in_dir = false) {
  const std::string out_path = stdout_path.empty() ? dir + "/.stdout" : stdout_path;
  const std::string err_path = dir + "/.stderr";
  std::vector<std::string> storage = {QKV_CLI_PATH};
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : storage) argv.push_back(s.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_storage(env.begin(), env.end());
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    bool replaced = false;
    for (const std::string& x : env) {
      replaced |= entry.substr(0, entry.find('=')) == x.substr(0, x.find('='));
    }
    if (!replaced) env_storage.push_back(entry);
  }
  std::vector<char*> envp;
  for (std::string& s : env_storage) envp.push_back(s.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  if (in_dir) posix_spawn_file_actions_addchdir_np(&actions, dir.c_str());
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  Result r;
  const auto start = std::chrono::steady_clock::now();
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    ADD_FAILURE() << "posix_spawn: " << std::strerror(rc);
    return r;
  }
  int wstatus = 0;
  while (waitpid(pid, &wstatus, WNOHANG) != pid) {
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!r.timed_out && elapsed > timeout_s) {
      r.timed_out = true;
      kill(pid, SIGKILL);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.exited = !r.timed_out && WIFEXITED(wstatus);
  if (r.exited) r.status = WEXITSTATUS(wstatus);
  if (stdout_path.empty()) r.out = Slurp(out_path);
  r.err = Slurp(err_path);
  std::remove(err_path.c_str());
  if (stdout_path.empty()) std::remove(out_path.c_str());
  return r;
}

std::string Describe(const Result& r) {
  return "exited=" + std::to_string(r.exited) + " status=" + std::to_string(r.status) +
         " timed_out=" + std::to_string(r.timed_out) + " seconds=" + std::to_string(r.seconds) +
         "\nstdout: " + r.out + "\nstderr: " + r.err;
}

class HardeningTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/qkv_hardening_XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
    q_ = P("q.npy"), k_ = P("k.npy"), v_ = P("v.npy"), out_ = P("out.npy");
    WriteF32(q_, {1, 2, 3, 4});
    WriteF32(k_, {1, 1, 5, 4});
    WriteF32(v_, {1, 1, 5, 4});
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string P(const std::string& name) const { return dir_ + "/" + name; }
  static void WriteF32(const std::string& path, const std::vector<int64_t>& shape) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    std::vector<float> data(n);
    for (size_t i = 0; i < n; ++i) data[i] = static_cast<float>(i % 7) * 0.25f - 0.5f;
    WriteNpy(path, DType::kFloat32, shape, data.data());
  }
  // An empty float32 .npy of `shape` (some dim 0): a few bytes, any other dims.
  std::string Empty(const std::string& name, const std::vector<int64_t>& shape) const {
    WriteNpy(P(name), DType::kFloat32, shape, nullptr);
    return P(name);
  }
  std::vector<std::string> Attend(const std::vector<std::string>& extra) const {
    std::vector<std::string> a = {"attend", "--q", q_, "--k", k_, "--v", v_, "--out", out_};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }

  // The error contract: exit 2, one line on stderr with every fragment, no
  // stdout, none of `outputs` (nor a temporary) left, within timeout_s.
  void ExpectError(const std::vector<std::string>& args, const std::vector<std::string>& fragments,
                   const std::vector<std::string>& outputs = {}, double timeout_s = 20.0,
                   const std::vector<std::string>& env = {}) {
    std::string cmd = "qkv";
    for (const std::string& a : args) cmd += " " + a;
    SCOPED_TRACE(cmd);
    const Result r = RunQkv(args, dir_, env, "", timeout_s);
    EXPECT_TRUE(r.exited) << Describe(r);
    EXPECT_EQ(r.status, 2) << Describe(r);
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    for (const std::string& f : fragments) {
      EXPECT_NE(r.err.find(f), std::string::npos) << "stderr lacks '" << f << "': " << r.err;
    }
    EXPECT_EQ(r.out, "");
    for (const std::string& o : outputs) EXPECT_FALSE(fs::exists(o)) << o << " left behind";
    for (const auto& e : fs::directory_iterator(dir_)) {
      EXPECT_EQ(e.path().string().find(".qkv-tmp-"), std::string::npos) << e.path();
    }
  }

  std::string dir_, q_, k_, v_, out_;
};

// 1. OMP_NUM_THREADS above the 1024 that --threads allows was a SIGSEGV
// (100000) or libgomp's "Thread creation failed" (40000) in attend, demo and
// mha; every command now refuses it by name.
TEST_F(HardeningTest, HugeOmpNumThreadsIsOneLineErrorInEveryCommand) {
  WriteF32(P("x.npy"), {1, 3, 4});
  WriteF32(P("enc.npy"), {3, 4});
  WriteF32(P("s.npy"), {4});
  const std::vector<std::vector<std::string>> commands = {
      {"attend", "--shape", "1,8,256,64"},
      {"backward", "--shape", "1,2,16,8"},
      {"demo"},
      {"bench", "--shape", "1,2,16,8", "--repeat", "1"},
      {"bench", "--decode", "--cache-len", "16", "--repeat", "1"},
      {"decode", "--prompt-tokens", "4", "--generate", "1"},
      {"memory", "--preset", "llama3-8b", "--seq", "4096"},
      {"mha", "--query", P("x.npy"), "--params", P("none.safetensors"), "--heads", "1", "--out",
       out_},
      {"classic", "--score", "dot", "--state", P("s.npy"), "--encoder", P("enc.npy"), "--out",
       out_},
      {"positions", "--kind", "sinusoidal", "--seq", "4", "--dim", "4", "--out", out_},
  };
  for (const char* threads : {"100000", "40000"}) {
    for (const auto& args : commands) {
      ExpectError(args, {"OMP_NUM_THREADS", "1024"}, {out_}, 20.0,
                  {std::string("OMP_NUM_THREADS=") + threads});
    }
  }
}

// The library resolves the default thread count in one place and holds it
// to the same cap (before: 100000 threads were started).
TEST(HardeningLibraryTest, DefaultThreadCountAboveCapIsAnError) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(100000);
  std::vector<float> q(8, 0.5f), o(8);
  AttentionParams p;
  p.q = TensorView::Contiguous(q.data(), DType::kFloat32, {1, 1, 2, 4});
  p.k = p.q;
  p.v = p.q;
  p.out = MutableTensorView::Contiguous(o.data(), DType::kFloat32, {1, 1, 2, 4});
  test::ExpectError([&] { Attention(p); }, "OMP_NUM_THREADS", "1024");
  omp_set_num_threads(saved);
  p.num_threads = 2;  // an explicit count does not consult the default
  omp_set_num_threads(100000);
  EXPECT_NO_THROW(Attention(p));
  omp_set_num_threads(saved);
}

// 2. A FIFO as an input blocked forever in fopen (attend, mha --params,
// positions --x, classic --state); it is refused at once, unopened by a writer.
TEST_F(HardeningTest, FifoInputIsRefusedWithoutBlocking) {
  const std::string fifo = P("fifo.npy");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0644), 0) << std::strerror(errno);
  WriteF32(P("x.npy"), {1, 3, 4});
  WriteF32(P("enc.npy"), {3, 4});
  ExpectError({"attend", "--q", fifo, "--k", k_, "--v", v_, "--out", out_},
              {"--q", "fifo.npy", "not a regular file"}, {out_}, 5.0);
  ExpectError(Attend({"--mask", fifo}), {"fifo.npy", "not a regular file"}, {out_}, 5.0);
  ExpectError({"mha", "--query", P("x.npy"), "--params", fifo, "--heads", "1", "--out", out_},
              {"--params", "not a regular file"}, {out_}, 5.0);
  ExpectError({"positions", "--kind", "rope", "--x", fifo, "--out", out_},
              {"--x", "not a regular file"}, {out_}, 5.0);
  ExpectError(
      {"classic", "--score", "dot", "--state", fifo, "--encoder", P("enc.npy"), "--out", out_},
      {"--state", "not a regular file"}, {out_}, 5.0);
  // Nor may an output replace a FIFO or a device (rename would unlink it).
  ExpectError(Attend({"--lse", fifo}), {"fifo.npy", "not a regular file"}, {out_}, 5.0);
  EXPECT_TRUE(fs::is_fifo(fifo));
}

// 3. Zero-size q, k, v with a huge seq_kv and --lse ran for minutes (every
// key of every row); lse now has a closed form and returns at once.
TEST_F(HardeningTest, ZeroHeadDimsWithLseAreBounded) {
  const std::string q0 = Empty("q0.npy", {1, 1, 1000, 0});
  const std::string kv0 = Empty("kv0.npy", {1, 1, 2147483647, 0});
  for (const std::vector<std::string>& extra :
       {std::vector<std::string>{}, {"--causal"}, {"--window", "5", "3"}}) {
    std::vector<std::string> args = {"attend", "--q", q0,  "--k",   kv0,      "--v",
                                     kv0,      "--out", out_, "--lse", P("lse.npy")};
    args.insert(args.end(), extra.begin(), extra.end());
    const Result r = RunQkv(args, dir_, {}, "", 10.0);
    ASSERT_TRUE(r.exited && r.status == 0) << Describe(r);
    EXPECT_LT(r.seconds, 5.0);
    const NpyArray lse = ReadNpy(P("lse.npy"));
    ASSERT_EQ(lse.shape, (std::vector<int64_t>{1, 1, 1000}));
    const int64_t nk = 2147483647, nq = 1000;
    for (int64_t i : {int64_t{0}, int64_t{1}, int64_t{999}}) {
      int64_t n = nk;
      if (extra.size() == 1) n = i + nk - nq + 1;  // causal, bottom-right
      if (extra.size() == 3) n = 9;                // window 5 left, 3 right, clipped at nk
      if (extra.size() == 3 && i == 999) n = 6;
      EXPECT_NEAR(lse.data<float>()[i], std::log(static_cast<double>(n)), 1e-5) << i;
    }
  }
}

// The closed form equals the reference kernel on small problems (weights
// turn the closed form off), masks, key lengths and -inf/NaN/+inf included.
TEST(HardeningLibraryTest, ZeroHeadDimLseClosedFormMatchesKernel) {
  const int64_t B = 2, H = 2, Nq = 5, Nk = 7;
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> mask_values = {0.5f, -inf, 2.0f, std::nanf(""), inf,
                                          -1.0f, 0.0f, -inf, 3.0f, 1.5f};
  const std::vector<uint8_t> bool_values = {1, 0, 1, 1, 0, 1, 1, 0, 0, 1};
  const int64_t lengths[] = {7, 3};
  for (int variant = 0; variant < 6; ++variant) {
    SCOPED_TRACE(variant);
    AttentionParams p;
    p.q = TensorView::Contiguous(nullptr, DType::kFloat32, {B, H, Nq, 0});
    p.k = TensorView::Contiguous(nullptr, DType::kFloat32, {B, 1, Nk, 0});
    p.v = p.k;
    p.out = MutableTensorView::Contiguous(nullptr, DType::kFloat32, {B, H, Nq, 0});
    if (variant == 1) p.mask.causal = true;
    if (variant == 2) p.mask.window_left = 2, p.mask.window_right = 1, p.mask.key_lengths = lengths;
    if (variant == 3) {  // float mask [1, H, Nq, 1]: constant along keys
      p.mask.mask = TensorView{mask_values.data(), DType::kFloat32, {B, H, Nq, Nk}, {0, Nq, 1, 0}};
    }
    if (variant == 4) {  // bool mask [B, 1, Nq, 1]
      p.mask.mask = TensorView{bool_values.data(), DType::kBool, {B, H, Nq, Nk}, {Nq, 0, 1, 0}};
      p.mask.causal = true;
      p.mask.alignment = Alignment::kTopLeft;
    }
    if (variant == 5) {  // batch 1, key length 3, causal top-left
      p.q.shape[0] = p.k.shape[0] = p.v.shape[0] = p.out.shape[0] = 1;
      p.mask.key_lengths = std::span<const int64_t>(lengths + 1, 1);
      p.mask.causal = true;
      p.mask.alignment = Alignment::kTopLeft;
    }
    const int64_t b = p.q.shape[0];
    std::vector<float> closed(b * H * Nq), kernel(b * H * Nq), weights(b * H * Nq * Nk);
    p.lse = MutableTensorView::Contiguous(closed.data(), DType::kFloat32, {b, H, Nq, 1});
    const AttentionInfo info = Attention(p);
    EXPECT_NE(info.reason.find("closed form"), std::string::npos) << info.reason;
    p.lse = MutableTensorView::Contiguous(kernel.data(), DType::kFloat32, {b, H, Nq, 1});
    p.weights = MutableTensorView::Contiguous(weights.data(), DType::kFloat32, {b, H, Nq, Nk});
    Attention(p);
    for (size_t i = 0; i < closed.size(); ++i) {
      if (std::isnan(kernel[i])) {
        EXPECT_TRUE(std::isnan(closed[i])) << i;
      } else if (std::isinf(kernel[i])) {
        EXPECT_EQ(closed[i], kernel[i]) << i;
      } else {
        EXPECT_NEAR(closed[i], kernel[i], 1e-6) << i;
        EXPECT_EQ(std::isinf(closed[i]), std::isinf(kernel[i])) << i;
      }
    }
  }
}

// 4. classic allocated the weights (and scores) for any seq_kv of a
// zero-size encoder: 1.28 GB from 128 bytes, or "out of memory" / "internal
// error", exit 1.
TEST_F(HardeningTest, ClassicZeroSizeEncoderIsRefused) {
  const std::string state = Empty("s.npy", {0});
  for (const int64_t seq : {int64_t{67108864}, int64_t{4294967296}, int64_t{9000000000000000000}}) {
    const std::string enc = Empty("enc.npy", {seq, 0});
    ExpectError({"classic", "--score", "dot", "--state", state, "--encoder", enc, "--out", out_,
                 "--attn-weights", P("w.npy")},
                {"--encoder", "enc.npy", "enc_dim >= 1"}, {out_, P("w.npy")}, 5.0);
  }
  WriteF32(P("s4.npy"), {4});
  const std::string wide = Empty("wide.npy", {0, 4});
  ExpectError({"classic", "--score", "dot", "--state", P("s4.npy"), "--encoder", wide,
               "--out", out_},
              {"--encoder", "seq_kv >= 1"}, {out_}, 5.0);
}

// 5. decode and bench --decode allocated before validating: a head count
// past int32, and the float32 staging buffers (4x an int8 cache) that the
// memory pre-check did not count.
TEST_F(HardeningTest, DecodeChecksEveryBufferBeforeAllocating) {
  ExpectError({"decode", "--heads", "2147483648", "--kv-heads", "1", "--head-dim", "1"},
              {"--heads", "2147483648"}, {}, 5.0);
  ExpectError({"bench", "--decode", "--cache-len", "16", "--heads", "2147483648", "--kv-heads", "1",
               "--head-dim", "1"},
              {"--heads"}, {}, 5.0);
  // An int8 cache of half this machine's memory passed the old check; with
  // its staging (8192 bytes a token against the cache's 2112) it cannot fit.
  const double physical =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  const int64_t prompt = std::min<int64_t>(static_cast<int64_t>(0.5 * physical / 2112.0),
                                           (int64_t{1} << 31) - 2);
  ExpectError({"decode", "--prompt-tokens", std::to_string(prompt), "--generate", "1", "--heads",
               "8", "--kv-heads", "8", "--head-dim", "128", "--cache-dtype", "i8"},
              {"would need", "staging"}, {}, 5.0);
  ExpectError({"bench", "--decode", "--cache-len", std::to_string(prompt), "--heads", "8",
               "--kv-heads", "8", "--head-dim", "128", "--cache-dtype", "i8"},
              {"--cache-len", "would need"}, {}, 5.0);
}

// 6. An output that is an input (or a model file) was silently replaced;
// two spellings of one output were not "given twice".
TEST_F(HardeningTest, OutputsNeverReplaceInputs) {
  const std::string q_before = Slurp(q_);
  ExpectError({"attend", "--q", q_, "--k", k_, "--v", v_, "--out", q_}, {"--out", "--q"});
  ExpectError(Attend({"--lse", v_}), {"--lse", "--v"}, {out_});
  // A hard link and a ./-spelling are the same file too.
  ASSERT_EQ(link(k_.c_str(), P("k_link.npy").c_str()), 0);
  ExpectError(Attend({"--attn-weights", P("k_link.npy")}), {"--attn-weights", "--k"}, {out_});
  ExpectError(Attend({"--lse", dir_ + "/./out.npy"}), {"--lse", "given twice"}, {out_});
  EXPECT_EQ(Slurp(q_), q_before);
  // attend --attn-weights onto a safetensors model (mha's --params input).
  const std::vector<float> w(4, 1.0f);
  const SafetensorsEntry entry{"w", {2, 2}, w};
  WriteSafetensors(P("model.safetensors"), std::span<const SafetensorsEntry>(&entry, 1));
  const std::string model = Slurp(P("model.safetensors"));
  ExpectError(Attend({"--attn-weights", P("model.safetensors")}), {"model.safetensors", ".npy"},
              {out_});
  EXPECT_EQ(Slurp(P("model.safetensors")), model);
  // The other commands: backward, mha, classic, positions.
  ExpectError({"backward", "--q", q_, "--k", k_, "--v", v_, "--dout", q_, "--dq", P("dq.npy"),
               "--dk", P("dk.npy"), "--dv", k_},
              {"--dv", "--k"}, {P("dq.npy"), P("dk.npy")});
  WriteF32(P("x.npy"), {1, 3, 4});
  ExpectError({"mha", "--query", P("x.npy"), "--params", P("model.safetensors"), "--heads", "1",
               "--out", P("x.npy")},
              {"--out", "--query"});
  WriteF32(P("enc.npy"), {3, 4});
  WriteF32(P("s.npy"), {4});
  ExpectError({"classic", "--score", "dot", "--state", P("s.npy"), "--encoder", P("enc.npy"),
               "--out", P("./s.npy")},
              {"--out", "--state"});
  ExpectError({"positions", "--kind", "rope", "--x", q_, "--out", q_}, {"--out", "--x"});
  EXPECT_EQ(Slurp(q_), q_before);
}

// 7. Write failures said "cannot be written (expected a writable file path)"
// whatever the reason; a failed write to stdout exited 0.
TEST_F(HardeningTest, WriteFailuresKeepTheirReason) {
  ExpectError(Attend({"--lse", P("nodir/lse.npy")}), {"nodir/lse.npy", "No such file or directory"},
              {out_});
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"memory", "--preset", "llama3-8b", "--seq", "4096", "--json"},
        {"memory", "--preset", "llama3-8b", "--seq", "4096"},
        {"bench", "--shape", "1,1,16,8", "--repeat", "1", "--json"},
        {"decode", "--prompt-tokens", "4", "--generate", "1", "--heads", "2", "--kv-heads", "1",
         "--head-dim", "8"}}) {
    SCOPED_TRACE(args[0]);
    const Result r = RunQkv(args, dir_, {}, "/dev/full");
    EXPECT_TRUE(r.exited) << Describe(r);
    EXPECT_NE(r.status, 0) << Describe(r);
    EXPECT_NE(r.err.find("standard output"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("No space left on device"), std::string::npos) << r.err;
  }
}

// 8. Flags that do not apply were silently ignored or reinterpreted.
TEST_F(HardeningTest, FlagsThatDoNotApplyAreRefused) {
  const std::vector<std::string> decode = {"bench", "--decode", "--cache-len", "16"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = decode;
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  };
  ExpectError(with({"--kv-heads", "-3"}), {"--kv-heads", "-3"});
  ExpectError(with({"--dtype", "f16"}), {"--dtype", "--decode"});
  ExpectError(with({"--causal"}), {"--causal", "--decode"});
  ExpectError(with({"--seq-kv", "8"}), {"--seq-kv", "--decode"});
  ExpectError(with({"--kernel", "flash"}), {"--kernel", "--decode"});
  ExpectError({"attend", "--shape", "1,1,4,4", "--seed", "-1"}, {"--seed"});
  ExpectError({"backward", "--shape", "1,1,4,4", "--seed", "-1"}, {"--seed"});
}

// 9. Every message names the flag the user typed.
TEST_F(HardeningTest, MessagesNameTheFlagTyped) {
  ExpectError({"attend", "--shape", "1,8,64,64", "--seq-kv", "1000000000000"}, {"--seq-kv"});
  ExpectError({"attend", "--shape", "1,1,1,1", "--seq-kv", "3000000000"}, {"--seq-kv"});
  ExpectError({"positions", "--kind", "sinusoidal", "--seq", "9223372036854775807", "--dim", "0",
               "--out", out_},
              {"--seq", "9223372036854775807"}, {out_}, 5.0);
  WriteNpy(P("huge_q.npy"), DType::kFloat32, std::vector<int64_t>{0, 4294967296, 8}, nullptr);
  const std::vector<float> w(1, 1.0f);
  const SafetensorsEntry entry{"w", {1}, w};
  WriteSafetensors(P("m.safetensors"), std::span<const SafetensorsEntry>(&entry, 1));
  ExpectError({"mha", "--query", P("huge_q.npy"), "--params", P("m.safetensors"), "--heads", "1",
               "--out", out_},
              {"--query", "huge_q.npy"}, {out_}, 5.0);
  ExpectError({"bench", "--decode", "--cache-len", "16", "--repeat", "0"}, {"--repeat"});
  ExpectError({"decode", "--repeat", "0"}, {"--repeat"});
  ExpectError({"decode", "--generate", "0"}, {"--generate"});
  ExpectError({"decode", "--kv-heads", "3"}, {"--kv-heads", "--heads"});
  ExpectError({"mha", "--query", q_, "--params", P("m.safetensors"), "--heads", "1", "--out",
               out_, "--threads", "5000"},
              {"--threads"}, {out_});
  // A query of another embed_dim than the weights: the query is named too
  // (issue 18, item 6), and a prefixed state_dict gets its prefix suggested.
  const std::vector<float> in_proj(3 * 8 * 8, 0.0f), out_proj(8 * 8, 0.0f);
  const SafetensorsEntry layer[] = {{"enc.0.attn.in_proj_weight", {24, 8}, in_proj},
                                    {"enc.0.attn.out_proj.weight", {8, 8}, out_proj}};
  WriteSafetensors(P("layer.safetensors"), layer);
  WriteF32(P("q4.npy"), {1, 3, 4});
  ExpectError({"mha", "--query", P("q4.npy"), "--params", P("layer.safetensors"), "--heads", "1",
               "--prefix", "enc.0.attn.", "--out", out_},
              {"--query", "q4.npy", "embed_dim 4", "(24, 8)"}, {out_});
  WriteF32(P("q8.npy"), {1, 3, 8});
  ExpectError({"mha", "--query", P("q8.npy"), "--params", P("layer.safetensors"), "--heads", "2",
               "--out", out_},
              {"--params", "prefix \"enc.0.attn.\"", "--prefix"}, {out_});
  // A path with a newline: the whole message on one line, the newline escaped.
  const Result r = RunQkv({"attend", "--q", P("a\nb.npy"), "--k", k_, "--v", v_, "--out", out_}, dir_);
  EXPECT_EQ(r.status, 2) << Describe(r);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("a\\nb.npy: cannot open"), std::string::npos) << r.err;
}

// Every input the fuzz targets found (tests/testdata/fuzz/<target>/, see
// docs/security.md), replayed: the readers give an array or one qkv::Error
// line; the command lines exit 0 or 2 with one line, in bounded time.
TEST(HardeningFuzzRegressionTest, FoundInputsStayFixed) {
  const fs::path root = fs::path(QKV_TESTDATA_DIR) / "fuzz";
  if (!fs::exists(root)) GTEST_SKIP() << "no fuzz findings committed";
  for (const auto& target : fs::directory_iterator(root)) {
    const std::string name = target.path().filename().string();
    for (const auto& file : fs::directory_iterator(target.path())) {
      SCOPED_TRACE(file.path().string());
      const std::string bytes = Slurp(file.path().string());
      const std::span<const unsigned char> data(
          reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
      try {
        if (name == "npy") {
          const NpyArray a = ParseNpy(data, "fuzz.npy");
          // As the fuzz target checks (and UBSan watches numel's product);
          // the array never takes more than the file (docs/security.md).
          EXPECT_EQ(static_cast<int64_t>(a.bytes.size()),
                    a.numel() * static_cast<int64_t>(DTypeSize(a.dtype)));
          EXPECT_LE(a.bytes.size(), bytes.size());
        } else if (name == "safetensors") {
          const SafetensorsFile f =
              SafetensorsFile::Parse(std::vector<unsigned char>(data.begin(), data.end()), "f");
          for (const auto& t : f.tensors()) {
            try {
              // The readers' allocation bound (docs/security.md).
              EXPECT_LE(f.LoadFloat32(t.name, t.shape).size() * sizeof(float), 2 * bytes.size());
            } catch (const Error& e) {
              EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
            }
          }
        }
      } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
      }
      if (name.rfind("cli_", 0) != 0) continue;
      // cli_<command>: one argument per line, run in a scratch directory
      // holding the fuzz target's fixtures.
      char pattern[] = "/tmp/qkv_fuzz_replay_XXXXXX";
      ASSERT_NE(mkdtemp(pattern), nullptr);
      fuzz::WriteCliFixtures(pattern);
      std::vector<std::string> args = {name.substr(4)};
      std::string current;
      for (char c : bytes) {
        if (c == '\n') {
          args.push_back(current);
          current.clear();
        } else {
          current += c;
        }
      }
      if (!current.empty()) args.push_back(current);
      const Result r = RunQkv(args, pattern, {"OMP_NUM_THREADS=1"}, "", 30.0, true);
      EXPECT_TRUE(r.exited && (r.status == 0 || r.status == 2)) << Describe(r);
      if (r.status == 2) {
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
      }
      std::error_code ec;
      fs::remove_all(pattern, ec);
    }
  }
}

}  // namespace
}  // namespace qkv
