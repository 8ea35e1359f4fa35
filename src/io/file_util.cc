#include "file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "qkv/error.h"

namespace qkv::internal {

std::string Quote(std::string_view text, size_t max_shown) {
  std::string out = "'";
  for (size_t i = 0; i < text.size() && i < max_shown; ++i) {
    const char c = text[i];
    out += (c >= 0x20 && c < 0x7f) ? c : '?';
  }
  out += text.size() > max_shown ? "...'" : "'";
  return out;
}

void Fail(const std::string& name, const std::string& problem, const std::string& expected) {
  throw Error(name + ": " + problem + " (expected " + expected + ")");
}

FilePtr OpenRegularFile(const std::string& path, const std::string& kind, uint64_t* size) {
  // O_NONBLOCK: opening a FIFO for reading blocks until a writer appears, so
  // the type is checked on a descriptor opened without waiting, before any
  // read; for a regular file the flag changes nothing and is cleared anyway.
  const int fd = open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) {
    Fail(path, std::string("cannot open: ") + std::strerror(errno),
         "an existing readable " + kind);
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int error = errno;
    close(fd);
    Fail(path, std::string("cannot stat: ") + std::strerror(error), "a readable " + kind);
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    if (S_ISDIR(st.st_mode)) Fail(path, "is a directory", "a " + kind);
    Fail(path,
         std::string("is not a regular file (") +
             (S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)
                                                    ? "a device"
                                                    : "a socket or special file") +
             ")",
         "a " + kind);
  }
  const int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    const int error = errno;
    close(fd);
    Fail(path, std::string("cannot open: ") + std::strerror(error),
         "an existing readable " + kind);
  }
  FilePtr f(fdopen(fd, "rb"));
  if (!f) {
    const int error = errno;
    close(fd);
    Fail(path, std::string("cannot open: ") + std::strerror(error),
         "an existing readable " + kind);
  }
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

std::string ReadSmallFile(const std::string& path, const std::string& kind, uint64_t max_bytes) {
  uint64_t size = 0;
  const FilePtr f = OpenRegularFile(path, kind, &size);
  if (size > max_bytes) {
    Fail(path, "is " + std::to_string(size) + " bytes",
         "a " + kind + " of at most " + std::to_string(max_bytes) + " bytes");
  }
  std::string text(static_cast<size_t>(size), '\0');
  if (size > 0) ReadAt(f.get(), 0, text.data(), text.size(), path);
  return text;
}

}  // namespace qkv::internal
