// Fault injection (issue 12): the CLI under a signal in the middle of
// writing its outputs, a read-only output directory, a file-size limit (a
// full disk) and an address-space limit (ulimit -v). Each must end with no
// partial or temporary file, and (but for the signal, which kills) one line
// on stderr naming the file or flag and exit status 2, never a crash or an
// out-of-memory kill.
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "cli_test_util.h"

namespace qkv {
namespace {

namespace fs = std::filesystem;
using test::CliResult;
using test::Describe;
using test::RunCli;
using test::RunProgram;

// Returns the names in `dir` (the runner's .stdout/.stderr excluded).
std::vector<std::string> Listing(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name != ".stdout" && name != ".stderr") names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

bool HasTemporary(const std::string& dir) {
  for (const std::string& name : Listing(dir)) {
    if (name.find(".qkv-tmp-") != std::string::npos) return true;
  }
  return false;
}

class FaultInjectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/qkv_fault_XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
    out_dir_ = dir_ + "/out";
    fs::create_directory(out_dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(out_dir_, fs::perms::owner_all, ec);
    fs::remove_all(dir_, ec);
  }

  // An attend run whose outputs take a while to write: 1 MiB of out and
  // 16 MiB of weights (the reference kernel), so a signal can land mid-write.
  std::vector<std::string> SlowWrite() const {
    return {"attend", "--shape", "1,4,1024,64", "--kernel", "reference", "--threads", "1",
            "--out", out_dir_ + "/o.npy", "--attn-weights", out_dir_ + "/w.npy"};
  }

  void ExpectOneLineError(const CliResult& r, const std::vector<std::string>& words) {
    EXPECT_TRUE(r.exited) << Describe(r);
    EXPECT_EQ(r.status, 2) << Describe(r);
    ASSERT_FALSE(r.err.empty());
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << r.err;  // one line
    for (const std::string& w : words) EXPECT_NE(r.err.find(w), std::string::npos) << r.err;
  }

  std::string dir_, out_dir_;
};

// SIGTERM and SIGINT once a temporary output exists: the process dies of
// the signal and removes its temporaries first; no output appears.
TEST_F(FaultInjectionTest, SignalMidWriteLeavesNoFile) {
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) {
    SCOPED_TRACE(strsignal(sig));
    bool sent = false;
    std::vector<std::string> command = {QKV_CLI_PATH};
    const std::vector<std::string> args = SlowWrite();
    command.insert(command.end(), args.begin(), args.end());
    const CliResult r = RunProgram(command, dir_, 120.0, [&](pid_t pid) {
      if (!sent && HasTemporary(out_dir_)) {
        kill(pid, sig);
        sent = true;
      }
    });
    ASSERT_TRUE(sent) << "no temporary file was seen: " << Describe(r);
    EXPECT_FALSE(r.exited) << Describe(r);
    EXPECT_EQ(r.signal, sig) << Describe(r);
    EXPECT_TRUE(Listing(out_dir_).empty())
        << "left behind: " << ::testing::PrintToString(Listing(out_dir_));
  }
}

// Without a signal the same run leaves exactly its two outputs (the test
// above is not passing because nothing is ever written).
TEST_F(FaultInjectionTest, UninterruptedWriteLeavesBothOutputs) {
  const CliResult r = RunCli(SlowWrite(), dir_, 120.0);
  EXPECT_TRUE(r.exited && r.status == 0) << Describe(r);
  EXPECT_EQ(Listing(out_dir_), (std::vector<std::string>{"o.npy", "w.npy"}));
}

// A read-only output directory. Root ignores directory permissions, so as
// root qkv runs as user nobody (setpriv, util-linux) from a copy that user
// can execute.
TEST_F(FaultInjectionTest, ReadOnlyDirectoryIsOneLineError) {
  fs::permissions(out_dir_, fs::perms::owner_read | fs::perms::owner_exec | fs::perms::group_read |
                                fs::perms::group_exec | fs::perms::others_read |
                                fs::perms::others_exec);
  std::vector<std::string> command;
  if (geteuid() == 0) {
    if (!fs::exists("/usr/bin/setpriv")) GTEST_SKIP() << "root without /usr/bin/setpriv";
    const std::string bin = dir_ + "/qkv";
    fs::copy_file(QKV_CLI_PATH, bin);
    fs::permissions(dir_, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                              fs::perms::others_read | fs::perms::others_exec);
    command = {"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin};
  } else {
    command = {QKV_CLI_PATH};
  }
  for (const char* a : {"attend", "--shape", "1,1,8,8", "--out"}) command.push_back(a);
  command.push_back(out_dir_ + "/o.npy");
  const CliResult r = RunProgram(command, dir_);
  ExpectOneLineError(r, {out_dir_ + "/o.npy", "Permission denied"});
  EXPECT_TRUE(Listing(out_dir_).empty());
}

// A full disk, as a file-size limit the child inherits (RLIMIT_FSIZE, with
// SIGXFSZ ignored so that write() fails with EFBIG instead of killing).
TEST_F(FaultInjectionTest, FileSizeLimitIsOneLineErrorAndLeavesNoFile) {
  struct rlimit old_limit {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  struct rlimit limit = old_limit;
  limit.rlim_cur = 2 << 20;  // 2 MiB: out (1 MiB) fits, the 16 MiB of weights do not
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
  const auto old_handler = signal(SIGXFSZ, SIG_IGN);
  const CliResult r = RunCli(SlowWrite(), dir_, 120.0);
  signal(SIGXFSZ, old_handler);
  setrlimit(RLIMIT_FSIZE, &old_limit);
  ExpectOneLineError(r, {"w.npy", "File too large"});
  EXPECT_TRUE(Listing(out_dir_).empty())
      << "left behind: " << ::testing::PrintToString(Listing(out_dir_));
}

// ulimit -v: the outputs' 520 MiB do not fit in a 400 MB address space. The
// command must say so before allocating (naming the flags), not die.
TEST_F(FaultInjectionTest, AddressSpaceLimitIsOneLineError) {
  if (test::kUnderAddressSanitizer) {
    GTEST_SKIP() << "AddressSanitizer reserves terabytes of address space: no ulimit -v applies";
  }
  struct rlimit old_limit {};
  ASSERT_EQ(getrlimit(RLIMIT_AS, &old_limit), 0);
  struct rlimit limit = old_limit;
  limit.rlim_cur = 400ull << 20;
  if (old_limit.rlim_max != RLIM_INFINITY && old_limit.rlim_max < limit.rlim_cur) {
    GTEST_SKIP() << "hard address-space limit below 400 MiB already";
  }
  ASSERT_EQ(setrlimit(RLIMIT_AS, &limit), 0);
  const CliResult r = RunCli({"attend", "--shape", "1,8,4096,64", "--kernel", "reference", "--out",
                              out_dir_ + "/o.npy", "--attn-weights", out_dir_ + "/w.npy"},
                             dir_, 120.0);
  setrlimit(RLIMIT_AS, &old_limit);
  ExpectOneLineError(r, {"--attn-weights", "ulimit -v"});
  EXPECT_TRUE(Listing(out_dir_).empty());
}

}  // namespace
}  // namespace qkv
