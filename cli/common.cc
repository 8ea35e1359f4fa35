#include "common.h"

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <set>

#include "qkv/error.h"

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
                  std::to_string(count) + (allow_zero ? " integers >= 0" : " integers >= 1") +
                  " separated by commas");
    }
    values.push_back(v);
    pos = comma + 1;
  }
  if (values.size() != count) {
    throw Error(std::string(flag) + ": '" + text + "' has " + std::to_string(values.size()) +
                " values (expected " + std::to_string(count) + ")");
  }
  return values;
}

void CheckFitsInMemory(const std::string& what, double bytes) {
  const double physical =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  if (bytes > 0.75 * physical) {
    throw Error(what + " would need " + HumanBytes(bytes) + " (expected at most 3/4 of this " +
                "machine's " + HumanBytes(physical) + " of memory)");
  }
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

void OutputSet::Add(std::string path, DType dtype, std::vector<int64_t> shape,
                    const void* data) {
  for (const Entry& e : entries_) {
    if (e.path == path) throw Error("output path '" + path + "' is given twice");
  }
  entries_.push_back({std::move(path), dtype, std::move(shape), data});
}

void OutputSet::Commit() {
  std::vector<std::string> temps;
  auto remove_temps = [&temps] {
    for (const std::string& t : temps) std::remove(t.c_str());
  };
  try {
    for (const Entry& e : entries_) {
      temps.push_back(e.path + ".qkv-tmp-" + std::to_string(getpid()));
      try {
        WriteNpy(temps.back(), e.dtype, e.shape, e.data);
      } catch (const Error&) {
        throw Error(e.path + ": cannot be written (expected a writable file path)");
      }
    }
    // Every temporary is written; refuse targets a rename cannot replace
    // (directories) before renaming any, so the set lands whole or not at all.
    for (const Entry& e : entries_) {
      struct stat st {};
      if (stat(e.path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
        throw Error(e.path + ": is a directory (expected a file path for the output)");
      }
    }
    for (size_t i = 0; i < entries_.size(); ++i) {
      if (std::rename(temps[i].c_str(), entries_[i].path.c_str()) != 0) {
        for (size_t done = 0; done < i; ++done) std::remove(entries_[done].path.c_str());
        throw Error(entries_[i].path + ": cannot write output (expected a writable path)");
      }
    }
    temps.clear();
  } catch (...) {
    remove_temps();
    throw;
  }
}

}  // namespace qkv::cli
