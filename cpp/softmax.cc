// Softmax over the stored entries of each row of a CSR matrix: the normalisation step of sparse
// attention (jaxsparse.attention: SDDMM -> this -> SpMM). XLA computes it with a segment max and
// a segment sum, scatters that run element by element on the CPU: on a local(4096, 128) pattern
// (1M entries per head) they took about twice the SDDMM and the SpMM together. The values may
// carry leading batch dimensions that share the pattern (one row of values per head).
#include <vector>

#include "common.h"
#include "kernels.h"

namespace jaxsparse {
namespace {

ffi::Error CsrRowSoftmax(ffi::ThreadPool pool, ffi::AnyBuffer values,
                         ffi::Buffer<ffi::S32> indptr, ffi::Result<ffi::AnyBuffer> out) {
  const auto vd = values.dimensions();
  const int dt = DtOf(values.element_type());
  if (vd.size() < 1 || out->dimensions().size() != vd.size() ||
      out->element_count() != values.element_count()) {
    return ffi::Error::InvalidArgument(
        "csr_row_softmax: values [..., nnz] and out of the same shape expected");
  }
  if ((dt != kF32 && dt != kF64) || out->element_type() != values.element_type()) {
    return ffi::Error::InvalidArgument(
        "csr_row_softmax: float32 or float64 values and out of the same dtype expected");
  }
  const int64_t rows = static_cast<int64_t>(indptr.element_count()) - 1;
  const int64_t nnz = vd.back();
  if (rows < 0) return ffi::Error::InvalidArgument("csr_row_softmax: indptr is empty");
  if (auto err = ValidateIndptr(indptr.typed_data(), rows, nnz, "csr_row_softmax");
      err.failure()) {
    return err;
  }
  if (nnz == 0) return ffi::Error::Success();
  const int64_t batch = static_cast<int64_t>(values.element_count()) / nnz;
  const int64_t esz = DtSize(dt);
  const IsaKernels& kern = SelectKernels(dt);
  const std::vector<int64_t> parts = Partition(indptr.typed_data(), rows, NumThreads(pool), 1, 8);
  const int64_t n_parts = static_cast<int64_t>(parts.size()) - 1;
  const char* x = static_cast<const char*>(values.untyped_data());
  char* y = static_cast<char*>(out->untyped_data());
  ParallelFor(pool, batch * n_parts, [&](int64_t t) {
    const int64_t b = t / n_parts, q = t % n_parts;
    kern.row_softmax(dt, x + b * nnz * esz, y + b * nnz * esz, indptr.typed_data(), parts[q],
                     parts[q + 1]);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kCsrRowSoftmax, CsrRowSoftmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // values [..., nnz]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [M + 1]
                                  .Ret<ffi::AnyBuffer>());       // out [..., nnz]

}  // namespace jaxsparse
