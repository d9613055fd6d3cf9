"""SDDMM: dense x dense product sampled at a sparsity pattern, as the primitive ``sddmm_p``.

``sddmm_p.bind(lhs, rhs, *pattern, fmt, shape, nm, block, transpose_lhs, transpose_rhs, backend)``
returns the values ``(op(lhs) @ op(rhs))[i, j]`` at the stored entries of the pattern (stored shape
``shape = (M, N)``), in the pattern's storage order and data shape (CSR ``[nnz]``, BSR
``[nblocks, bm, bn]`` with ``block = (bm, bn)``, N:M ``[M, N / m * n]``). ``op(lhs)`` is ``[M, K]``
(``lhs`` is ``[K, M]`` when ``transpose_lhs``), ``op(rhs)`` is ``[K, N]`` (``rhs`` is ``[N, K]`` when
``transpose_rhs``, the layout of ``q @ k.T``). The dense ``M x N`` product is never formed.

Its cotangents are SpMMs on the same pattern, and SpMM's cotangent with respect to the sparse
values is this op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.interpreters import ad, batching, mlir
from jax.extend.core import Primitive

from jaxsparse import _config
from jaxsparse._formats import SparseMatrix, check_pattern_runtime, gathered, row_ids
from jaxsparse._spmm import (check_bsr_blocks, check_pattern, compute_dtype, coo_index,
                             map_over_batch, out_aval, spmm_p)

__all__ = ["sddmm_p", "sddmm"]

sddmm_p = Primitive("jaxsparse_sddmm")


# ----------------------------------------------------------------------------------------------
# Public function


def sddmm(a, b, pattern: SparseMatrix, *, backend: str | None = None) -> SparseMatrix:
    """``(a @ b)`` sampled at the stored entries of ``pattern``, as a sparse matrix of the same
    format and structure (``pattern``'s values are ignored).

    ``a`` is ``[M, K]``, ``b`` is ``[K, N]``, ``pattern`` is ``[M, N]`` (CSR, BSR or N:M; a lazily
    transposed pattern works too). For ``q @ k.T`` pass ``k.T``: inside ``jit`` the transpose is
    folded into the kernel call.

    NaN and Inf: the result equals the dense product sampled at the pattern, so a NaN in row ``i``
    of ``a`` reaches only the stored entries of row ``i`` (and a NaN in column ``j`` of ``b`` only
    those of column ``j``); entries outside the pattern are never computed.

    >>> p = jaxsparse.CSR.fromdense(jnp.eye(2))
    >>> jaxsparse.sddmm(jnp.ones((2, 3)), jnp.ones((3, 2)), p).data.tolist()
    [3.0, 3.0]
    """
    if not isinstance(pattern, SparseMatrix):
        raise TypeError(f"sddmm: pattern must be a jaxsparse matrix, got {type(pattern).__name__}")
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"sddmm: a and b must be 2-D, got a.shape={a.shape}, b.shape={b.shape}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"sddmm: contraction dimensions do not match: a.shape={a.shape}, "
                         f"b.shape={b.shape}")
    if (a.shape[0], b.shape[1]) != pattern.shape:
        raise ValueError(f"sddmm: a @ b has shape {(a.shape[0], b.shape[1])} but "
                         f"pattern.shape={pattern.shape}")
    dtype = jnp.result_type(a.dtype, b.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"sddmm: a and b must be floating point, got a.dtype={a.dtype}, "
                        f"b.dtype={b.dtype}")
    a, b = a.astype(dtype), b.astype(dtype)
    if pattern.transposed:
        # (a @ b).T = b.T @ a.T sampled at the stored pattern.
        lhs, rhs, tl, tr = b, a, True, True
    else:
        lhs, rhs, tl, tr = a, b, False, False
    values = sddmm_values(lhs, rhs, pattern, transpose_lhs=tl, transpose_rhs=tr, backend=backend)
    return pattern.with_values(values)


def sddmm_values(lhs, rhs, pattern: SparseMatrix, *, transpose_lhs=False, transpose_rhs=False,
                 backend: str | None = None):
    """Bind :data:`sddmm_p` on the *stored* pattern; returns the values array only."""
    block = pattern.block_size if pattern.fmt == "bsr" else None
    return sddmm_p.bind(lhs, rhs, *pattern.pattern_arrays, block=block,
                        transpose_lhs=bool(transpose_lhs), transpose_rhs=bool(transpose_rhs),
                        backend=_config.resolve_backend(backend), **pattern._prim_params())


# ----------------------------------------------------------------------------------------------
# Reference implementation (pure JAX, every platform, memory O(nnz * K))


def sddmm_reference(lhs, rhs, *pattern, fmt, shape, nm, block, transpose_lhs, transpose_rhs,
                    backend=None):
    """Pure-JAX SDDMM with the semantics of :data:`sddmm_p` (the pattern is checked at run time
    first, see :func:`jaxsparse._formats.check_pattern_runtime`)."""
    lhs, rhs, *pattern = (gathered(x) for x in (lhs, rhs, *pattern))
    check_pattern_runtime(pattern, fmt, shape, nm, block, where="sddmm")
    out_dtype = lhs.dtype
    cd = compute_dtype(out_dtype)
    lm = (lhs.T if transpose_lhs else lhs).astype(cd)  # [M, K]
    rn = (rhs if transpose_rhs else rhs.T).astype(cd)  # [N, K]
    m, n = shape
    k = lm.shape[1]
    if fmt == "bsr":
        indices, indptr = pattern
        bm, bn = block
        brows = row_ids(indptr, indices.shape[0])
        lb = lm.reshape(m // bm, bm, k)[brows]
        rb = rn.reshape(n // bn, bn, k)[indices]
        out = jnp.einsum("zik,zjk->zij", lb, rb, precision=jax.lax.Precision.HIGHEST)
    else:
        rows, cols = coo_index(pattern, fmt, shape, nm)
        out = jnp.sum(lm[rows] * rn[cols], axis=-1)
        if fmt == "nm":
            out = out.reshape(pattern[0].shape)
    return out.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Abstract evaluation


def _sddmm_abstract_eval(lhs, rhs, *pattern, fmt, shape, nm, block, transpose_lhs,
                         transpose_rhs, backend):
    out_shape = check_pattern(pattern, fmt, shape, nm, "sddmm")
    if fmt == "bsr":
        if block is None:
            raise ValueError("sddmm: a bsr pattern needs its block size (block=(bm, bn))")
        check_bsr_blocks(pattern[1], shape, block, "sddmm")
        out_shape = (pattern[0].shape[0], *block)
    if lhs.ndim != 2 or rhs.ndim != 2:
        raise ValueError(f"sddmm: lhs and rhs must be 2-D, got lhs.shape={lhs.shape}, "
                         f"rhs.shape={rhs.shape}")
    if lhs.dtype != rhs.dtype:
        raise TypeError(f"sddmm: lhs and rhs dtypes must match, got lhs.dtype={lhs.dtype}, "
                        f"rhs.dtype={rhs.dtype}")
    lm, lk = lhs.shape[::-1] if transpose_lhs else lhs.shape
    rk, rn = rhs.shape[::-1] if transpose_rhs else rhs.shape
    if lk != rk or (lm, rn) != tuple(shape):
        raise ValueError(f"sddmm: op(lhs) is {(lm, lk)} and op(rhs) is {(rk, rn)}; their product "
                         f"must match the pattern shape {tuple(shape)}")
    return out_aval(out_shape, lhs.dtype, lhs, rhs, *pattern)


# ----------------------------------------------------------------------------------------------
# Autodiff


def _sddmm_jvp(primals, tangents, **params):
    lhs, rhs, *pattern = primals
    lhs_dot, rhs_dot, *_ = tangents
    out = sddmm_p.bind(*primals, **params)
    out_dot = None
    if type(lhs_dot) is not ad.Zero:
        out_dot = sddmm_p.bind(lhs_dot, rhs, *pattern, **params)
    if type(rhs_dot) is not ad.Zero:
        term = sddmm_p.bind(lhs, rhs_dot, *pattern, **params)
        out_dot = term if out_dot is None else out_dot + term
    if out_dot is None:
        out_dot = ad.Zero.from_primal_value(out)
    return out, out_dot


def _sddmm_transpose(ct, lhs, rhs, *pattern, fmt, shape, nm, block, transpose_lhs,
                     transpose_rhs, backend):
    if any(ad.is_undefined_primal(p) for p in pattern):
        raise ValueError("sddmm: the sparsity pattern is not differentiable")
    ct = ad.instantiate_zeros(ct)
    spmm = functools.partial(spmm_p.bind, ct, *pattern, fmt=fmt, shape=shape, nm=nm,
                             backend=backend)
    ct_lhs = ct_rhs = None
    # With P the cotangent on the pattern: d op(lhs) = P @ op(rhs).T, d op(rhs) = op(lhs).T @ P.
    if ad.is_undefined_primal(lhs):
        op_rhs_t = rhs if transpose_rhs else rhs.T  # op(rhs).T, [N, K]
        if transpose_lhs:  # lhs is [K, M]: op(rhs) @ P.T
            ct_lhs = spmm(op_rhs_t.T, transpose_a=False, layout="nk")
        else:
            ct_lhs = spmm(op_rhs_t, transpose_a=False, layout="kn")
    if ad.is_undefined_primal(rhs):
        op_lhs = lhs.T if transpose_lhs else lhs  # [M, K]
        if transpose_rhs:  # rhs is [N, K]: P.T @ op(lhs)
            ct_rhs = spmm(op_lhs, transpose_a=True, layout="kn")
        else:
            ct_rhs = spmm(op_lhs.T, transpose_a=True, layout="nk")
    return (ct_lhs, ct_rhs, *([None] * len(pattern)))


# ----------------------------------------------------------------------------------------------
# Batching


def _sddmm_batch(args, dims, **params):
    return map_over_batch(functools.partial(sddmm_p.bind, **params), args, dims), 0


# ----------------------------------------------------------------------------------------------
# Registration

sddmm_p.def_impl(functools.partial(jax._src.dispatch.apply_primitive, sddmm_p))
sddmm_p.def_abstract_eval(_sddmm_abstract_eval)
ad.primitive_jvps[sddmm_p] = _sddmm_jvp
ad.primitive_transposes[sddmm_p] = _sddmm_transpose
batching.primitive_batchers[sddmm_p] = _sddmm_batch


def _default_lowering(ctx, *args, **params):
    if params["backend"] in ("pallas", "pallas-interpret"):
        from jaxsparse.pallas._lowering import default_sddmm_lowering
        return default_sddmm_lowering(ctx, *args, **params)
    if params["backend"] == "ffi":
        raise NotImplementedError(
            "jaxsparse backend 'ffi' needs the native CPU kernels on the CPU platform; "
            "use backend='auto' or 'reference' here")
    return mlir.lower_fun(sddmm_reference, multiple_results=False)(ctx, *args, **params)


mlir.register_lowering(sddmm_p, _default_lowering)
