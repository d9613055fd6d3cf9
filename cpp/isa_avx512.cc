// The kernels of isa_kernels.inc built for avx512 (see CMakeLists.txt for the compiler flags).
#define JS_NS isa_avx512
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define JS_LEVEL 512
#else  // not x86-64 (CMakeLists.txt gives no flags): a portable copy that is never selected
#define JS_LEVEL 0
#endif
#include "isa_kernels.inc"

namespace jaxsparse {

const IsaKernels& KernelsAvx512() {
  static const IsaKernels k{"avx512", isa_avx512::SpmmRows, isa_avx512::SpmvRows,
                            isa_avx512::SddmmRows, isa_avx512::SellRows,
                            isa_avx512::SellFirstBadGroup, isa_avx512::SellBlockRowsValid,
                            isa_avx512::Transpose, isa_avx512::Epilogue, isa_avx512::RowSoftmax,
                            isa_avx512::AttendTile};
  return k;
}

}  // namespace jaxsparse
