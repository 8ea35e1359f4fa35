// qkv/version.h: what this build of qkv is (`qkv --version`,
// `qkv._qkv.build_info()`).
#ifndef QKV_VERSION_H_
#define QKV_VERSION_H_

#include <string>

namespace qkv {

// The CMake project version, e.g. "0.1.0".
const char* Version();

// One line: "qkv 0.1.0 (git 1a2b3c4, GNU 12.2.0, Release); SIMD targets built:
// AVX3_SPR AVX3_ZEN4 AVX3 AVX2 SSE4 SSE2; running: AVX2". The git revision is
// the checkout's at CMake configure time ("unknown" outside a git checkout).
std::string BuildInfo();

}  // namespace qkv

#endif  // QKV_VERSION_H_
