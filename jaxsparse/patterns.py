"""Static attention patterns, built with NumPy on the host in O(nnz) memory.

Each function returns a sparse matrix of shape ``(seq_len, seq_len)`` whose stored entries are the
allowed (query, key) pairs: row ``i`` lists the keys query ``i`` may attend to. The stored values are
ones and are ignored by :func:`jaxsparse.attention` and :func:`jaxsparse.sddmm`; only the structure
matters. The dense ``seq_len x seq_len`` mask is never built (except by :func:`from_mask`, whose
input already is one).

>>> p = causal(4)
>>> p.indptr.tolist()
[0, 1, 3, 6, 10]
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxsparse._formats import BSR, CSR, INDEX_DTYPE

__all__ = ["causal", "local", "strided", "bigbird", "from_mask", "full"]


def _check_len(seq_len, where: str) -> int:
    if int(seq_len) != seq_len or seq_len < 1:
        raise ValueError(f"{where}: seq_len must be a positive int, got seq_len={seq_len!r}")
    return int(seq_len)


def _check_positive(value, name: str, where: str, *, zero_ok: bool = False) -> int:
    low = 0 if zero_ok else 1
    if int(value) != value or value < low:
        kind = "non-negative" if zero_ok else "positive"
        raise ValueError(f"{where}: {name} must be a {kind} int, got {name}={value!r}")
    return int(value)


def _csr_from_ranges(starts: np.ndarray, stops: np.ndarray, n: int) -> CSR:
    """CSR whose row ``i`` holds the columns ``starts[i] .. stops[i] - 1`` (O(nnz))."""
    counts = np.maximum(stops - starts, 0).astype(np.int64)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    # Column of entry e in row r: starts[r] + (e - indptr[r]).
    offset = np.repeat(starts.astype(np.int64) - indptr[:-1], counts)
    indices = np.arange(nnz, dtype=np.int64) + offset
    return _csr(indices, indptr, n)


def _csr_from_coo(rows: np.ndarray, cols: np.ndarray, n: int) -> CSR:
    """CSR of the union of (row, col) pairs (duplicates dropped, sorted)."""
    key = np.unique(rows.astype(np.int64) * n + cols.astype(np.int64))
    rows, cols = np.divmod(key, n)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return _csr(cols, indptr, n)


def _csr(indices, indptr, n) -> CSR:
    if indptr[-1] > np.iinfo(INDEX_DTYPE).max:
        raise ValueError(f"pattern has {indptr[-1]} entries, more than int32 indices can address")
    data = jnp.ones((int(indptr[-1]),), jnp.float32)
    return CSR((data, jnp.asarray(indices.astype(INDEX_DTYPE)),
                jnp.asarray(indptr.astype(INDEX_DTYPE))), shape=(n, n))


def causal(seq_len: int) -> CSR:
    """Query ``i`` attends to keys ``0 .. i`` (lower triangle, diagonal included)."""
    n = _check_len(seq_len, "causal")
    rows = np.arange(n)
    return _csr_from_ranges(np.zeros(n, np.int64), rows + 1, n)


def local(seq_len: int, window: int, causal: bool = False) -> CSR:
    """Sliding window: query ``i`` attends to keys ``j`` with ``|i - j| <= window``, or with
    ``0 <= i - j <= window`` when ``causal`` (so each row holds up to ``2 * window + 1``, or
    ``window + 1``, keys)."""
    n = _check_len(seq_len, "local")
    w = _check_positive(window, "window", "local", zero_ok=True)
    rows = np.arange(n, dtype=np.int64)
    starts = np.maximum(rows - w, 0)
    stops = rows + 1 if causal else np.minimum(rows + w + 1, n)
    return _csr_from_ranges(starts, stops, n)


def strided(seq_len: int, stride: int, causal: bool = False) -> CSR:
    """Sparse Transformer's strided pattern (Child et al., 2019): query ``i`` attends to key ``j``
    when ``|i - j| < stride`` (the local band) or ``(i - j) % stride == 0`` (the strided "column"
    heads); with ``causal`` only keys ``j <= i``. O(seq_len^2 / stride + seq_len * stride) entries."""
    n = _check_len(seq_len, "strided")
    s = _check_positive(stride, "stride", "strided")
    rows = np.arange(n, dtype=np.int64)
    # Band |i - j| < stride.
    b_start = np.maximum(rows - s + 1, 0)
    b_stop = rows + 1 if causal else np.minimum(rows + s, n)
    band_counts = b_stop - b_start
    band_rows = np.repeat(rows, band_counts)
    band_ptr = np.concatenate([[0], np.cumsum(band_counts)])
    band_cols = np.arange(band_rows.size) - np.repeat(band_ptr[:-1] - b_start, band_counts)
    # Strided keys j = i - t * stride for t >= 1 (and t <= -1 unless causal).
    back = rows // s  # number of j = i - t*s >= 0 with t >= 1
    fwd = np.zeros(n, np.int64) if causal else (n - 1 - rows) // s
    counts = back + fwd
    st_rows = np.repeat(rows, counts)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    t = np.arange(st_rows.size) - np.repeat(ptr[:-1], counts)  # 0 .. counts-1
    back_r = np.repeat(back, counts)
    st_cols = np.where(t < back_r, st_rows - (t + 1) * s, st_rows + (t - back_r + 1) * s)
    return _csr_from_coo(np.concatenate([band_rows, st_rows]),
                         np.concatenate([band_cols, st_cols]), n)


def bigbird(seq_len: int, window: int, n_global: int, n_random: int, seed: int = 0) -> CSR:
    """BigBird (Zaheer et al., 2020): a local band ``|i - j| <= window``, ``n_global`` global
    tokens (the first ones: they attend to every key and every query attends to them) and
    ``n_random`` random keys per query (drawn with ``numpy.random.default_rng(seed)``, so the
    pattern is reproducible)."""
    n = _check_len(seq_len, "bigbird")
    w = _check_positive(window, "window", "bigbird", zero_ok=True)
    g = _check_positive(n_global, "n_global", "bigbird", zero_ok=True)
    r = _check_positive(n_random, "n_random", "bigbird", zero_ok=True)
    if g > n:
        raise ValueError(f"bigbird: n_global={g} exceeds seq_len={n}")
    band = local(n, w)
    parts_r = [np.repeat(np.arange(n), np.diff(np.asarray(band.indptr)))]
    parts_c = [np.asarray(band.indices).astype(np.int64)]
    if g:
        allr = np.arange(n, dtype=np.int64)
        # Global queries see every key; every query sees the global keys.
        parts_r += [np.repeat(np.arange(g), n), np.repeat(allr, g)]
        parts_c += [np.tile(allr, g), np.tile(np.arange(g), n)]
    if r:
        rng = np.random.default_rng(seed)
        parts_r.append(np.repeat(np.arange(n, dtype=np.int64), r))
        parts_c.append(rng.integers(0, n, size=n * r))
    return _csr_from_coo(np.concatenate(parts_r), np.concatenate(parts_c), n)


def full(q_len: int, k_len: int | None = None, *, block_size=None) -> BSR:
    """Every query attends to every key (dense attention), as a BSR pattern: one block of
    ``(q_len, k_len)`` (``k_len`` defaults to ``q_len``), or all blocks of ``block_size`` (an int
    for square blocks). :func:`jaxsparse.attention` runs a BSR pattern in one fused pass, on the
    CPU with a native kernel, so this is exact dense attention without the
    ``[batch, heads, q_len, k_len]`` scores in memory.

    >>> full(4).block_size, full(4, block_size=2).indices.tolist()
    ((4, 4), [0, 1, 0, 1])
    """
    q = _check_len(q_len, "full")
    k = q if k_len is None else _check_len(k_len, "full")
    if block_size is None:
        bq, bk = q, k
    else:
        bq, bk = (block_size, block_size) if np.isscalar(block_size) else tuple(block_size)
    if int(bq) != bq or int(bk) != bk or bq < 1 or bk < 1 or q % bq or k % bk:
        raise ValueError(f"full: block_size={block_size!r} must divide (q_len, k_len)={(q, k)}")
    return from_mask(np.ones((q, k), bool), block_size=(bq, bk))


def from_mask(mask, block_size=None) -> CSR | BSR:
    """The pattern of a boolean ``[q_len, k_len]`` mask (True = may attend): CSR, or BSR with
    ``block_size=(bq, bk)`` (or an int for square blocks), in which case every block holding any
    True entry is stored whole, so the pattern allows the full block."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"from_mask: mask must be 2-D [q_len, k_len], got mask.shape={m.shape}")
    m = m.astype(bool)
    if block_size is None:
        data = jnp.ones((int(m.sum()),), jnp.float32)
        rows, cols = np.nonzero(m)
        indptr = np.zeros(m.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=m.shape[0]), out=indptr[1:])
        return CSR((data, jnp.asarray(cols.astype(INDEX_DTYPE)),
                    jnp.asarray(indptr.astype(INDEX_DTYPE))), shape=m.shape)
    bq, bk = (block_size, block_size) if np.isscalar(block_size) else tuple(block_size)
    q, k = m.shape
    if bq < 1 or bk < 1 or q % bq or k % bk:
        raise ValueError(f"from_mask: block_size={(bq, bk)} must divide mask.shape={m.shape}")
    occupied = m.reshape(q // bq, bq, k // bk, bk).any(axis=(1, 3))
    br, bc = np.nonzero(occupied)
    indptr = np.zeros(q // bq + 1, np.int64)
    np.cumsum(np.bincount(br, minlength=q // bq), out=indptr[1:])
    data = jnp.ones((br.size, bq, bk), jnp.float32)
    return BSR((data, jnp.asarray(bc.astype(INDEX_DTYPE)), jnp.asarray(indptr.astype(INDEX_DTYPE))),
               shape=m.shape)
