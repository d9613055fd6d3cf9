// SpMM: out[M, N] = A[M, K] @ B[K, N] with A in CSR.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace jaxsparse {
namespace {

template <typename T>
void CsrSpmmRows(const T* data, const int32_t* indices, const int32_t* indptr, const T* b,
                 T* out, int64_t n, int64_t row_begin, int64_t row_end) {
  using A = typename Acc<T>::type;
  std::vector<A> acc(n);
  for (int64_t i = row_begin; i < row_end; ++i) {
    std::fill(acc.begin(), acc.end(), A(0));
    for (int32_t p = indptr[i]; p < indptr[i + 1]; ++p) {
      const A v = ToFloat(data[p]);
      const T* brow = b + static_cast<int64_t>(indices[p]) * n;
      for (int64_t j = 0; j < n; ++j) acc[j] += v * ToFloat(brow[j]);
    }
    T* orow = out + i * n;
    for (int64_t j = 0; j < n; ++j) orow[j] = FromFloat(acc[j], T{});
  }
}

ffi::Error CsrSpmm(ffi::ThreadPool pool, ffi::AnyBuffer data, ffi::Buffer<ffi::S32> indices,
                   ffi::Buffer<ffi::S32> indptr, ffi::AnyBuffer b,
                   ffi::Result<ffi::AnyBuffer> out) {
  const auto b_dims = b.dimensions();
  const auto out_dims = out->dimensions();
  if (b_dims.size() != 2 || out_dims.size() != 2) {
    return ffi::Error::InvalidArgument("csr_spmm: dense operand and output must be 2-D");
  }
  const int64_t rows = indptr.element_count() - 1;
  const int64_t k = b_dims[0], n = b_dims[1];
  const int64_t nnz = indices.element_count();
  if (rows < 0 || out_dims[0] != rows || out_dims[1] != n ||
      static_cast<int64_t>(data.element_count()) != nnz) {
    return ffi::Error::InvalidArgument("csr_spmm: inconsistent operand shapes");
  }
  if (data.element_type() != b.element_type() || out->element_type() != b.element_type()) {
    return ffi::Error::InvalidArgument("csr_spmm: data, dense operand and output dtypes differ");
  }
  if (ffi::Error err = ValidateCompressed(indptr.typed_data(), rows, indices.typed_data(), nnz, k,
                                          "csr_spmm");
      err.failure()) {
    return err;
  }
  const int64_t max_parts = std::max<int64_t>(1, 4 * pool.num_threads());
  std::vector<int64_t> part_begin(max_parts + 1);
  const int64_t parts = BalanceRows(indptr.typed_data(), rows, max_parts, part_begin.data());
  const bool ok = DispatchFloat(b.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* d = static_cast<const T*>(data.untyped_data());
    const T* bp = static_cast<const T*>(b.untyped_data());
    T* o = static_cast<T*>(out->untyped_data());
    ParallelFor(pool, parts, [&](int64_t part) {
      CsrSpmmRows(d, indices.typed_data(), indptr.typed_data(), bp, o, n, part_begin[part],
                  part_begin[part + 1]);
    });
  });
  if (!ok) return ffi::Error::InvalidArgument("csr_spmm: unsupported dtype");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kCsrSpmm, CsrSpmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // data [nnz]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [nnz]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [M + 1]
                                  .Arg<ffi::AnyBuffer>()        // b [K, N]
                                  .Ret<ffi::AnyBuffer>());      // out [M, N]

}  // namespace jaxsparse
