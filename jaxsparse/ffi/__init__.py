"""Native CPU kernels through XLA FFI, and the CPU lowerings of the sparse primitives.

The C++ extension ``_jaxsparse_cpu`` (built from ``cpp/`` by ``pip install``) exposes one FFI
handler per kernel. Importing this module registers them with XLA and installs CPU lowerings of
``spmm_p``/``sddmm_p`` that call them where a kernel applies, and the pure-JAX reference elsewhere.
When the extension is missing (a source checkout that was never built, say) jaxsparse still works
on the reference path; :data:`AVAILABLE` is False and :data:`UNAVAILABLE_REASON` says why.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.interpreters import mlir

from jaxsparse._sddmm import sddmm_p, sddmm_reference
from jaxsparse._spmm import spmm_p, spmm_reference

try:
    from jaxsparse.ffi import _jaxsparse_cpu
except ImportError as e:  # pragma: no cover - exercised only without a build
    _jaxsparse_cpu = None
    UNAVAILABLE_REASON = (f"the jaxsparse native CPU kernels are unavailable ({e}); using the "
                          f"pure-JAX reference. Reinstall with `pip install .` to build them.")
else:
    UNAVAILABLE_REASON = None

AVAILABLE = _jaxsparse_cpu is not None

_NATIVE_DTYPES = (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16)


def _native_dtype(dtype) -> bool:
    return any(dtype == d for d in _NATIVE_DTYPES)


# ----------------------------------------------------------------------------------------------
# Native implementations: pure-JAX wrappers around ffi_call, lowered with mlir.lower_fun.


def _csr_spmm(data, indices, indptr, b, *, shape, transpose_a, layout, **_):
    del transpose_a  # only the non-transposed product has a native kernel so far
    if layout == "nk":
        b = b.T
    out_type = jax.ShapeDtypeStruct((shape[0], b.shape[1]), data.dtype)
    out = jax.ffi.ffi_call("jaxsparse_csr_spmm", out_type)(data, indices, indptr, b)
    return out.T if layout == "nk" else out


def _csr_sddmm(lhs, rhs, indices, indptr, *, transpose_lhs, transpose_rhs, **_):
    lm = lhs.T if transpose_lhs else lhs  # [M, K]
    rn = rhs if transpose_rhs else rhs.T  # [N, K]
    out_type = jax.ShapeDtypeStruct(indices.shape, lhs.dtype)
    return jax.ffi.ffi_call("jaxsparse_csr_sddmm", out_type)(lm, rn, indices, indptr)


def _spmm_kernel(avals, params):
    """The native SpMM for these operands and parameters, or None with the reason."""
    if params["fmt"] != "csr":
        return None, f"no native {params['fmt']} SpMM kernel"
    if params["transpose_a"]:
        return None, "no native transposed-A SpMM kernel"
    if not _native_dtype(avals[0].dtype):
        return None, f"no native SpMM kernel for {avals[0].dtype}"
    return _csr_spmm, None


def _sddmm_kernel(avals, params):
    if params["fmt"] != "csr":
        return None, f"no native {params['fmt']} SDDMM kernel"
    if not _native_dtype(avals[0].dtype):
        return None, f"no native SDDMM kernel for {avals[0].dtype}"
    return _csr_sddmm, None


def _cpu_lowering(select, reference):
    def lowering(ctx, *args, **params):
        backend = params["backend"]
        fn = None
        if backend in ("auto", "ffi"):
            if not AVAILABLE:
                reason = UNAVAILABLE_REASON
            else:
                fn, reason = select(ctx.avals_in, params)
            if fn is None and backend == "ffi":
                raise NotImplementedError(f"jaxsparse backend 'ffi': {reason}")
        return mlir.lower_fun(fn or reference, multiple_results=False)(ctx, *args, **params)

    return lowering


def _register():
    if AVAILABLE:
        for name, capsule in _jaxsparse_cpu.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    else:
        warnings.warn(UNAVAILABLE_REASON, RuntimeWarning, stacklevel=3)
    mlir.register_lowering(spmm_p, _cpu_lowering(_spmm_kernel, spmm_reference), platform="cpu")
    mlir.register_lowering(sddmm_p, _cpu_lowering(_sddmm_kernel, sddmm_reference), platform="cpu")


_register()
