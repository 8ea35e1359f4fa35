// OpenBLAS, loaded with dlopen on first use instead of linked.
//
// Why: OpenBLAS's OpenMP build allocates a 128 MiB buffer per thread while it
// loads (0.3.21: blas_thread_init -> blas_memory_alloc), and retries forever
// when the allocation fails. Linked, it loaded into every qkv process: under
// `ulimit -v 400M` even `qkv attend` on 8 tokens was left with 32 MiB, and
// under 100 MiB every command hung before main(). Loaded here, only the
// commands that run dense layers (embed, mha) pay for it, and the
// address-space limit is checked first, so a low one is a one-line error.
//
// Which library: the OpenMP build, by its full path (QKV_OPENBLAS_PATH, found
// by CMake in Debian's openblas-openmp directory); the alternatives' default
// libopenblas.so.0 is the pthreads build when installed, whose own spinning
// threads fight qkv's OpenMP team.
//
// The kernel: Debian 12's OpenBLAS 0.3.21 predates some current CPUs (Zen 5
// and Sapphire Rapids were seen) and gives them its "Prescott" SSE3 kernels,
// 3-8x slower than the AVX2 / AVX-512 ones they run. When that happens on a
// CPU with AVX2 + FMA and OPENBLAS_CORETYPE is not set, the kernel is selected
// again the way OpenBLAS does at load time (gotoblas_dynamic_init) with
// OPENBLAS_CORETYPE set for that call only, and the description says so.
#include "models/blas.h"

#include <dlfcn.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "qkv/error.h"

#ifndef QKV_OPENBLAS_PATH
#error "QKV_OPENBLAS_PATH: the OpenMP OpenBLAS shared library (CMakeLists.txt sets it)"
#endif

namespace qkv::models::internal {
namespace {

// OpenBLAS 0.3.21's per-thread buffer (BUFFER_SIZE plus its guard page).
constexpr double kBufferBytes = 134316032.0;
constexpr double kMiB = 1024.0 * 1024.0;

// Throws unless the address-space limit leaves room for OpenBLAS's buffers
// (one per CPU, as it counts them, plus one) and 64 MiB for its code.
void CheckAddressSpace() {
  struct rlimit limit {};
  if (getrlimit(RLIMIT_AS, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return;
  double used = 0;
  if (std::FILE* f = std::fopen("/proc/self/statm", "r")) {
    long pages = 0;
    if (std::fscanf(f, "%ld", &pages) == 1) used = static_cast<double>(pages) * sysconf(_SC_PAGESIZE);
    std::fclose(f);
  }
  const double cpus = static_cast<double>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
  const double need = (cpus + 1) * kBufferBytes + 64 * kMiB;
  const double left = static_cast<double>(limit.rlim_cur) - used;
  if (need > left) {
    char message[400];
    std::snprintf(message, sizeof message,
                  "OpenBLAS needs about %.0f MiB of address space to load (%.0f MiB per CPU for "
                  "its buffers), but %.0f MiB are left under this process's address-space limit "
                  "(expected a higher ulimit -v)",
                  need / kMiB, kBufferBytes / kMiB, std::max(left, 0.0) / kMiB);
    throw Error(message);
  }
}

template <class F>
F Symbol(void* handle, const char* name) {
  void* p = dlsym(handle, name);
  if (p == nullptr) {
    throw Error(std::string(QKV_OPENBLAS_PATH) + ": no symbol " + name +
                " (expected Debian's OpenBLAS, libopenblas0-openmp)");
  }
  return reinterpret_cast<F>(p);
}

Blas Load() {
  CheckAddressSpace();
  void* handle = dlopen(QKV_OPENBLAS_PATH, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    throw Error(std::string("cannot load OpenBLAS: ") + (why ? why : QKV_OPENBLAS_PATH) +
                " (expected Debian's libopenblas0-openmp; make deps installs it)");
  }
  Blas blas;
  blas.sgemm = Symbol<decltype(&cblas_sgemm)>(handle, "cblas_sgemm");
  const auto config = Symbol<char* (*)()>(handle, "openblas_get_config");
  const auto corename = Symbol<char* (*)()>(handle, "openblas_get_corename");
  const auto parallel = Symbol<int (*)()>(handle, "openblas_get_parallel");
  std::string note;
  if (std::string(corename()) == "Prescott" && std::getenv("OPENBLAS_CORETYPE") == nullptr &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    setenv("OPENBLAS_CORETYPE", avx512 ? "SkylakeX" : "Haswell", 1);
    Symbol<void (*)()>(handle, "gotoblas_dynamic_quit")();
    Symbol<void (*)()>(handle, "gotoblas_dynamic_init")();
    unsetenv("OPENBLAS_CORETYPE");
    note = std::string(" (OpenBLAS chose Prescott for this CPU; qkv selected ") + corename() + ")";
  }
  const int p = parallel();
  blas.description = std::string(config()) +
                     (p == 2 ? " (OpenMP)" : p == 1 ? " (pthreads)" : " (serial)") + ", core " +
                     corename() + note;
  return blas;
}

}  // namespace

const Blas& LoadBlas() {
  static std::once_flag once;
  static Blas blas;
  static std::string error;
  std::call_once(once, [] {
    try {
      blas = Load();
    } catch (const Error& e) {
      error = e.what();
    }
  });
  if (!error.empty()) throw Error(error);
  return blas;
}

}  // namespace qkv::models::internal
