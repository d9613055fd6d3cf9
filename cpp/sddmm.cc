// SDDMM: out[p] = dot(lhs[row(p), :], rhs[col(p), :]) for every stored entry p of a CSR pattern
// [M, N], or every entry of every block of a BSR pattern; lhs is [M, K] and rhs is [N, K], both
// row-major, so each dot is contiguous. The AVX-512 build computes 16 dots at a time and reduces
// them with one transposing shuffle tree (see Dots16 in isa_kernels.inc).
#include <algorithm>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace jaxsparse {
namespace {

ffi::Error CheckOperands(const char* what, ffi::AnyBuffer& lhs, ffi::AnyBuffer& rhs,
                         ffi::Result<ffi::AnyBuffer>& out, int64_t m, int64_t n_cols_mult,
                         int* dt) {
  const auto l = lhs.dimensions();
  const auto r = rhs.dimensions();
  if (l.size() != 2 || r.size() != 2 || l[1] != r[1] || l[0] != m || r[0] % n_cols_mult != 0) {
    return ffi::Error::InvalidArgument(std::string(what) + ": lhs [M, K] and rhs [N, K] expected");
  }
  *dt = DtOf(lhs.element_type());
  if (*dt < 0 || lhs.element_type() != rhs.element_type() ||
      out->element_type() != lhs.element_type()) {
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": unsupported dtype, or lhs, rhs and output dtypes differ");
  }
  return ffi::Error::Success();
}

void Run(ffi::ThreadPool& pool, const SddmmProblem& p, const int32_t* indptr, int64_t rows) {
  if (rows == 0) return;
  const IsaKernels& kern = SelectKernels(p.dt);
  const int64_t threads = NumThreads(pool);
  const int64_t max_parts = threads <= 1 ? 1 : 8 * threads;
  std::vector<int64_t> part_begin(max_parts + 1);
  const int64_t parts = BalanceRows(indptr, rows, max_parts, part_begin.data());
  ParallelFor(pool, parts, [&](int64_t q) {
    kern.sddmm_rows(p, part_begin[q], part_begin[q + 1]);
  });
}

ffi::Error CsrSddmm(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                    ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> indptr,
                    ffi::Result<ffi::AnyBuffer> out) {
  const int64_t rows = static_cast<int64_t>(indptr.element_count()) - 1;
  const int64_t nnz = indices.element_count();
  int dt;
  if (rows < 0 || static_cast<int64_t>(out->element_count()) != nnz) {
    return ffi::Error::InvalidArgument("csr_sddmm: inconsistent operand shapes");
  }
  if (auto err = CheckOperands("csr_sddmm", lhs, rhs, out, rows, 1, &dt); err.failure()) return err;
  const auto r = rhs.dimensions();
  if (auto err = ValidateCompressed(indptr.typed_data(), rows, indices.typed_data(), nnz, r[0],
                                    "csr_sddmm");
      err.failure()) {
    return err;
  }
  SddmmProblem p{kCsr, dt, lhs.untyped_data(), r[1], rhs.untyped_data(), r[1],
                 indices.typed_data(), indptr.typed_data(), 1, 1, r[1], out->untyped_data()};
  Run(pool, p, indptr.typed_data(), rows);
  return ffi::Error::Success();
}

ffi::Error BsrSddmm(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                    ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> indptr,
                    ffi::Result<ffi::AnyBuffer> out) {
  const int64_t brows = static_cast<int64_t>(indptr.element_count()) - 1;
  const int64_t nblocks = indices.element_count();
  const auto od = out->dimensions();
  if (brows < 0 || od.size() != 3 || od[0] != nblocks || od[1] < 1 || od[2] < 1) {
    return ffi::Error::InvalidArgument("bsr_sddmm: out must be [nblocks, bm, bn]");
  }
  const int64_t bm = od[1], bn = od[2];
  int dt;
  if (auto err = CheckOperands("bsr_sddmm", lhs, rhs, out, brows * bm, bn, &dt); err.failure()) {
    return err;
  }
  const auto r = rhs.dimensions();
  if (auto err = ValidateCompressed(indptr.typed_data(), brows, indices.typed_data(), nblocks,
                                    r[0] / bn, "bsr_sddmm");
      err.failure()) {
    return err;
  }
  SddmmProblem p{kBsr, dt, lhs.untyped_data(), r[1], rhs.untyped_data(), r[1],
                 indices.typed_data(), indptr.typed_data(), bm, bn, r[1], out->untyped_data()};
  Run(pool, p, indptr.typed_data(), brows);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kCsrSddmm, CsrSddmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // lhs [M, K]
                                  .Arg<ffi::AnyBuffer>()         // rhs [N, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [nnz]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [M + 1]
                                  .Ret<ffi::AnyBuffer>());       // out [nnz]

XLA_FFI_DEFINE_HANDLER_SYMBOL(kBsrSddmm, BsrSddmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // lhs [M, K]
                                  .Arg<ffi::AnyBuffer>()         // rhs [N, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [nblocks]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [M / bm + 1]
                                  .Ret<ffi::AnyBuffer>());       // out [nblocks, bm, bn]

}  // namespace jaxsparse
