"""SpMM: sparse x dense matrix product, as the primitive ``spmm_p``.

``spmm_p.bind(data, *pattern, b, fmt, shape, nm, transpose_a, layout, backend)`` computes, with
``A`` the stored sparse matrix ``[M, K]`` and ``op(A) = A.T if transpose_a else A``:

* ``layout="kn"``: ``op(A) @ b`` with ``b`` ``[K', N]``, out ``[M', N]``;
* ``layout="nk"``: ``b @ op(A).T`` with ``b`` ``[N, K']``, out ``[N, M']`` (the linear-layer layout:
  ``x @ W.T`` with ``W`` stored ``[out, in]`` is ``layout="nk", transpose_a=False``).

The pattern arrays are ``(indices, indptr)`` for CSR and BSR, ``(positions,)`` for N:M; a CSR
pattern may be followed by a transposition plan ``(perm, t_indices, t_indptr)``
(:class:`jaxsparse.TransposePlan`, from ``jaxsparse.pack(a, transpose=True)``), which the kernels
use for ``transpose_a=True`` instead of building ``A.T`` per call (the reference ignores it).
Layout, transposition and format are static, so every combination reaches a kernel without a
transposed copy of the sparse operand. The cotangent with respect to ``data`` is an SDDMM on the
same pattern.

``spmm_fused_p.bind(data, *pattern, bias, b, activation, has_bias, <spmm_p params>)`` is the same
product followed by ``+ bias`` (one value per row of ``op(A)``, the output features; an empty array
when ``has_bias`` is False) and ``activation`` (a name in :data:`ACTIVATIONS` or None), which the
CPU kernels apply to each block of the output while it is in cache. It is reached through
``matmul(..., bias=, activation=)``, whose derivatives are those of the unfused composition.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxsparse import _config
from jaxsparse._formats import (SparseMatrix, check_pattern_runtime, gathered, nm_columns,
                                row_ids)

__all__ = ["spmm_p", "spmm_fused_p", "matmul", "spmm", "ACTIVATIONS"]

spmm_p = Primitive("jaxsparse_spmm")
spmm_fused_p = Primitive("jaxsparse_spmm_fused")

# The activations matmul can fuse into the product, as jax.nn computes them.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact (erf), as in BERT
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # jax.nn.gelu's default
    "silu": jax.nn.silu,
}

_LAYOUTS = ("kn", "nk")
_HALF = (jnp.float16, jnp.bfloat16)


# ----------------------------------------------------------------------------------------------
# Public functions


def matmul(a, b, *, bias=None, activation: str | None = None, backend: str | None = None):
    """Matrix product where exactly one operand is sparse (:class:`CSR`, :class:`BSR`, :class:`NM`).

    * ``matmul(A, x)``: ``x`` is ``[K]``, ``[K, N]`` or ``[..., K, N]`` (leading batch dimensions).
    * ``matmul(x, A)``: ``x`` is ``[M]`` or ``[..., M]``; leading dimensions fold into one, so
      ``x @ W.T`` for activations ``[batch, seq, in]`` and a weight ``W`` stored ``[out, in]`` is a
      single kernel call on the stored ``W``.

    Operands are promoted to a common dtype as ``jnp.matmul`` does; half types accumulate in
    float32. ``backend`` overrides :func:`jaxsparse.use_backend` for this call.

    ``bias`` (one value per output feature: ``[M]`` for ``A @ x``, ``[K]`` for ``x @ A``) and
    ``activation`` (``"relu"``, ``"gelu"`` (exact), ``"gelu_tanh"`` (``jax.nn.gelu``'s default
    approximation) or ``"silu"``) give ``activation(product + bias)``, applied by the CPU kernels
    to each block of the output while it is in cache instead of by separate XLA passes (a linear
    layer's bias and the MLP's activation). Derivatives are those of the unfused composition,
    which is also what runs where no native kernel applies.

    NaN and Inf: only *stored* entries are multiplied, so a structural zero of the sparse operand
    times a NaN/Inf of the dense one contributes nothing, where a dense product would give NaN
    (``0 * nan``). A stored zero (an explicit zero, a zero inside a stored BSR block, an unused
    N:M slot) does give NaN, as in a dense product. NaN/Inf in the sparse values propagate as usual.

    Malformed patterns (indices out of range, ``indptr`` not monotone or not ending at nnz, N:M
    positions >= m) raise: at construction for concrete arrays, and at run time from inside
    ``jit`` when the matrix was built from traced arrays.

    >>> a = jaxsparse.CSR.fromdense(jnp.eye(3))
    >>> (a @ jnp.ones(3)).tolist()
    [1.0, 1.0, 1.0]
    """
    a_sparse, b_sparse = isinstance(a, SparseMatrix), isinstance(b, SparseMatrix)
    if a_sparse == b_sparse:
        kinds = "both are sparse" if a_sparse else "neither is sparse"
        raise TypeError(f"matmul: exactly one operand must be a jaxsparse matrix, {kinds} "
                        f"(got {type(a).__name__} and {type(b).__name__})")
    backend = _config.resolve_backend(backend)
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"matmul: activation must be None or one of {tuple(ACTIVATIONS)}, got "
                         f"activation={activation!r}")
    if a_sparse:
        return _sparse_dense(a, b, backend, bias, activation)
    return _dense_sparse(a, b, backend, bias, activation)


def _promote(sp: SparseMatrix, x, where: str):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(sp.dtype) if jnp.issubdtype(x.dtype, jnp.integer) else x
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{where}: complex dense operands are not supported (got {x.dtype})")
    dtype = jnp.result_type(sp.dtype, x.dtype)
    return (sp if sp.dtype == dtype else sp.astype(dtype)), x.astype(dtype)


def _bias(bias, a: SparseMatrix, features: int):
    """``bias`` as a [features] array of a's dtype (None stays None)."""
    if bias is None:
        return None
    bias = jnp.asarray(bias)
    if bias.shape != (features,):
        raise ValueError(f"matmul: bias must have one value per output feature, shape "
                         f"({features},), got bias.shape={bias.shape}")
    return bias.astype(a.dtype)


def _sparse_dense(a: SparseMatrix, x, backend: str, bias=None, activation=None):
    a, x = _promote(a, x, "matmul")
    m, k = a.shape
    if x.ndim == 0 or x.shape[0 if x.ndim == 1 else -2] != k:
        raise ValueError(f"matmul: contraction dimensions do not match: sparse a.shape={a.shape}, "
                         f"dense b.shape={x.shape} (need b.shape[-2] == {k}, or b.shape == ({k},))")
    if x.ndim == 1:
        return _sparse_dense(a, x[:, None], backend, bias, activation)[:, 0]
    bias = _bias(bias, a, m)
    fn = lambda xx: spmm(a, xx, transpose_a=a.transposed, layout="kn", backend=backend,
                         bias=bias, activation=activation)
    for _ in range(x.ndim - 2):
        fn = jax.vmap(fn)
    return fn(x)


def _dense_sparse(x, a: SparseMatrix, backend: str, bias=None, activation=None):
    a, x = _promote(a, x, "matmul")
    m, k = a.shape
    if x.ndim == 0 or x.shape[-1] != m:
        raise ValueError(f"matmul: contraction dimensions do not match: dense a.shape={x.shape}, "
                         f"sparse b.shape={a.shape} (need a.shape[-1] == {m})")
    lead = x.shape[:-1]
    out = spmm(a, x.reshape(math.prod(lead), m), transpose_a=not a.transposed, layout="nk",
               backend=backend, bias=_bias(bias, a, k), activation=activation)
    return out.reshape(*lead, k)


def spmm(a: SparseMatrix, b, *, transpose_a: bool = False, layout: str = "kn",
         backend: str | None = None, bias=None, activation: str | None = None):
    """Bind :data:`spmm_p` on the *stored* matrix of ``a`` (its ``.T`` flag is not applied), or
    :data:`spmm_fused_p` with a ``bias`` (one per row of ``op(A)``) or an ``activation``.

    Lower level than :func:`matmul`: ``b`` must be 2-D with ``a``'s dtype, ``bias`` too.
    """
    if not isinstance(a, SparseMatrix):
        raise TypeError(f"spmm: a must be a jaxsparse matrix, got {type(a).__name__}")
    if layout not in _LAYOUTS:
        raise ValueError(f"spmm: layout must be one of {_LAYOUTS}, got layout={layout!r}")
    params = dict(transpose_a=bool(transpose_a), layout=layout,
                  backend=_config.resolve_backend(backend), **a._prim_params())
    n = b.shape[1] if layout == "kn" else b.shape[0]
    if getattr(a, "matvec", None) is not None and not transpose_a and \
            a.dtype == jnp.float32 and b.dtype == jnp.float32:
        from jaxsparse._pack import sell_spmv, takes_sliced  # a packed product of a few vectors
        if takes_sliced(a, n):
            out = sell_spmv(a, b, layout=layout, backend=params["backend"])
            return _epilogue(out, bias, activation, layout)
    pattern = (*a.pattern_arrays, *(getattr(a, "plan", None) or ()))
    if bias is None and activation is None:
        return spmm_p.bind(a.values, *pattern, b, **params)
    has_bias = bias is not None
    if not has_bias:
        bias = jnp.zeros((0,), a.dtype)
    return _fused(tuple(sorted(params.items())), activation, has_bias, a.values, pattern, bias, b)


def _epilogue(out, bias, activation, layout):
    """``activation(out + bias)`` with XLA operations; bias runs along out's features."""
    if bias is not None:
        out = out + (bias[:, None] if layout == "kn" else bias[None, :])
    return out if activation is None else ACTIVATIONS[activation](out)


def _unfused(params, activation, has_bias, data, pattern, bias, b):
    """What :data:`spmm_fused_p` computes, as spmm_p and XLA operations (half types: the bias
    and the activation in float32, rounded once)."""
    params = dict(params)
    out = spmm_p.bind(data, *pattern, b, **params)
    cd = compute_dtype(out.dtype)
    out = _epilogue(out.astype(cd), bias.astype(cd) if has_bias else None, activation,
                    params["layout"])
    return out.astype(data.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _fused(params, activation, has_bias, data, pattern, bias, b):
    return spmm_fused_p.bind(data, *pattern, bias, b, activation=activation, has_bias=has_bias,
                             **dict(params))


@_fused.defjvp
def _fused_jvp(params, activation, has_bias, primals, tangents):
    # Differentiate the unfused composition: spmm_p's JVP / transpose rules, jax.nn's activations.
    return jax.jvp(functools.partial(_unfused, params, activation, has_bias), primals, tangents)


def _bind_like(params, data, pattern, b, **overrides):
    return spmm_p.bind(data, *pattern, b, **{**params, **overrides})


# ----------------------------------------------------------------------------------------------
# Reference implementation (pure JAX, every platform, memory O(nnz * N))


def coo_index(pattern, fmt, shape, nm):
    """(rows, cols) of the stored entries of a CSR or N:M pattern, in storage order, flattened."""
    if fmt == "csr":
        indices, indptr = pattern
        return row_ids(indptr, indices.shape[0]), indices
    (positions,) = pattern
    n, m = nm
    cols = nm_columns(positions, n, m)
    rows = jnp.broadcast_to(jnp.arange(shape[0], dtype=cols.dtype)[:, None], cols.shape)
    return rows.reshape(-1), cols.reshape(-1)


def split_plan(fmt, pattern) -> tuple[tuple, tuple]:
    """``(pattern, plan)``: a CSR pattern's transposition plan split off (``()`` when none)."""
    if fmt == "csr" and len(pattern) == 5:
        return tuple(pattern[:2]), tuple(pattern[2:])
    return tuple(pattern), ()


def check_plan(plan, shape, nnz, where):
    """Shape/dtype checks of a transposition plan ``(perm, t_indices, t_indptr)``."""
    perm, t_indices, t_indptr = plan
    for name, arr, size, dtypes in (("perm", perm, nnz, (np.int32,)),
                                    ("t_indices", t_indices, nnz, (np.int32, np.uint16)),
                                    ("t_indptr", t_indptr, shape[1] + 1, (np.int32,))):
        if arr.ndim != 1 or arr.shape[0] != size or arr.dtype not in dtypes:
            raise TypeError(f"{where}: transposition plan {name} must be 1-D "
                            f"{'/'.join(np.dtype(d).name for d in dtypes)} [{size}], got "
                            f"{name}.shape={arr.shape}, {name}.dtype={arr.dtype}")


def compute_dtype(dtype):
    return jnp.float32 if any(dtype == h for h in _HALF) else dtype


def spmm_reference(data, *rest, fmt, shape, nm, transpose_a, layout, backend=None):
    """Pure-JAX SpMM with the semantics of :data:`spmm_p`.

    The pattern is checked at run time first (:func:`check_pattern_runtime`): XLA gathers clamp
    and scatters drop out-of-range indices, so without it a malformed traced pattern would give a
    quiet wrong answer. Only stored entries are multiplied: a structural zero of ``A`` times a NaN
    or Inf of ``b`` contributes nothing (a dense product would give NaN); a stored zero does give
    NaN, as in a dense product.
    """
    data, *pattern, b = (gathered(x) for x in (data, *rest))
    pattern, _ = split_plan(fmt, pattern)
    block = data.shape[1:] if fmt == "bsr" else None
    check_pattern_runtime(pattern, fmt, shape, nm, block, where="spmm")
    out_dtype = data.dtype
    cd = compute_dtype(out_dtype)
    data, b = data.astype(cd), b.astype(cd)
    if layout == "nk":
        b = b.T
    m, k = shape
    n = b.shape[1]  # explicit sizes below: a -1 in reshape fails when another dimension is 0
    if fmt == "bsr":
        indices, indptr = pattern
        bm, bk = data.shape[1:]
        brows = row_ids(indptr, indices.shape[0])
        hi = jax.lax.Precision.HIGHEST
        if not transpose_a:
            g = b.reshape(k // bk, bk, n)[indices]
            prod = jnp.einsum("zij,zjn->zin", data, g, precision=hi)
            out = jax.ops.segment_sum(prod, brows, num_segments=m // bm).reshape(m, n)
        else:
            g = b.reshape(m // bm, bm, n)[brows]
            prod = jnp.einsum("zij,zin->zjn", data, g, precision=hi)
            out = jax.ops.segment_sum(prod, indices, num_segments=k // bk).reshape(k, n)
    else:
        rows, cols = coo_index(pattern, fmt, shape, nm)
        vals = data.reshape(-1)
        if not transpose_a:
            out = jax.ops.segment_sum(vals[:, None] * b[cols], rows, num_segments=m)
        else:
            out = jax.ops.segment_sum(vals[:, None] * b[rows], cols, num_segments=k)
    if layout == "nk":
        out = out.T
    return out.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Abstract evaluation


def check_pattern(pattern, fmt, shape, nm, where):
    """Shape/dtype checks shared by spmm_p and sddmm_p; returns the data shape the pattern implies."""
    m, k = shape
    if fmt in ("csr", "bsr"):
        if len(pattern) != 2:
            raise TypeError(f"{where}: {fmt} needs (indices, indptr), got {len(pattern)} arrays")
        indices, indptr = pattern
        for name, arr in (("indices", indices), ("indptr", indptr)):
            packed = fmt == "csr" and name == "indices" and arr.dtype == np.uint16  # pack()
            if (arr.dtype != np.int32 and not packed) or arr.ndim != 1:
                raise TypeError(f"{where}: {name} must be 1-D int32, got "
                                f"{name}.shape={arr.shape}, {name}.dtype={arr.dtype}")
        if fmt == "csr":
            if indptr.shape[0] != m + 1:
                raise ValueError(f"{where}: indptr.shape={indptr.shape} does not match "
                                 f"{m} rows (shape={shape})")
            return (indices.shape[0],)
        return None  # BSR: block size comes from data (spmm) or the block param (sddmm)
    if fmt == "nm":
        (positions,) = pattern
        n, mm = nm
        want = (m, k // mm * n)
        if positions.shape != want or not jnp.issubdtype(positions.dtype, jnp.integer):
            raise TypeError(f"{where}: positions must be integer {want} for shape={shape}, "
                            f"n:m={nm}; got positions.shape={positions.shape}, "
                            f"positions.dtype={positions.dtype}")
        return want
    raise ValueError(f"{where}: unknown sparse format {fmt!r}")


def check_bsr_blocks(indptr, shape, block, where):
    bm, bk = block
    if bm < 1 or bk < 1 or shape[0] % bm or shape[1] % bk:
        raise ValueError(f"{where}: block size {block} must divide shape={shape}")
    if indptr.shape[0] != shape[0] // bm + 1:
        raise ValueError(f"{where}: indptr.shape={indptr.shape} does not match "
                         f"{shape[0] // bm} block rows (shape={shape}, block={block})")


def out_aval(shape, dtype, *avals):
    """The output aval, carrying the inputs' varying manual axes: inside ``shard_map`` a value that
    varies over a mesh axis must be typed so, or transposes (``grad``) fail with "Expected
    cotangent type float32[...]{V:x}". Takes the input that varies over the most axes."""
    def varying(a):
        return getattr(getattr(a, "manual_axis_type", None), "varying", None) or frozenset()

    best = max(avals, key=lambda a: len(varying(a)), default=None)
    if best is None or not varying(best):
        return jax.core.ShapedArray(shape, dtype)
    spec = jax.sharding.PartitionSpec(*([None] * len(shape)))
    return best.update(shape=tuple(shape), dtype=dtype, weak_type=False,
                       sharding=best.sharding.update(spec=spec))


def _spmm_abstract_eval(data, *rest, fmt, shape, nm, transpose_a, layout, backend):
    *pattern, b = rest
    pattern, plan = split_plan(fmt, pattern)
    want = check_pattern(pattern, fmt, shape, nm, "spmm")
    if plan:
        check_plan(plan, shape, want[0], "spmm")
    if fmt == "bsr":
        if data.ndim != 3 or data.shape[0] != pattern[0].shape[0]:
            raise ValueError(f"spmm: bsr data must be [nblocks, bm, bk] with nblocks = "
                             f"len(indices)={pattern[0].shape[0]}, got data.shape={data.shape}")
        check_bsr_blocks(pattern[1], shape, data.shape[1:], "spmm")
    elif data.shape != want:
        raise ValueError(f"spmm: {fmt} data.shape={data.shape} does not match the pattern {want}")
    if b.ndim != 2:
        raise ValueError(f"spmm: dense operand must be 2-D, got b.shape={b.shape}")
    if data.dtype != b.dtype:
        raise TypeError(f"spmm: sparse and dense dtypes must match, got data.dtype={data.dtype}, "
                        f"b.dtype={b.dtype}")
    rows, contract = (shape[1], shape[0]) if transpose_a else shape
    kdim = b.shape[0] if layout == "kn" else b.shape[1]
    if kdim != contract:
        raise ValueError(f"spmm: contraction mismatch: op(A) is {(rows, contract)} "
                         f"(transpose_a={transpose_a}), b.shape={b.shape} (layout={layout!r})")
    n = b.shape[1] if layout == "kn" else b.shape[0]
    out_shape = (rows, n) if layout == "kn" else (n, rows)
    return out_aval(out_shape, data.dtype, data, *rest)


def _fused_abstract_eval(data, *rest, activation, has_bias, **params):
    *pattern, bias, b = rest
    out = _spmm_abstract_eval(data, *pattern, b, **params)
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"spmm: activation must be None or one of {tuple(ACTIVATIONS)}, got "
                         f"activation={activation!r}")
    features = params["shape"][1] if params["transpose_a"] else params["shape"][0]
    want = (features,) if has_bias else (0,)
    if bias.shape != want or bias.dtype != data.dtype:
        raise ValueError(f"spmm: bias must be {want} of dtype {data.dtype} (has_bias={has_bias}), "
                         f"got bias.shape={bias.shape}, bias.dtype={bias.dtype}")
    return out_aval(out.shape, out.dtype, data, *rest)  # the bias may vary over manual axes too


def spmm_fused_reference(data, *rest, activation, has_bias, **params):
    """:data:`spmm_fused_p` as :data:`spmm_p` (lowered for its backend) and XLA operations."""
    *pattern, bias, b = rest
    return _unfused(tuple(params.items()), activation, has_bias, data, pattern, bias, b)


# ----------------------------------------------------------------------------------------------
# Autodiff


def _spmm_jvp(primals, tangents, **params):
    data, *pattern, b = primals
    data_dot, *_, b_dot = tangents
    out = spmm_p.bind(*primals, **params)
    out_dot = None
    if type(data_dot) is not ad.Zero:
        out_dot = _bind_like(params, data_dot, pattern, b)
    if type(b_dot) is not ad.Zero:
        term = _bind_like(params, data, pattern, b_dot)
        out_dot = term if out_dot is None else out_dot + term
    if out_dot is None:
        out_dot = ad.Zero.from_primal_value(out)
    return out, out_dot


def _spmm_transpose(ct, data, *rest, fmt, shape, nm, transpose_a, layout, backend):
    from jaxsparse._sddmm import sddmm_p

    *pattern, b = rest
    if any(ad.is_undefined_primal(p) for p in pattern):
        raise ValueError("spmm: the sparsity pattern is not differentiable")
    params = dict(fmt=fmt, shape=shape, nm=nm, transpose_a=transpose_a, layout=layout,
                  backend=backend)
    ct = ad.instantiate_zeros(ct)
    ct_data = ct_b = None
    if ad.is_undefined_primal(b):
        ct_b = _bind_like(params, data, pattern, ct, transpose_a=not transpose_a)
    if ad.is_undefined_primal(data):
        # d out / d A sampled at A's pattern, as sddmm_p(lhs, rhs) = (op(lhs) @ op(rhs))[pattern]:
        #   kn: ct @ b.T (A) or b @ ct.T (A.T);   nk: ct.T @ b (A) or b.T @ ct (A.T).
        if layout == "kn":
            lhs, rhs = (b, ct) if transpose_a else (ct, b)
            tl, tr = False, True
        else:
            lhs, rhs = (b, ct) if transpose_a else (ct, b)
            tl, tr = True, False
        block = data.aval.shape[1:] if fmt == "bsr" else None
        ct_data = sddmm_p.bind(lhs, rhs, *split_plan(fmt, pattern)[0], fmt=fmt, shape=shape,
                               nm=nm, block=block, transpose_lhs=tl, transpose_rhs=tr,
                               backend=backend)
    return (ct_data, *([None] * len(pattern)), ct_b)


# ----------------------------------------------------------------------------------------------
# Batching


def _spmm_batch(args, dims, *, prim=spmm_p, **params):
    """Batching of spmm_p and spmm_fused_p (whose bias comes before b, with the sparse operand)."""
    *sparse_args, b = args
    *sparse_dims, b_dim = dims
    layout = params["layout"]
    if all(d is None for d in sparse_dims):
        # Batched dense operand only: fold the batch into the N dimension (one kernel call).
        b = jnp.moveaxis(b, b_dim, 0)
        nb = b.shape[0]
        if layout == "nk":
            rows, kk = b.shape[1:]
            out = prim.bind(*sparse_args, b.reshape(nb * rows, kk), **params)
            return out.reshape(nb, rows, out.shape[-1]), 0
        kk, n = b.shape[1:]
        folded = jnp.moveaxis(b, 0, 1).reshape(kk, nb * n)
        out = prim.bind(*sparse_args, folded, **params)
        return out.reshape(out.shape[0], nb, n), 1
    return map_over_batch(functools.partial(prim.bind, **params), args, dims), 0


def map_over_batch(fn, args, dims):
    """Apply ``fn`` per batch element with ``lax.map`` (used where arrays of the sparse operand are
    batched: each element has its own values or pattern)."""
    mapped = [i for i, d in enumerate(dims) if d is not None]
    xs = [jnp.moveaxis(args[i], dims[i], 0) for i in mapped]

    def body(x_slices):
        full = list(args)
        for i, x in zip(mapped, x_slices):
            full[i] = x
        return fn(*full)

    return jax.lax.map(body, xs)


# ----------------------------------------------------------------------------------------------
# Registration

spmm_p.def_impl(functools.partial(jax._src.dispatch.apply_primitive, spmm_p))
spmm_p.def_abstract_eval(_spmm_abstract_eval)
ad.primitive_jvps[spmm_p] = _spmm_jvp
ad.primitive_transposes[spmm_p] = _spmm_transpose
batching.primitive_batchers[spmm_p] = _spmm_batch


def _default_lowering(ctx, *args, **params):
    if params["backend"] in ("pallas", "pallas-interpret"):
        from jaxsparse.pallas._lowering import default_spmm_lowering
        return default_spmm_lowering(ctx, *args, **params)
    if params["backend"] == "ffi":
        raise NotImplementedError(
            "jaxsparse backend 'ffi' needs the native CPU kernels on the CPU platform; "
            "use backend='auto' or 'reference' here")
    return mlir.lower_fun(spmm_reference, multiple_results=False)(ctx, *args, **params)


mlir.register_lowering(spmm_p, _default_lowering)

spmm_fused_p.def_impl(functools.partial(jax._src.dispatch.apply_primitive, spmm_fused_p))
spmm_fused_p.def_abstract_eval(_fused_abstract_eval)
batching.primitive_batchers[spmm_fused_p] = functools.partial(_spmm_batch, prim=spmm_fused_p)
mlir.register_lowering(spmm_fused_p,
                       mlir.lower_fun(spmm_fused_reference, multiple_results=False))
