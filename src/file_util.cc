#include "file_util.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "qkv/error.h"

namespace qkv::internal {

void Fail(const std::string& name, const std::string& problem, const std::string& expected) {
  throw Error(name + ": " + problem + " (expected " + expected + ")");
}

FilePtr OpenRegularFile(const std::string& path, const std::string& kind, uint64_t* size) {
  FilePtr f(std::fopen(path.c_str(), "rb"));
  if (!f) {
    Fail(path, std::string("cannot open: ") + std::strerror(errno),
         "an existing readable " + kind);
  }
  struct stat st;
  if (fstat(fileno(f.get()), &st) != 0) {
    Fail(path, std::string("cannot stat: ") + std::strerror(errno), "a readable " + kind);
  }
  if (S_ISDIR(st.st_mode)) Fail(path, "is a directory", "a " + kind);
  if (!S_ISREG(st.st_mode)) Fail(path, "is not a regular file", "a " + kind);
  *size = static_cast<uint64_t>(st.st_size);
  return f;
}

void ReadAt(std::FILE* f, uint64_t offset, void* out, size_t size, const std::string& path) {
  if (size == 0) return;
  if (fseeko(f, static_cast<off_t>(offset), SEEK_SET) != 0 || std::fread(out, 1, size, f) != size) {
    Fail(path,
         std::string("read failed: ") +
             (std::ferror(f) ? std::strerror(errno) : "file shrank while reading"),
         "a readable file that is not being modified");
  }
}

}  // namespace qkv::internal
