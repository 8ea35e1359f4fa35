#include "common.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <set>
#include <system_error>

#include "qkv/error.h"
#include "validate.h"

namespace qkv::cli {

std::vector<int64_t> ParseIntList(const std::string& text, size_t count, const char* flag,
                                  bool allow_zero) {
  std::vector<int64_t> values;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, comma - pos);
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (...) {
      used = 0;
    }
    if (item.empty() || used != item.size() || v < (allow_zero ? 0 : 1) || v > (1LL << 40)) {
      throw Error(std::string(flag) + ": '" + text + "' is not a list of " +
                  (count ? std::to_string(count) + " " : std::string()) +
                  (allow_zero ? "integers >= 0" : "integers >= 1") + " separated by commas");
    }
    values.push_back(v);
    pos = comma + 1;
  }
  if (count == 0 && values.size() > 64) {
    throw Error(std::string(flag) + ": " + std::to_string(values.size()) +
                " values (expected at most 64)");
  }
  if (count != 0 && values.size() != count) {
    throw Error(std::string(flag) + ": '" + text + "' has " + std::to_string(values.size()) +
                " values (expected " + std::to_string(count) + ")");
  }
  return values;
}

namespace {

double memory_limit_for_testing = 0.0;

}  // namespace

void SetMemoryLimitForTesting(double bytes) { memory_limit_for_testing = bytes; }

namespace {

// Returns the bytes this process may still map under its address-space
// limit (ulimit -v, RLIMIT_AS): the limit minus the address space in use now
// (/proc/self/statm); infinity without a limit.
double AddressSpaceLeft() {
  struct rlimit limit {};
  if (getrlimit(RLIMIT_AS, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) {
    return std::numeric_limits<double>::infinity();
  }
  double used_pages = 0.0;
  std::ifstream statm("/proc/self/statm");
  statm >> used_pages;
  const double used = used_pages * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  return std::max(0.0, static_cast<double>(limit.rlim_cur) - used);
}

}  // namespace

void CheckFitsInMemory(const std::string& what, double bytes) {
  if (memory_limit_for_testing > 0.0) {
    if (bytes > memory_limit_for_testing) {
      throw Error(what + " would need " + HumanBytes(bytes) + " (expected at most the test limit " +
                  HumanBytes(memory_limit_for_testing) + ")");
    }
    return;
  }
  const double physical =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  if (bytes > 0.75 * physical) {
    throw Error(what + " would need " + HumanBytes(bytes) + " (expected at most 3/4 of this " +
                "machine's " + HumanBytes(physical) + " of memory)");
  }
  // Under ulimit -v the allocation would fail, not the machine: keep 64 MiB
  // for the kernels' scratch, the threads' stacks and the allocator.
  const double left = AddressSpaceLeft();
  if (bytes + 64.0 * 1024 * 1024 > left) {
    throw Error(what + " would need " + HumanBytes(bytes) + " (expected at most the " +
                HumanBytes(std::max(0.0, left - 64.0 * 1024 * 1024)) +
                " left under this process's address-space limit, ulimit -v)");
  }
}

void CheckDimFlag(const char* flag, int64_t value, int64_t min) {
  if (value < min || value > internal::kMaxDim) {
    throw Error(std::string(flag) + ": " + std::to_string(value) + " (expected " +
                std::to_string(min) + " to 2^31 - 1)");
  }
}

void CheckThreadsFlag(int threads, const char* flag) {
  if (threads < 0 || threads > internal::kMaxThreads) {
    throw Error(std::string(flag) + ": " + std::to_string(threads) + " (expected 0 to " +
                std::to_string(internal::kMaxThreads) + "; 0 = all cores)");
  }
}

void CheckThreadEnvironment() { internal::CheckDefaultThreads(); }

namespace {

// Where a path leads: its device and inode when it exists, and its absolute
// path with ".", ".." and symlinks resolved as far as it exists.
struct Identity {
  bool exists = false;
  dev_t dev = 0;
  ino_t ino = 0;
  std::string canonical;
};

Identity Identify(const std::string& path) {
  Identity id;
  struct stat st {};
  if (stat(path.c_str(), &st) == 0) {
    id.exists = true;
    id.dev = st.st_dev;
    id.ino = st.st_ino;
  }
  std::error_code ec;
  const std::filesystem::path absolute = std::filesystem::absolute(path, ec);
  const std::filesystem::path canonical =
      ec ? std::filesystem::path(path) : std::filesystem::weakly_canonical(absolute, ec);
  id.canonical = ec ? absolute.lexically_normal().string() : canonical.string();
  return id;
}

bool SameFile(const Identity& a, const Identity& b) {
  if (a.exists && b.exists) return a.dev == b.dev && a.ino == b.ino;
  return a.canonical == b.canonical;
}

}  // namespace

void CheckOutputPaths(const std::vector<FlagPath>& inputs, const std::vector<FlagPath>& outputs) {
  std::vector<std::pair<const FlagPath*, Identity>> in, out;
  for (const FlagPath& p : inputs) {
    if (!p.path.empty()) in.emplace_back(&p, Identify(p.path));
  }
  for (const FlagPath& p : outputs) {
    if (p.path.empty()) continue;
    const Identity id = Identify(p.path);
    for (const auto& [other, other_id] : out) {
      if (p.path == other->path || SameFile(id, other_id)) {
        throw Error(std::string(p.flag) + ": output path '" + p.path + "' is given twice (also " +
                    other->flag + " '" + other->path +
                    "'; expected a different file for each output)");
      }
    }
    for (const auto& [input, input_id] : in) {
      if (SameFile(id, input_id)) {
        throw Error(std::string(p.flag) + ": " + p.path + " is the same file as " + input->flag +
                    " " + input->path +
                    " (expected an output path that is not an input; it would be overwritten)");
      }
    }
    out.emplace_back(&p, id);
  }
}

std::string Printable(const std::string& text) {
  std::string out;
  for (const char c : text) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (u < 0x20 || u == 0x7f) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02x", u);
      out += hex;
    } else {
      out += c;
    }
  }
  return out;
}

DType CacheDType(const std::string& name) {
  if (name == "f16") return DType::kFloat16;
  if (name == "bf16") return DType::kBFloat16;
  if (name == "i8") return DType::kInt8;
  return DType::kFloat32;
}

double Median(std::vector<double> times) {
  std::sort(times.begin(), times.end());
  const size_t n = times.size();
  return n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
}

int64_t PeakRssBytes() {
  // VmHWM, not getrusage's ru_maxrss: the latter survives execve, so a qkv
  // started from a large process (a Python benchmark) would report its
  // parent's peak.
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    long long kib = -1;
    while (std::fgets(line, sizeof line, f)) {
      if (std::sscanf(line, "VmHWM: %lld kB", &kib) == 1) break;
    }
    std::fclose(f);
    if (kib >= 0) return kib * 1024;
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

std::string HumanBytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 5) {
    bytes /= 1024.0;
    ++u;
  }
  char text[64];
  std::snprintf(text, sizeof text, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return text;
}

namespace {

// The temporaries being written, for the signal handler: pointers into
// strings Commit keeps alive (and does not move) until it clears the count.
constexpr int kSignals[] = {SIGINT, SIGTERM, SIGHUP};
const char* volatile g_temp_paths[64];
volatile sig_atomic_t g_temp_count = 0;

// Removes the temporaries, then dies of the signal as if unhandled (the
// shell sees "killed by SIGTERM", not an exit status). unlink, signal and
// raise are async-signal-safe.
void RemoveTempsAndDie(int sig) {
  for (sig_atomic_t i = 0; i < g_temp_count; ++i) unlink(g_temp_paths[i]);
  signal(sig, SIG_DFL);
  raise(sig);
}

// Installs RemoveTempsAndDie for kSignals while alive; restores the
// previous handlers after.
class TempCleanupOnSignal {
 public:
  TempCleanupOnSignal() {
    struct sigaction sa {};
    sa.sa_handler = RemoveTempsAndDie;
    sigemptyset(&sa.sa_mask);
    for (int sig : kSignals) sigaddset(&sa.sa_mask, sig);
    for (size_t i = 0; i < std::size(kSignals); ++i) sigaction(kSignals[i], &sa, &old_[i]);
  }
  ~TempCleanupOnSignal() {
    g_temp_count = 0;
    for (size_t i = 0; i < std::size(kSignals); ++i) sigaction(kSignals[i], &old_[i], nullptr);
  }
  TempCleanupOnSignal(const TempCleanupOnSignal&) = delete;
  TempCleanupOnSignal& operator=(const TempCleanupOnSignal&) = delete;

 private:
  struct sigaction old_[std::size(kSignals)];
};

// Holds kSignals back while alive (they are delivered when it ends).
class BlockSignals {
 public:
  BlockSignals() {
    sigset_t set;
    sigemptyset(&set);
    for (int sig : kSignals) sigaddset(&set, sig);
    pthread_sigmask(SIG_BLOCK, &set, &old_);
  }
  ~BlockSignals() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
  BlockSignals(const BlockSignals&) = delete;
  BlockSignals& operator=(const BlockSignals&) = delete;

 private:
  sigset_t old_;
};

}  // namespace

namespace {

// Writes `text` to `path` (created or truncated); throws qkv::Error
// "<path>: <reason>" as WriteNpy does, flushing and closing checked.
void WriteTextFile(const std::string& path, const std::string& text) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    throw Error(path + ": cannot create: " + std::strerror(errno) + " (expected a writable path)");
  }
  const bool written = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  const int write_error = errno;
  const bool closed = std::fclose(f) == 0;
  if (!written || !closed) {
    throw Error(path + ": cannot write: " + std::strerror(written ? errno : write_error) +
                " (expected free space and a writable path)");
  }
}

}  // namespace

void OutputSet::Add(std::string path, DType dtype, std::vector<int64_t> shape,
                    const void* data) {
  for (const Entry& e : entries_) {
    if (e.path == path) throw Error("output path '" + path + "' is given twice");
  }
  entries_.push_back({std::move(path), dtype, std::move(shape), data, false, {}, {}});
}

void OutputSet::AddText(std::string path, std::string text, std::string replaceable_prefix) {
  Add(std::move(path), DType::kBool, {}, nullptr);
  entries_.back().is_text = true;
  entries_.back().text = std::move(text);
  entries_.back().replaceable_prefix = std::move(replaceable_prefix);
}

void OutputSet::Commit() {
  // Refuse targets a rename cannot or must not replace (a directory; a FIFO
  // or device, which rename would unlink) before writing anything.
  for (const Entry& e : entries_) {
    struct stat st {};
    if (lstat(e.path.c_str(), &st) != 0 || S_ISLNK(st.st_mode)) continue;
    if (S_ISREG(st.st_mode)) {
      // Outputs are .npy files: replacing an existing file of another kind
      // (a model.safetensors given to attend's --attn-weights, meant for mha's --params)
      // is refused. An empty file may be replaced.
      const std::string magic = e.is_text ? e.replaceable_prefix : std::string("\x93NUMPY");
      std::string head(magic.size(), '\0');
      std::FILE* f = st.st_size > 0 ? std::fopen(e.path.c_str(), "rb") : nullptr;
      const bool ours = f == nullptr || (std::fread(head.data(), 1, head.size(), f) == head.size() &&
                                         head == magic);
      if (f != nullptr) std::fclose(f);
      if (!ours) {
        const std::string kind = e.is_text ? "an earlier output of this kind" : "a .npy file";
        throw Error(e.path + ": exists and is not " + kind + " (expected a new path, or " + kind +
                    " to replace; outputs never overwrite other files)");
      }
      continue;
    }
    if (S_ISDIR(st.st_mode)) {
      throw Error(e.path + ": is a directory (expected a file path for the output)");
    }
    throw Error(e.path + ": exists and is not a regular file (expected a regular file path " +
                "for the output; a FIFO or device would be replaced)");
  }
  if (entries_.size() > std::size(g_temp_paths)) {
    throw Error("outputs: " + std::to_string(entries_.size()) + " given (expected at most " +
                std::to_string(std::size(g_temp_paths)) + ")");
  }
  std::vector<std::string> temps;
  temps.reserve(entries_.size());  // no reallocation: the handler holds c_str()s
  auto remove_temps = [&temps] {
    g_temp_count = 0;
    for (const std::string& t : temps) std::remove(t.c_str());
  };
  const TempCleanupOnSignal cleanup;
  try {
    for (const Entry& e : entries_) {
      temps.push_back(e.path + ".qkv-tmp-" + std::to_string(getpid()));
      g_temp_paths[temps.size() - 1] = temps.back().c_str();
      g_temp_count = static_cast<sig_atomic_t>(temps.size());
      try {
        if (e.is_text) {
          WriteTextFile(temps.back(), e.text);
        } else {
          WriteNpy(temps.back(), e.dtype, e.shape, e.data);
        }
      } catch (const Error& error) {
        // WriteNpy names the temporary; name the output path instead and keep
        // its reason ("cannot create: Read-only file system (...)").
        std::string what = error.what();
        const std::string prefix = temps.back() + ": ";
        if (what.compare(0, prefix.size(), prefix) == 0) what = what.substr(prefix.size());
        throw Error(e.path + ": cannot be written: " + what);
      }
    }
    // All renamed or none: a signal now waits until the loop is done.
    const BlockSignals hold;
    for (size_t i = 0; i < entries_.size(); ++i) {
      if (std::rename(temps[i].c_str(), entries_[i].path.c_str()) != 0) {
        const int error = errno;
        for (size_t done = 0; done < i; ++done) std::remove(entries_[done].path.c_str());
        throw Error(entries_[i].path + ": cannot write output: " + std::strerror(error) +
                    " (expected a writable path)");
      }
    }
    g_temp_count = 0;
    temps.clear();
  } catch (...) {
    remove_temps();
    throw;
  }
}

void CheckAttnDirFlag(const std::string& dir) {
  struct stat st {};
  if (!dir.empty() && stat(dir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) {
    throw Error("--attn-weights: " + Printable(dir) + " exists and is not a directory " +
                "(expected a folder for layer{L}.npy and tokens.json)");
  }
}

void CommitWithAttnDir(OutputSet& out, const std::string& dir) {
  bool made_dir = false;
  if (!dir.empty()) {
    if (mkdir(dir.c_str(), 0777) == 0) {
      made_dir = true;
    } else if (errno != EEXIST) {
      throw Error("--attn-weights: " + Printable(dir) + ": cannot create: " + std::strerror(errno) +
                  " (expected a writable folder path)");
    }
  }
  try {
    out.Commit();
  } catch (...) {
    if (made_dir) rmdir(dir.c_str());
    throw;
  }
}

// The lines of --input (a final newline ends the last line; a "\r" before
// "\n" is dropped, so CRLF files read as their lines).
std::vector<std::string> ReadInputLines(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    throw Error("--input: " + path + " is not a readable regular file (expected a text file, " +
                "one input per line)");
  }
  CheckFitsInMemory("--input " + path, 3.0 * static_cast<double>(st.st_size));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("--input: " + path + ": cannot open (expected a readable text file)");
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
  }
  if (in.bad()) throw Error("--input: " + path + ": read error (expected a readable text file)");
  return lines;
}

namespace {
double MonotonicSeconds() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}
}  // namespace

bool StderrIsTerminal() { return isatty(STDERR_FILENO) != 0; }

Progress::Progress(std::string what, std::string unit, int64_t total)
    : what_(std::move(what)), unit_(std::move(unit)), total_(total),
      enabled_(StderrIsTerminal()), last_(MonotonicSeconds()) {}

void Progress::Done(int64_t done) {
  if (!enabled_ || done >= total_) return;
  const double now = MonotonicSeconds();
  if (now - last_ < 2.0) return;
  std::fprintf(stderr, "%s: %lld/%lld %s\n", what_.c_str(), static_cast<long long>(done),
               static_cast<long long>(total_), unit_.c_str());
  last_ = now;
}

}  // namespace qkv::cli
