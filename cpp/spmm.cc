// SpMM: A @ B ("kn": B [K, N], out [M, N]) and B @ A.T ("nk", the linear-layer layout: B [N, K],
// out [N, M]) for A in CSR, BSR or N:M, stored [M, K]; with the attribute `ta` the same products
// of A.T, which is built for the call (TransposeA), or for CSR from the transposition plan of
// jaxsparse.pack(a, transpose=True) (PlannedTransposedCsr), and then multiplied like any A.
//
// Rows of A are split into load-balanced parts (by stored entries, so long and empty rows even
// out) and the columns of B into chunks of 128; the pool threads claim (chunk, part) tasks
// dynamically, chunk by chunk. kn: each task writes its block of out directly. nk: B is
// transposed once per call into a [K, N] panel shared by all threads (the activations, N x K,
// are small next to the work), then each task computes blocks of 16 rows (up to 256 for a
// K-blocked product) of A @ panel into a thread-local buffer that is transposed into
// out[:, rows] while still in cache; with 48 tokens or more per thread, tasks are instead slices
// of the tokens through all of A, each transposing its own slice of B into a panel of its own.
// N = 1 (a matrix-vector product; both layouts are the same memory) takes a gather-based SpMV.
// A fused bias and activation (matmul(..., bias=, activation=)) are applied to each block of out
// right after it is computed (nk: to the thread-local block, before its transpose).
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace jaxsparse {
namespace {

constexpr int64_t kTileRows = 16;  // rows of A per nk output block: one 16 x 16 transposed tile
constexpr int64_t kChunkCols = 128;  // columns of B per task: a [K, 128] slice stays in L2

// A leading dimension of at least `cols` elements that is an odd number of 64-byte lines: rows
// start on a cache line (vector loads never straddle two) and successive rows walk through all
// the cache sets (a multiple of 512 bytes, N = 128 or 1024 float32, would use an eighth of them).
int64_t PaddedLd(int64_t cols, int64_t esz) {
  int64_t lines = (cols * esz + 63) / 64;
  if (lines % 2 == 0) ++lines;
  return lines * 64 / esz;
}

struct Shape {
  int64_t rows;  // rows of the kernel loop: M, or M / bm block rows for BSR
  int64_t m, k, n;
};

// The fused bias (one per row of A, i.e. per output feature; null for none) and activation
// (Act, isa.h) applied to every block of the output right after it is computed.
struct Epilogue {
  const void* bias = nullptr;
  int act = kActNone;
  bool Active() const { return bias != nullptr || act != kActNone; }
  // Rows [r0, r0 + rows) of A, their columns [0, cols) of the product in c (row stride ldc).
  void Apply(const IsaKernels& kern, int dt, void* c, int64_t r0, int64_t rows, int64_t cols,
             int64_t ldc) const {
    if (Active()) kern.epilogue(dt, c, rows, cols, ldc, BiasFrom(r0, dt), true, act);
  }
  // N = 1: elements [r0, r0 + count) of the output vector y, the bias running along them.
  void ApplyToVector(const IsaKernels& kern, int dt, void* y, int64_t r0, int64_t count) const {
    if (!Active()) return;
    kern.epilogue(dt, static_cast<char*>(y) + r0 * DtSize(dt), 1, count, count, BiasFrom(r0, dt),
                  false, act);
  }

 private:
  const void* BiasFrom(int64_t r0, int dt) const {
    return bias == nullptr ? nullptr : static_cast<const char*>(bias) + r0 * DtSize(dt);
  }
};

// b [K, N] (kn) or [N, K] (nk) and out [R, N] (kn) or [N, R] (nk) for op(A) @ b with A stored
// [a_rows, a_cols]: op(A) = A (K = a_cols, R = a_rows) or, with `ta`, A.T (K = a_rows,
// R = a_cols). Sets *a_cols and *n.
ffi::Error CheckDense(const char* what, ffi::AnyBuffer& b, ffi::Result<ffi::AnyBuffer>& out,
                      int64_t a_rows, bool nk, bool ta, int dt, int64_t* a_cols, int64_t* n) {
  const auto bd = b.dimensions();
  const auto od = out->dimensions();
  if (bd.size() != 2 || od.size() != 2) {
    return ffi::Error::InvalidArgument(std::string(what) + ": dense operand and output must be 2-D");
  }
  const int64_t k = nk ? bd[1] : bd[0];
  *n = nk ? bd[0] : bd[1];
  const int64_t o_rows = nk ? od[1] : od[0], o_n = nk ? od[0] : od[1];
  if (o_n != *n || (ta ? k : o_rows) != a_rows) {
    return ffi::Error::InvalidArgument(
        std::string(what) + ": " + (ta ? "b's contracting dimension" : "the output") +
        " does not match A's " + std::to_string(a_rows) + " rows" +
        (ta ? " (A transposed)" : "") + ", or the output does not have N=" + std::to_string(*n));
  }
  *a_cols = ta ? o_rows : k;
  if (dt < 0 || b.element_type() != out->element_type()) {
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": unsupported dtype or dtypes of b and out differ");
  }
  return ffi::Error::Success();
}

// The fused epilogue of a call: `bias` is empty (none) or one value per output feature (`m`)
// of out's type; act one of Act.
ffi::Error GetEpilogue(const char* what, ffi::AnyBuffer& bias, int64_t act, int64_t m,
                       ffi::DataType dt, Epilogue* ep) {
  if (act < kActNone || act > kActSilu) {
    return ffi::Error::InvalidArgument(std::string(what) + ": unknown activation code " +
                                       std::to_string(act));
  }
  ep->act = static_cast<int>(act);
  if (bias.element_count() == 0) return ffi::Error::Success();
  if (static_cast<int64_t>(bias.element_count()) != m || bias.element_type() != dt) {
    return ffi::Error::InvalidArgument(std::string(what) + ": bias must hold " +
                                       std::to_string(m) + " values of the output's dtype, got " +
                                       std::to_string(bias.element_count()));
  }
  ep->bias = bias.untyped_data();
  return ffi::Error::Success();
}

// p restricted to kernel rows [r0, ...), renumbered from 0.
SpmmProblem Shift(const SpmmProblem& p, int64_t r0) {
  SpmmProblem q = p;
  if (p.fmt == kNm) {
    q.data = static_cast<const char*>(p.data) + r0 * p.slots * DtSize(p.dt);
    q.positions = p.positions + r0 * p.slots;
  } else {
    q.indptr = p.indptr + r0;  // entries keep their absolute offsets into data and indices
  }
  return q;
}

// The first stored entry of kernel rows [r0, r1) whose column (block column for BSR, position in
// its group for N:M) is not below `limit`, or -1.
int64_t FirstBadEntry(const SpmmProblem& p, int64_t r0, int64_t r1, int64_t limit) {
  if (p.fmt == kNm) return FirstOutOfRange(p.positions, r0 * p.slots, r1 * p.slots, limit);
  if (p.indices16 != nullptr) {
    return FirstOutOfRange(p.indices16, p.indptr[r0], p.indptr[r1], limit);
  }
  return FirstOutOfRange(p.indices, p.indptr[r0], p.indptr[r1], limit);
}

// A.T for a transposed-A product (op(A) = A.T: jaxsparse.matmul(W.T, x), x @ W with W stored
// [in, out], and the gradient of every product with respect to its dense operand), built once
// per call by a stable counting sort of A's entries by column, in parallel: each thread counts
// the columns of its part of A's rows, a prefix sum over (column, part) gives every part its own
// slots in each column of A.T, and each thread then moves its entries there in row order (each
// thread filling a range of A.T's rows instead, scanning all of A for the entries of its range,
// was 1.3x slower on 2 cores: an unpredictable branch per entry). The result is CSR (BSR for
// BSR, its blocks transposed; CSR for N:M), CSR with 16-bit indices where A has at most 65536
// rows, and goes through the same kernels as any other product. 3072x768 at 90%,
// x[128, 3072] @ W, interleaved in one process: ~120 ms through the XLA reference before, now
// 1.6-1.8x faster than dense and ~2x the time of x @ W.T (this transposition is about a third).
struct TransposedA {
  std::vector<int32_t> indptr;
  Scratch indices{nullptr, std::free};
  Scratch data{nullptr, std::free};
};

// Calls fn(entry, column) for the stored entries of kernel row i of A, in order.
template <typename Fn>
void ForEntries(const SpmmProblem& p, int64_t i, const Fn& fn) {
  if (p.fmt == kNm) {
    for (int64_t s = 0, e = i * p.slots; s < p.slots; ++s, ++e) {
      fn(e, p.group_base[s] + p.positions[e]);
    }
  } else if (p.indices16 != nullptr) {
    for (int64_t e = p.indptr[i]; e < p.indptr[i + 1]; ++e) fn(e, int64_t{p.indices16[e]});
  } else {
    for (int64_t e = p.indptr[i]; e < p.indptr[i + 1]; ++e) fn(e, int64_t{p.indices[e]});
  }
}

// Moves the entries of kernel rows [r0, r1) of A to their places in A.T (next[c]: the next free
// entry of A.T's row c): the row index to idx, the value (a bm x bk block, transposed) to dst.
// U is the unsigned type of the element's size.
template <typename U, typename Index>
void MoveEntries(const SpmmProblem& p, int64_t r0, int64_t r1, int32_t* next, void* idx,
                 void* dst) {
  const U* src = static_cast<const U*>(p.data);
  U* out = static_cast<U*>(dst);
  Index* index = static_cast<Index*>(idx);
  const int64_t bm = p.bm, bk = p.bk, block = bm * bk;
  for (int64_t i = r0; i < r1; ++i) {
    ForEntries(p, i, [&](int64_t e, int64_t c) {
      const int32_t d = next[c]++;
      index[d] = static_cast<Index>(i);
      if (block == 1) {
        out[d] = src[e];
        return;
      }
      for (int64_t r = 0; r < bm; ++r)
        for (int64_t k = 0; k < bk; ++k) out[d * block + k * bm + r] = src[e * block + r * bk + k];
    });
  }
}

// The problem of A.T, whose arrays live in *t. A's kernel rows (block rows for BSR) are split
// into `parts` (one per thread), its `cols` kernel columns hold every entry (already checked).
SpmmProblem TransposeA(ffi::ThreadPool& pool, const SpmmProblem& p,
                       const std::vector<int64_t>& parts, int64_t cols, TransposedA* t) {
  const int64_t rows = parts.back();
  const int64_t n_parts = static_cast<int64_t>(parts.size()) - 1;
  std::vector<int32_t> slot(n_parts * cols, 0);  // per part: counts, then next position
  ParallelFor(pool, n_parts, [&](int64_t q) {
    int32_t* count = slot.data() + q * cols;
    for (int64_t i = parts[q]; i < parts[q + 1]; ++i) {
      ForEntries(p, i, [&](int64_t, int64_t c) { ++count[c]; });
    }
  });
  t->indptr.resize(cols + 1);
  int32_t run = 0;
  for (int64_t c = 0; c < cols; ++c) {
    t->indptr[c] = run;
    for (int64_t q = 0; q < n_parts; ++q) {
      const int32_t count = slot[q * cols + c];
      slot[q * cols + c] = run;
      run += count;
    }
  }
  t->indptr[cols] = run;
  const bool narrow = p.fmt != kBsr && rows <= 65536;  // the BSR kernels read int32 indices
  const int64_t block = p.bm * p.bk, esz = DtSize(p.dt);
  t->indices = AlignedScratch(int64_t{run} * (narrow ? 2 : 4));
  t->data = AlignedScratch(int64_t{run} * block * esz);
  using Mover = void (*)(const SpmmProblem&, int64_t, int64_t, int32_t*, void*, void*);
  const Mover move =
      esz == 2 ? (narrow ? MoveEntries<uint16_t, uint16_t> : MoveEntries<uint16_t, int32_t>)
      : esz == 4 ? (narrow ? MoveEntries<uint32_t, uint16_t> : MoveEntries<uint32_t, int32_t>)
                 : (narrow ? MoveEntries<uint64_t, uint16_t> : MoveEntries<uint64_t, int32_t>);
  ParallelFor(pool, n_parts, [&](int64_t q) {
    move(p, parts[q], parts[q + 1], slot.data() + q * cols, t->indices.get(), t->data.get());
  });
  SpmmProblem pt{};
  pt.fmt = p.fmt == kBsr ? kBsr : kCsr;
  pt.dt = p.dt;
  pt.data = t->data.get();
  pt.indptr = t->indptr.data();
  pt.bm = p.bk;
  pt.bk = p.bm;
  if (narrow) {
    pt.indices16 = reinterpret_cast<const uint16_t*>(t->indices.get());
  } else {
    pt.indices = reinterpret_cast<const int32_t*>(t->indices.get());
  }
  return pt;
}

// The product, or nothing and the first stored entry whose column (see FirstBadEntry) is out of
// range; -1 when none is. indptr must be valid. Each part's entries are checked by the thread
// that computes the part, right before it does: in parallel, and the check brings the indices
// into cache for the product (the serial check before the call took 30% of a 3072x768 SpMV).
// Chunk-major products and nk token slices (below) check all parts in a parallel pass first.
int64_t RunSpmm(ffi::ThreadPool& pool, SpmmProblem p, const Shape& s, bool nk, const void* b,
                void* out, int64_t limit, const Epilogue& ep) {
  if (s.m == 0) return -1;
  if (s.n == 0) return FirstBadEntry(p, 0, s.rows, limit);
  const IsaKernels& kern = SelectKernels(p.dt);
  const int64_t threads = NumThreads(pool);
  const int64_t esz = DtSize(p.dt);
  // Preparation passes over B (widening, the nk panel) run on the calling thread when B is
  // small: waking a pool thread costs more than it saves there.
  const bool split_prep = threads > 1 && s.k * s.n > (int64_t{1} << 20);
  const bool split_panel = threads > 1 && s.k * s.n >= (int64_t{1} << 14);
  // nk output blocks are multiples of 16 rows of A (transposed tiles): parts start on a tile edge
  // so that each tile is written as 16 whole, aligned 64-byte segments of out's rows.
  const int64_t bm = p.fmt == kBsr ? p.bm : 1;
  const int64_t tile = std::max<int64_t>(1, kTileRows / bm);
  // float16 B is widened to float32 once (see SpmmRowsT; the vector builds have no float16
  // kernels); bfloat16 B stays bfloat16 and is widened in registers.
  const bool widen = p.dt == kF16;
  const int panel_dt = widen ? kF32 : p.dt;
  const int64_t panel_esz = DtSize(panel_dt);
  // nk with at least 48 tokens per thread: each task takes a slice of the tokens (N / threads, in
  // multiples of 16, at most kChunkCols) through every row of A, transposing its own slice of B
  // into its own panel. The panel then stays in the L2 of the core that wrote it and reads it,
  // where the shared panel below is written by all threads and read by all (half of its lines
  // come from the other core's cache). Every task reads all of A, but that is 6 bytes per entry
  // (packed CSR) against the 256 bytes of B a strip of 64 columns loads for it. Interleaved in
  // one process (90%): MiniLM-sized layers (384 / 1536 wide) at N = 1024 ~1.45x faster, at
  // N = 128 within noise to ~5%; 3072x768 at N = 128 and 1024 ~1.25x; 768x3072 (K-blocked), BSR
  // 16x16, bfloat16 and N = 197 within noise.
  const int64_t per_thread = ((s.n + threads - 1) / threads + 15) / 16 * 16;
  // A slice is also narrowed until its panel fits kStripBytes (float32: 128 columns at K = 768,
  // 64 at 1536, 32 at 3072), though not below 32 columns (64 for BSR, whose strips of 32 columns
  // were ~1.2x slower than 64), so that each thread's panel stays in its L2. 90%, interleaved,
  // against slices of up to 128 columns:
  // 768x3072 ~1.15x faster at N = 128 (32 columns) and N = 1024; 384x1536 ~1.14x and BSR 16x16
  // 768x3072 ~1.19x at N = 1024; 3072x768 unchanged.
  const int64_t fits = kStripBytes / (std::max<int64_t>(1, s.k) * panel_esz) / 16 * 16;
  const int64_t slice = std::min({kChunkCols, per_thread,
                                  std::max<int64_t>(p.fmt == kBsr ? 64 : 32, fits)});
  // Rows dense enough for K-blocks in L1 (isa.h) take them only in products of kL1BlockN columns
  // or more at a time: chunks of kn and of the shared nk panel, or nk slices. So such rows keep
  // the shared panel where the slices would be narrower (N = 128 on two threads: 64 columns; 32
  // at K = 3072). Interleaved in one process, 50-80% sparsity, against the slices: 3072x768
  // 1.1-1.25x faster at N = 128 and 1.16-1.29x at N = 197, 768x3072 1.37-1.75x at N = 128 and
  // 1.13-1.5x at N = 1024, 384x1536 1.16-1.48x; 1536x384 1.0-1.3x (0.85-1.0x at 80%).
  const int64_t entries = p.fmt == kNm ? s.rows * p.slots : p.indptr[s.rows] * p.bm * p.bk;
  const bool l1_rows = p.dt == kF32 && p.fmt != kBsr && s.k > kL1BlockK &&
                       entries * kL1BlockK >= kL1BlockMin * s.rows * s.k;
  const bool slices_per_thread = nk && threads > 1 && per_thread >= 48 &&
                                 !(l1_rows && s.n >= kL1BlockN && slice < kL1BlockN);
  // A K-blocked product (isa.h) fetches each K-block of B into L2 (L1) once per group of rows, so
  // its groups should be large: nk blocks of up to kBlockedRows rows, and 2 parts per thread
  // instead of 8 (768x3072 at N = 1024, interleaved in one process: ~29 -> ~18 ms, kn and nk).
  const bool l1_blocks =
      l1_rows && (slices_per_thread ? slice : std::min(s.n, kChunkCols)) >= kL1BlockN;
  const bool blocked =
      p.dt == kF32 && p.fmt != kBsr && s.n > 1 && (s.k > kBlockedK || l1_blocks);
  const int64_t sub = blocked ? std::max<int64_t>(1, kBlockedRows / bm) : tile;
  const std::vector<int64_t> parts = Partition(p.fmt == kNm ? nullptr : p.indptr, s.rows,
                                               threads, nk ? tile : 1, blocked ? 2 : 8);
  const int64_t n_parts = static_cast<int64_t>(parts.size()) - 1;
  p.k = s.k;
  p.n = s.n;
  p.l1_blocks = l1_blocks;
  FirstBad first_bad;
  auto valid = [&](int64_t q) {  // false (and the entry reported) when part q has a bad entry
    const int64_t e = FirstBadEntry(p, parts[q], parts[q + 1], limit);
    if (e >= 0) first_bad.Report(e);
    return e < 0;
  };

  if (s.n == 1 && p.dt != kF64) {
    std::vector<float> xbuf;
    const float* x = static_cast<const float*>(b);
    if (p.dt != kF32) {
      xbuf.resize(s.k);
      for (int64_t j = 0; j < s.k; ++j) {
        const uint16_t h = static_cast<const uint16_t*>(b)[j];
        xbuf[j] = p.dt == kBF16 ? ToFloat(bf16_t{h}) : ToFloat(f16_t{h});
      }
      x = xbuf.data();
    }
    ParallelFor(pool, n_parts, [&](int64_t q) {
      if (!valid(q)) return;
      kern.spmv_rows(p, x, parts[q], parts[q + 1], out);
      ep.ApplyToVector(kern, p.dt, out, parts[q] * bm, (parts[q + 1] - parts[q]) * bm);
    });
    return first_bad.Get();
  }

  // kn copies B first, its rows PaddedLd apart, when they are not a whole number of cache lines
  // apart (N = 197 tokens: every vector load straddles two lines; 1.2-1.4x faster with the copy,
  // 768x768 to 3072x768 at 90%, interleaved) or, past one 128-column strip, a multiple of 512
  // bytes (N = 1024 float32: 4 KiB apart, the rows a strip visits share an eighth of L2; ~17 ->
  // ~10 ms on 3072x768).
  const bool pad = !nk && s.n > 16 && ((s.n * panel_esz) % 64 != 0 ||
                                        (s.n > 128 && (s.n * panel_esz) % 512 == 0));
  const int64_t b_rows = nk ? s.n : s.k, b_cols = nk ? s.k : s.n;
  const int64_t ldb = pad ? PaddedLd(b_cols, panel_esz) : b_cols;
  Scratch copy_buf(nullptr, std::free);
  if (widen || pad) {
    copy_buf = AlignedScratch(b_rows * ldb * panel_esz);
    const int64_t chunk_rows =
        std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, b_cols));
    const int64_t n_chunks = (b_rows + chunk_rows - 1) / chunk_rows;
    ParallelFor(pool, split_prep ? n_chunks : 1, [&](int64_t c) {
      const int64_t r0 = split_prep ? c * chunk_rows : 0;
      const int64_t r1 = split_prep ? std::min(b_rows, r0 + chunk_rows) : b_rows;
      for (int64_t r = r0; r < r1; ++r) {
        char* dst = copy_buf.get() + r * ldb * panel_esz;
        if (!widen) {
          std::memcpy(dst, static_cast<const char*>(b) + r * b_cols * panel_esz,
                      b_cols * panel_esz);
          continue;
        }
        const uint16_t* h = static_cast<const uint16_t*>(b) + r * b_cols;
        float* wide = reinterpret_cast<float*>(dst);
        for (int64_t e = 0; e < b_cols; ++e) wide[e] = ToFloat(f16_t{h[e]});
      }
    });
    b = copy_buf.get();
    p.b_f32 = widen;
  }

  // Columns of B are taken kChunkCols at a time. When A is small (its share per thread within
  // kStripBytes), tasks are (chunk, part) pairs, chunk-major: the threads work through the same
  // [K, 128] slice of B (or of the nk panel) together, each fetching it into its L2 once per
  // chunk, where one task per part fetched every slice once per part (8 parts per thread). N =
  // 1024, 90%, interleaved: 384x384 and 768x768 ~1.2x, 1536x384 ~1.07x faster. A larger A
  // keeps one task per part, all chunks in turn, so that the part's entries stay in L2 (3072x768:
  // chunk-major was ~5% slower). Chunk-major parts are validated first, in a pass of their own.
  const int64_t chunks = (s.n + kChunkCols - 1) / kChunkCols;
  const int64_t index_bytes = p.fmt == kNm ? 1 : p.indices16 != nullptr ? 2 : 4;
  const bool chunk_major = chunks > 1 && entries * (esz + index_bytes) <= threads * kStripBytes;
  if (chunk_major) {
    ParallelFor(pool, n_parts, [&](int64_t q) { valid(q); });
    if (first_bad.Get() >= 0) return first_bad.Get();
  }
  // Runs task t: body(q, chunk, n0) for part q and each of its chunks of columns [n0, ...).
  auto run_task = [&](int64_t t, const char* b_base, const auto& body) {
    const int64_t q = t % n_parts;
    if (!chunk_major && !valid(q)) return;
    const int64_t c0 = chunk_major ? t / n_parts : 0, c1 = chunk_major ? c0 + 1 : chunks;
    for (int64_t c = c0; c < c1; ++c) {
      SpmmProblem chunk = p;
      chunk.b = b_base + c * kChunkCols * panel_esz;
      chunk.n = std::min(kChunkCols, s.n - c * kChunkCols);
      body(q, chunk, c * kChunkCols);
    }
  };
  const int64_t tasks = chunk_major ? n_parts * chunks : n_parts;

  if (!nk) {
    p.b = b;
    p.ldb = ldb;
    ParallelFor(pool, tasks, [&](int64_t t) {
      run_task(t, static_cast<const char*>(b), [&](int64_t q, const SpmmProblem& chunk, int64_t n0) {
        char* block = static_cast<char*>(out) + (parts[q] * bm * s.n + n0) * esz;
        kern.spmm_rows(chunk, parts[q], parts[q + 1], static_cast<char*>(out) + n0 * esz, s.n);
        ep.Apply(kern, p.dt, block, parts[q] * bm, (parts[q + 1] - parts[q]) * bm, chunk.n, s.n);
      });
    });
    return first_bad.Get();
  }

  // nk computes output blocks (sub * bm rows of A by at most kChunkCols columns of a panel of
  // B.T: 16 x 128 unless bm > 16, up to 256 x 128 when K-blocked) that stay in cache until they
  // are transposed into out. A large out (1 MiB or more) whose rows are a multiple of 4 KiB apart
  // is written with streaming stores: a tile's 16 row segments would otherwise compete for the
  // same L1 set. Other outputs stay in the cache, where the next layer of a model reads them:
  // streaming them too (as until now) made all-MiniLM-L6-v2 at 90% sparsity, batch 8 x 128
  // tokens (384- and 1536-wide outputs of 1.5 and 6 MiB), 2-9% slower end to end in four
  // interleaved runs.
  const IsaKernels& tkern = SelectKernels(panel_dt);
  const int64_t ldt = PaddedLd(std::min(s.n, kChunkCols), esz);
  const bool stream = s.m * s.n * esz >= (int64_t{1} << 20) && (s.m * esz) % 4096 == 0;
  // Kernel rows [r0, r1) of the product `chunk` (A times columns of a panel, written to columns
  // n0 + [0, chunk.n) of out), sub rows at a time through the buffer tmp.
  auto rows_to_out = [&](const SpmmProblem& chunk, int64_t r0, int64_t r1, int64_t n0, char* tmp) {
    for (; r0 < r1; r0 += sub) {
      const int64_t cnt = std::min(sub, r1 - r0);
      kern.spmm_rows(Shift(chunk, r0), 0, cnt, tmp, ldt);
      ep.Apply(kern, p.dt, tmp, r0 * bm, cnt * bm, chunk.n, ldt);
      kern.transpose(p.dt, tmp, cnt * bm, chunk.n, ldt,
                     static_cast<char*>(out) + (n0 * s.m + r0 * bm) * esz, s.m, stream);
    }
  };
  if (slices_per_thread) {
    if (!chunk_major) {
      ParallelFor(pool, n_parts, [&](int64_t q) { valid(q); });
      if (first_bad.Get() >= 0) return first_bad.Get();
    }
    const int64_t slices = (s.n + slice - 1) / slice;
    ParallelFor(pool, slices, [&](int64_t c) {
      const int64_t n0 = c * slice, n1 = std::min(s.n, n0 + slice);
      const int64_t ldp = PaddedLd(n1 - n0, panel_esz);
      Scratch panel = AlignedScratch(s.k * ldp * panel_esz);
      tkern.transpose(panel_dt, static_cast<const char*>(b) + n0 * s.k * panel_esz, n1 - n0,
                      s.k, s.k, panel.get(), ldp, false);
      SpmmProblem sl = p;
      sl.b = panel.get();
      sl.ldb = ldp;
      sl.n = n1 - n0;
      Scratch tmp = AlignedScratch(sub * bm * ldt * esz);
      rows_to_out(sl, 0, s.rows, n0, tmp.get());
    });
    return first_bad.Get();
  }

  // Otherwise one panel = B.T, [K, N], rows PaddedLd apart (N = 197 tokens: 1.3-1.45x faster
  // than rows padded by one line but not aligned). Unlike the widening pass, the transpose is
  // split between the threads from 16K elements on (N = 128 tokens of a 768-wide layer is 96K).
  const int64_t ldp = PaddedLd(s.n, panel_esz);
  Scratch panel = AlignedScratch(s.k * ldp * panel_esz);
  constexpr int64_t kPanelRows = 32;
  const int64_t n_chunks = (s.n + kPanelRows - 1) / kPanelRows;
  ParallelFor(pool, split_panel ? n_chunks : 1, [&](int64_t c) {
    const int64_t n0 = split_panel ? c * kPanelRows : 0;
    const int64_t n1 = split_panel ? std::min(s.n, n0 + kPanelRows) : s.n;
    tkern.transpose(panel_dt, static_cast<const char*>(b) + n0 * s.k * panel_esz, n1 - n0, s.k,
                    s.k, panel.get() + n0 * panel_esz, ldp, false);
  });
  p.b = panel.get();
  p.ldb = ldp;
  ParallelFor(pool, tasks, [&](int64_t t) {
    Scratch tmp = AlignedScratch(sub * bm * ldt * esz);
    run_task(t, panel.get(), [&](int64_t q, const SpmmProblem& chunk, int64_t n0) {
      rows_to_out(chunk, parts[q], parts[q + 1], n0, tmp.get());
    });
  });
  return first_bad.Get();
}

// RunSpmm for op(A) @ b: op(A) = A, or with `ta` A.T (TransposeA, once every entry of A has
// been checked against `limit`). A has `rows` kernel rows and `cols` kernel columns (block rows
// and columns for BSR); n: columns of the product. Returns A's first bad entry, or -1.
int64_t RunOp(ffi::ThreadPool& pool, const SpmmProblem& p, int64_t rows, int64_t cols, bool ta,
              bool nk, int64_t n, const void* b, void* out, int64_t limit, const Epilogue& ep) {
  if (!ta) return RunSpmm(pool, p, Shape{rows, rows * p.bm, cols * p.bk, n}, nk, b, out, limit, ep);
  const std::vector<int64_t> parts =
      Partition(p.fmt == kNm ? nullptr : p.indptr, rows, NumThreads(pool), 1, 1);
  FirstBad first_bad;
  ParallelFor(pool, static_cast<int64_t>(parts.size()) - 1, [&](int64_t q) {
    const int64_t e = FirstBadEntry(p, parts[q], parts[q + 1], limit);
    if (e >= 0) first_bad.Report(e);
  });
  if (first_bad.Get() >= 0) return first_bad.Get();
  TransposedA t;
  const SpmmProblem pt = TransposeA(pool, p, parts, cols, &t);
  return RunSpmm(pool, pt, Shape{cols, cols * pt.bm, rows * p.bm, n}, nk, b, out, rows, ep);
}

// Points p at CSR column indices: int32, or uint16 as jaxsparse.pack stores them (K <= 65536).
ffi::Error SetCsrIndices(ffi::AnyBuffer& indices, const char* name, SpmmProblem* p) {
  if (indices.element_type() == ffi::DataType::S32) {
    p->indices = static_cast<const int32_t*>(indices.untyped_data());
  } else if (indices.element_type() == ffi::DataType::U16) {
    p->indices16 = static_cast<const uint16_t*>(indices.untyped_data());
  } else {
    return ffi::Error::InvalidArgument(std::string("csr_spmm: ") + name +
                                       " must be int32 or uint16");
  }
  return ffi::Error::Success();
}

// Copies data[perm[d]] to vals[d] for d in [d0, d1); returns the first d whose perm[d] is not
// in [0, nnz), or -1.
template <typename U>
int64_t GatherValues(const void* data, const int32_t* perm, int64_t d0, int64_t d1, int64_t nnz,
                     void* vals) {
  const U* src = static_cast<const U*>(data);
  U* dst = static_cast<U*>(vals);
  for (int64_t d = d0; d < d1; ++d) {
    const int32_t e = perm[d];
    if (e < 0 || e >= nnz) return d;
    dst[d] = src[e];
  }
  return -1;
}

// op(A) = A.T from the transposition plan of jaxsparse.pack(a, transpose=True): A.T's pattern
// (t_indices, t_indptr: K rows, entries in columns [0, M)) and perm, where A.T's entry d is A's
// entry perm[d]. Each call gathers the values in parallel (each part checking its perm entries)
// instead of counting and moving every entry (TransposeA): 3072x768 at 90%, N = 128, the moves
// were ~0.4 ms of a ~1.1 ms product. The plan is checked for bounds only: one that does not
// describe A (pack builds it from A) gives the product of another matrix, never a read out of
// range.
ffi::Error PlannedTransposedCsr(ffi::ThreadPool& pool, const SpmmProblem& p, int64_t rows,
                                int64_t k, int64_t nnz, ffi::Buffer<ffi::S32>& t_perm,
                                ffi::AnyBuffer& t_indices, ffi::Buffer<ffi::S32>& t_indptr,
                                bool nk, int64_t n, const void* b, void* out,
                                const Epilogue& ep) {
  const char* what = "csr_spmm";
  if (static_cast<int64_t>(t_perm.element_count()) != nnz ||
      static_cast<int64_t>(t_indices.element_count()) != nnz ||
      static_cast<int64_t>(t_indptr.element_count()) != k + 1) {
    return ffi::Error::InvalidArgument(
        std::string(what) + ": the transposition plan must hold perm [nnz], t_indices [nnz] "
        "and t_indptr [K + 1] = [" + std::to_string(k + 1) + "]; got " +
        std::to_string(t_perm.element_count()) + ", " +
        std::to_string(t_indices.element_count()) + " and " +
        std::to_string(t_indptr.element_count()) + " entries");
  }
  SpmmProblem pt{};
  if (auto err = SetCsrIndices(t_indices, "t_indices", &pt); err.failure()) return err;
  if (auto err = ValidateIndptr(t_indptr.typed_data(), k, nnz, what, "t_indptr"); err.failure()) {
    return err;
  }
  const int64_t esz = DtSize(p.dt);
  Scratch vals = AlignedScratch(nnz * esz);
  using Gather = int64_t (*)(const void*, const int32_t*, int64_t, int64_t, int64_t, void*);
  const Gather gather = esz == 2 ? GatherValues<uint16_t>
                        : esz == 4 ? GatherValues<uint32_t> : GatherValues<uint64_t>;
  constexpr int64_t kGatherChunk = 1 << 16;
  FirstBad first_bad;
  ParallelFor(pool, (nnz + kGatherChunk - 1) / kGatherChunk, [&](int64_t c) {
    const int64_t d0 = c * kGatherChunk, d1 = std::min(nnz, d0 + kGatherChunk);
    const int64_t d = gather(p.data, t_perm.typed_data(), d0, d1, nnz, vals.get());
    if (d >= 0) first_bad.Report(d);
  });
  if (first_bad.Get() >= 0) {
    return IndexError(what, "perm", t_perm.typed_data(), first_bad.Get(), nnz);
  }
  pt.fmt = kCsr;
  pt.dt = p.dt;
  pt.data = vals.get();
  pt.indptr = t_indptr.typed_data();
  pt.bm = pt.bk = 1;
  const int64_t bad = RunSpmm(pool, pt, Shape{k, k, rows, n}, nk, b, out, rows, ep);
  if (bad >= 0) {
    return pt.indices != nullptr ? IndexError(what, "t_indices", pt.indices, bad, rows)
                                 : IndexError(what, "t_indices", pt.indices16, bad, rows);
  }
  return ffi::Error::Success();
}

// indices are int32, or uint16 for a matrix packed by jaxsparse.pack (K <= 65536). t_perm,
// t_indices and t_indptr are a transposition plan (PlannedTransposedCsr), used with `ta`, or
// empty.
ffi::Error CsrSpmm(ffi::ThreadPool pool, ffi::AnyBuffer data, ffi::AnyBuffer indices,
                   ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> t_perm,
                   ffi::AnyBuffer t_indices, ffi::Buffer<ffi::S32> t_indptr, ffi::AnyBuffer b,
                   ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> out, bool nk, bool ta,
                   int64_t act) {
  const int64_t rows = static_cast<int64_t>(indptr.element_count()) - 1;
  const int64_t nnz = indices.element_count();
  const int dt = DtOf(data.element_type());
  int64_t k, n;
  if (rows < 0 || static_cast<int64_t>(data.element_count()) != nnz ||
      data.element_type() != b.element_type()) {
    return ffi::Error::InvalidArgument("csr_spmm: inconsistent data, indices and indptr");
  }
  if (auto err = CheckDense("csr_spmm", b, out, rows, nk, ta, dt, &k, &n); err.failure()) {
    return err;
  }
  Epilogue ep;
  if (auto err = GetEpilogue("csr_spmm", bias, act, ta ? k : rows, b.element_type(), &ep);
      err.failure()) {
    return err;
  }
  SpmmProblem p{};
  if (auto err = SetCsrIndices(indices, "indices", &p); err.failure()) return err;
  if (auto err = ValidateIndptr(indptr.typed_data(), rows, nnz, "csr_spmm"); err.failure()) {
    return err;
  }
  p.fmt = kCsr;
  p.dt = dt;
  p.data = data.untyped_data();
  p.indptr = indptr.typed_data();
  p.bm = p.bk = 1;
  if (ta && t_perm.element_count() > 0) {
    return PlannedTransposedCsr(pool, p, rows, k, nnz, t_perm, t_indices, t_indptr, nk, n,
                                b.untyped_data(), out->untyped_data(), ep);
  }
  const int64_t bad =
      RunOp(pool, p, rows, k, ta, nk, n, b.untyped_data(), out->untyped_data(), k, ep);
  if (bad >= 0) {
    return p.indices != nullptr ? IndexError("csr_spmm", "indices", p.indices, bad, k)
                                : IndexError("csr_spmm", "indices", p.indices16, bad, k);
  }
  return ffi::Error::Success();
}

ffi::Error BsrSpmm(ffi::ThreadPool pool, ffi::AnyBuffer data, ffi::Buffer<ffi::S32> indices,
                   ffi::Buffer<ffi::S32> indptr, ffi::AnyBuffer b, ffi::AnyBuffer bias,
                   ffi::Result<ffi::AnyBuffer> out, bool nk, bool ta, int64_t act) {
  const auto dd = data.dimensions();
  const int64_t brows = static_cast<int64_t>(indptr.element_count()) - 1;
  const int64_t nblocks = indices.element_count();
  if (dd.size() != 3 || dd[0] != nblocks || dd[1] < 1 || dd[2] < 1 || brows < 0 ||
      data.element_type() != b.element_type()) {
    return ffi::Error::InvalidArgument(
        "bsr_spmm: data must be [nblocks, bm, bk] with nblocks = len(indices), bm, bk >= 1");
  }
  const int64_t bm = dd[1], bk = dd[2];
  const int dt = DtOf(data.element_type());
  int64_t k, n;
  if (auto err = CheckDense("bsr_spmm", b, out, brows * bm, nk, ta, dt, &k, &n);
      err.failure()) {
    return err;
  }
  Epilogue ep;
  if (auto err = GetEpilogue("bsr_spmm", bias, act, ta ? k : brows * bm, b.element_type(), &ep);
      err.failure()) {
    return err;
  }
  if (k % bk != 0) {
    return ffi::Error::InvalidArgument("bsr_spmm: block width bk=" + std::to_string(bk) +
                                       " does not divide K=" + std::to_string(k));
  }
  if (auto err = ValidateIndptr(indptr.typed_data(), brows, nblocks, "bsr_spmm"); err.failure()) {
    return err;
  }
  SpmmProblem p{};
  p.fmt = kBsr;
  p.dt = dt;
  p.data = data.untyped_data();
  p.indices = indices.typed_data();
  p.indptr = indptr.typed_data();
  p.bm = bm;
  p.bk = bk;
  const int64_t bad = RunOp(pool, p, brows, k / bk, ta, nk, n, b.untyped_data(),
                            out->untyped_data(), k / bk, ep);
  if (bad >= 0) return IndexError("bsr_spmm", "indices", p.indices, bad, k / bk);
  return ffi::Error::Success();
}

ffi::Error NmSpmm(ffi::ThreadPool pool, ffi::AnyBuffer values, ffi::Buffer<ffi::U8> positions,
                  ffi::AnyBuffer b, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> out,
                  int64_t nm_n, int64_t nm_m, bool nk, bool ta, int64_t act) {
  const auto vd = values.dimensions();
  const auto pd = positions.dimensions();
  if (vd.size() != 2 || pd.size() != 2 || vd[0] != pd[0] || vd[1] != pd[1] ||
      values.element_type() != b.element_type()) {
    return ffi::Error::InvalidArgument("nm_spmm: values and positions must be [M, slots]");
  }
  const int64_t rows = vd[0], slots = vd[1];
  const int dt = DtOf(values.element_type());
  int64_t k, n;
  if (auto err = CheckDense("nm_spmm", b, out, rows, nk, ta, dt, &k, &n); err.failure()) {
    return err;
  }
  Epilogue ep;
  if (auto err = GetEpilogue("nm_spmm", bias, act, ta ? k : rows, b.element_type(), &ep);
      err.failure()) {
    return err;
  }
  if (rows * slots > INT32_MAX) {  // A.T is CSR, whose offsets are int32
    return ffi::Error::InvalidArgument("nm_spmm: more than 2^31 - 1 stored values");
  }
  if (auto err = CheckNm("nm_spmm", nm_n, nm_m, k, slots, "K"); err.failure()) return err;
  const uint8_t* pos = positions.typed_data();
  std::vector<int32_t> group_base(slots);
  for (int64_t s = 0; s < slots; ++s) group_base[s] = static_cast<int32_t>(s / nm_n * nm_m);
  SpmmProblem p{};
  p.fmt = kNm;
  p.dt = dt;
  p.data = values.untyped_data();
  p.positions = pos;
  p.group_base = group_base.data();
  p.slots = slots;
  p.bm = p.bk = 1;
  const int64_t e =
      RunOp(pool, p, rows, k, ta, nk, n, b.untyped_data(), out->untyped_data(), nm_m, ep);
  if (e >= 0) return PositionError("nm_spmm", pos, e, slots, nm_m);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kCsrSpmm, CsrSpmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // data [nnz]
                                  .Arg<ffi::AnyBuffer>()         // indices [nnz] int32 / uint16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [M + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // t_perm [nnz] or [0]
                                  .Arg<ffi::AnyBuffer>()         // t_indices [nnz] or [0]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // t_indptr [K + 1] or [0]
                                  .Arg<ffi::AnyBuffer>()         // b: kn [K, N], nk [N, K]
                                  .Arg<ffi::AnyBuffer>()         // bias [M] or [0] (none)
                                  .Ret<ffi::AnyBuffer>()         // out: kn [M, N], nk [N, M]
                                  .Attr<bool>("nk")
                                  .Attr<bool>("ta")              // op(A) = A.T
                                  .Attr<int64_t>("act"));        // Act (isa.h)

XLA_FFI_DEFINE_HANDLER_SYMBOL(kBsrSpmm, BsrSpmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // data [nblocks, bm, bk]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [nblocks]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [M / bm + 1]
                                  .Arg<ffi::AnyBuffer>()         // b
                                  .Arg<ffi::AnyBuffer>()         // bias [M] or [0]
                                  .Ret<ffi::AnyBuffer>()         // out
                                  .Attr<bool>("nk")
                                  .Attr<bool>("ta")              // op(A) = A.T
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kNmSpmm, NmSpmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // values [M, K / m * n]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // positions [M, K / m * n]
                                  .Arg<ffi::AnyBuffer>()         // b
                                  .Arg<ffi::AnyBuffer>()         // bias [M] or [0]
                                  .Ret<ffi::AnyBuffer>()         // out
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("m")
                                  .Attr<bool>("nk")
                                  .Attr<bool>("ta")              // op(A) = A.T
                                  .Attr<int64_t>("act"));

}  // namespace jaxsparse
