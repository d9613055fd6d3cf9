"""Fused block-sparse attention as the primitive ``block_attention_p``.

``block_attention_p.bind(q, k, v, indptr, indices, keep, scale, block_k, fold_heads, backend)``:
``q`` ``[B, Sq, H, D]``, ``k`` ``[B, Sk, H, D]``, ``v`` ``[B, Sk, H, Dv]`` (the layout of
:func:`jax.nn.dot_product_attention`), the structure of a BSR pattern ``[Sq, Sk]`` with blocks of
``Sq / len(indptr - 1)`` rows and ``block_k`` columns (``indptr``, ``indices``: int32), and
``keep`` bool ``[1 or B, Sk]``, the keys each batch element may attend to (a padding mask).
Returns ``[B, Sq, H, Dv]``: for each query row, the softmax of ``scale * q . k`` over the keys of
its block row's blocks that ``keep`` allows, times ``v``; a row without such a key gives zeros.

This is :func:`jaxsparse.attention` on a BSR pattern, computed in one pass: on the CPU a native
kernel keeps each tile's scores in cache (``cpp/attention.cc``); the reference, on every platform
and for the derivatives, is the unfused SDDMM -> row softmax -> SpMM of :mod:`jaxsparse._attention`.
The JVP is the reference's (linear in the tangents, so ``grad`` transposes it through SDDMM and
SpMM); batching folds a mapped axis into ``B``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxsparse._formats import BSR, INDEX_DTYPE

__all__ = ["block_attention_p", "block_attention_reference"]

block_attention_p = Primitive("jaxsparse_block_attention")


def _pattern(q, k, indptr, indices, block_k) -> BSR:
    """The BSR pattern [Sq, Sk] of these index arrays (zero values of q's dtype)."""
    sq, sk = q.shape[1], k.shape[1]
    bm = sq // (indptr.shape[0] - 1)
    data = jnp.zeros((indices.shape[0], bm, block_k), q.dtype)
    return BSR.tree_unflatten(((sq, sk), False), (data, indices, indptr))


def block_attention_reference(q, k, v, indptr, indices, keep, *, scale, block_k, fold_heads,
                              backend):
    """block_attention_p by the unfused SDDMM -> softmax -> SpMM path (any platform)."""
    from jaxsparse._attention import unfused_attention

    return unfused_attention(q, k, v, _pattern(q, k, indptr, indices, block_k), scale=scale,
                             mask=keep[:, None, None, :], fold_heads=fold_heads, backend=backend)


def _abstract_eval(q, k, v, indptr, indices, keep, *, scale, block_k, fold_heads, backend):
    del scale, fold_heads, backend
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise TypeError(f"block_attention: q, k, v must be [B, S, H, D], got q{list(q.shape)}, "
                        f"k{list(k.shape)}, v{list(v.shape)}")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if k.shape != (b, sk, h, d) or v.shape[:3] != (b, sk, h):
        raise TypeError(f"block_attention: k must be [{b}, Sk, {h}, {d}] and v [{b}, Sk, {h}, Dv],"
                        f" got k{list(k.shape)}, v{list(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"block_attention: q, k, v must share a floating dtype, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    for name, a in (("indptr", indptr), ("indices", indices)):
        if a.ndim != 1 or a.dtype != INDEX_DTYPE:
            raise TypeError(f"block_attention: {name} must be int32 [n], got {a.dtype}"
                            f"{list(a.shape)}")
    rows = indptr.shape[0] - 1
    if rows < 1 or sq % rows or block_k < 1 or sk % block_k:
        raise ValueError(f"block_attention: the blocks ({sq} / {rows} rows, {block_k} columns) "
                         f"must divide the pattern's shape ({sq}, {sk})")
    if keep.ndim != 2 or keep.dtype != jnp.bool_ or keep.shape[0] not in (1, b) \
            or keep.shape[1] != sk:
        raise TypeError(f"block_attention: keep must be bool [1 or {b}, {sk}], got {keep.dtype}"
                        f"{list(keep.shape)}")
    return jax.core.ShapedArray((b, sq, h, v.shape[3]), q.dtype)


def _jvp(primals, tangents, **params):
    q, k, v, indptr, indices, keep = primals
    out = block_attention_p.bind(*primals, **params)
    dq, dk, dv = (ad.instantiate_zeros(t) for t in tangents[:3])
    ref = lambda q, k, v: block_attention_reference(q, k, v, indptr, indices, keep, **params)
    _, dout = jax.jvp(ref, (q, k, v), (dq, dk, dv))
    return out, dout


def _batch(args, dims, **params):
    n = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    # The mapped axis first; q, k, v (and, for a batch of patterns, everything) broadcast.
    per_pattern = dims[3] is not None or dims[4] is not None
    q, k, v, indptr, indices, keep = (
        jnp.moveaxis(x, d, 0) if d is not None else
        jnp.broadcast_to(x, (n,) + x.shape) if i < 3 or per_pattern else x
        for i, (x, d) in enumerate(zip(args, dims)))
    if per_pattern:  # one at a time
        return jax.lax.map(lambda a: block_attention_p.bind(*a, **params),
                           (q, k, v, indptr, indices, keep)), 0
    b = q.shape[1]
    if dims[5] is not None:  # [n, 1 or b, Sk] -> [n * b, Sk]
        keep = jnp.broadcast_to(keep, (n, b, keep.shape[-1])).reshape(n * b, -1)
    elif keep.shape[0] == b and b > 1:  # row i * b + j of the folded batch is keep[j]
        keep = jnp.tile(keep, (n, 1))
    fold = lambda x: x.reshape((n * b,) + x.shape[2:])
    out = block_attention_p.bind(fold(q), fold(k), fold(v), indptr, indices, keep, **params)
    return out.reshape((n, b) + out.shape[1:]), 0


block_attention_p.def_impl(functools.partial(jax._src.dispatch.apply_primitive,
                                             block_attention_p))
block_attention_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[block_attention_p] = _jvp
batching.primitive_batchers[block_attention_p] = _batch
mlir.register_lowering(block_attention_p,
                       mlir.lower_fun(block_attention_reference, multiple_results=False))
