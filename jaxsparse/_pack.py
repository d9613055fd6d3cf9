"""One-time preparation of a fixed (inference) weight for the native kernels: :func:`pack`.

Weights do not change at inference time, so their layout can be chosen for the kernels once, as
SparseDNN specializes its kernels to a fixed pattern. :func:`pack` makes a :class:`PackedCSR`:

* column indices in 16 bits when ``K <= 65536`` (6 bytes per float32 nonzero instead of 8);
* for float32, a second copy of the matrix in a *sliced* layout for products with one vector
  (``N = 1``) or a few (:func:`takes_sliced`): rows in slices of 16, columns in windows of 63. For
  each (slice, window) holding entries it stores ``c`` vectors of 16
  ``(value, column - 63 * window)`` pairs, lane ``j`` for row ``rows[16 * slice + j]``, where
  ``c`` is the most entries any of the 16 rows has in the window (the others padded with value 0
  and column 63); the rows are ordered, within blocks of 128, so that each slice's rows need few
  slots (:func:`_slice_order`). The kernel then needs no gather: the 16 columns of a vector index
  the window of ``x`` held in four registers (AVX-512 ``vpermt2ps``): its 63 values and a zero,
  which the padding reads, so a NaN or Inf in ``x`` never meets a padded 0. The 16 sums are the 16
  lanes of one accumulator, with no horizontal sums. On a random 3072x768 matrix at 90% sparsity
  this holds ~1.56 slots per 16 nonzeros (1.73 in the rows' own order; ~7.8 bytes per nonzero
  with the 1-byte columns) and runs ~2.6x faster than the gathering CSR kernel. With several
  vectors the kernel reads each slot's columns once for up to four of them.

A :class:`PackedCSR` is still a :class:`CSR` (a pytree; the CSR arrays are its first children), so
``jaxsparse.matmul``, ``jit``, ``vmap``, ``grad``, ``.T`` and every backend take it unchanged;
only the native CPU products of one or a few vectors read the sliced copy.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxsparse._formats import BSR, CSR, NM, SparseMatrix, _is_concrete

__all__ = ["pack", "PackedCSR", "SlicedMatvec", "TransposePlan", "sell_spmv_p"]

_MAX_K16 = 1 << 16
SLICE = 16  # rows per slice (lanes of an AVX-512 float32 vector)
WINDOW = 63  # columns per window (four AVX-512 registers of x hold them and a zero)
PAD = 63  # the column padding lanes read: the zero after the window
BLOCK = 8 * SLICE  # rows are reordered within blocks of 8 slices (cpp/isa.h: kSellBlock)


class SlicedMatvec(NamedTuple):
    """The sliced matrix-vector layout of a float32 matrix (see the module docstring)."""

    values: jax.Array        # float32 [slots * 16]
    columns: jax.Array       # uint8 [slots * 16], column within the window (63: padding)
    group_window: jax.Array  # int32 [groups]
    group_ptr: jax.Array     # int32 [groups + 1], first slot of each group
    slice_ptr: jax.Array     # int32 [ceil(M / 16) + 1], first group of each slice
    rows: jax.Array          # int32 [M]: the row of A in lane j of slice s is rows[16 s + j]


class TransposePlan(NamedTuple):
    """The pattern of ``A.T`` for a CSR ``A`` ``[M, K]``, and where its values come from."""

    perm: jax.Array     # int32 [nnz]: A.T's entry d is A's entry perm[d]
    indices: jax.Array  # uint16 (M <= 65536) or int32 [nnz]: A.T's column indices (rows of A)
    indptr: jax.Array   # int32 [K + 1]: A.T's row offsets


@jax.tree_util.register_pytree_node_class
class PackedCSR(CSR):
    """A :class:`CSR` prepared by :func:`pack` (not made by hand): ``indices`` ``uint16`` when
    ``K <= 65536``, ``matvec``, a :class:`SlicedMatvec` copy of a float32 matrix (or None), and
    ``plan``, a :class:`TransposePlan` (or None).

    Values and pattern are the CSR arrays; ``with_values`` and ``astype`` keep the plan (it
    depends on the pattern only) and drop the sliced copy (it would no longer match the values).
    """

    def _set(self, children, aux):
        self.data, self.indices, self.indptr = children[:3]
        self.matvec = children[3] if len(children) > 3 else None
        self.plan = children[4] if len(children) > 4 else None
        self._shape, self.transposed = aux

    def _children(self):
        return (self.data, self.indices, self.indptr, self.matvec, self.plan)

    @property
    def pattern_arrays(self) -> tuple:
        return (self.indices, self.indptr)

    def with_values(self, values):
        return self._replace(children=(values, self.indices, self.indptr, None, self.plan))

    def _repr_extra(self):
        extra = f", indices={np.dtype(self.indices.dtype).name}"
        extra += ", sliced matvec" if self.matvec is not None else ""
        return extra + (", transpose plan" if self.plan is not None else "")


def pack(a: SparseMatrix, *, matvec: bool = True, transpose: bool = False) -> SparseMatrix:
    """A kernel-friendly copy of ``a`` for repeated products with a fixed sparse weight.

    * :class:`CSR`: a :class:`PackedCSR` with 16-bit column indices when ``K <= 65536`` and, for a
      float32 matrix with concrete arrays and ``matvec=True``, the sliced layout that the native
      CPU products with one vector (``A @ x`` with ``x`` ``[K]`` or ``[K, 1]``, or ``x @ A.T``)
      use, and those with a few (``x`` ``[K, N]`` or ``[N, K]`` while ``N`` times the slots per
      stored entry is at most 8: ``N <= 5`` at 90% sparsity, ``N <= 3`` at 98%), on CPUs with
      AVX-512 (elsewhere the CSR kernel, faster there, computes them:
      ``jaxsparse.ffi.SLICED_KERNEL``).
      The sliced copy takes ~1.56x (90% sparsity) to ~2.3x (98%) the nonzeros in 5-byte lanes
      (and 4 bytes per row for its order); pass
      ``matvec=False`` when the weight only meets larger ``N``. ``transpose=True`` also
      stores a :class:`TransposePlan` (the pattern of ``A.T`` and a permutation, ~6 more bytes
      per stored entry) so that products with ``A.T`` (``A.T @ X``, ``x @ A``, and the gradient
      of ``A @ X`` or ``x @ A.T`` with respect to ``X`` in training) gather the values per call
      instead of rebuilding ``A.T`` (CPU and Pallas kernels; 3072x768 at 90%, 128 columns:
      ~1.7x faster). Inside ``jit`` (traced arrays) only the indices are narrowed.
    * :class:`BSR` and :class:`NM` are already compact (one index per block, 8-bit positions)
      and are returned as is, as is a :class:`PackedCSR` (given the plan it lacks when
      ``transpose=True``).

    The packed matrix gives the same products as ``a`` on every backend, under ``jit`` and
    ``vmap``, and holds device arrays (NumPy ones are moved once here, not by every jitted call
    that takes the matrix); gradients flow to its CSR values (``data``), not to the sliced copy
    (the native SDDMM widens the 16-bit indices inside the call).

    >>> w = jaxsparse.CSR.fromdense(jnp.eye(3))
    >>> jaxsparse.pack(w).indices.dtype
    dtype('uint16')
    """
    if not isinstance(a, SparseMatrix):
        raise TypeError(f"pack: expected a jaxsparse matrix, got {type(a).__name__}")
    if isinstance(a, PackedCSR) and transpose and a.plan is None and _is_concrete(a.indices):
        plan = transpose_plan(np.asarray(a.indices), np.asarray(a.indptr), a.stored_shape)
        return a._replace(children=(*a._children()[:4], plan))
    if isinstance(a, PackedCSR) or isinstance(a, (BSR, NM)) or type(a) is not CSR:
        return a
    indices = a.indices
    if a.stored_shape[1] <= _MAX_K16:
        if isinstance(indices, np.ndarray):
            indices = indices.astype(np.uint16)
        else:
            indices = jnp.asarray(indices).astype(jnp.uint16)
    concrete = all(map(_is_concrete, (a.data, a.indices, a.indptr)))
    sliced = plan = None
    if matvec and a.dtype == jnp.float32 and concrete:
        sliced = _sliced(np.asarray(a.data), np.asarray(a.indices), np.asarray(a.indptr),
                         a.stored_shape)
    if transpose and concrete:
        plan = transpose_plan(np.asarray(a.indices), np.asarray(a.indptr), a.stored_shape)
    children = (a.data, indices, a.indptr)
    host = any(isinstance(v, np.ndarray) for v in children)
    if indices is a.indices and sliced is None and plan is None and not host:
        return a  # nothing to prepare
    if host:  # NumPy arrays: jit would copy them to the device on every call that takes them
        children = tuple(map(jnp.asarray, children))
    return PackedCSR.tree_unflatten(a._aux(), (*children, sliced, plan))


def transpose_plan(indices: np.ndarray, indptr: np.ndarray, shape) -> TransposePlan:
    """The :class:`TransposePlan` of a (valid) CSR pattern ``[M, K]``, built with NumPy: A's
    entries ordered by column (by row within a column, as A.T's rows hold them)."""
    m, k = shape
    rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(indptr))
    perm = np.argsort(indices, kind="stable")
    counts = np.bincount(indices.astype(np.int64), minlength=k)[:k]
    t_indices = rows[perm].astype(np.uint16 if m <= _MAX_K16 else np.int32)
    return TransposePlan(jnp.asarray(perm.astype(np.int32)), jnp.asarray(t_indices),
                         jnp.asarray(np.r_[0, np.cumsum(counts)].astype(np.int32)))


def _slice_order(counts: np.ndarray) -> np.ndarray:
    """An order of the rows (position -> row) whose slices of 16 need few slots: ``counts[i, w]``
    is row i's entries in window w, and a slice takes, per window, as many slots as its fullest
    row there. Greedy, within each block of ``BLOCK`` rows (the native kernel gives each thread
    whole blocks, so no two threads write the same rows of the output): a slice starts from the
    fullest row left, then takes, 15 times, the row adding the fewest slots (ties: the fullest).
    A random 3072x768 matrix at 90% sparsity: 1.73 -> 1.56 slots per 16 entries (95%: 2.08 ->
    1.83); blocks of 1024 rows would give 1.44 (1.64)."""
    m = counts.shape[0]
    order = []
    for b0 in range(0, m, BLOCK):
        left = np.arange(b0, min(m, b0 + BLOCK))
        sub = counts[left]
        full = sub.sum(1)
        while left.size:
            pick = int(np.argmax(full))
            top = np.zeros_like(sub[0])
            for _ in range(min(SLICE, left.size)):
                top = np.maximum(top, sub[pick])
                order.append(left[pick])
                keep = np.arange(left.size) != pick
                left, sub, full = left[keep], sub[keep], full[keep]
                if left.size:
                    grown = np.maximum(sub, top).sum(1)  # the slice's slots with each candidate
                    pick = int(np.argmin(grown * (np.int64(full.max()) + 1) - full))
    return np.asarray(order, np.int64)


def _sliced(data, indices, indptr, shape) -> SlicedMatvec:
    """The sliced layout of a (valid) float32 CSR matrix, built with NumPy."""
    m, k = shape
    nnz = indices.shape[0]
    windows = max(1, -(-k // WINDOW))
    slices = -(-m // SLICE)
    rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(indptr))
    cols = indices.astype(np.int64)
    per_window = np.bincount(rows * windows + cols // WINDOW,
                             minlength=m * windows).reshape(m, windows)
    row_order = _slice_order(per_window)
    position = np.empty(m, np.int64)
    position[row_order] = np.arange(m)
    rows = position[rows]  # from here on, a row is its position in the order
    group_key = (rows // SLICE) * windows + cols // WINDOW  # (slice, window), in that order
    lane = rows % SLICE
    order = np.lexsort((lane, group_key))  # stable: storage order within (group, lane)
    bucket = group_key[order] * SLICE + lane[order]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]]) if nnz else np.zeros(0, int)
    rank = np.arange(nnz) - np.repeat(starts, np.diff(np.r_[starts, nnz]))
    keys, group_of = np.unique(group_key[order], return_inverse=True)
    counts = np.zeros(keys.shape[0], np.int64)
    np.maximum.at(counts, group_of, rank + 1)
    group_ptr = np.r_[0, np.cumsum(counts)]
    slot_pos = (group_ptr[group_of] + rank) * SLICE + lane[order]
    values = np.zeros(group_ptr[-1] * SLICE, np.float32)
    columns = np.full(group_ptr[-1] * SLICE, PAD, np.uint8)
    values[slot_pos] = data[order]
    columns[slot_pos] = cols[order] % WINDOW
    slice_ptr = np.searchsorted(keys // windows, np.arange(slices + 1))
    return SlicedMatvec(*(jnp.asarray(v) for v in (
        values, columns, (keys % windows).astype(np.int32), group_ptr.astype(np.int32),
        slice_ptr.astype(np.int32), row_order.astype(np.int32))))


# ----------------------------------------------------------------------------------------------
# The primitive: A @ x (N = 1) of a PackedCSR with a sliced copy. It carries the CSR arrays too,
# so that every other platform, backend and transformation (JVP, batching) is the CSR product.

sell_spmv_p = Primitive("jaxsparse_sell_spmv")


def takes_sliced(a: PackedCSR, n: int) -> bool:
    """Whether a product of ``a`` (with a sliced copy) and ``n`` vectors goes through the copy:
    always for one vector; for a few while ``n`` times the slots per stored entry is at most 8.

    Each vector costs the sliced kernel about as much as the first (x is permuted per vector),
    while the CSR kernel takes ``n = 2`` to ``16`` at about one cost (a masked vector of x per
    entry). Measured on the development machine (both layouts, two threads, interleaved in one
    process), before the rows were reordered: at 90% sparsity (1.7 slots per entry: ``n <= 4``
    taken), 3072x768, 768x3072 and 768x768 with ``n = 2`` to ``4``, 1.2-3.3x faster than the CSR
    kernel, at ``n = 8`` 0.7-1.2x; at 98% (2.8 slots per entry: ``n <= 2``), ``n = 2`` 1.3-1.7x,
    ``n = 4`` 0.9-1.3x; at 99.5% (4.9: ``n = 1`` only), ``n = 2`` 0.8x in the ``kn`` layout. With
    the reordered rows (1.56 slots per entry at 90%) ``n = 5`` is taken too: 1.4-2.0x faster than
    the CSR kernel on the same three shapes, two ad-hoc timings each (one of 768x768 0.93x).
    Since the CSR kernel's last 1 to 8 columns take 256-bit vectors in four chains (~1.7x faster
    at ``n = 2`` to ``8``), one interleaved run of the same shapes and layouts at 90% gave the
    sliced copy 1.2-4.4x at ``n = 2`` and ``3``, 0.78-2.5x at ``n = 4``, 0.90-1.39x at ``n = 5``;
    at 95% (``n <= 4`` taken) 1.02-1.26x at ``n = 4`` and 0.96-1.03x at 5; at 98% (``n <= 3``)
    1.01-1.61x at 3 and 0.88-1.10x at 4: the threshold stays about at the break-even."""
    return n == 1 or (n >= 1 and n * a.matvec.values.shape[0] <= 8 * a.data.shape[0])


def sell_spmv(a: PackedCSR, b, *, layout: str, backend: str):
    """``a @ b`` (``layout="kn"``, ``b`` ``[K, N]``) or ``b @ a.T`` (``"nk"``, ``b`` ``[N, K]``)
    for a few vectors (:func:`takes_sliced`)."""
    return sell_spmv_p.bind(a.data, a.indices, a.indptr, *a.matvec, b, shape=a.stored_shape,
                            layout=layout, backend=backend)


def _csr_params(shape, layout, backend):
    return dict(fmt="csr", shape=shape, nm=None, transpose_a=False, layout=layout,
                backend=backend)


def _split(args):
    data, indices, indptr, *sliced, b = args
    return (data, indices, indptr, b), sliced


def _via_csr(*args, shape, layout, backend):
    from jaxsparse._spmm import spmm_p
    csr, _ = _split(args)
    return spmm_p.bind(*csr, **_csr_params(shape, layout, backend))


def _abstract_eval(*args, shape, layout, backend):
    from jaxsparse._spmm import _spmm_abstract_eval
    csr, sliced = _split(args)
    want = [jnp.float32, jnp.uint8, jnp.int32, jnp.int32, jnp.int32, jnp.int32]
    if len(sliced) != 6 or any(s.dtype != w or s.ndim != 1 for s, w in zip(sliced, want)):
        raise TypeError("sell_spmv: the sliced layout must be 1-D (float32 values, uint8 columns, "
                        "int32 group_window, group_ptr, slice_ptr, rows); got "
                        f"{[(s.dtype, s.shape) for s in sliced]}")
    n = csr[3].shape[1] if layout == "kn" else csr[3].shape[0]
    if n < 1 or csr[0].dtype != jnp.float32:
        raise ValueError(f"sell_spmv: float32 products of at least one vector only, got N={n}, "
                         f"dtype={csr[0].dtype}")
    return _spmm_abstract_eval(*csr, **_csr_params(shape, layout, backend))


def _jvp(primals, tangents, *, shape, layout, backend):
    from jaxsparse._spmm import spmm_p
    (data, indices, indptr, b), _ = _split(primals)
    (data_dot, _, _, b_dot), _ = _split(tangents)
    out = sell_spmv_p.bind(*primals, shape=shape, layout=layout, backend=backend)
    params = _csr_params(shape, layout, backend)
    terms = []
    if type(data_dot) is not ad.Zero:
        terms.append(spmm_p.bind(data_dot, indices, indptr, b, **params))
    if type(b_dot) is not ad.Zero:
        terms.append(spmm_p.bind(data, indices, indptr, b_dot, **params))
    if not terms:
        return out, ad.Zero.from_primal_value(out)
    return out, functools.reduce(jnp.add, terms)


def _batch(args, dims, *, shape, layout, backend):
    # Batched, the product has N > 1 (or several matrices): the CSR rule handles it.
    from jaxsparse._spmm import _spmm_batch
    csr, _ = _split(args)
    csr_dims, _ = _split(dims)
    return _spmm_batch(csr, csr_dims, **_csr_params(shape, layout, backend))


sell_spmv_p.def_impl(functools.partial(jax._src.dispatch.apply_primitive, sell_spmv_p))
sell_spmv_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[sell_spmv_p] = _jvp
batching.primitive_batchers[sell_spmv_p] = _batch
mlir.register_lowering(sell_spmv_p, mlir.lower_fun(_via_csr, multiple_results=False))
