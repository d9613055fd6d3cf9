"""Native CPU kernels through XLA FFI, and the CPU lowerings of the sparse primitives.

The C++ extension ``_jaxsparse_cpu`` (built from ``cpp/`` by ``pip install``) exposes one FFI
handler per kernel. Importing this module registers them with XLA and installs CPU lowerings of
``spmm_p``/``spmm_fused_p``/``sddmm_p`` (and attention's ``row_softmax_p`` and
``block_attention_p``) that call them where a kernel applies, and the pure-JAX reference elsewhere. When the extension is missing (a source
checkout that was never built, say) jaxsparse still works on the reference path;
:data:`AVAILABLE` is False and :data:`UNAVAILABLE_REASON` says why.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import mlir

from jaxsparse._block_attention import block_attention_p, block_attention_reference
from jaxsparse._pack import _via_csr, sell_spmv_p
from jaxsparse._sddmm import sddmm_p, sddmm_reference
from jaxsparse._softmax import row_softmax_p, row_softmax_reference
from jaxsparse._spmm import (spmm_fused_p, spmm_fused_reference, spmm_p, spmm_reference,
                             split_plan)

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
# Run-time knobs of the kernels (tests and benchmarks).

ISAS = ("auto", "avx512", "avx2", "scalar")


def set_isa(name: str) -> None:
    """Force the instruction set of the float32/bfloat16 kernels: ``"avx512"``, ``"avx2"``,
    ``"scalar"`` (portable C++), or ``"auto"`` (the widest this CPU supports; the default, or
    ``$JAXSPARSE_ISA`` at import). Takes effect at the next kernel call, compiled or not."""
    _require()
    if name not in ISAS:
        raise ValueError(f"set_isa: unknown instruction set {name!r}; expected one of {ISAS}")
    _jaxsparse_cpu.set_isa(name)


def get_isa() -> str:
    """The instruction set the float32/bfloat16 kernels use now."""
    _require()
    return _jaxsparse_cpu.get_isa()


def isa_supported(name: str) -> bool:
    """Whether this CPU can run the ``name`` build of the kernels."""
    _require()
    return bool(_jaxsparse_cpu.isa_supported(name))


GATHERS = ("auto", "vector", "scalar")


def set_gather(mode: str) -> None:
    """How the CSR matrix-vector kernels (``N = 1``, no sliced copy) read ``x``: ``"vector"``
    (vector gathers), ``"scalar"`` (entry by entry, in four chains of multiply-adds), or
    ``"auto"`` (the default: scalar on AMD CPUs, whose gathers are slow, vector elsewhere).
    Takes effect at the next kernel call."""
    _require()
    if mode not in GATHERS:
        raise ValueError(f"set_gather: unknown mode {mode!r}; expected one of {GATHERS}")
    _jaxsparse_cpu.set_gather(mode)


def get_gather() -> str:
    """``"vector"`` or ``"scalar"``: how the CSR matrix-vector kernels read ``x`` now."""
    _require()
    return _jaxsparse_cpu.get_gather()


def set_max_threads(n: int) -> None:
    """Cap the threads each kernel call uses on XLA's intra-op pool (0: no cap, the default)."""
    _require()
    _jaxsparse_cpu.set_max_threads(int(n))


def get_max_threads() -> int:
    _require()
    return int(_jaxsparse_cpu.get_max_threads())


def _require():
    if not AVAILABLE:
        raise RuntimeError(UNAVAILABLE_REASON)


# ----------------------------------------------------------------------------------------------
# Native implementations: pure-JAX wrappers around ffi_call, lowered with mlir.lower_fun.
#
# The ffi_call is not registered as batch-partitionable (jax.ffi.register_ffi_target_as_batch_
# partitionable): every operand of these kernels is a single 2-D matrix with no leading batch
# dimension to shard over (vmap folds batches into N or maps over them before lowering), so the
# partitioner would have nothing to split.


# The codes of the activations the kernels fuse (enum Act, cpp/isa.h).
_ACT_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


def _spmm_native(data, *rest, fmt, shape, nm, transpose_a, layout, activation=None,
                 has_bias=None, **_):
    """spmm_p, or spmm_fused_p (has_bias set: the operands hold the bias before b)."""
    if has_bias is None:
        *pattern, b = rest
        bias = jnp.zeros((0,), data.dtype)
    else:
        *pattern, bias, b = rest
    nk = layout == "nk"
    n = b.shape[0] if nk else b.shape[1]
    rows = shape[1] if transpose_a else shape[0]
    out_shape = (n, rows) if nk else (rows, n)
    out_type = jax.ShapeDtypeStruct(out_shape, data.dtype)
    attrs = dict(nk=np.bool_(nk), ta=np.bool_(transpose_a), act=np.int64(_ACT_CODES[activation]))
    if fmt == "nm":
        (positions,) = pattern
        return jax.ffi.ffi_call("jaxsparse_nm_spmm", out_type)(
            data, positions.astype(jnp.uint8), b, bias, n=np.int64(nm[0]), m=np.int64(nm[1]),
            **attrs)
    if fmt == "csr":  # the transposition plan, or three empty arrays
        pattern, plan = split_plan(fmt, pattern)
        if not plan or not transpose_a:
            plan = (jnp.zeros((0,), jnp.int32),) * 3
        pattern = (*pattern, *plan)
    return jax.ffi.ffi_call(f"jaxsparse_{fmt}_spmm", out_type)(data, *pattern, b, bias, **attrs)


def _sell_native(data, indices, indptr, *rest, shape, layout, **_):
    *sliced, b = rest
    out_shape = (shape[0], b.shape[1]) if layout == "kn" else (b.shape[0], shape[0])
    return jax.ffi.ffi_call("jaxsparse_sell_spmv", jax.ShapeDtypeStruct(out_shape, jnp.float32))(
        *sliced, b, nk=np.bool_(layout == "nk"))


def _sddmm_native(lhs, rhs, *pattern, fmt, nm, block, transpose_lhs, transpose_rhs, **_):
    # The kernel takes lhs as [M, K] or [K, M] (lhs_km) and rhs as [N, K] or [K, N] (rhs_kn) and
    # transposes what it must itself.
    layouts = dict(lhs_km=np.bool_(transpose_lhs), rhs_kn=np.bool_(not transpose_rhs))
    if fmt == "nm":
        (positions,) = pattern
        return jax.ffi.ffi_call("jaxsparse_nm_sddmm", jax.ShapeDtypeStruct(
            positions.shape, lhs.dtype))(lhs, rhs, positions.astype(jnp.uint8),
                                         n=np.int64(nm[0]), m=np.int64(nm[1]), **layouts)
    # 16-bit indices (jaxsparse.pack) are widened: one pass over nnz, small next to the dots.
    indices, indptr = pattern
    out_shape = indices.shape if fmt == "csr" else (indices.shape[0], *block)
    out_type = jax.ShapeDtypeStruct(out_shape, lhs.dtype)
    return jax.ffi.ffi_call(f"jaxsparse_{fmt}_sddmm", out_type)(
        lhs, rhs, indices.astype(jnp.int32), indptr, **layouts)


def _row_softmax_native(values, indptr, **_):
    return jax.ffi.ffi_call("jaxsparse_csr_row_softmax",
                            jax.ShapeDtypeStruct(values.shape, values.dtype))(values, indptr)


def _block_attention_native(q, k, v, indptr, indices, keep, *, scale, block_k, **_):
    out_type = jax.ShapeDtypeStruct(q.shape[:3] + v.shape[3:], q.dtype)
    return jax.ffi.ffi_call("jaxsparse_bsr_attention", out_type)(
        q, k, v, indptr, indices, keep.astype(jnp.uint8), scale=np.float32(scale),
        block_k=np.int64(block_k))


def _spmm_kernel(avals, params):
    """The native SpMM for these operands and parameters, or None with the reason."""
    if params["fmt"] not in ("csr", "bsr", "nm"):
        return None, f"no native {params['fmt']} SpMM kernel"
    if not _native_dtype(avals[0].dtype):
        return None, f"no native SpMM kernel for {avals[0].dtype}"
    return _spmm_native, None


def _sddmm_kernel(avals, params):
    if params["fmt"] not in ("csr", "bsr", "nm"):
        return None, f"no native {params['fmt']} SDDMM kernel"
    if not _native_dtype(avals[0].dtype):
        return None, f"no native SDDMM kernel for {avals[0].dtype}"
    return _sddmm_native, None


def _sell_kernel(avals, params):
    return (_sell_native if SLICED_KERNEL else _via_csr), None


def _row_softmax_kernel(avals, params):
    if not any(avals[0].dtype == d for d in (jnp.float32, jnp.float64)):
        return None, f"no native row softmax for {avals[0].dtype}"
    return _row_softmax_native, None


def _block_attention_kernel(avals, params):
    if avals[0].dtype != jnp.float32:
        return None, f"no native fused attention kernel for {avals[0].dtype}"
    return _block_attention_native, None


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
    mlir.register_lowering(spmm_fused_p, _cpu_lowering(_spmm_kernel, spmm_fused_reference),
                           platform="cpu")
    mlir.register_lowering(sddmm_p, _cpu_lowering(_sddmm_kernel, sddmm_reference), platform="cpu")
    mlir.register_lowering(sell_spmv_p, _cpu_lowering(_sell_kernel, _via_csr), platform="cpu")
    mlir.register_lowering(row_softmax_p,
                           _cpu_lowering(_row_softmax_kernel, row_softmax_reference),
                           platform="cpu")
    mlir.register_lowering(block_attention_p,
                           _cpu_lowering(_block_attention_kernel, block_attention_reference),
                           platform="cpu")


# Whether the products of a packed matrix with one or a few vectors use its sliced copy: where
# the AVX-512 kernels run (those in force at import: this CPU's widest, or $JAXSPARSE_ISA). The
# sliced kernel is vectorized for AVX-512 only (vpermt2ps); the portable loop that runs it on
# other CPUs is slower than their CSR kernel (3072x768 at 90%, N = 1, forced to AVX2 on the
# development machine: ~0.22 against ~0.12 ms), so there the CSR kernel computes them. set_isa
# does not change this (a product compiled here may still run its sliced kernel's portable loop).
SLICED_KERNEL = AVAILABLE and get_isa() == "avx512"

_register()
