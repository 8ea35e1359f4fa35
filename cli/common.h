// Shared helpers of the qkv command-line tool.
#ifndef QKV_CLI_COMMON_H_
#define QKV_CLI_COMMON_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <thread>
#include <string>
#include <vector>

#include "qkv/npy.h"
#include "qkv/tensor.h"

namespace qkv::cli {

// Parses "a,b,c,d" into exactly `count` integers >= 1 (or >= 0 with
// allow_zero; count 0: any number from 1 to 64); throws qkv::Error naming `flag`.
std::vector<int64_t> ParseIntList(const std::string& text, size_t count, const char* flag,
                                  bool allow_zero);

// Throws qkv::Error unless `bytes` (what `what` would allocate) fits in 3/4 of
// this machine's physical memory (or the limit set below): no request may
// allocate without bound.
void CheckFitsInMemory(const std::string& what, double bytes);

// Lowers the limit CheckFitsInMemory holds requests to (bytes; 0 restores
// 3/4 of physical memory). For the fuzz targets, which must stay small.
void SetMemoryLimitForTesting(double bytes);

// Throws qkv::Error naming `flag` unless min <= value <= 2^31 - 1 (every
// tensor dim fits int32, as in the library).
void CheckDimFlag(const char* flag, int64_t value, int64_t min);

// Throws qkv::Error naming `flag` unless 0 <= threads <= 1024 (0 = all cores).
void CheckThreadsFlag(int threads, const char* flag = "--threads");

// Throws qkv::Error naming OMP_NUM_THREADS when OpenMP's default thread count
// exceeds the 1024 that --threads allows (every command checks it first).
void CheckThreadEnvironment();

// A path given by a flag, for the same-file checks below.
struct FlagPath {
  const char* flag;
  std::string path;
};

// Throws qkv::Error naming both flags when an output is the same file as an
// input (same device and inode, so links and spellings like ./o.npy are
// caught) or two outputs are the same path (compared after resolving "."
// "..", symlinks and, for existing files, device and inode). Empty paths are
// skipped. Commands call it before reading anything.
void CheckOutputPaths(const std::vector<FlagPath>& inputs, const std::vector<FlagPath>& outputs);

// Returns `text` with control characters (a newline in a path) written as
// \n, \t or \xNN, so that an error message stays one line.
std::string Printable(const std::string& text);

// The KV-cache storage dtype named by --cache-dtype (f32, f16, bf16, i8; the
// flag's IsMember check has refused anything else).
DType CacheDType(const std::string& name);

// Returns the median of `times` (the mean of the middle two for an even
// count); `times` must not be empty.
double Median(std::vector<double> times);

// Returns this process's peak resident set size in bytes.
int64_t PeakRssBytes();

// Returns "12.3 MiB"-style text.
std::string HumanBytes(double bytes);

// A set of output arrays written all-or-nothing: Commit() writes each to a
// temporary file beside its target, then renames them all into place; on
// any failure every temporary is removed and qkv::Error is thrown, so no
// half-written output is ever left behind. Errors keep the system's reason
// (no such directory, read-only file system, no space left on device).
// SIGINT, SIGTERM and SIGHUP while the temporaries are written remove them
// before the signal ends the process; during the renames those signals wait
// until every output is in place. Either way no partial or temporary file
// is left behind.
class OutputSet {
 public:
  void Add(std::string path, DType dtype, std::vector<int64_t> shape, const void* data);
  // A text output (tokens.json): it may replace an existing file only when
  // that file is empty or starts with `replaceable_prefix`.
  void AddText(std::string path, std::string text, std::string replaceable_prefix);
  void Commit();

 private:
  struct Entry {
    std::string path;
    DType dtype;
    std::vector<int64_t> shape;
    const void* data;
    bool is_text = false;
    std::string text, replaceable_prefix;
  };
  std::vector<Entry> entries_;
};

// Progress of a long run on stderr, only when stderr is a terminal (so
// logs and tests never see it): "qkv bench: 3/10 runs" at most every 2 s.
// True when stderr is a terminal (progress lines are for people, not logs).
bool StderrIsTerminal();

class Progress {
 public:
  Progress(std::string what, std::string unit, int64_t total);
  void Done(int64_t done);  // call after each unit

 private:
  std::string what_, unit_;
  int64_t total_;
  bool enabled_;
  double last_;
};

// Runs `work` and returns its result; when stderr is a terminal, `work`
// runs on a worker thread while this one prints "qkv attend: running, 4 s"
// every 2 s (one attention call has no finer progress to report). Results
// and exceptions are those of `work`, whichever thread ran it.
template <class F>
auto WithElapsedProgress(const std::string& what, F&& work) -> decltype(work()) {
  if (!StderrIsTerminal()) return work();
  std::optional<decltype(work())> result;
  std::exception_ptr error;
  std::atomic<bool> done{false};
  std::thread worker([&] {
    try {
      result.emplace(work());
    } catch (...) {
      error = std::current_exception();
    }
    done.store(true, std::memory_order_release);
  });
  const auto start = std::chrono::steady_clock::now();
  auto last = start;
  while (!done.load(std::memory_order_acquire)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const auto now = std::chrono::steady_clock::now();
    if (now - last >= std::chrono::seconds(2)) {
      std::fprintf(stderr, "%s: running, %.0f s\n", what.c_str(),
                   std::chrono::duration<double>(now - start).count());
      last = now;
    }
  }
  worker.join();
  if (error) std::rethrow_exception(error);
  return std::move(*result);
}

// The lines of --input PATH, one input per line (a final newline ends the
// last line; a "\r" before "\n" is dropped, so CRLF files read as their lines).
std::vector<std::string> ReadInputLines(const std::string& path);

// `--attn-weights DIR` (qkv embed, qkv logits: layer{L}.npy and tokens.json,
// docs/inspect.md). Throws qkv::Error when DIR exists and is not a folder.
void CheckAttnDirFlag(const std::string& dir);
// Creates DIR when missing, then commits `out` (which holds DIR's files); if
// the commit fails, a DIR it created is removed again.
void CommitWithAttnDir(OutputSet& out, const std::string& dir);

}  // namespace qkv::cli

#endif  // QKV_CLI_COMMON_H_
