// The nanobind module: exposes the FFI handlers as capsules for jax.ffi.register_ffi_target.
#include <nanobind/nanobind.h>

#include "kernels.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule Encapsulate(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an XLA FFI handler is expected");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jaxsparse_cpu, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["jaxsparse_csr_spmm"] = Encapsulate(jaxsparse::kCsrSpmm);
    d["jaxsparse_csr_sddmm"] = Encapsulate(jaxsparse::kCsrSddmm);
    return d;
  });
}
