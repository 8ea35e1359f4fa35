// Shared helpers of the qkv command-line tool.
#ifndef QKV_CLI_COMMON_H_
#define QKV_CLI_COMMON_H_

#include <cstdint>
#include <string>
#include <vector>

#include "qkv/npy.h"
#include "qkv/tensor.h"

namespace qkv::cli {

// Parses "a,b,c,d" into exactly `count` integers >= 1 (or >= 0 with
// allow_zero); throws qkv::Error naming `flag`.
std::vector<int64_t> ParseIntList(const std::string& text, size_t count, const char* flag,
                                  bool allow_zero);

// Throws qkv::Error unless `bytes` (what `what` would allocate) fits in 3/4 of
// this machine's physical memory: no request may allocate without bound.
void CheckFitsInMemory(const std::string& what, double bytes);

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
// half-written output is ever left behind.
class OutputSet {
 public:
  void Add(std::string path, DType dtype, std::vector<int64_t> shape, const void* data);
  void Commit();

 private:
  struct Entry {
    std::string path;
    DType dtype;
    std::vector<int64_t> shape;
    const void* data;
  };
  std::vector<Entry> entries_;
};

}  // namespace qkv::cli

#endif  // QKV_CLI_COMMON_H_
