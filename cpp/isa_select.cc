// Run-time choice of the kernel build: the widest instruction set the CPU supports, unless a test
// forces one (SetIsa, from Python jaxsparse.ffi.set_isa) or $JAXSPARSE_ISA names one at import.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "isa.h"

namespace jaxsparse {
namespace {

enum Level : int { kAuto = -1, kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

bool CpuHas(int level) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (level) {
    case kScalar: return true;
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return level == kScalar;
#endif
}

int BestLevel() {
  static const int best = CpuHas(kAvx512) ? kAvx512 : CpuHas(kAvx2) ? kAvx2 : kScalar;
  return best;
}

int ParseLevel(const char* name) {
  if (std::strcmp(name, "auto") == 0 || name[0] == '\0') return kAuto;
  if (std::strcmp(name, "avx512") == 0) return kAvx512;
  if (std::strcmp(name, "avx2") == 0) return kAvx2;
  if (std::strcmp(name, "scalar") == 0) return kScalar;
  return -2;
}

int InitialLevel() {
  const char* env = std::getenv("JAXSPARSE_ISA");
  if (env == nullptr) return kAuto;
  const int level = ParseLevel(env);
  return (level >= kScalar && CpuHas(level)) ? level : kAuto;
}

std::atomic<int> forced{InitialLevel()};
enum Gather : int { kGatherAuto = -1, kGatherVector = 0, kGatherScalar = 1 };
std::atomic<int> gather{kGatherAuto};

bool SlowGathers() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool slow = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return slow;
#else
  return true;  // no vector gathers: the portable build loads one by one anyway
#endif
}
std::atomic<int64_t> max_threads{0};

int CurrentLevel() {
  const int f = forced.load(std::memory_order_relaxed);
  return f == kAuto ? BestLevel() : f;
}

}  // namespace

const IsaKernels& SelectKernels(int dt) {
  if (dt != kF32 && dt != kBF16) return KernelsScalar();
  switch (CurrentLevel()) {
    case kAvx512: return KernelsAvx512();
    case kAvx2: return KernelsAvx2();
    default: return KernelsScalar();
  }
}

bool IsaSupported(const char* name) {
  const int level = ParseLevel(name);
  return level == kAuto || (level >= kScalar && CpuHas(level));
}

bool SetIsa(const char* name) {
  if (!IsaSupported(name)) return false;
  forced.store(ParseLevel(name));
  return true;
}

const char* IsaName() {
  switch (CurrentLevel()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "scalar";
  }
}

bool ScalarGather() {
  const int g = gather.load(std::memory_order_relaxed);
  return g == kGatherAuto ? SlowGathers() : g == kGatherScalar;
}

bool SetGather(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    gather.store(kGatherAuto);
  } else if (std::strcmp(name, "vector") == 0) {
    gather.store(kGatherVector);
  } else if (std::strcmp(name, "scalar") == 0) {
    gather.store(kGatherScalar);
  } else {
    return false;
  }
  return true;
}

const char* GatherName() { return ScalarGather() ? "scalar" : "vector"; }

void SetMaxThreads(int64_t n) { max_threads.store(n < 0 ? 0 : n); }
int64_t MaxThreads() { return max_threads.load(std::memory_order_relaxed); }

}  // namespace jaxsparse
