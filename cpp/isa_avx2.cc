// The kernels of isa_kernels.inc built for avx2 (see CMakeLists.txt for the compiler flags).
#define JS_NS isa_avx2
#if defined(__AVX2__) && defined(__FMA__)
#define JS_LEVEL 256
#else  // not x86-64 (CMakeLists.txt gives no flags): a portable copy that is never selected
#define JS_LEVEL 0
#endif
#include "isa_kernels.inc"

namespace jaxsparse {

const IsaKernels& KernelsAvx2() {
  static const IsaKernels k{"avx2", isa_avx2::SpmmRows, isa_avx2::SpmvRows, isa_avx2::SddmmRows,
                            isa_avx2::SellRows, isa_avx2::SellFirstBadGroup,
                            isa_avx2::SellBlockRowsValid, isa_avx2::Transpose, isa_avx2::Epilogue,
                            isa_avx2::RowSoftmax, isa_avx2::AttendTile};
  return k;
}

}  // namespace jaxsparse
