"""Sparse matrix formats: CSR, BSR and N:M, as pytrees with static metadata.

Every format stores a 2-D matrix of *stored* shape ``(M, K)``; ``.T`` flips a static
``transposed`` flag instead of moving data, so ``x @ w.T`` on a weight kept as ``[out, in]`` reaches
the kernels without a transposed copy. ``.shape`` is always the logical shape.

Arrays are pytree children; shape, transposition and N:M metadata are static and hashable, so the
formats pass through ``jit``, ``vmap``, ``grad`` and ``tree_map``. Construction from concrete arrays
validates the structure; construction from traced arrays (inside ``jit``) checks shapes only,
and the kernels check values at run time.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SparseMatrix", "CSR", "BSR", "NM"]

INDEX_DTYPE = np.int32
POSITION_DTYPE = np.uint8
_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _as_array(x, name: str, cls: str):
    if isinstance(x, (jax.Array, np.ndarray)):
        return x
    if isinstance(x, jax.ShapeDtypeStruct) or x is None:
        return x
    try:
        return jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"{cls}: {name} must be an array, got {type(x).__name__}") from e


def _check_float(data, cls: str, name: str = "data"):
    if not any(data.dtype == d for d in _FLOAT_DTYPES):
        raise TypeError(
            f"{cls}: {name} must have a floating dtype (float16, bfloat16, float32, float64), "
            f"got {name}.dtype={data.dtype}")


def _check_index_dtype(x, name: str, cls: str):
    """Integer index arrays become int32; values must fit (checked when concrete)."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{cls}: {name} must have an integer dtype, got {name}.dtype={x.dtype}")
    if x.dtype == INDEX_DTYPE:
        return x
    if _is_concrete(x):
        xs = np.asarray(x)
        if xs.size and (xs.max() > np.iinfo(INDEX_DTYPE).max or xs.min() < np.iinfo(INDEX_DTYPE).min):
            raise ValueError(f"{cls}: {name} values do not fit in int32 (max={xs.max()})")
        return jnp.asarray(xs.astype(INDEX_DTYPE)) if isinstance(x, jax.Array) else xs.astype(INDEX_DTYPE)
    # Traced: values that do not fit int32 must not wrap around into range; they become -1, which
    # the run-time check reports (an index or indptr entry can never be negative).
    return _narrow_traced(x, INDEX_DTYPE, -1)


def _narrow_traced(x, dtype, invalid):
    """``x.astype(dtype)`` for a traced integer array, with values ``dtype`` cannot hold mapped
    to ``invalid`` instead of wrapping around."""
    src, dst = jnp.iinfo(x.dtype), np.iinfo(dtype)
    out = x.astype(dtype)
    if src.max > dst.max or src.min < dst.min:
        bad = x > src.dtype.type(dst.max)
        if src.min < 0 and src.min < dst.min:
            bad = bad | (x < src.dtype.type(dst.min))
        out = jnp.where(bad, dtype(invalid), out)
    return out


def _check_shape(shape, cls: str) -> tuple[int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as e:
        raise TypeError(f"{cls}: shape must be a tuple of two ints, got shape={shape!r}") from e
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"{cls}: shape must be two non-negative ints, got shape={shape}")
    return shape


def _validate_compressed(indices, indptr, rows: int, cols: int, cls: str, blocked: bool):
    """Structure checks of a compressed-row layout (CSR, or BSR over block rows/cols)."""
    unit, entries = ("block ", "blocks") if blocked else ("", "entries")
    if indptr.ndim != 1 or indptr.shape[0] != rows + 1:
        raise ValueError(f"{cls}: indptr must have shape ({rows + 1},) for {rows} {unit}rows, "
                         f"got indptr.shape={indptr.shape}")
    if not (_is_concrete(indices) and _is_concrete(indptr)):
        return
    ip = np.asarray(indptr).astype(np.int64)
    ix = np.asarray(indices).astype(np.int64)
    nnz = ix.shape[0]
    if ip[0] != 0:
        raise ValueError(f"{cls}: indptr[0] must be 0, got indptr[0]={ip[0]}")
    steps = np.diff(ip)
    if (steps < 0).any():
        r = int(np.argmax(steps < 0))
        raise ValueError(f"{cls}: indptr must be non-decreasing, but indptr[{r + 1}]={ip[r + 1]} < "
                         f"indptr[{r}]={ip[r]}")
    if ip[-1] != nnz:
        raise ValueError(f"{cls}: indptr[-1] must equal the number of stored {entries} "
                         f"(len(indices)={nnz}), got indptr[-1]={ip[-1]}")
    if nnz == 0:
        return
    bad = (ix < 0) | (ix >= cols)
    if bad.any():
        p = int(np.argmax(bad))
        raise ValueError(f"{cls}: indices[{p}]={ix[p]} is out of range [0, {cols}) "
                         f"for {cols} {unit}columns")
    rows_of = np.repeat(np.arange(rows), steps)
    same_row = rows_of[1:] == rows_of[:-1]
    order = np.diff(ix)
    if (same_row & (order == 0)).any():
        p = int(np.argmax(same_row & (order == 0))) + 1
        raise ValueError(f"{cls}: duplicate {unit or 'entry '}at {unit}row {rows_of[p]}, "
                         f"column {ix[p]} (indices[{p}]); sum duplicates first "
                         f"(e.g. scipy's sum_duplicates())")
    if (same_row & (order < 0)).any():
        p = int(np.argmax(same_row & (order < 0))) + 1
        raise ValueError(f"{cls}: indices must be sorted within each row; row {rows_of[p]} has "
                         f"indices[{p - 1}]={ix[p - 1]} before indices[{p}]={ix[p]} "
                         f"(sort them first, e.g. scipy's sort_indices())")


def row_ids(indptr, nnz: int):
    """Row of each stored entry of a compressed layout, as int32 [nnz] (traceable)."""
    if nnz == 0:
        return jnp.zeros((0,), INDEX_DTYPE)
    marks = jnp.zeros((nnz,), INDEX_DTYPE).at[indptr[1:-1]].add(1, mode="drop")
    return jnp.cumsum(marks, dtype=INDEX_DTYPE)


class SparseMatrix:
    """Base class of the sparse formats: logical shape, transposition, operators."""

    fmt: str = ""
    _shape: tuple[int, int]
    transposed: bool
    # NumPy arrays defer to our __rmatmul__ instead of treating the matrix as an object array.
    __array_ufunc__ = None

    # -- pytree protocol --------------------------------------------------------------------
    def _children(self) -> tuple:
        raise NotImplementedError

    def _aux(self) -> tuple:
        return (self._shape, self.transposed)

    def tree_flatten(self):
        return self._children(), self._aux()

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj._set(children, aux)
        return obj

    def _set(self, children, aux):
        raise NotImplementedError

    def _replace(self, children=None, aux=None):
        """A copy with other children and/or static metadata (no validation)."""
        return type(self).tree_unflatten(self._aux() if aux is None else aux,
                                         self._children() if children is None else children)

    # -- the primitive interface ----------------------------------------------------------
    @property
    def values(self):
        """The stored values (the array gradients flow to)."""
        return self._children()[0]

    @property
    def pattern_arrays(self) -> tuple:
        """The index arrays that fix the sparsity pattern."""
        return tuple(self._children()[1:])

    def _prim_params(self) -> dict[str, Any]:
        """Static parameters the primitives need to interpret the arrays."""
        return dict(fmt=self.fmt, shape=self._shape, nm=None)

    def with_values(self, values):
        """The same pattern with other values (e.g. an SDDMM result)."""
        return self._replace(children=(values, *self.pattern_arrays))

    # -- array-like API --------------------------------------------------------------------
    @property
    def stored_shape(self) -> tuple[int, int]:
        """The shape of the matrix as stored (before the lazy transpose)."""
        return self._shape

    @property
    def shape(self) -> tuple[int, int]:
        m, k = self._shape
        return (k, m) if self.transposed else (m, k)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def nnz(self) -> int:
        """Number of stored entries (explicit zeros included)."""
        return int(np.prod(self.values.shape))

    @property
    def T(self):
        """The transpose, as a flag: no data moves."""
        return self._replace(aux=(self._shape, not self.transposed))

    def transpose(self):
        return self.T

    def astype(self, dtype):
        return self.with_values(self.values.astype(dtype))

    def _todense_stored(self):
        raise NotImplementedError

    def todense(self):
        """The dense matrix (logical shape)."""
        d = self._todense_stored()
        return d.T if self.transposed else d

    def to_scipy(self):
        """A ``scipy.sparse`` matrix holding the logical matrix (concrete arrays only)."""
        raise NotImplementedError

    def __matmul__(self, other):
        from jaxsparse._spmm import matmul
        return matmul(self, other)

    def __rmatmul__(self, other):
        from jaxsparse._spmm import matmul
        return matmul(other, self)

    def __repr__(self):
        t = ", transposed" if self.transposed else ""
        extra = self._repr_extra()
        return (f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
                f"nnz={self.nnz}{extra}{t})")

    def _repr_extra(self) -> str:
        return ""

    # -- conversions ----------------------------------------------------------------------
    @classmethod
    def from_jax_sparse(cls, mat, /, **kwargs):
        """Convert a ``jax.experimental.sparse`` BCOO or BCSR (2-D, unbatched)."""
        from jax.experimental import sparse as jsparse
        if not isinstance(mat, (jsparse.BCOO, jsparse.BCSR)):
            raise TypeError(f"{cls.__name__}.from_jax_sparse: expected a BCOO or BCSR, "
                            f"got {type(mat).__name__}")
        if mat.ndim != 2 or mat.n_batch or mat.n_dense:
            raise ValueError(f"{cls.__name__}.from_jax_sparse: only 2-D matrices without batch or "
                             f"dense dimensions convert, got shape={mat.shape}, n_batch={mat.n_batch}, "
                             f"n_dense={mat.n_dense}")
        import scipy.sparse as sp
        if isinstance(mat, jsparse.BCSR):
            s = sp.csr_matrix((np.asarray(mat.data), np.asarray(mat.indices), np.asarray(mat.indptr)),
                              shape=mat.shape)
        else:
            idx = np.asarray(mat.indices)
            s = sp.coo_matrix((np.asarray(mat.data), (idx[:, 0], idx[:, 1])), shape=mat.shape)
        return cls.from_scipy(s, **kwargs)

    @classmethod
    def from_scipy(cls, m, **kwargs):
        raise NotImplementedError


@jax.tree_util.register_pytree_node_class
class CSR(SparseMatrix):
    """Compressed sparse rows: ``CSR((data, indices, indptr), shape=(M, K))``.

    ``data`` [nnz] float, ``indices`` [nnz] int32 column of each entry (sorted, unique within a
    row), ``indptr`` [M + 1] int32 offsets of each row.

    >>> a = CSR.fromdense(np.array([[0., 2.], [3., 0.]]))
    >>> a.nnz, a.indices.tolist(), a.indptr.tolist()
    (2, [1, 0], [0, 1, 2])
    """

    fmt = "csr"

    def __init__(self, args: Sequence, *, shape, transposed: bool = False):
        name = type(self).__name__
        if len(args) != 3:
            raise ValueError(f"{name}: expected (data, indices, indptr), got {len(args)} arrays")
        data, indices, indptr = (_as_array(a, n, name) for a, n in
                                 zip(args, ("data", "indices", "indptr")))
        shape = _check_shape(shape, name)
        _check_float(data, name)
        indices = _check_index_dtype(indices, "indices", name)
        indptr = _check_index_dtype(indptr, "indptr", name)
        if data.ndim != 1 or indices.ndim != 1 or data.shape != indices.shape:
            raise ValueError(f"{name}: data and indices must be 1-D of equal length, got "
                             f"data.shape={data.shape}, indices.shape={indices.shape}")
        _validate_compressed(indices, indptr, shape[0], shape[1], name, blocked=False)
        self._set((data, indices, indptr), (shape, bool(transposed)))

    def _set(self, children, aux):
        self.data, self.indices, self.indptr = children
        self._shape, self.transposed = aux

    def _children(self):
        return (self.data, self.indices, self.indptr)

    def _todense_stored(self):
        rows = row_ids(self.indptr, self.indices.shape[0])
        out = jnp.zeros(self._shape, self.data.dtype)
        return out.at[rows, self.indices].add(self.data, mode="drop")

    @classmethod
    def fromdense(cls, x, *, nse: int | None = None):
        """The CSR of the nonzeros of a 2-D array.

        Exact for concrete input. Inside ``jit`` the number of stored entries must be given as a
        static ``nse``; surplus slots hold zeros in the last row, missing ones are dropped.
        """
        x = _as_array(x, "x", "CSR.fromdense")
        if x.ndim != 2:
            raise ValueError(f"CSR.fromdense: x must be 2-D, got x.shape={x.shape}")
        _check_float(x, "CSR.fromdense", "x")
        if _is_concrete(x) and nse is None:
            xs = np.asarray(x)
            rows, cols = np.nonzero(xs)
            indptr = np.zeros(xs.shape[0] + 1, INDEX_DTYPE)
            np.cumsum(np.bincount(rows, minlength=xs.shape[0]), out=indptr[1:])
            return cls((jnp.asarray(xs[rows, cols]), jnp.asarray(cols.astype(INDEX_DTYPE)),
                        jnp.asarray(indptr)), shape=xs.shape)
        if nse is None:
            raise ValueError("CSR.fromdense: inside jit, pass a static nse (number of stored "
                             "entries) since the nonzero count is not known at trace time")
        m, k = x.shape
        fill = (max(m - 1, 0), max(k - 1, 0))
        rows, cols = jnp.nonzero(x, size=nse, fill_value=fill)
        valid = jnp.arange(nse) < jnp.count_nonzero(x)
        data = jnp.where(valid, x[rows, cols], 0).astype(x.dtype)
        indptr = jnp.concatenate([jnp.zeros(1, INDEX_DTYPE),
                                  jnp.cumsum(jnp.bincount(rows, length=m), dtype=INDEX_DTYPE)])
        return cls((data, cols.astype(INDEX_DTYPE), indptr), shape=(m, k))

    @classmethod
    def from_scipy(cls, m):
        """From any ``scipy.sparse`` matrix (duplicates summed, indices sorted)."""
        import scipy.sparse as sp
        if not sp.issparse(m):
            raise TypeError(f"CSR.from_scipy: expected a scipy.sparse matrix, got {type(m).__name__}")
        m = sp.csr_matrix(m, copy=True)
        m.sum_duplicates()
        m.sort_indices()
        return cls((jnp.asarray(m.data), jnp.asarray(m.indices.astype(INDEX_DTYPE)),
                    jnp.asarray(m.indptr.astype(INDEX_DTYPE))), shape=m.shape)

    def to_scipy(self):
        import scipy.sparse as sp
        m = sp.csr_matrix((np.asarray(self.data), np.asarray(self.indices), np.asarray(self.indptr)),
                          shape=self._shape)
        return m.T.tocsr() if self.transposed else m


@jax.tree_util.register_pytree_node_class
class BSR(SparseMatrix):
    """Block sparse rows: ``BSR((data, indices, indptr), shape=(M, K))``.

    ``data`` [nblocks, bm, bk] (the block size is read from it), ``indices`` [nblocks] int32
    block column of each block (sorted, unique within a block row), ``indptr`` [M / bm + 1].
    """

    fmt = "bsr"

    def __init__(self, args: Sequence, *, shape, transposed: bool = False):
        name = type(self).__name__
        if len(args) != 3:
            raise ValueError(f"{name}: expected (data, indices, indptr), got {len(args)} arrays")
        data, indices, indptr = (_as_array(a, n, name) for a, n in
                                 zip(args, ("data", "indices", "indptr")))
        shape = _check_shape(shape, name)
        _check_float(data, name)
        indices = _check_index_dtype(indices, "indices", name)
        indptr = _check_index_dtype(indptr, "indptr", name)
        if data.ndim != 3 or indices.ndim != 1 or data.shape[0] != indices.shape[0]:
            raise ValueError(f"{name}: data must be [nblocks, bm, bk] and indices [nblocks], got "
                             f"data.shape={data.shape}, indices.shape={indices.shape}")
        bm, bk = data.shape[1:]
        if bm < 1 or bk < 1 or shape[0] % bm or shape[1] % bk:
            raise ValueError(f"{name}: block size ({bm}, {bk}) (from data.shape={data.shape}) "
                             f"must divide shape={shape}")
        _validate_compressed(indices, indptr, shape[0] // bm, shape[1] // bk, name, blocked=True)
        self._set((data, indices, indptr), (shape, bool(transposed)))

    def _set(self, children, aux):
        self.data, self.indices, self.indptr = children
        self._shape, self.transposed = aux

    def _children(self):
        return (self.data, self.indices, self.indptr)

    @property
    def block_size(self) -> tuple[int, int]:
        """Stored block size (bm, bk); the logical blocks of ``.T`` are (bk, bm)."""
        return tuple(self.data.shape[1:])

    def _repr_extra(self):
        return f", block_size={self.block_size}"

    def _todense_stored(self):
        bm, bk = self.block_size
        m, k = self._shape
        nb = self.indices.shape[0]
        brow = row_ids(self.indptr, nb)
        out = jnp.zeros((m // bm, k // bk, bm, bk), self.data.dtype)
        out = out.at[brow, self.indices].add(self.data, mode="drop")
        return out.transpose(0, 2, 1, 3).reshape(m, k)

    @classmethod
    def fromdense(cls, x, *, block_size: tuple[int, int], nse: int | None = None):
        """The BSR of the blocks of ``x`` holding any nonzero.

        Inside ``jit`` pass a static ``nse`` (number of stored blocks).
        """
        x = _as_array(x, "x", "BSR.fromdense")
        if x.ndim != 2:
            raise ValueError(f"BSR.fromdense: x must be 2-D, got x.shape={x.shape}")
        _check_float(x, "BSR.fromdense", "x")
        bm, bk = (int(b) for b in block_size)
        m, k = x.shape
        if bm < 1 or bk < 1 or m % bm or k % bk:
            raise ValueError(f"BSR.fromdense: block_size={block_size} must divide x.shape={x.shape}")
        blocks = x.reshape(m // bm, bm, k // bk, bk).transpose(0, 2, 1, 3)
        occupied = (blocks != 0).any(axis=(2, 3))
        if _is_concrete(x) and nse is None:
            br, bc = np.nonzero(np.asarray(occupied))
            indptr = np.zeros(m // bm + 1, INDEX_DTYPE)
            np.cumsum(np.bincount(br, minlength=m // bm), out=indptr[1:])
            data = jnp.asarray(np.asarray(blocks)[br, bc])
            return cls((data, jnp.asarray(bc.astype(INDEX_DTYPE)), jnp.asarray(indptr)),
                       shape=(m, k))
        if nse is None:
            raise ValueError("BSR.fromdense: inside jit, pass a static nse (number of stored "
                             "blocks) since the block count is not known at trace time")
        fill = (max(m // bm - 1, 0), max(k // bk - 1, 0))
        br, bc = jnp.nonzero(occupied, size=nse, fill_value=fill)
        valid = (jnp.arange(nse) < jnp.count_nonzero(occupied))[:, None, None]
        data = jnp.where(valid, blocks[br, bc], 0).astype(x.dtype)
        indptr = jnp.concatenate([jnp.zeros(1, INDEX_DTYPE),
                                  jnp.cumsum(jnp.bincount(br, length=m // bm), dtype=INDEX_DTYPE)])
        return cls((data, bc.astype(INDEX_DTYPE), indptr), shape=(m, k))

    @classmethod
    def from_scipy(cls, m, *, block_size: tuple[int, int] | None = None):
        """From a ``scipy.sparse`` matrix; a BSR keeps its block size unless one is given."""
        import scipy.sparse as sp
        if not sp.issparse(m):
            raise TypeError(f"BSR.from_scipy: expected a scipy.sparse matrix, got {type(m).__name__}")
        if block_size is None:
            if m.format != "bsr":
                raise ValueError("BSR.from_scipy: block_size is required unless m is a bsr matrix")
            block_size = m.blocksize
        bm, bk = block_size
        if m.shape[0] % bm or m.shape[1] % bk:
            raise ValueError(f"BSR.from_scipy: block_size={tuple(block_size)} must divide "
                             f"m.shape={m.shape}")
        b = sp.csr_matrix(m, copy=True)
        b.sum_duplicates()
        b = b.tobsr(blocksize=tuple(block_size))
        b.sort_indices()
        return cls((jnp.asarray(b.data), jnp.asarray(b.indices.astype(INDEX_DTYPE)),
                    jnp.asarray(b.indptr.astype(INDEX_DTYPE))), shape=b.shape)

    def to_scipy(self):
        import scipy.sparse as sp
        m = sp.bsr_matrix((np.asarray(self.data), np.asarray(self.indices),
                           np.asarray(self.indptr)), shape=self._shape)
        return m.T.tobsr() if self.transposed else m


@jax.tree_util.register_pytree_node_class
class NM(SparseMatrix):
    """N:M structured sparsity along the rows: at most ``n`` nonzeros in every group of ``m``
    consecutive columns (2:4 is what sparse tensor cores run).

    ``NM((values, positions), shape=(M, K), n=2, m=4)``: ``values`` [M, K / m * n] the kept
    values of each group in order, ``positions`` [M, K / m * n] uint8 their column inside the group
    (in [0, m), increasing within a group). Use :meth:`fromdense` to build one.
    """

    fmt = "nm"

    def __init__(self, args: Sequence, *, shape, n: int, m: int, transposed: bool = False):
        name = type(self).__name__
        if len(args) != 2:
            raise ValueError(f"{name}: expected (values, positions), got {len(args)} arrays")
        values, positions = (_as_array(a, nme, name) for a, nme in
                             zip(args, ("values", "positions")))
        shape = _check_shape(shape, name)
        n, m = int(n), int(m)
        if not 0 < n <= m <= 255:
            raise ValueError(f"{name}: need 0 < n <= m <= 255, got n={n}, m={m}")
        if shape[1] % m:
            raise ValueError(f"{name}: group size m={m} must divide the number of columns "
                             f"shape[1]={shape[1]}")
        _check_float(values, name, "values")
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise TypeError(f"{name}: positions must have an integer dtype, got "
                            f"positions.dtype={positions.dtype}")
        want = (shape[0], shape[1] // m * n)
        if values.shape != want or positions.shape != want:
            raise ValueError(f"{name}: values and positions must have shape {want} for "
                             f"shape={shape}, n={n}, m={m}; got values.shape={values.shape}, "
                             f"positions.shape={positions.shape}")
        if _is_concrete(positions):
            p = np.asarray(positions).astype(np.int64)
            if p.size and (p.min() < 0 or p.max() >= m):
                bad = np.argwhere((p < 0) | (p >= m))[0]
                raise ValueError(f"{name}: positions[{bad[0]}, {bad[1]}]={p[tuple(bad)]} is out of "
                                 f"range [0, {m})")
            g = p.reshape(shape[0], shape[1] // m, n)
            if n > 1 and (np.diff(g, axis=-1) <= 0).any():
                bad = np.argwhere(np.diff(g, axis=-1) <= 0)[0]
                raise ValueError(f"{name}: positions must increase within each group of {n}; row "
                                 f"{bad[0]}, group {bad[1]} has {g[bad[0], bad[1]].tolist()}")
            positions = positions.astype(POSITION_DTYPE)
        elif positions.dtype != POSITION_DTYPE:
            # 255 is never a valid position (m <= 255): wider values report, never wrap into range.
            positions = _narrow_traced(positions, POSITION_DTYPE, 255)
        self._set((values, positions), ((shape, bool(transposed)), n, m))

    def _set(self, children, aux):
        self.data, self.positions = children
        (self._shape, self.transposed), self.n, self.m = aux

    def _children(self):
        return (self.data, self.positions)

    def _aux(self):
        return ((self._shape, self.transposed), self.n, self.m)

    @property
    def T(self):
        return self._replace(aux=((self._shape, not self.transposed), self.n, self.m))

    def _prim_params(self):
        return dict(fmt=self.fmt, shape=self._shape, nm=(self.n, self.m))

    def _repr_extra(self):
        return f", n={self.n}, m={self.m}"

    def columns(self):
        """Column of every stored value in the stored matrix, int32 [M, K / m * n]."""
        return nm_columns(self.positions, self.n, self.m)

    def _todense_stored(self):
        rows = jnp.arange(self._shape[0])[:, None]
        out = jnp.zeros(self._shape, self.data.dtype)
        return out.at[rows, self.columns()].add(self.data)

    @classmethod
    def fromdense(cls, x, *, n: int = 2, m: int = 4):
        """The N:M form of ``x``: keeps every nonzero; raises ``ValueError`` if a group of ``m``
        columns holds more than ``n`` nonzeros (prune first: ``jaxsparse.prune``).

        Inside ``jit`` the count cannot be checked; the ``n`` largest-magnitude entries of each
        group are kept, which is exact whenever ``x`` is N:M.
        """
        x = _as_array(x, "x", "NM.fromdense")
        if x.ndim != 2:
            raise ValueError(f"NM.fromdense: x must be 2-D, got x.shape={x.shape}")
        _check_float(x, "NM.fromdense", "x")
        rows, k = x.shape
        n, m = int(n), int(m)
        if not 0 < n <= m <= 255:
            raise ValueError(f"NM.fromdense: need 0 < n <= m <= 255, got n={n}, m={m}")
        if k % m:
            raise ValueError(f"NM.fromdense: m={m} must divide the number of columns "
                             f"x.shape[1]={k}")
        groups = x.reshape(rows, k // m, m)
        if _is_concrete(x):
            counts = np.count_nonzero(np.asarray(groups), axis=-1)
            if (counts > n).any():
                r, g = np.argwhere(counts > n)[0]
                raise ValueError(f"NM.fromdense: x is not {n}:{m} sparse: row {r}, columns "
                                 f"{g * m}..{g * m + m - 1} hold {counts[r, g]} nonzeros (> n={n}); "
                                 f"prune it first (jaxsparse.prune.n_m)")
        # Rank by magnitude (nonzeros first, ties by position), keep n, restore column order.
        score = jnp.abs(groups.astype(jnp.float32))
        keep = jnp.sort(jnp.argsort(-score, axis=-1, stable=True)[..., :n], axis=-1)
        values = jnp.take_along_axis(groups, keep, axis=-1).reshape(rows, k // m * n)
        positions = keep.astype(POSITION_DTYPE).reshape(rows, k // m * n)
        return cls((values, positions), shape=(rows, k), n=n, m=m)

    @classmethod
    def from_scipy(cls, s, *, n: int = 2, m: int = 4):
        import scipy.sparse as sp
        if not sp.issparse(s):
            raise TypeError(f"NM.from_scipy: expected a scipy.sparse matrix, got {type(s).__name__}")
        return cls.fromdense(s.toarray(), n=n, m=m)

    def to_scipy(self):
        import scipy.sparse as sp
        return sp.csr_matrix(np.asarray(self.todense()))


def nm_columns(positions, n: int, m: int):
    """Stored column of each N:M value: group index * m + position (traceable)."""
    slots = positions.shape[-1]
    group = (jnp.arange(slots, dtype=INDEX_DTYPE) // n) * m
    return group + positions.astype(INDEX_DTYPE)


# ----------------------------------------------------------------------------------------------
# Run-time structure checks for traced patterns.
#
# Inside ``jit`` the constructors see only shapes, and XLA gathers clamp and scatters drop
# out-of-range indices, so a malformed pattern would give a quiet wrong answer on the pure-JAX
# path. ``check_pattern_runtime`` computes, in O(nnz + rows), whether the pattern is well formed
# and, only when it is not, calls back into Python (``jax.debug.callback`` inside a ``lax.cond``)
# to raise a ``ValueError`` naming the first problem. XLA reports it as a ``JaxRuntimeError``
# whose message contains that ``ValueError``; the outputs of the failed computation are errors
# too, so the bad result can never be read. The callback is a side-effecting op, which XLA does not
# remove; it works on every platform that supports host callbacks (CPU, GPU, TPU).


def _raise_compressed(diag, *, where, fmt, rows, cols, nnz):
    ip0, any_step, r, ip_r, ip_r1, last, any_bad, p, v = (int(d) for d in np.asarray(diag))
    unit, entries = ("block ", "blocks") if fmt == "bsr" else ("", "entries")
    if ip0 != 0:
        msg = f"indptr[0] must be 0, got indptr[0]={ip0}"
    elif any_step:
        msg = (f"indptr must be non-decreasing, but indptr[{r + 1}]={ip_r1} < "
               f"indptr[{r}]={ip_r}")
    elif last != nnz:
        msg = (f"indptr[-1] must equal the number of stored {entries} (len(indices)={nnz}), "
               f"got indptr[-1]={last}")
    elif any_bad:
        msg = f"indices[{p}]={v} is out of range [0, {cols}) for {cols} {unit}columns"
    else:  # pragma: no cover - the callback only runs when a check failed
        msg = "malformed pattern"
    raise ValueError(f"{where}: malformed {fmt} pattern (checked at run time): {msg}")


def _raise_nm(diag, *, where, m, width):
    p, v = (int(d) for d in np.asarray(diag))
    raise ValueError(f"{where}: malformed nm pattern (checked at run time): "
                     f"positions[{p // width}, {p % width}]={v} is out of range [0, {m}) "
                     f"(values that do not fit uint8 show as 255)")


def _fail_if(ok, callback, diag):
    jax.lax.cond(ok, lambda d: None, lambda d: jax.debug.callback(callback, d), diag)


def gathered(x):
    """``x`` with the mesh axes its type is sharded over (``AxisType.Explicit``) gathered: the
    reference implementations' gathers and scatters (``segment_sum``) cannot carry them, so on
    such a mesh they compute replicated, as the native kernels' custom calls do."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if not spec or all(s is None for s in spec):
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def check_pattern_runtime(pattern, fmt: str, shape, nm=None, block=None, *, where: str):
    """Raise (at run time, from inside ``jit``) if the pattern arrays are malformed.

    Checks what the kernels need to stay in bounds: CSR/BSR ``indptr`` starts at 0, never
    decreases and ends at ``len(indices)``, every index lies in ``[0, columns)``; N:M positions
    lie in ``[0, m)``. (Sorting and uniqueness within a row are not checked here: duplicates add
    up, which is the meaning a COO-like reading gives them.) Cost O(nnz + rows), and a host
    callback only when a check fails. Use it at the start of every lowering that does not
    validate on its own (the pure-JAX reference, Pallas kernels).

    The host callback adds to XLA's compile time (a few tenths of a second per compiled
    computation on a small CPU); ``JAXSPARSE_RUNTIME_CHECKS=0`` in the environment (read when a
    computation is lowered) turns the check off for code whose patterns are known to be valid.
    """
    if os.environ.get("JAXSPARSE_RUNTIME_CHECKS", "1") == "0":
        return
    m, k = shape
    if fmt == "nm":
        (positions,) = pattern
        if positions.size == 0:
            return
        n, group = nm
        flat = positions.reshape(-1).astype(jnp.int32)
        bad = (flat < 0) | (flat >= group)
        p = jnp.argmax(bad).astype(jnp.int32)
        diag = jnp.stack([p, flat[p]])
        _fail_if(~jnp.any(bad), functools.partial(_raise_nm, where=where, m=group,
                                                  width=positions.shape[1]), diag)
        return
    indices, indptr = pattern
    cols = k // block[1] if fmt == "bsr" else k
    rows = indptr.shape[0] - 1
    nnz = indices.shape[0]
    zero = jnp.zeros((), jnp.int32)
    ip = indptr.astype(jnp.int32)
    ip0, last = ip[0], ip[-1]
    if rows > 0:
        steps = ip[1:] < ip[:-1]
        any_step = jnp.any(steps)
        r = jnp.argmax(steps).astype(jnp.int32)
        ip_r, ip_r1 = ip[r], ip[r + 1]
    else:
        any_step, r, ip_r, ip_r1 = jnp.zeros((), bool), zero, zero, zero
    if nnz > 0:
        ix = indices.astype(jnp.int32)
        bad = (ix < 0) | (ix >= cols)
        any_bad = jnp.any(bad)
        p = jnp.argmax(bad).astype(jnp.int32)
        v = ix[p]
    else:
        any_bad, p, v = jnp.zeros((), bool), zero, zero
    ok = (ip0 == 0) & ~any_step & (last == nnz) & ~any_bad
    diag = jnp.stack([ip0, any_step.astype(jnp.int32), r, ip_r, ip_r1, last,
                      any_bad.astype(jnp.int32), p, v])
    _fail_if(ok, functools.partial(_raise_compressed, where=where, fmt=fmt, rows=rows, cols=cols,
                                   nnz=nnz), diag)
