"""Attention restricted to a static sparse pattern: SDDMM -> softmax over stored entries -> SpMM.

For every batch element and head, ``scores = (q * scale) @ k.T`` is computed only at the pattern's
entries (:data:`jaxsparse.sddmm_p`), normalised with a softmax over the stored entries of each row
(CSR patterns: ``row_softmax_p``, a native kernel on the CPU; BSR and N:M: a segment max / sum over
row ids), and multiplied with ``v`` (:data:`jaxsparse.spmm_p`). The
``q_len x k_len`` score matrix is never formed: memory is O(batch * heads * nnz).

A BSR pattern (float32, no mask or a key-padding mask) is one primitive instead,
:data:`jaxsparse._block_attention.block_attention_p`, fused into a single native kernel on the CPU
whose scores never leave the cache; the path above is its reference and its derivative.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import _config
from jaxsparse._block_attention import block_attention_p
from jaxsparse._formats import INDEX_DTYPE, CSR, SparseMatrix, nm_columns, row_ids
from jaxsparse._sddmm import sddmm_values
from jaxsparse._softmax import row_softmax, segment_softmax
from jaxsparse._spmm import compute_dtype, spmm

__all__ = ["attention", "unfused_attention"]

#: Above this many stored entries over all batch elements and heads, heads are mapped over.
_FOLD_MAX_ENTRIES = 1 << 21


def _entry_coords(pattern: SparseMatrix):
    """Row and column of every stored entry, shaped like the pattern's values."""
    vshape = pattern.values.shape
    if pattern.fmt == "csr":
        if not isinstance(pattern.indptr, jax.core.Tracer):
            # Static pattern: on the host (XLA would constant-fold the cumsum, slowly).
            ip = np.asarray(pattern.indptr)
            return np.repeat(np.arange(ip.shape[0] - 1, dtype=INDEX_DTYPE), np.diff(ip)), \
                pattern.indices
        return row_ids(pattern.indptr, vshape[0]), pattern.indices
    if pattern.fmt == "bsr":
        nb, bm, bk = vshape
        brow = row_ids(pattern.indptr, nb)
        rows = brow[:, None, None] * bm + jnp.arange(bm, dtype=INDEX_DTYPE)[None, :, None]
        cols = pattern.indices[:, None, None] * bk + jnp.arange(bk, dtype=INDEX_DTYPE)[None, None, :]
        return jnp.broadcast_to(rows, vshape), jnp.broadcast_to(cols, vshape)
    cols = nm_columns(pattern.positions, pattern.n, pattern.m)
    rows = jnp.broadcast_to(jnp.arange(vshape[0], dtype=INDEX_DTYPE)[:, None], vshape)
    return rows, cols


def _block_diagonal(pattern: CSR, copies: int):
    """``copies`` copies of a CSR pattern along the diagonal (one bigger CSR).

    The expansion runs on device; a static pattern enters as a constant behind an optimization
    barrier, so XLA neither constant-folds the expansion (slow to compile) nor embeds the
    ``copies``-times bigger arrays in the program."""
    m, k = pattern.shape
    nnz = pattern.indices.shape[0]
    indices, indptr = jax.lax.optimization_barrier(
        (jnp.asarray(pattern.indices), jnp.asarray(pattern.indptr)))
    c = jnp.arange(copies, dtype=INDEX_DTYPE)[:, None]
    big_indices = (indices[None, :] + c * k).reshape(-1)
    big_indptr = jnp.concatenate([(indptr[None, :-1] + c * nnz).reshape(-1),
                                  jnp.full((1,), copies * nnz, INDEX_DTYPE)])
    data = jnp.zeros((copies * nnz,), pattern.dtype)
    return CSR.tree_unflatten(((copies * m, copies * k), False), (data, big_indices, big_indptr))


def _single_head(q, k, v, pattern, keep, backend, rows=None):
    """One (batch, head): q [Sq, D] (already scaled), k [Sk, D], v [Sk, Dv] -> [Sq, Dv]. ``rows``:
    the row of every stored entry (BSR and N:M patterns; computed when not given)."""
    pattern = pattern.astype(q.dtype)
    s = sddmm_values(q, k, pattern, transpose_rhs=True, backend=backend)
    s = s.astype(compute_dtype(s.dtype))
    if pattern.fmt == "csr":  # a native kernel on the CPU (row_softmax_p)
        if keep is not None:
            s = jnp.where(keep.reshape(s.shape), s, jnp.asarray(-jnp.inf, s.dtype))
        p = row_softmax(s, jnp.asarray(pattern.indptr), backend=backend)
    else:
        if rows is None:
            rows, _ = _entry_coords(pattern)
        p = segment_softmax(s, rows, pattern.shape[0], keep, sorted_rows=pattern.fmt != "bsr")
    return spmm(pattern.with_values(p.astype(v.dtype)), v, layout="kn", backend=backend)


def _is_pow2_16(x: int) -> bool:
    return x >= 16 and x & (x - 1) == 0


def _fused_mode(backend, pattern, mask, d, dv, dtype):
    """The Pallas mode ("pallas" or "pallas-interpret") in which the fused block-sparse attention
    kernel serves this call, or None for the SDDMM -> softmax -> SpMM path. It serves BSR patterns
    without an extra mask when the Pallas backends are chosen, and under "auto" on a GPU."""
    chosen = _config.resolve_backend(backend)
    on_gpu = jax.default_backend() == "gpu"
    if chosen == "auto" and on_gpu:
        chosen = "pallas"
    if chosen not in ("pallas", "pallas-interpret") or pattern.fmt != "bsr" or mask is not None:
        return None
    if dv != d or not _is_pow2_16(d) or not all(_is_pow2_16(x) for x in pattern.block_size):
        return None
    if not any(dtype == t for t in (jnp.float32, jnp.bfloat16, jnp.float16)):
        return None
    if chosen == "pallas":
        from jaxsparse import pallas as jsp
        if not on_gpu or jsp.gpu_capability_reason():
            return None
    return chosen


def attention(query, key, value, pattern: SparseMatrix, *, scale: float | None = None,
              mask=None, bias=None, dropout_rate: float = 0.0, deterministic: bool = True,
              dtype=None, precision=None, module=None, is_causal: bool = False,
              dropout_rng=None, broadcast_dropout: bool = True, fold_heads: bool | None = None,
              backend: str | None = None):
    """Multi-head attention restricted to the static sparse ``pattern`` ``[q_len, k_len]``.

    ``query`` ``[..., q_len, heads, head_dim]``, ``key`` ``[..., k_len, heads, head_dim]``,
    ``value`` ``[..., k_len, heads, v_dim]`` as in :func:`jax.nn.dot_product_attention` (leading
    batch dims fold into one); returns ``[..., q_len, heads, v_dim]``. Query ``i`` attends only to
    the keys stored in row ``i`` of ``pattern`` (CSR, BSR or N:M; see :mod:`jaxsparse.patterns`),
    with a softmax over those entries; **a row with no allowed key gives zeros** (a dense masked
    softmax would instead average all values).

    ``mask`` (optional, bool, broadcastable to ``[batch, heads, q_len, k_len]``, e.g. a padding
    mask ``[batch, 1, 1, k_len]``) removes further entries; it is only read at the pattern's
    entries, so a broadcastable mask is never expanded. Rows whose entries are all masked give
    zeros as well. ``bias`` and dropout are not supported (``dropout_rate`` must be 0 unless
    ``deterministic``). The remaining keywords are accepted so that
    ``functools.partial(attention, pattern=p)`` serves as ``nnx.MultiHeadAttention``'s
    ``attention_fn``.

    ``fold_heads=True`` computes all batch elements and heads with one SDDMM and one SpMM on a
    block-diagonal copy of the pattern (CSR only); ``False`` maps over them one at a time
    (``lax.map``), so memory stays O(nnz). The default folds small problems (at most 2M stored
    entries over all batch elements and heads) and maps over larger ones.

    On a GPU (backend ``"auto"`` or ``"pallas"``), and with ``backend="pallas-interpret"``
    anywhere, a BSR pattern without ``mask`` whose block sizes and head dim are powers of two
    >= 16 runs the fused flash-style kernel :func:`jaxsparse.pallas.block_sparse_attention`
    instead (forward only: differentiate with ``backend="reference"``). Otherwise (backend
    ``"auto"`` or ``"ffi"``) a float32 BSR pattern with no ``mask``, or one that only removes
    keys (``[batch or 1, 1, 1, k_len]``), is computed in one fused pass: on the CPU a native
    kernel that never writes the scores to memory, elsewhere the unfused path; derivatives go
    through the unfused path. With :func:`jaxsparse.patterns.full` that is exact dense attention.

    >>> p = jaxsparse.patterns.causal(4)
    >>> q = jnp.ones((1, 4, 2, 8), jnp.float32)
    >>> attention(q, q, q, p).shape
    (1, 4, 2, 8)
    """
    del precision, module, dropout_rng, broadcast_dropout
    if not isinstance(pattern, SparseMatrix):
        raise TypeError(f"attention: pattern must be a jaxsparse matrix (see jaxsparse.patterns), "
                        f"got {type(pattern).__name__}")
    if bias is not None:
        raise NotImplementedError("attention: an additive bias is not supported on a sparse pattern")
    if dropout_rate and not deterministic:
        raise NotImplementedError("attention: dropout is not supported (use deterministic=True)")
    if is_causal:
        raise ValueError("attention: is_causal is expressed by the pattern "
                         "(jaxsparse.patterns.causal), not by a flag")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if dtype is not None:
        query, key, value = (a.astype(dtype) for a in (query, key, value))
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(f"attention: query, key and value must be [..., seq, heads, dim] with the "
                         f"same rank, got query.shape={query.shape}, key.shape={key.shape}, "
                         f"value.shape={value.shape}")
    *lead, sq, h, d = query.shape
    sk = key.shape[-3]
    if key.shape[:-3] != tuple(lead) or value.shape[:-3] != tuple(lead):
        raise ValueError(f"attention: batch dims differ: query.shape={query.shape}, "
                         f"key.shape={key.shape}, value.shape={value.shape}")
    if key.shape[-2:] != (h, d) or value.shape[-3:-1] != (sk, h):
        raise ValueError(f"attention: key must be [..., k_len, {h}, {d}] and value "
                         f"[..., k_len, {h}, v_dim]; got key.shape={key.shape}, "
                         f"value.shape={value.shape}")
    if pattern.shape != (sq, sk):
        raise ValueError(f"attention: pattern.shape={pattern.shape} does not match "
                         f"(q_len, k_len)=({sq}, {sk})")
    dt = jnp.result_type(query.dtype, key.dtype, value.dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"attention: query, key, value must be floating point, got {dt}")
    query, key, value = (a.astype(dt) for a in (query, key, value))
    if pattern.transposed:
        raise ValueError("attention: pass the pattern [q_len, k_len] as stored (not a .T view)")
    b = int(np.prod(lead)) if lead else 1
    dv = value.shape[-1]
    fused = _fused_mode(backend, pattern, mask, d, dv, dt)
    if fused is not None:  # flash-style Pallas kernel over the pattern's blocks (forward only)
        from jaxsparse import pallas as jsp
        out = jsp.block_sparse_attention(query.reshape(b, sq, h, d), key.reshape(b, sk, h, d),
                                         value.reshape(b, sk, h, dv), pattern, scale=scale,
                                         interpret=fused == "pallas-interpret")
        return out.reshape(*lead, sq, h, dv)
    scale = (1.0 / np.sqrt(d)) if scale is None else float(scale)
    query, key, value = (query.reshape(b, sq, h, d), key.reshape(b, sk, h, d),
                         value.reshape(b, sk, h, dv))
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.ndim > 4 or mask.ndim < 2:
            raise ValueError(f"attention: mask must be broadcastable to [batch, heads, q_len, "
                             f"k_len], got mask.shape={mask.shape}")
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mb, mh, mq, mk = mask.shape
        if mb not in (1, b) or mh not in (1, h) or mq not in (1, sq) or mk not in (1, sk):
            raise ValueError(f"attention: mask.shape={mask.shape} is not broadcastable to "
                             f"{(b, h, sq, sk)}")
    chosen = _config.resolve_backend(backend)
    if (pattern.fmt == "bsr" and chosen in ("auto", "ffi") and dt == jnp.float32
            and (mask is None or mask.shape[1:3] == (1, 1))):
        # One fused pass over the pattern's blocks (a native kernel on the CPU); the mask, if
        # any, only says which keys each batch element may attend to.
        keep = (jnp.ones((1, sk), bool) if mask is None else
                jnp.broadcast_to(mask[:, 0, 0, :].astype(bool), (mask.shape[0], sk)))
        out = block_attention_p.bind(
            query, key, value, jnp.asarray(pattern.indptr, INDEX_DTYPE),
            jnp.asarray(pattern.indices, INDEX_DTYPE), keep, scale=scale,
            block_k=pattern.block_size[1], fold_heads=fold_heads, backend=chosen)
    else:
        out = unfused_attention(query, key, value, pattern, scale=scale, mask=mask,
                                fold_heads=fold_heads, backend=backend)
    return out.reshape(*lead, sq, h, dv)


def unfused_attention(query, key, value, pattern: SparseMatrix, *, scale: float, mask,
                      fold_heads: bool | None, backend):
    """:func:`attention` of ``query`` ``[b, sq, h, d]``, ``key`` ``[b, sk, h, d]``, ``value``
    ``[b, sk, h, dv]`` as SDDMM -> softmax over stored entries -> SpMM, one (batch, head) at a
    time or all heads folded into one block-diagonal pattern. ``mask``: None or a bool array
    ``[mb, mh, mq, mk]`` broadcastable to ``[b, h, sq, sk]``. Returns ``[b, sq, h, dv]``."""
    b, sq, h, d = query.shape
    sk, dv = key.shape[1], value.shape[-1]
    dt = query.dtype
    # [B, H, S, D]
    q = (query * jnp.asarray(scale, dt)).transpose(0, 2, 1, 3)
    k = key.transpose(0, 2, 1, 3)
    v = value.transpose(0, 2, 1, 3)

    keep = None
    if mask is not None:
        mb, mh, mq, mk = mask.shape
        rows, cols = _entry_coords(pattern)
        g = mask[:, :, rows if mq > 1 else jnp.zeros_like(rows),
                 cols if mk > 1 else jnp.zeros_like(cols)]  # [mb, mh, *values.shape]
        keep = jnp.broadcast_to(g.astype(bool), (b, h) + g.shape[2:])

    if fold_heads is None:
        # Folding saves kernel launches on small problems; mapping keeps memory O(nnz).
        fold_heads = pattern.fmt == "csr" and b * h * pattern.nnz <= _FOLD_MAX_ENTRIES
    if fold_heads and pattern.fmt == "csr":
        out = _single_head(q.reshape(b * h * sq, d), k.reshape(b * h * sk, d),
                           v.reshape(b * h * sk, dv), _block_diagonal(pattern, b * h),
                           None if keep is None else keep.reshape(-1), backend)
        out = out.reshape(b, h, sq, dv)
    else:
        # One (batch, head) at a time: peak memory O(nnz), not O(batch * heads * nnz).
        rows = None  # CSR patterns need no row ids (the softmax reads indptr)
        if pattern.fmt != "csr":
            rows = jax.lax.optimization_barrier(jnp.asarray(_entry_coords(pattern)[0]))
        qs, ks, vs = (a.reshape(b * h, *a.shape[2:]) for a in (q, k, v))
        if keep is None:
            body = lambda xs: _single_head(*xs, pattern, None, backend, rows)
            out = jax.lax.map(body, (qs, ks, vs))
        else:
            body = lambda xs: _single_head(*xs[:3], pattern, xs[3], backend, rows)
            out = jax.lax.map(body, (qs, ks, vs, keep.reshape(b * h, *keep.shape[2:])))
        out = out.reshape(b, h, sq, dv)
    return out.transpose(0, 2, 1, 3)
