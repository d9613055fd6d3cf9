// SDDMM: out[p] = dot(lhs[row(p), :], rhs[indices[p], :]) for every stored entry p of a CSR
// pattern [M, N]; lhs is [M, K] and rhs is [N, K], both row-major, so each dot is contiguous.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace jaxsparse {
namespace {

template <typename T>
void CsrSddmmRows(const T* lhs, const T* rhs, const int32_t* indices, const int32_t* indptr,
                  T* out, int64_t k, int64_t row_begin, int64_t row_end) {
  using A = typename Acc<T>::type;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* lrow = lhs + i * k;
    for (int32_t p = indptr[i]; p < indptr[i + 1]; ++p) {
      const T* rrow = rhs + static_cast<int64_t>(indices[p]) * k;
      A acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += A(ToFloat(lrow[j])) * A(ToFloat(rrow[j]));
      out[p] = FromFloat(acc, T{});
    }
  }
}

ffi::Error CsrSddmm(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                    ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> indptr,
                    ffi::Result<ffi::AnyBuffer> out) {
  const auto l_dims = lhs.dimensions();
  const auto r_dims = rhs.dimensions();
  if (l_dims.size() != 2 || r_dims.size() != 2 || l_dims[1] != r_dims[1]) {
    return ffi::Error::InvalidArgument("csr_sddmm: lhs [M, K] and rhs [N, K] expected");
  }
  const int64_t rows = indptr.element_count() - 1;
  const int64_t nnz = indices.element_count();
  if (rows != l_dims[0] || static_cast<int64_t>(out->element_count()) != nnz) {
    return ffi::Error::InvalidArgument("csr_sddmm: inconsistent operand shapes");
  }
  if (lhs.element_type() != rhs.element_type() || out->element_type() != lhs.element_type()) {
    return ffi::Error::InvalidArgument("csr_sddmm: lhs, rhs and output dtypes differ");
  }
  if (ffi::Error err = ValidateCompressed(indptr.typed_data(), rows, indices.typed_data(), nnz,
                                          r_dims[0], "csr_sddmm");
      err.failure()) {
    return err;
  }
  const int64_t k = l_dims[1];
  const int64_t max_parts = std::max<int64_t>(1, 4 * pool.num_threads());
  std::vector<int64_t> part_begin(max_parts + 1);
  const int64_t parts = BalanceRows(indptr.typed_data(), rows, max_parts, part_begin.data());
  const bool ok = DispatchFloat(lhs.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* l = static_cast<const T*>(lhs.untyped_data());
    const T* r = static_cast<const T*>(rhs.untyped_data());
    T* o = static_cast<T*>(out->untyped_data());
    ParallelFor(pool, parts, [&](int64_t part) {
      CsrSddmmRows(l, r, indices.typed_data(), indptr.typed_data(), o, k, part_begin[part],
                   part_begin[part + 1]);
    });
  });
  if (!ok) return ffi::Error::InvalidArgument("csr_sddmm: unsupported dtype");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kCsrSddmm, CsrSddmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // lhs [M, K]
                                  .Arg<ffi::AnyBuffer>()        // rhs [N, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [nnz]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [M + 1]
                                  .Ret<ffi::AnyBuffer>());      // out [nnz]

}  // namespace jaxsparse
