// Build facts for qkv/version.h.
#include "qkv/version.h"

#include <hwy/targets.h>

#include <string>

#include "kernels/flash_attention.h"

#ifndef QKV_VERSION_STRING
#define QKV_VERSION_STRING "unknown"
#endif
#ifndef QKV_GIT_REVISION
#define QKV_GIT_REVISION "unknown"
#endif
#ifndef QKV_BUILD_TYPE
#define QKV_BUILD_TYPE "unknown"
#endif

namespace qkv {

const char* Version() { return QKV_VERSION_STRING; }

std::string BuildInfo() {
#if defined(__clang__)
  const std::string compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  const std::string compiler = std::string("GNU ") + __VERSION__;
#else
  const std::string compiler = "unknown compiler";
#endif
  std::string targets;
  // HWY_TARGETS: every target the kernels were compiled for (dynamic
  // dispatch picks the best the CPU supports at run time).
  for (int64_t bits = HWY_TARGETS; bits != 0; bits &= bits - 1) {
    const int64_t target = bits & -bits;
    if (!targets.empty()) targets += ' ';
    targets += hwy::TargetName(target);
  }
  return std::string("qkv ") + QKV_VERSION_STRING + " (git " + QKV_GIT_REVISION + ", " + compiler +
         ", " + QKV_BUILD_TYPE + "); SIMD targets built: " + targets +
         "; running: " + internal::FlashSimdTarget();
}

}  // namespace qkv
