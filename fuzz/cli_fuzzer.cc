// libFuzzer target: `qkv <command> ...` argument parsing and the whole run, in
// process, for the command named by QKV_FUZZ_COMMAND (attend, mha or decode).
//
// The input is the argument list, one argument per line. The run happens in a
// private temporary directory holding small valid fixtures (q.npy, k.npy,
// v.npy, mask.npy, x.npy, w.safetensors, ...), so that arguments reach past
// the readers; arguments containing '/' are skipped, so nothing is ever read
// or written outside that directory, and every file a run leaves is removed
// (and the fixtures rewritten) before the next.
//
// Contract checked: exit status 0 or 2 (1 is an out-of-memory or internal
// error: a finding), and status 2 comes with exactly one line on the error
// stream. Memory is held to 64 MiB by the commands' own checks
// (SetMemoryLimitForTesting), numbers between 65 and 2^30 are skipped (so the
// work of one run stays small while huge values still reach every check), and
// OpenMP runs one thread.
#include <dirent.h>
#include <omp.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "commands.h"
#include "common.h"
#include "cli_fixtures.h"

#ifndef QKV_FUZZ_COMMAND
#error "define QKV_FUZZ_COMMAND (attend, mha or decode)"
#endif

namespace {

std::string dir;
std::set<std::string> fixtures;

void WriteFixtures() { fixtures = qkv::fuzz::WriteCliFixtures(dir); }

// Removes every file a run left in the directory (outputs, temporaries).
void Clean() {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) std::abort();
  std::vector<std::string> extra;
  while (const dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != ".." && fixtures.count(name) == 0) extra.push_back(name);
  }
  closedir(d);
  for (const std::string& name : extra) {
    const std::string path = dir + "/" + name;
    if (std::remove(path.c_str()) != 0) rmdir(path.c_str());
  }
}

// Returns false when some maximal run of digits in `arg` is a number in
// [65, 2^30): large enough to cost time, too small to be refused.
bool NumbersAllowed(const std::string& arg) {
  for (size_t i = 0; i < arg.size();) {
    if (arg[i] < '0' || arg[i] > '9') {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < arg.size() && arg[j] >= '0' && arg[j] <= '9') ++j;
    const std::string digits = arg.substr(i, j - i);
    if (digits.size() < 12) {
      const long long v = std::stoll(digits);
      if (v > 64 && v < (1LL << 30)) return false;
    }
    i = j;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  char pattern[] = "/tmp/qkv_cli_fuzz_XXXXXX";
  if (mkdtemp(pattern) == nullptr) std::abort();
  dir = pattern;
  if (chdir(dir.c_str()) != 0) std::abort();
  WriteFixtures();
  std::atexit([] {
    fixtures.clear();
    Clean();
    rmdir(dir.c_str());
  });
  omp_set_num_threads(1);
  qkv::cli::SetMemoryLimitForTesting(64.0 * 1024 * 1024);
  if (std::freopen("/dev/null", "w", stdout) == nullptr) std::abort();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> args = {"qkv", QKV_FUZZ_COMMAND};
  std::string current;
  for (size_t i = 0; i <= size; ++i) {
    if (i == size || data[i] == '\n') {
      if (!current.empty() || i < size) args.push_back(current);
      current.clear();
      if (args.size() > 40) return 0;
    } else {
      current += static_cast<char>(data[i]);
    }
  }
  for (const std::string& a : args) {
    if (a.find('/') != std::string::npos || a.find('\0') != std::string::npos || a.size() > 200 ||
        !NumbersAllowed(a)) {
      return -1;  // not added to the corpus
    }
  }
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  char* err_text = nullptr;
  size_t err_size = 0;
  std::FILE* err = open_memstream(&err_text, &err_size);
  if (err == nullptr) std::abort();
  const int status = qkv::cli::RunCommandLine(
      static_cast<int>(args.size()), argv.data(), err, [](CLI::App& app) {
        // Small defaults, so that a run without these flags is quick too.
        // (run_callback_for_default: default_val then sets the variable.)
        if (CLI::App* decode = app.get_subcommand("decode")) {
          const std::pair<const char*, int> defaults[] = {
              {"--prompt-tokens", 8}, {"--generate", 3}, {"--heads", 4},     {"--kv-heads", 2},
              {"--head-dim", 16}, {"--cache-window", 6}, {"--block-size", 4}};
          for (const auto& [name, value] : defaults) {
            decode->get_option(name)->run_callback_for_default()->default_val(value);
          }
        }
      });
  std::fclose(err);
  const std::string message(err_text, err_size);
  std::free(err_text);
  std::fflush(stdout);
  std::clearerr(stdout);
  Clean();
  WriteFixtures();
  size_t lines = 0;
  for (char c : message) lines += c == '\n';
  const bool one_line = lines == 1 && message.back() == '\n';
  if (status == 0 || (status == 2 && one_line)) return 0;
  std::fprintf(stderr, "qkv %s: status %d, error stream:\n%s\n", QKV_FUZZ_COMMAND, status,
               message.c_str());
  std::abort();
}
