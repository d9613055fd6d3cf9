// The nanobind module: exposes the FFI handlers as capsules for jax.ffi.register_ffi_target, and
// the run-time knobs of the kernels (instruction set, thread cap) for tests and benchmarks.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <stdexcept>
#include <string>

#include "isa.h"
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
    d["jaxsparse_bsr_spmm"] = Encapsulate(jaxsparse::kBsrSpmm);
    d["jaxsparse_nm_spmm"] = Encapsulate(jaxsparse::kNmSpmm);
    d["jaxsparse_csr_sddmm"] = Encapsulate(jaxsparse::kCsrSddmm);
    d["jaxsparse_bsr_sddmm"] = Encapsulate(jaxsparse::kBsrSddmm);
    d["jaxsparse_nm_sddmm"] = Encapsulate(jaxsparse::kNmSddmm);
    d["jaxsparse_sell_spmv"] = Encapsulate(jaxsparse::kSellSpmv);
    d["jaxsparse_csr_row_softmax"] = Encapsulate(jaxsparse::kCsrRowSoftmax);
    d["jaxsparse_bsr_attention"] = Encapsulate(jaxsparse::kBsrAttention);
    return d;
  });
  m.def("set_isa", [](const std::string& name) {
    if (!jaxsparse::SetIsa(name.c_str())) {
      throw std::invalid_argument("set_isa: unknown or unsupported instruction set '" + name +
                                  "' (expected 'auto', 'avx512', 'avx2' or 'scalar', supported "
                                  "by this CPU)");
    }
  });
  m.def("get_isa", []() { return std::string(jaxsparse::IsaName()); });
  m.def("isa_supported", [](const std::string& name) { return jaxsparse::IsaSupported(name.c_str()); });
  m.def("set_gather", [](const std::string& name) {
    if (!jaxsparse::SetGather(name.c_str())) {
      throw std::invalid_argument("set_gather: unknown mode '" + name +
                                  "' (expected 'auto', 'vector' or 'scalar')");
    }
  });
  m.def("get_gather", []() { return std::string(jaxsparse::GatherName()); });
  m.def("set_max_threads", [](int64_t n) { jaxsparse::SetMaxThreads(n); });
  m.def("get_max_threads", []() { return jaxsparse::MaxThreads(); });
}
