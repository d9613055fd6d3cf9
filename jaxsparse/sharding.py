"""Sharding helpers: split a sparse matrix by rows into equal-shape shards for ``shard_map``.

A sparse matrix cannot be sharded like a dense array: its ``data``/``indices`` have a length (nnz)
that differs from one block of rows to the next. :func:`split_rows` cuts the *stored* rows into
``n_shards`` equal blocks and pads each block's entries with explicit zeros to the largest nnz, so
the shards have identical shapes and stack into **one** pytree whose arrays carry a leading shard
axis. Shard that axis over a mesh axis (``P("model")``) and, inside ``shard_map``, take the local
shard with :func:`local` (on four devices: not run as a doctest, see tests/test_sharding.py):

>>> mesh = jax.make_mesh((4,), ("model",))  # doctest: +SKIP
>>> w1 = jaxsparse.sharding.split_rows(W1, 4)  # W1 stored [hidden, in]  # doctest: +SKIP
>>> @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("model")),  # doctest: +SKIP
...                    out_specs=P(None, "model"))
... def layer(x, w):
...     return jax.nn.relu(x @ jaxsparse.sharding.local(w).T)   # [batch, hidden / 4] per device

Padding entries are explicit zeros placed at positions the shard does not store yet, so every
shard stays a valid matrix (sorted, no duplicates) and the products are unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse._formats import BSR, CSR, INDEX_DTYPE, SparseMatrix

__all__ = ["split_rows", "local"]


def _pad_positions(rows_cols: np.ndarray, n_rows: int, n_cols: int, count: int):
    """``count`` (row, col) positions of an ``n_rows x n_cols`` grid not in ``rows_cols``."""
    if count == 0:
        return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    taken = {}
    for r, c in rows_cols:
        taken.setdefault(int(r), set()).add(int(c))
    out_r, out_c = [], []
    for r in range(n_rows):
        used = taken.get(r, ())
        free = [c for c in range(n_cols) if c not in used][:count - len(out_r)]
        out_r += [r] * len(free)
        out_c += free
        if len(out_r) == count:
            break
    return np.asarray(out_r, np.int64), np.asarray(out_c, np.int64)


def _compress(rows, cols, vals, n_rows):
    order = np.lexsort((cols, rows))
    indptr = np.zeros(n_rows + 1, INDEX_DTYPE)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return vals[order], cols[order].astype(INDEX_DTYPE), indptr


def split_rows(a: SparseMatrix, n_shards: int) -> SparseMatrix:
    """Split the stored rows of a CSR or BSR ``a`` into ``n_shards`` equal-shape shards.

    Returns a matrix of ``a``'s type whose arrays have a leading axis of size ``n_shards``
    (``data`` ``[n_shards, nnz_max]``, ``indices`` ``[n_shards, nnz_max]``, ``indptr``
    ``[n_shards, rows / n_shards + 1]`` for CSR; blocks for BSR); its static shape is the shape of
    one shard, ``(M / n_shards, K)``. Shard ``i`` holds stored rows ``i * M / n_shards`` onwards.
    ``a``'s lazy transpose flag is kept: for ``x @ W.T`` with ``W`` stored ``[out, in]`` the shards
    split the outputs (tensor parallelism). Needs concrete arrays (a one-time host-side step, like
    building the matrix); use it outside ``jit``.
    """
    if not isinstance(a, (CSR, BSR)):
        raise TypeError(f"split_rows: expected a CSR or BSR matrix, got {type(a).__name__}")
    n_shards = int(n_shards)
    if any(isinstance(x, jax.core.Tracer) for x in a._children()):
        raise TypeError("split_rows: needs concrete arrays; call it outside jit")
    m, k = a.stored_shape
    blocked = isinstance(a, BSR)
    bm, bk = a.block_size if blocked else (1, 1)
    grid_rows, grid_cols = m // bm, k // bk
    if n_shards < 1 or grid_rows % n_shards:
        unit = "block rows" if blocked else "rows"
        raise ValueError(f"split_rows: n_shards={n_shards} must divide the {grid_rows} stored "
                         f"{unit} (stored shape={a.stored_shape}"
                         f"{f', block_size={a.block_size}' if blocked else ''})")
    data = np.asarray(a.data)
    indices = np.asarray(a.indices).astype(np.int64)
    indptr = np.asarray(a.indptr).astype(np.int64)
    rows_of = np.repeat(np.arange(grid_rows), np.diff(indptr))
    per = grid_rows // n_shards
    bounds = [(s * per, (s + 1) * per) for s in range(n_shards)]
    counts = [int(indptr[hi] - indptr[lo]) for lo, hi in bounds]
    width = max(counts) if counts else 0
    shards = []
    for (lo, hi), count in zip(bounds, counts):
        sl = slice(int(indptr[lo]), int(indptr[hi]))
        rows, cols, vals = rows_of[sl] - lo, indices[sl], data[sl]
        pr, pc = _pad_positions(zip(rows, cols), per, grid_cols, width - count)
        pad_vals = np.zeros((len(pr), *data.shape[1:]), data.dtype)
        shards.append(_compress(np.concatenate([rows, pr]), np.concatenate([cols, pc]),
                                np.concatenate([vals, pad_vals]), per))
    stacked = [jnp.asarray(np.stack(parts)) for parts in zip(*shards)]
    aux = ((per * bm, k), a.transposed)
    return type(a).tree_unflatten(aux, stacked)


def local(a: SparseMatrix) -> SparseMatrix:
    """Inside ``shard_map``: the device's shard of a :func:`split_rows` result (drops the leading
    shard axis, of size 1 there)."""
    def squeeze(x):
        if x.shape[0] != 1:
            raise ValueError(f"local: expected a leading shard axis of size 1 (one shard per "
                             f"device), got an array of shape {x.shape}")
        return x[0]

    return jax.tree.map(squeeze, a)
