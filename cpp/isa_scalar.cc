// The kernels of isa_kernels.inc built for scalar (see CMakeLists.txt for the compiler flags).
#define JS_NS isa_scalar
#define JS_LEVEL 0
#include "isa_kernels.inc"

namespace jaxsparse {

const IsaKernels& KernelsScalar() {
  static const IsaKernels k{"scalar", isa_scalar::SpmmRows, isa_scalar::SpmvRows,
                            isa_scalar::SddmmRows, isa_scalar::SellRows,
                            isa_scalar::SellFirstBadGroup, isa_scalar::SellBlockRowsValid,
                            isa_scalar::Transpose, isa_scalar::Epilogue, isa_scalar::RowSoftmax,
                            isa_scalar::AttendTile};
  return k;
}

}  // namespace jaxsparse
