// Test helper: run a check once per compiled Highway SIMD target.
#ifndef QKV_TESTS_SIMD_TEST_UTIL_H_
#define QKV_TESTS_SIMD_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <string>

#include "hwy/targets.h"

namespace qkv::test {

// Calls fn(target name) once per compiled SIMD target this CPU supports,
// selected through Highway's test hook; `target_name()` returns the name
// the kernel under test dispatches to (targets that map to the same
// compiled code run once). Restores the default afterwards.
template <class NameFn, class Fn>
void ForEachSimdTarget(const NameFn& target_name, const Fn& fn) {
  hwy::SetSupportedTargetsForTest(0);
  const int64_t supported = hwy::SupportedTargets();
  std::set<std::string> seen;
  for (int64_t t : {int64_t{HWY_AVX3}, int64_t{HWY_AVX2}, int64_t{HWY_SSE4}, int64_t{HWY_EMU128},
                    int64_t{HWY_SCALAR}}) {
    if (!(supported & t) && t != HWY_SCALAR && t != HWY_EMU128) continue;
    hwy::SetSupportedTargetsForTest(t);
    const std::string name = target_name();
    if (!seen.insert(name).second) continue;
    SCOPED_TRACE("target " + name);
    fn(name);
  }
  hwy::SetSupportedTargetsForTest(0);
}

}  // namespace qkv::test

#endif  // QKV_TESTS_SIMD_TEST_UTIL_H_
