"""Lowerings of ``spmm_p`` / ``sddmm_p`` to the Pallas kernels, and their registration.

Which kernel applies is decided from the static parameters and avals only (format, layout,
transposition, dtype, block size), so the decision is made at lowering time:

* backend ``"pallas-interpret"``: the kernels in Pallas interpret mode, on any platform (the
  default all-platform lowering dispatches here; on CPU, where the native-kernel lowering of
  :mod:`jaxsparse.ffi` is registered, :func:`register` chains in front of it);
* backend ``"pallas"``: the compiled (Triton) kernels; GPU (``cuda``) only;
* backend ``"auto"`` on the ``cuda`` platform: the compiled kernels where they apply.

Where no kernel applies (float64, ``transpose_a=True``, an N:M SDDMM, a BSR block that is not a
power of two in 16..128, a GPU below compute capability 8.0) the reference lowering is used and a
``RuntimeWarning`` says why (once per reason).

Kernel metadata (the row order of the swizzle, block rows of BSR entries) is computed on device
inside the lowered function with jnp ops (an argsort of the row lengths: O(M log M), small next
to the product): inside a primitive's lowering the pattern is always traced, so host-side
preprocessing is impossible there. Block-sparse attention, which is a function and not a
primitive, preprocesses concrete masks on the host and caches them (see ``_attention``).
"""

from __future__ import annotations

import functools
import warnings

import jax
from jax.interpreters import mlir

from jaxsparse._sddmm import sddmm_p, sddmm_reference
from jaxsparse._spmm import split_plan, spmm_p, spmm_reference
from jaxsparse.pallas._common import is_pow2, kernel_dtype
from jaxsparse.pallas._sddmm import bsr_sddmm, csr_sddmm
from jaxsparse.pallas._spmm import bsr_spmm, csr_spmm, nm_spmm

PALLAS_BACKENDS = ("pallas", "pallas-interpret")
MIN_COMPUTE_CAPABILITY = 8.0  # bf16 tensor cores (Ampere); Triton's bf16 dot needs it

_warned: set[str] = set()


def _warn_fallback(op: str, reason: str) -> None:
    msg = f"jaxsparse pallas: no {op} kernel applies ({reason}); using the reference lowering"
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


def _block_ok(block) -> bool:
    return all(is_pow2(int(b)) and 16 <= b <= 128 for b in block)


# ----------------------------------------------------------------------------------------------
# Kernel selection: (function with the primitive's signature, None) or (None, reason)


def select_spmm(avals, params):
    dtype = avals[0].dtype
    fmt = params["fmt"]
    if params["transpose_a"] and not split_plan(fmt, avals[1:-1])[1]:
        return None, "transpose_a=True without a transposition plan (pack(a, transpose=True))"
    if not kernel_dtype(dtype):
        return None, f"dtype {dtype}"
    if fmt == "bsr" and not _block_ok(avals[0].shape[1:]):
        return None, f"BSR block {tuple(avals[0].shape[1:])} (needs powers of two in 16..128)"
    if fmt not in ("csr", "bsr", "nm"):
        return None, f"format {fmt!r}"
    return _spmm_kernel, None


def _spmm_kernel(data, *rest, fmt, shape, nm, transpose_a, layout, backend):
    *pattern, b = rest
    pattern, plan = split_plan(fmt, pattern)
    interpret = backend != "pallas" and backend != "auto"
    if layout == "nk":  # b @ A.T = (A @ b.T).T: transpose the dense operand, not A
        b = b.T
    if transpose_a:  # select_spmm let only a CSR matrix with a transposition plan through
        perm, t_indices, t_indptr = plan
        data, pattern, shape = data[perm], (t_indices, t_indptr), shape[::-1]
    if fmt == "bsr":
        out = bsr_spmm(data, *pattern, b, shape=shape, interpret=interpret)
    elif fmt == "csr":
        out = csr_spmm(data, *pattern, b, shape=shape, interpret=interpret)
    else:
        out = nm_spmm(data, *pattern, b, shape=shape, nm=nm, interpret=interpret)
    return out.T if layout == "nk" else out


def select_sddmm(avals, params):
    dtype = avals[0].dtype
    fmt = params["fmt"]
    if not kernel_dtype(dtype):
        return None, f"dtype {dtype}"
    if fmt == "bsr" and not _block_ok(params["block"]):
        return None, f"BSR block {tuple(params['block'])} (needs powers of two in 16..128)"
    if fmt not in ("csr", "bsr"):
        return None, f"format {fmt!r}"
    return _sddmm_kernel, None


def _sddmm_kernel(lhs, rhs, *pattern, fmt, shape, nm, block, transpose_lhs, transpose_rhs,
                  backend):
    interpret = backend != "pallas" and backend != "auto"
    lm = lhs.T if transpose_lhs else lhs  # [M, K]
    rn = rhs if transpose_rhs else rhs.T  # [N, K]
    if fmt == "bsr":
        return bsr_sddmm(lm, rn, *pattern, block=block, interpret=interpret)
    return csr_sddmm(lm, rn, *pattern, interpret=interpret)


# ----------------------------------------------------------------------------------------------
# Lowering rules


@functools.lru_cache(maxsize=None)
def gpu_capability_reason() -> str | None:
    """None if the first GPU can run the kernels, else why not."""
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError as e:
        return f"no GPU ({e})"
    cc = getattr(dev, "compute_capability", None)
    try:
        ok = cc is not None and float(cc) >= MIN_COMPUTE_CAPABILITY
    except ValueError:
        ok = False
    return None if ok else f"GPU compute capability {cc} < {MIN_COMPUTE_CAPABILITY}"


def pallas_rule(op, select, reference, *, platform):
    """Lowering rule for one platform, for the Pallas backends (and ``auto`` on cuda).

    Returns ``rule(ctx, *args, **params)`` or None when the rule does not handle ``backend``.
    """

    def rule(ctx, *args, **params):
        backend = params["backend"]
        if backend == "pallas" and platform != "cuda":
            raise NotImplementedError(
                "jaxsparse backend 'pallas' compiles Triton kernels for the cuda platform; "
                "use 'pallas-interpret' to run them here (slow, for testing)")
        fn, reason = select(ctx.avals_in, params)
        if fn is not None and backend != "pallas-interpret" and platform == "cuda":
            reason = gpu_capability_reason()
            fn = None if reason else fn
        if fn is None:
            _warn_fallback(op, reason)
            fn = reference
        return mlir.lower_fun(fn, multiple_results=False)(ctx, *args, **params)

    return rule


def handles(backend: str, platform: str) -> bool:
    return backend in PALLAS_BACKENDS or (backend == "auto" and platform == "cuda")


def default_spmm_lowering(ctx, *args, **params):
    """Entry point from ``jaxsparse._spmm._default_lowering`` (platforms without their own rule)."""
    return pallas_rule("SpMM", select_spmm, spmm_reference, platform="default")(
        ctx, *args, **params)


def default_sddmm_lowering(ctx, *args, **params):
    return pallas_rule("SDDMM", select_sddmm, sddmm_reference, platform="default")(
        ctx, *args, **params)


def _chained(prim, op, select, reference, platform, fallback):
    rule = pallas_rule(op, select, reference, platform=platform)

    def lowering(ctx, *args, **params):
        if handles(params["backend"], platform):
            return rule(ctx, *args, **params)
        return fallback(ctx, *args, **params)

    return lowering


def _reference_rule(reference):
    def lowering(ctx, *args, **params):
        if params["backend"] == "ffi":
            raise NotImplementedError(
                "jaxsparse backend 'ffi' needs the native CPU kernels on the CPU platform; "
                "use backend='auto', 'pallas' or 'reference' here")
        return mlir.lower_fun(reference, multiple_results=False)(ctx, *args, **params)

    return lowering


def register() -> None:
    """Register the cuda lowerings, and chain the Pallas backends in front of the CPU lowering."""
    from jaxsparse import ffi

    mlir.register_lowering(
        spmm_p, _chained(spmm_p, "SpMM", select_spmm, spmm_reference, "cuda",
                         _reference_rule(spmm_reference)), platform="cuda")
    mlir.register_lowering(
        sddmm_p, _chained(sddmm_p, "SDDMM", select_sddmm, sddmm_reference, "cuda",
                          _reference_rule(sddmm_reference)), platform="cuda")
    # On CPU, jaxsparse.ffi's lowering shadows the default one: put pallas-interpret in front.
    cpu_spmm = ffi._cpu_lowering(ffi._spmm_kernel, spmm_reference)
    cpu_sddmm = ffi._cpu_lowering(ffi._sddmm_kernel, sddmm_reference)
    mlir.register_lowering(
        spmm_p, _chained(spmm_p, "SpMM", select_spmm, spmm_reference, "cpu", cpu_spmm),
        platform="cpu")
    mlir.register_lowering(
        sddmm_p, _chained(sddmm_p, "SDDMM", select_sddmm, sddmm_reference, "cpu", cpu_sddmm),
        platform="cpu")
