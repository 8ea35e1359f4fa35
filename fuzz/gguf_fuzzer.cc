// libFuzzer target: the GGUF reader on arbitrary bytes, then every typed
// getter on every metadata key and a read of every byte of every tensor, so
// that ASan sees any span that reaches past the input. Every input must parse
// or give one qkv::Error line; never a crash, a sanitizer report or a leak.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "qkv/error.h"
#include "qkv/gguf.h"

namespace {

volatile uint64_t g_sink = 0;

void CheckOneLine(const qkv::Error& e) {
  if (std::strchr(e.what(), '\n') != nullptr) std::abort();
}

// Calls `get` and accepts a qkv::Error (a getter of the wrong type).
template <class Get>
uint64_t Try(Get get) {
  try {
    return get();
  } catch (const qkv::Error& e) {
    CheckOneLine(e);
    return 0;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const qkv::GgufFile file =
        qkv::GgufFile::Parse(std::vector<unsigned char>(data, data + size), "fuzz.gguf");
    uint64_t sum = 0;
    for (const auto& entry : file.metadata()) {
      const std::string& key = entry.first;
      sum += Try([&] { return file.GetString(key).size(); });
      sum += Try([&] { return static_cast<uint64_t>(file.GetInt(key)); });
      sum += Try([&] { return static_cast<uint64_t>(file.GetFloat(key) != 0); });
      sum += Try([&] {
        uint64_t n = 0;
        for (const std::string& s : file.GetStringArray(key)) n += s.size();
        return n;
      });
      sum += Try([&] { return file.GetIntArray(key).size(); });
      sum += Try([&] { return file.GetFloatArray(key).size(); });
      // Decoded arrays never hold more elements than the input has bytes.
      if (entry.second.count > size) std::abort();
    }
    uint64_t claimed = 0;
    for (const auto& t : file.tensors()) {
      for (unsigned char c : t.bytes) sum += c;
      claimed += t.bytes.size();
      if (file.Find(t.name) == nullptr) std::abort();
    }
    // Tensors do not overlap, so together they fit in the input.
    if (claimed > size) std::abort();
    g_sink = sum;  // keeps the reads from being optimized away
  } catch (const qkv::Error& e) {
    CheckOneLine(e);
  }
  return 0;
}
