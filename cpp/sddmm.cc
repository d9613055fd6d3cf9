// SDDMM: out[p] = dot(lhs[row(p), :], rhs[col(p), :]) for every stored entry p of a CSR pattern
// [M, N], every entry of every block of a BSR pattern, or every slot of an N:M pattern. The
// kernels read lhs as [M, K] and rhs as [N, K], row-major, so each dot is contiguous; an operand
// given the other way round (attribute lhs_km / rhs_kn: lhs [K, M], rhs [K, N], as in a @ b) is
// transposed here into an aligned scratch copy, several times faster than the transpose XLA would
// otherwise run before the call. The AVX-512 build computes 16 dots at a time and reduces them
// with one transposing shuffle tree (see Dots16 in isa_kernels.inc).
#include <algorithm>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace jaxsparse {
namespace {

// An operand as the kernels read it: rows of K elements, ld apart.
struct Operand {
  const void* data;
  int64_t k, ld;
};

// The dimensions of a 2-D operand, [rows, K] or (transposed) [K, rows].
bool Dims(ffi::AnyBuffer& x, bool transposed, int64_t* rows, int64_t* k) {
  const auto d = x.dimensions();
  if (d.size() != 2) return false;
  *rows = transposed ? d[1] : d[0];
  *k = transposed ? d[0] : d[1];
  return true;
}

// [rows, K] row-major: the buffer itself, or a transposed copy of a [K, rows] buffer in scratch
// (rows padded to a whole cache line).
Operand Rows(ffi::AnyBuffer& x, bool transposed, int dt, Scratch* scratch) {
  int64_t rows, k;
  Dims(x, transposed, &rows, &k);
  if (!transposed) return Operand{x.untyped_data(), k, k};
  const int64_t esz = DtSize(dt);
  const int64_t ld = (k * esz + 63) / 64 * 64 / esz;
  *scratch = AlignedScratch(rows * ld * esz);
  SelectKernels(dt).transpose(dt, x.untyped_data(), k, rows, rows, scratch->get(), ld, false);
  return Operand{scratch->get(), k, ld};
}

ffi::Error CheckOperands(const char* what, ffi::AnyBuffer& lhs, bool lhs_km, ffi::AnyBuffer& rhs,
                         bool rhs_kn, ffi::Result<ffi::AnyBuffer>& out, int64_t m,
                         int64_t n_cols_mult, int* dt) {
  int64_t lm, lk, rn, rk;
  if (!Dims(lhs, lhs_km, &lm, &lk) || !Dims(rhs, rhs_kn, &rn, &rk) || lk != rk || lm != m ||
      rn % n_cols_mult != 0) {
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": lhs [M, K] and rhs [N, K] (or transposed) expected");
  }
  *dt = DtOf(lhs.element_type());
  if (*dt < 0 || lhs.element_type() != rhs.element_type() ||
      out->element_type() != lhs.element_type()) {
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": unsupported dtype, or lhs, rhs and output dtypes differ");
  }
  return ffi::Error::Success();
}

// The SDDMM, or nothing and the first pattern entry whose column (block column) is not below
// `limit`; -1 when none is. As in RunSpmm (spmm.cc), each part's indices are checked by the
// thread that computes the part, right before it does.
int64_t Run(ffi::ThreadPool& pool, SddmmProblem p, ffi::AnyBuffer& lhs, bool lhs_km,
            ffi::AnyBuffer& rhs, bool rhs_kn, const int32_t* indptr, int64_t rows, int64_t limit) {
  if (rows == 0) return -1;
  Scratch lt(nullptr, std::free), rt(nullptr, std::free);
  const Operand l = Rows(lhs, lhs_km, p.dt, &lt), r = Rows(rhs, rhs_kn, p.dt, &rt);
  p.lhs = l.data;
  p.ldl = l.ld;
  p.rhs = r.data;
  p.ldr = r.ld;
  p.k = l.k;
  const IsaKernels& kern = SelectKernels(p.dt);
  const int64_t threads = NumThreads(pool);
  const std::vector<int64_t> part_begin = Partition(indptr, rows, threads, 1, 8);
  const int64_t parts = static_cast<int64_t>(part_begin.size()) - 1;
  FirstBad first_bad;
  ParallelFor(pool, parts, [&](int64_t q) {
    const int64_t r0 = part_begin[q], r1 = part_begin[q + 1];
    const int64_t e = FirstOutOfRange(p.indices, indptr[r0], indptr[r1], limit);
    if (e < 0) {
      kern.sddmm_rows(p, r0, r1);
    } else {
      first_bad.Report(e);
    }
  });
  return first_bad.Get();
}

ffi::Error CsrSddmm(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                    ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> indptr,
                    ffi::Result<ffi::AnyBuffer> out, bool lhs_km, bool rhs_kn) {
  const int64_t rows = static_cast<int64_t>(indptr.element_count()) - 1;
  const int64_t nnz = indices.element_count();
  int dt;
  if (rows < 0 || static_cast<int64_t>(out->element_count()) != nnz) {
    return ffi::Error::InvalidArgument("csr_sddmm: inconsistent operand shapes");
  }
  if (auto err = CheckOperands("csr_sddmm", lhs, lhs_km, rhs, rhs_kn, out, rows, 1, &dt);
      err.failure()) {
    return err;
  }
  int64_t n, k;
  Dims(rhs, rhs_kn, &n, &k);
  if (auto err = ValidateIndptr(indptr.typed_data(), rows, nnz, "csr_sddmm"); err.failure()) {
    return err;
  }
  SddmmProblem p{kCsr, dt, nullptr, 0, nullptr, 0, indices.typed_data(), indptr.typed_data(),
                 1, 1, k, out->untyped_data()};
  const int64_t bad = Run(pool, p, lhs, lhs_km, rhs, rhs_kn, indptr.typed_data(), rows, n);
  if (bad >= 0) return IndexError("csr_sddmm", "indices", indices.typed_data(), bad, n);
  return ffi::Error::Success();
}

ffi::Error BsrSddmm(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                    ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> indptr,
                    ffi::Result<ffi::AnyBuffer> out, bool lhs_km, bool rhs_kn) {
  const int64_t brows = static_cast<int64_t>(indptr.element_count()) - 1;
  const int64_t nblocks = indices.element_count();
  const auto od = out->dimensions();
  if (brows < 0 || od.size() != 3 || od[0] != nblocks || od[1] < 1 || od[2] < 1) {
    return ffi::Error::InvalidArgument("bsr_sddmm: out must be [nblocks, bm, bn]");
  }
  const int64_t bm = od[1], bn = od[2];
  int dt;
  if (auto err = CheckOperands("bsr_sddmm", lhs, lhs_km, rhs, rhs_kn, out, brows * bm, bn, &dt);
      err.failure()) {
    return err;
  }
  int64_t n, k;
  Dims(rhs, rhs_kn, &n, &k);
  if (auto err = ValidateIndptr(indptr.typed_data(), brows, nblocks, "bsr_sddmm"); err.failure()) {
    return err;
  }
  SddmmProblem p{kBsr, dt, nullptr, 0, nullptr, 0, indices.typed_data(), indptr.typed_data(),
                 bm, bn, k, out->untyped_data()};
  const int64_t bad = Run(pool, p, lhs, lhs_km, rhs, rhs_kn, indptr.typed_data(), brows, n / bn);
  if (bad >= 0) return IndexError("bsr_sddmm", "indices", indices.typed_data(), bad, n / bn);
  return ffi::Error::Success();
}

// An N:M pattern [M, N]: row i keeps slots = N / m * n entries, slot s at column
// s / n * m + positions[i, s]; out [M, slots] in the same order. The positions are checked, then
// turned into CSR column indices (4 bytes per entry, small next to the dots) for the CSR kernel.
ffi::Error NmSddmm(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                   ffi::Buffer<ffi::U8> positions, ffi::Result<ffi::AnyBuffer> out, int64_t nm_n,
                   int64_t nm_m, bool lhs_km, bool rhs_kn) {
  const auto pd = positions.dimensions();
  const auto od = out->dimensions();
  if (pd.size() != 2 || od.size() != 2 || od[0] != pd[0] || od[1] != pd[1]) {
    return ffi::Error::InvalidArgument("nm_sddmm: positions and out must be [M, slots]");
  }
  const int64_t rows = pd[0], slots = pd[1];
  int dt;
  if (auto err = CheckOperands("nm_sddmm", lhs, lhs_km, rhs, rhs_kn, out, rows, 1, &dt);
      err.failure()) {
    return err;
  }
  int64_t n, k;
  Dims(rhs, rhs_kn, &n, &k);
  if (auto err = CheckNm("nm_sddmm", nm_n, nm_m, n, slots, "N"); err.failure()) return err;
  if (rows * slots > INT32_MAX) {
    return ffi::Error::InvalidArgument("nm_sddmm: more than 2^31 - 1 pattern entries");
  }
  const uint8_t* pos = positions.typed_data();
  const int64_t e = FirstOutOfRange(pos, 0, rows * slots, nm_m);
  if (e >= 0) return PositionError("nm_sddmm", pos, e, slots, nm_m);
  std::vector<int32_t> indices(rows * slots), indptr(rows + 1);
  for (int64_t i = 0; i <= rows; ++i) indptr[i] = static_cast<int32_t>(i * slots);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t s = 0; s < slots; ++s) {
      indices[i * slots + s] = static_cast<int32_t>(s / nm_n * nm_m + pos[i * slots + s]);
    }
  }
  SddmmProblem p{kCsr, dt, nullptr, 0, nullptr, 0, indices.data(), indptr.data(), 1, 1, k,
                 out->untyped_data()};
  Run(pool, p, lhs, lhs_km, rhs, rhs_kn, indptr.data(), rows, n);  // columns < N by construction
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kCsrSddmm, CsrSddmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // lhs [M, K] or [K, M]
                                  .Arg<ffi::AnyBuffer>()         // rhs [N, K] or [K, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [nnz]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [M + 1]
                                  .Ret<ffi::AnyBuffer>()         // out [nnz]
                                  .Attr<bool>("lhs_km")
                                  .Attr<bool>("rhs_kn"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kBsrSddmm, BsrSddmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // lhs [M, K] or [K, M]
                                  .Arg<ffi::AnyBuffer>()         // rhs [N, K] or [K, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [nblocks]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [M / bm + 1]
                                  .Ret<ffi::AnyBuffer>()         // out [nblocks, bm, bn]
                                  .Attr<bool>("lhs_km")
                                  .Attr<bool>("rhs_kn"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kNmSddmm, NmSddmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // lhs [M, K] or [K, M]
                                  .Arg<ffi::AnyBuffer>()         // rhs [N, K] or [K, N]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // positions [M, N / m * n]
                                  .Ret<ffi::AnyBuffer>()         // out [M, N / m * n]
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("m")
                                  .Attr<bool>("lhs_km")
                                  .Attr<bool>("rhs_kn"));

}  // namespace jaxsparse
