"""Softmax over the stored entries of each row of a CSR matrix, as the primitive ``row_softmax_p``.

``row_softmax_p.bind(values, indptr, backend)``: ``values`` ``[..., nnz]`` (leading dimensions
share the pattern: one set of values per batch element and head), ``indptr`` ``[M + 1]`` int32.
Each row's entries ``e`` get ``exp(x[e] - max) / sum(exp(x[e'] - max))``; a row without entries
has nothing to normalise. This is sparse attention's normalisation (:func:`jaxsparse.attention`).
The reference is a segment max and a segment sum over row ids; on the CPU it lowers to a native
kernel (the scatters behind XLA's segment ops run element by element there).

Edge cases are the reference's, native kernel included: NaN is ignored by the row maximum, a
maximum that is not finite (a row of ``-inf`` scores, say) counts as 0, and a sum that is not
positive as 1; so a row holding a NaN gives NaN at that entry, and a masked (``-inf``) score 0.
The float32 kernel's exponential has a relative error of ~1e-7 and returns 0 below e^-87.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxsparse import _config
from jaxsparse._formats import INDEX_DTYPE, row_ids

__all__ = ["row_softmax", "row_softmax_p", "row_softmax_reference", "segment_softmax"]

row_softmax_p = Primitive("jaxsparse_row_softmax")


def row_softmax(values, indptr, *, backend: str | None = None):
    """The softmax over the entries of each row of a CSR matrix with ``indptr``."""
    return row_softmax_p.bind(values, indptr, backend=_config.resolve_backend(backend))


def segment_softmax(scores, rows, n_rows: int, keep=None, sorted_rows: bool = False):
    """Softmax of ``scores`` over the entries of each row (``rows`` gives each entry's row), with
    XLA's segment max and sum (any format, any platform). ``keep`` (bool, same shape) excludes
    entries; a row without any entry left gets zeros."""
    flat, r = scores.reshape(-1), rows.reshape(-1)
    if keep is not None:
        keep = keep.reshape(-1)
        flat = jnp.where(keep, flat, -jnp.inf)
    mx = jax.ops.segment_max(flat, r, num_segments=n_rows, indices_are_sorted=sorted_rows)
    mx = jnp.where(jnp.isfinite(mx), mx, jnp.zeros((), mx.dtype))
    p = jnp.exp(flat - mx[r])
    if keep is not None:
        p = jnp.where(keep, p, jnp.zeros((), p.dtype))
    den = jax.ops.segment_sum(p, r, num_segments=n_rows, indices_are_sorted=sorted_rows)
    den = jnp.where(den > 0, den, jnp.ones((), den.dtype))
    return (p / den[r]).reshape(scores.shape)


def row_softmax_reference(values, indptr, *, backend=None):
    """row_softmax_p by :func:`segment_softmax` (any platform)."""
    del backend
    n_rows, nnz = indptr.shape[0] - 1, values.shape[-1]
    rows = row_ids(indptr, nnz)
    one = lambda x: segment_softmax(x, rows, n_rows, sorted_rows=True)
    return jax.vmap(one)(values.reshape(-1, nnz)).reshape(values.shape)


def _abstract_eval(values, indptr, *, backend):
    if values.ndim < 1 or not jnp.issubdtype(values.dtype, jnp.floating):
        raise TypeError(f"row_softmax: values must be floating point [..., nnz], got "
                        f"{values.dtype}{list(values.shape)}")
    if indptr.ndim != 1 or indptr.dtype != INDEX_DTYPE or indptr.shape[0] < 1:
        raise TypeError(f"row_softmax: indptr must be int32 [rows + 1], got "
                        f"{indptr.dtype}{list(indptr.shape)}")
    return jax.core.ShapedArray(values.shape, values.dtype)


def _jvp(primals, tangents, *, backend):
    values, indptr = primals
    dx, _ = tangents
    p = row_softmax_p.bind(values, indptr, backend=backend)
    if type(dx) is ad.Zero:
        return p, ad.Zero.from_primal_value(p)
    # d softmax = p * (dx - sum_row(p * dx)): linear in dx, transposed by JAX (segment sums).
    nnz = values.shape[-1]
    rows = row_ids(indptr, nnz)
    row_sum = lambda x: jax.ops.segment_sum(x, rows, num_segments=indptr.shape[0] - 1,
                                            indices_are_sorted=True)
    s = jax.vmap(row_sum)((p * dx).reshape(-1, nnz))
    return p, p * (dx - s[:, rows].reshape(values.shape))


def _batch(args, dims, *, backend):
    values, indptr = args
    vd, idd = dims
    if idd is not None:
        out = jax.vmap(row_softmax_reference, in_axes=(vd, idd))(values, indptr)
        return out, 0
    return row_softmax_p.bind(jnp.moveaxis(values, vd, 0), indptr, backend=backend), 0


row_softmax_p.def_impl(functools.partial(jax._src.dispatch.apply_primitive, row_softmax_p))
row_softmax_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[row_softmax_p] = _jvp
batching.primitive_batchers[row_softmax_p] = _batch
mlir.register_lowering(row_softmax_p,
                       mlir.lower_fun(row_softmax_reference, multiple_results=False))
