// libFuzzer target: the safetensors reader on arbitrary bytes, then every
// tensor it accepts read back as float32. Every input must parse or give one
// qkv::Error line; never a crash, a sanitizer report or a leak; and no
// tensor read back may take more than twice the input's size (the readers'
// allocation bound, docs/security.md: float32 from 2-byte dtypes).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "qkv/error.h"
#include "qkv/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const qkv::SafetensorsFile file =
        qkv::SafetensorsFile::Parse(std::vector<unsigned char>(data, data + size), "fuzz.st");
    for (const auto& t : file.tensors()) {
      try {
        const std::vector<float> values = file.LoadFloat32(t.name, t.shape);
        if (values.size() * sizeof(float) > 2 * size) std::abort();
      } catch (const qkv::Error& e) {
        if (std::strchr(e.what(), '\n') != nullptr) std::abort();
      }
    }
  } catch (const qkv::Error& e) {
    if (std::strchr(e.what(), '\n') != nullptr) std::abort();
  }
  return 0;
}
