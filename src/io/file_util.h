// Internal: reading untrusted input files (.npy, .safetensors) with one-line
// qkv::Error messages "<path>: <problem> (expected <what>)".
#ifndef QKV_SRC_FILE_UTIL_H_
#define QKV_SRC_FILE_UTIL_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>

namespace qkv::internal {

// Returns file text quoted for a one-line message: non-printable bytes become
// '?' and text past `max_shown` bytes is cut ("..."), so a binary or hostile
// header cannot add lines to an error.
std::string Quote(std::string_view text, size_t max_shown);

// Throws qkv::Error "<name>: <problem> (expected <expected>)".
[[noreturn]] void Fail(const std::string& name, const std::string& problem,
                       const std::string& expected);

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

// Opens `path` for reading and returns it with its size in *size. Throws
// unless it is an existing, readable regular file (pipes and devices have no
// size to check a header against); `kind` names it, e.g. ".npy file".
FilePtr OpenRegularFile(const std::string& path, const std::string& kind, uint64_t* size);

// Returns the whole of a regular file of at most `max_bytes` (a JSON
// configuration, a tokenizer), or throws naming the path: a FIFO, a device
// or a larger file is refused before anything is allocated.
std::string ReadSmallFile(const std::string& path, const std::string& kind, uint64_t max_bytes);

// Reads exactly `size` bytes at `offset` or throws naming the path.
void ReadAt(std::FILE* f, uint64_t offset, void* out, size_t size, const std::string& path);

}  // namespace qkv::internal

#endif  // QKV_SRC_FILE_UTIL_H_
