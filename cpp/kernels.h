// FFI handler symbols exported by the jaxsparse CPU kernels.
#ifndef JAXSPARSE_KERNELS_H_
#define JAXSPARSE_KERNELS_H_

#include "xla/ffi/api/ffi.h"

namespace jaxsparse {

XLA_FFI_DECLARE_HANDLER_SYMBOL(kCsrSpmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kBsrSpmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kNmSpmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kCsrSddmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kBsrSddmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kNmSddmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kSellSpmv);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kCsrRowSoftmax);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kBsrAttention);

}  // namespace jaxsparse

#endif  // JAXSPARSE_KERNELS_H_
