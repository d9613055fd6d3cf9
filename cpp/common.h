// Shared helpers for the jaxsparse CPU kernels: element types, validation of sparse
// structure, and a parallel loop on XLA's intra-op thread pool.
#ifndef JAXSPARSE_COMMON_H_
#define JAXSPARSE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "isa.h"
#include "xla/ffi/api/ffi.h"

namespace jaxsparse {

namespace ffi = xla::ffi;

// ---------------------------------------------------------------------------
// Element types. Half types are stored as 16-bit patterns and accumulate in float.

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float ToFloat(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline bf16_t FromFloat(float f, bf16_t) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

inline float ToFloat(f16_t x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t mant = x.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { mant <<= 1; ++e; } while ((mant & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline f16_t FromFloat(float f, f16_t) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (abs >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (abs < 0x38800000u) {  // subnormal or zero in half
    const uint32_t shift = 113 - (abs >> 23);
    if (shift > 24) return f16_t{sign};
    uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    uint32_t half = mant >> (shift + 13);
    const uint32_t rem = mant & ((1u << (shift + 13)) - 1);
    const uint32_t mid = 1u << (shift + 12);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return f16_t{static_cast<uint16_t>(sign | half)};
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return f16_t{static_cast<uint16_t>(sign | h)};
}

inline float ToFloat(float x) { return x; }
inline double ToFloat(double x) { return x; }
inline float FromFloat(float x, float) { return x; }
inline double FromFloat(double x, double) { return x; }

// Accumulator type: double for double, float for everything else.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Calls fn(T{}) with the C++ element type matching `dtype`; returns false for other types.
template <typename Fn>
bool DispatchFloat(ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::F32: fn(float{}); return true;
    case ffi::DataType::F64: fn(double{}); return true;
    case ffi::DataType::BF16: fn(bf16_t{}); return true;
    case ffi::DataType::F16: fn(f16_t{}); return true;
    default: return false;
  }
}

// ---------------------------------------------------------------------------
// Validation. Every kernel checks the structure it is given in O(nnz + rows) before it reads
// through it, so malformed indices become an error, never an out-of-bounds access. indptr is
// checked first; then each part's indices, on the thread that computes the part, just before it
// does (RunSpmm in spmm.cc, Run in sddmm.cc).

// indptr (or another offsets array, `name`) has rows + 1 entries, starts at 0, never decreases
// and ends at nnz (`total` in messages).
inline ffi::Error ValidateIndptr(const int32_t* indptr, int64_t rows, int64_t nnz,
                                 const char* what, const std::string& name = "indptr",
                                 const char* total = "nnz") {
  if (indptr[0] != 0) {
    return ffi::Error::InvalidArgument(std::string(what) + ": " + name + "[0] must be 0, got " +
                                       std::to_string(indptr[0]));
  }
  // A branch-free pass first (it vectorizes: ~0.1 ns per row, where the loop with an early exit
  // took ~0.9, 2.7 us of every call with M = 3072); the culprit is located only when there is one.
  uint32_t any_bad = 0;
  for (int64_t i = 0; i < rows; ++i) any_bad |= static_cast<uint32_t>(indptr[i + 1] < indptr[i]);
  for (int64_t i = 0; any_bad != 0 && i < rows; ++i) {
    if (indptr[i + 1] < indptr[i]) {
      return ffi::Error::InvalidArgument(
          std::string(what) + ": " + name + " must be non-decreasing, but " + name + "[" +
          std::to_string(i + 1) + "]=" + std::to_string(indptr[i + 1]) + " < " + name + "[" +
          std::to_string(i) + "]=" + std::to_string(indptr[i]));
    }
  }
  if (indptr[rows] != nnz) {
    return ffi::Error::InvalidArgument(std::string(what) + ": " + name + "[-1] must equal " +
                                       total + "=" + std::to_string(nnz) + ", got " +
                                       std::to_string(indptr[rows]));
  }
  return ffi::Error::Success();
}

// The first p in [e0, e1) with index[p] outside [0, limit), or -1. A branch-free pass first
// (vectorizes); the culprit is located only when something is wrong.
template <typename Index>
int64_t FirstOutOfRange(const Index* index, int64_t e0, int64_t e1, int64_t limit) {
  uint32_t any_bad = 0;
  const uint32_t lim = static_cast<uint32_t>(std::min<int64_t>(limit, INT32_MAX));
  for (int64_t p = e0; p < e1; ++p) {
    any_bad |= static_cast<uint32_t>(static_cast<uint32_t>(index[p]) >= lim);
  }
  for (int64_t p = e0; any_bad != 0 && p < e1; ++p) {
    if (static_cast<int64_t>(index[p]) < 0 || static_cast<int64_t>(index[p]) >= limit) return p;
  }
  return -1;
}

template <typename Index>
ffi::Error IndexError(const char* what, const char* name, const Index* index, int64_t p,
                      int64_t limit) {
  return ffi::Error::InvalidArgument(std::string(what) + ": " + name + "[" + std::to_string(p) +
                                     "]=" + std::to_string(index[p]) + " is out of range [0, " +
                                     std::to_string(limit) + ")");
}

// N:M structure along a dimension of `cols` (K of an SpMM operand, N of an SDDMM pattern, named
// `dim`): 0 < n <= m, m dividing cols, and rows of `slots` = cols / m * n stored entries.
inline ffi::Error CheckNm(const char* what, int64_t n, int64_t m, int64_t cols, int64_t slots,
                          const char* dim) {
  if (n >= 1 && m >= n && cols % m == 0 && slots == cols / m * n) return ffi::Error::Success();
  const std::string d(dim);
  return ffi::Error::InvalidArgument(
      std::string(what) + ": need 0 < n <= m, m dividing " + d + " and slots = " + d +
      " / m * n; got n=" + std::to_string(n) + ", m=" + std::to_string(m) + ", " + d + "=" +
      std::to_string(cols) + ", slots=" + std::to_string(slots));
}

// Entry e of an N:M positions array [rows, slots] is not below m.
inline ffi::Error PositionError(const char* what, const uint8_t* positions, int64_t e,
                                int64_t slots, int64_t m) {
  return ffi::Error::InvalidArgument(
      std::string(what) + ": positions[" + std::to_string(e / slots) + ", " +
      std::to_string(e % slots) + "]=" + std::to_string(positions[e]) + " is out of range [0, " +
      std::to_string(m) + ")");
}

// The lowest bad entry position reported by any of the threads that check parts of a matrix.
class FirstBad {
 public:
  void Report(int64_t e) {
    int64_t cur = v_.load();
    while (e < cur && !v_.compare_exchange_weak(cur, e)) {
    }
  }
  int64_t Get() const {  // -1 when nothing was reported
    const int64_t v = v_.load();
    return v == INT64_MAX ? -1 : v;
  }

 private:
  std::atomic<int64_t> v_{INT64_MAX};
};

// Kernel element type of an FFI dtype, or -1; and its size in bytes.
inline int DtOf(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F32: return kF32;
    case ffi::DataType::BF16: return kBF16;
    case ffi::DataType::F64: return kF64;
    case ffi::DataType::F16: return kF16;
    default: return -1;
  }
}
inline int64_t DtSize(int dt) { return dt == kF32 ? 4 : dt == kF64 ? 8 : 2; }

// ---------------------------------------------------------------------------
// Uninitialized scratch memory that starts on a cache line. The kernels' buffers (the nk panel,
// widened operands, output blocks) have row strides that are multiples of 64 bytes, so with this
// start no vector load from them straddles two lines; a plain std::vector is only 16-byte
// aligned, which made every such load a split load on some calls and not on others.
using Scratch = std::unique_ptr<char, void (*)(void*)>;
inline Scratch AlignedScratch(int64_t bytes) {
  const size_t size = static_cast<size_t>((std::max<int64_t>(bytes, 1) + 63) / 64 * 64);
  char* ptr = static_cast<char*>(std::aligned_alloc(64, size));
  if (ptr == nullptr) throw std::bad_alloc();
  return Scratch(ptr, std::free);
}

// ---------------------------------------------------------------------------
// Parallel loop on XLA's intra-op thread pool.

// Threads a kernel may use: XLA's pool (which counts the calling thread's share), capped by
// SetMaxThreads (jaxsparse.ffi.set_max_threads, used by the tests and benchmarks).
inline int64_t NumThreads(ffi::ThreadPool& pool) {
  int64_t n = std::max<int64_t>(1, pool.num_threads());
  const int64_t cap = MaxThreads();
  return cap > 0 ? std::min(n, cap) : n;
}
//
// Runs fn(task) for task in [0, n_tasks). The calling thread takes part, claiming tasks from a
// shared counter like the pool threads do, so the loop finishes even when no pool thread is free
// (no deadlock when called from inside the pool). Helpers that start after every task has been
// claimed return at once; the shared state outlives the call through the shared_ptr they hold.
//
// Once it has no task left, the calling thread polls for the helpers' last tasks for up to
// kSpinWait before it sleeps on the condition variable: being woken from a sleep took it long
// enough to matter in a product of ~0.1 ms. 90% sparse, N = 128, 2-core AMD EPYC VM, polling
// against sleeping at once, interleaved in one process: 384x384 and 512x512 1.3-1.4x faster,
// 768x768 and 1536x384 1.07-1.15x, 3072x768 1.02-1.05x, the 3072x768 matrix-vector product
// ~1.1x. Polling for 50, 200 and 1000 us did equally well, 20 us a little worse; kSpinWait sits
// in that plateau.
constexpr std::chrono::microseconds kSpinWait{100};

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n_tasks, const Fn& fn) {
  if (n_tasks <= 0) return;
  const int64_t n_threads = NumThreads(pool);
  if (n_tasks == 1 || n_threads <= 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const Fn* fn_ptr = &fn;
  auto drain = [state, fn_ptr, n_tasks]() {
    int64_t t;
    while ((t = state->next.fetch_add(1)) < n_tasks) {
      (*fn_ptr)(t);
      if (state->done.fetch_add(1) + 1 == n_tasks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(n_threads, n_tasks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(drain)(drain));
  drain();
  const auto give_up = std::chrono::steady_clock::now() + kSpinWait;
  while (state->done.load() != n_tasks && std::chrono::steady_clock::now() < give_up) {
    for (int i = 0; i < 16; ++i) CpuRelax();
  }
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n_tasks; });
}

// Splits the rows of a compressed matrix into at most `max_parts` contiguous ranges holding
// roughly equal work (nonzeros plus one per row, so empty rows still cost something), each
// starting at a multiple of `align` rows. part_begin must have room for max_parts + 1 entries;
// returns the number of parts.
inline int64_t BalanceRows(const int32_t* indptr, int64_t rows, int64_t max_parts,
                           int64_t* part_begin, int64_t align = 1) {
  const int64_t total = static_cast<int64_t>(indptr[rows]) + rows;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(max_parts, (rows + align - 1) / align));
  int64_t n = 0, row = 0;
  part_begin[n++] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    // The first row past the previous boundary with indptr[row] + row >= target, by bisection
    // (the work increases with the row): walking the rows took ~1.5 us of every call with
    // M = 3072 and 16 parts, bisection ~0.2 us.
    for (int64_t hi = rows; row < hi;) {
      const int64_t mid = row + (hi - row) / 2;
      if (static_cast<int64_t>(indptr[mid]) + mid < target) {
        row = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t start = std::min(rows, (row + align - 1) / align * align);
    if (start > part_begin[n - 1] && start < rows) part_begin[n++] = start;
  }
  part_begin[n] = rows;
  return n;
}

// The partition of rows into at most parts_per_thread * threads parts of roughly equal work (by
// BalanceRows over indptr, or by row count when indptr is null), each starting at a multiple of
// `align` rows: part q is [begin[q], begin[q + 1]).
inline std::vector<int64_t> Partition(const int32_t* indptr, int64_t rows, int64_t threads,
                                      int64_t align, int64_t parts_per_thread) {
  const int64_t max_parts = threads <= 1 ? 1 : parts_per_thread * threads;
  std::vector<int64_t> begin(max_parts + 1);
  int64_t parts;
  if (indptr != nullptr) {
    parts = BalanceRows(indptr, rows, max_parts, begin.data(), align);
  } else {
    const int64_t units = (rows + align - 1) / align;
    parts = std::max<int64_t>(1, std::min(max_parts, units));
    for (int64_t q = 0; q <= parts; ++q) begin[q] = std::min(rows, units * q / parts * align);
  }
  begin.resize(parts + 1);
  return begin;
}

}  // namespace jaxsparse

#endif  // JAXSPARSE_COMMON_H_
