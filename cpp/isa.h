// Interface between the FFI handlers and the per-instruction-set kernel implementations.
//
// Every kernel exists in up to three builds of the same source (isa_kernels.inc): AVX-512
// (isa_avx512.cc, compiled with -mavx512f...), AVX2+FMA (isa_avx2.cc, -mavx2 -mfma) and a portable
// one (isa_scalar.cc, no flags). The handlers pick one at run time with __builtin_cpu_supports, so
// the extension runs on any x86-64. Only plain C types cross this boundary: the wide-ISA
// translation units include no shared inline code that the linker could merge with a portable copy.
#ifndef JAXSPARSE_ISA_H_
#define JAXSPARSE_ISA_H_

#include <cstdint>

namespace jaxsparse {

// Element types the kernels handle. The vector builds take F32 and BF16 (f32 accumulation); the
// portable build takes all four.
enum Dt : int { kF32 = 0, kBF16 = 1, kF64 = 2, kF16 = 3 };
enum Fmt : int { kCsr = 0, kBsr = 1, kNm = 2 };
// The activation an SpMM may apply to its output (after the bias), as jax.nn computes them:
// relu, gelu (exact, erf), gelu_tanh (jax.nn.gelu's default tanh approximation), silu.
enum Act : int { kActNone = 0, kActRelu = 1, kActGelu = 2, kActGeluTanh = 3, kActSilu = 4 };

// A sparse matrix A [M, K] (stored, not transposed) times a dense B [K, N] (row stride ldb).
// Rows are block rows for BSR.
struct SpmmProblem {
  int fmt;
  int dt;
  const void* data;              // csr [nnz], bsr [nblocks, bm, bk], nm [M, slots]
  const int32_t* indices;        // csr / bsr
  const uint16_t* indices16;     // csr packed by jaxsparse.pack (then indices is null)
  const int32_t* indptr;         // csr / bsr
  const uint8_t* positions;      // nm [M, slots]
  const int32_t* group_base;     // nm [slots]: first column of each slot's group (s / n * m)
  int64_t slots;                 // nm: stored values per row
  int64_t bm, bk;                // bsr block size (1, 1 otherwise)
  const void* b;                 // [K, N]
  int64_t ldb;
  bool b_f32;                    // b holds float32 (a widened copy of a half-type operand)
  int64_t k, n;                  // columns of A (rows of B), columns of B
  bool l1_blocks;                // float32 rows dense enough for K-blocks in L1 (see below)
};

// SDDMM on a CSR or BSR pattern [M, N]: out[p] = dot(lhs[row(p)], rhs[col(p)]) with lhs [M, K]
// and rhs [N, K] row-major (row strides ldl, ldr).
struct SddmmProblem {
  int fmt;
  int dt;
  const void* lhs;
  int64_t ldl;
  const void* rhs;
  int64_t ldr;
  const int32_t* indices;
  const int32_t* indptr;
  int64_t bm, bn;
  int64_t k;
  void* out;
};

// A product y = A x of a few vectors x (N <= kSellMaxN in one pass) on the sliced layout that
// jaxsparse.pack builds for float32 CSR matrices (see _pack.py): rows in slices of kSellLanes;
// within a slice, the columns in windows of kSellWindow; for each (slice, window) group holding
// entries, `slots` vectors of kSellLanes (value, column-in-window) pairs, lane j belonging to row
// rows[16 s + j]: pack orders the rows so that each slice's rows need few slots, within blocks of
// kSellBlock slices (block b's lanes hold rows [16 kSellBlock b, 16 kSellBlock (b + 1)), so a
// thread computing whole blocks writes rows of y no other thread writes). A slot needs no gather:
// its 16 columns index the window of x held in four registers: 63 columns of x and a zero, which
// padding lanes (value 0, column kSellPad) read, so that a NaN or Inf in x never meets a padded 0
// (only stored entries multiply, as in the other kernels). The columns of a slot are read once
// for every vector of the pass.
constexpr int64_t kSellLanes = 16;
constexpr int64_t kSellWindow = 63;   // columns of A per window
constexpr int64_t kSellStride = 64;   // floats per window of the padded x
constexpr uint8_t kSellPad = 63;      // the column of padding lanes: the zero after each window
constexpr int64_t kSellMaxN = 4;      // vectors per pass (four registers of x each)
constexpr int64_t kSellBlock = 8;     // slices per block of reordered rows (128 rows)
struct SellProblem {
  const float* values;         // [slots * 16]
  const uint8_t* columns;      // [slots * 16], each < 63, or kSellPad
  const int32_t* group_window; // [groups]: window of x of each group
  const int32_t* group_ptr;    // [groups + 1]: first slot of each group
  const int32_t* slice_ptr;    // [slices + 1]: first group of each slice
  const int32_t* rows;         // [m]: the row of A in lane j of slice s is rows[16 s + j]
  const float* x;              // vector j: x + j * x_stride, [windows * 64]: window w is
                               // x[63 w, 63 w + 63), zeros after
  int64_t x_stride;
  float* y;                    // y[i, j] (row i of A, vector j) at y[i * y_row + j * y_vec]
  int64_t y_row, y_vec;
  int64_t m;
  int64_t n;                   // vectors in this pass, 1 to kSellMaxN
};

// spmm_rows visits the entries of a float32 product (B float32, not BSR) in K-blocks, up to
// kBlockedRows rows at a time (see StripRows), when a [K, W] strip of B would exceed kStripBytes
// by half (for the widest strips, 8 AVX-512 vectors of float32, that is K > kBlockedK), or, with
// p.l1_blocks (the caller's decision: rows holding at least kL1BlockMin entries per kL1BlockK
// columns on average), in blocks of kL1BlockK columns whose rows of B stay in L1, for products of
// at least kL1BlockN columns. A caller that splits its rows should then pass as many rows per
// call as it can, up to kBlockedRows.
constexpr int64_t kStripBytes = 384 << 10;
constexpr int64_t kBlockedRows = 256;
constexpr int64_t kBlockedK = kStripBytes / (128 * 4) * 3 / 2;
constexpr int64_t kL1BlockK = 64;
constexpr int64_t kL1BlockMin = 12;
constexpr int64_t kL1BlockN = 128;

// One tile of fused block-sparse attention (attention.cc): `rows` query rows of one (batch,
// head) against the tile's `nk` keys, which the caller has gathered into compact copies.
// out[i, :dv] = sum_t p[i, t] v[t, :dv], p = softmax over t of scale * q[i] . k[t] + kbias[t].
struct AttentionTile {
  const float* q;      // query row i at q + i * ldq (d floats)
  int64_t ldq;
  const float* kt;     // the keys transposed: key t's element e at kt[e * ldk + t], t < nk_pad
  int64_t ldk;         // >= nk_pad; columns [nk, nk_pad) hold zeros
  const float* v;      // value t at v + v_at[t]: dv floats, readable (and finite) up to dv_pad
  const int64_t* v_at;
  const float* kbias;  // [nk_pad]: 0 for a key to attend to, -inf for a masked or padding key
  float* scores;       // scratch [rows, ldk]
  float* inv_sum;      // scratch [rows]
  float* out;          // output row i at out + i * ldo (dv floats)
  int64_t ldo;
  int64_t rows, d, dv, nk, nk_pad, dv_pad;  // nk_pad, dv_pad: multiples of kAttnPad
  float scale;
};
// Keys and value columns of an AttentionTile are padded to multiples of this (one AVX-512
// vector; a whole number of vectors in every build).
constexpr int64_t kAttnPad = 16;
// Query rows per AttentionTile: scores [kAttnRows, nk] stay in L1 / L2.
constexpr int64_t kAttnRows = 32;

struct IsaKernels {
  const char* name;
  // Rows [r0, r1) of A @ B into c (row stride ldc, element type p.dt).
  void (*spmm_rows)(const SpmmProblem& p, int64_t r0, int64_t r1, void* c, int64_t ldc);
  // N = 1: y[r] = A[r, :] . x for rows [r0, r1); x is float32 [K], y has type p.dt.
  void (*spmv_rows)(const SpmmProblem& p, const float* x, int64_t r0, int64_t r1, void* y);
  void (*sddmm_rows)(const SddmmProblem& p, int64_t r0, int64_t r1);
  // y for the rows of slices [s0, s1) of a sliced product (all p.n vectors). Reads x only within
  // each group's window, whatever the columns hold; returns the OR of all the columns it read,
  // so the caller can tell (>= 64) that one was out of range.
  uint8_t (*sell_rows)(const SellProblem& p, int64_t s0, int64_t s1);
  // The checks sell_rows needs first: the first group of [g0, g1) whose window is past x (K
  // columns), or, in a last window narrower than kSellWindow, holds a column past K that is not
  // the padding column (-1 if none); and whether the lanes of block b (slices [kSellBlock b,
  // kSellBlock (b + 1))) hold each of its rows once (so sell_rows writes them all, and only them).
  int64_t (*sell_first_bad_group)(const SellProblem& p, int64_t g0, int64_t g1, int64_t k);
  bool (*sell_block_rows_valid)(const SellProblem& p, int64_t b);
  // dst[j, i] = src[i, j] for i < rows, j < cols (element type dt). With `stream`, whole 64-byte
  // aligned float32 row segments of dst are written with non-temporal stores (ordered by an
  // sfence before returning).
  void (*transpose)(int dt, const void* src, int64_t rows, int64_t cols, int64_t lds, void* dst,
                    int64_t ldd, bool stream);
  // c[i, j] = act(c[i, j] + bias[i]) (bias_per_row) or act(c[i, j] + bias[j]) for i < rows,
  // j < cols (row stride ldc, element type dt; bias of the same type, or null for none).
  void (*epilogue)(int dt, void* c, int64_t rows, int64_t cols, int64_t ldc, const void* bias,
                   bool bias_per_row, int act);
  // The softmax over the stored entries of each of rows [r0, r1) of a CSR matrix: y[e] for the
  // entries e of the rows, from x[e] (indptr already validated by the caller); float32, and
  // float64 in the portable build.
  void (*row_softmax)(int dt, const void* x, void* y, const int32_t* indptr, int64_t r0,
                      int64_t r1);
  // One tile of fused attention (AttentionTile), float32.
  void (*attention_tile)(const AttentionTile& t);
};

const IsaKernels& KernelsScalar();
const IsaKernels& KernelsAvx2();
const IsaKernels& KernelsAvx512();

// The kernels in force for this call: the widest the CPU supports, or the one forced by
// SetIsa (tests) / $JAXSPARSE_ISA. `dt` outside the vector builds always gets the portable one.
const IsaKernels& SelectKernels(int dt);
// "auto", "avx512", "avx2" or "scalar"; returns false for an unknown or unsupported name.
bool SetIsa(const char* name);
const char* IsaName();          // the ISA float32 kernels use now
bool IsaSupported(const char* name);
// Whether the CSR matrix-vector kernels load the entries of x one by one (four chains of scalar
// multiply-adds) instead of with 16- or 8-lane vector gathers, which are slow on AMD CPUs: on the
// development machine (Zen 4) a 16-lane gather costs ~16 ns; scalar loads made the CSR product
// 1.03-1.36x faster with 16- and 32-bit indices (3072x768, 768x3072 and 768x768 at 50-98%,
// N = 1, interleaved in one process). On Intel CPUs, whose gathers are fast, not measured: they
// keep the gathers. "auto" (scalar on AMD, gathers elsewhere), "vector" or "scalar"; SetGather
// returns false for an unknown name.
// The builds without vector gathers for an index type (AVX2 with 16-bit indices, the portable
// build) always load one by one.
bool ScalarGather();
bool SetGather(const char* name);
const char* GatherName();
// Caps the threads a kernel uses (0: all of XLA's intra-op pool).
void SetMaxThreads(int64_t n);
int64_t MaxThreads();

}  // namespace jaxsparse

#endif  // JAXSPARSE_ISA_H_
