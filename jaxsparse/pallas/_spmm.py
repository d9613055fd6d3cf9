"""SpMM kernels (sparse x dense -> dense) for BSR, CSR and N:M, in the Triton flavour of Pallas.

All three compute ``out = A @ b`` with ``A`` the stored ``[M, K]`` sparse matrix and ``b`` dense
``[K, N]`` (the ``kn`` layout; the wrappers in :mod:`jaxsparse.pallas._lowering` transpose the dense
operand for ``nk``). ``out`` has ``A``'s dtype; products accumulate in float32.

* :func:`bsr_spmm`: one program per (block row, column tile), block rows visited longest first
  (row swizzle); each stored block is one tensor-core ``dot`` ``[bm, bk] x [bk, bn]``.
* :func:`csr_spmm`: Sputnik's ideas: rows ordered by length and handed out ``rows_per_program``
  at a time (similar lengths in one program), the non-zeros of a row consumed ``chunk`` at a time
  with ``chunk`` sized from the mean row length, each non-zero gathering one contiguous
  ``bn``-wide row of ``b`` (vector loads).
* :func:`nm_spmm`: the compressed values and positions are loaded as stored and expanded on chip
  into one ``[bm, G]`` tile per slot of the group, each multiplied with the matching strided rows
  of ``b`` on the tensor cores.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxsparse.pallas._common import (call_options, check_tile, dot_precision, next_pow2,
                                      pad_axis, round_up, row_order)

F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# BSR


@dataclasses.dataclass(frozen=True)
class BsrSpmmConfig:
    bn: int  # columns of the output tile: acc is [bm, bn] float32 in registers
    num_warps: int  # 4 for small blocks, 8 when bm * bn reaches 128 x 128
    num_stages: int  # software pipelining depth of the block loop

    @classmethod
    def get_default(cls, bm: int, bk: int, n: int) -> "BsrSpmmConfig":
        bn = min(128 if bm <= 64 else 64, max(16, next_pow2(n)))
        return cls(bn=bn, num_warps=8 if bm * bn >= 128 * 64 else 4, num_stages=3)


def _bsr_spmm_kernel(order_ref, indptr_ref, indices_ref, data_ref, b_ref, o_ref, *, bm, bk, bn):
    i, j = pl.program_id(0), pl.program_id(1)
    row = order_ref[i]
    start, end = indptr_ref[row], indptr_ref[row + 1]

    def body(z, acc):
        col = indices_ref[z]
        a = data_ref[z, :, :]
        bt = b_ref[pl.ds(col * bk, bk), pl.ds(j * bn, bn)]
        return acc + jnp.dot(a, bt, preferred_element_type=F32,
                             precision=dot_precision(a.dtype))

    acc = jax.lax.fori_loop(start, end, body, jnp.zeros((bm, bn), F32))
    o_ref[pl.ds(row * bm, bm), pl.ds(j * bn, bn)] = acc.astype(o_ref.dtype)


def bsr_spmm(data, indices, indptr, b, *, shape, interpret=False, config=None):
    """``A @ b`` for BSR ``A`` (``data`` ``[nblocks, bm, bk]``) and dense ``b`` ``[K, N]``."""
    m, k = shape
    nb, bm, bk = data.shape
    n = b.shape[1]
    if nb == 0 or n == 0 or m == 0:
        return jnp.zeros((m, n), data.dtype)
    cfg = config or BsrSpmmConfig.get_default(bm, bk, n)
    bn = cfg.bn
    check_tile(bm, bk, bn)
    n_pad = round_up(n, bn)
    b = pad_axis(b, 1, n_pad)
    order = row_order(indptr)
    kernel = functools.partial(_bsr_spmm_kernel, bm=bm, bk=bk, bn=bn)
    out = pl.pallas_call(
        kernel,
        grid=(m // bm, n_pad // bn),
        out_shape=jax.ShapeDtypeStruct((m, n_pad), data.dtype),
        name="jaxsparse_bsr_spmm",
        **call_options(interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(order, indptr, indices, data, b)
    return out[:, :n]


# ----------------------------------------------------------------------------------------------
# CSR


@dataclasses.dataclass(frozen=True)
class CsrSpmmConfig:
    chunk: int  # non-zeros of a row consumed per step: next power of two of the mean row length
    rows_per_program: int  # rows of similar length (after the swizzle) handled by one program
    bn: int  # output columns per program: each non-zero loads a contiguous bn-wide row of b
    num_warps: int

    @classmethod
    def get_default(cls, m: int, nnz: int, n: int) -> "CsrSpmmConfig":
        mean = nnz / max(m, 1)
        chunk = min(64, max(16, next_pow2(int(mean))))
        # Short rows: several rows per program so each program does a useful amount of work.
        rows = max(1, min(8, 64 // max(chunk, int(mean) or 1)))
        bn = min(128, max(16, next_pow2(n)))
        return cls(chunk=chunk, rows_per_program=next_pow2(rows) if rows > 1 else 1, bn=bn,
                   num_warps=4)


def _csr_spmm_kernel(order_ref, indptr_ref, indices_ref, data_ref, b_ref, o_ref, *, chunk,
                     rows, bn):
    i, j = pl.program_id(0), pl.program_id(1)
    lane = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    for r in range(rows):  # static unroll over the rows of this program
        row = order_ref[i * rows + r]
        start, end = indptr_ref[row], indptr_ref[row + 1]

        def body(t, acc, start=start, end=end):
            p = start + t * chunk
            valid = (p + lane) < end
            cols = indices_ref[pl.ds(p, chunk)]  # in bounds: the wrapper pads by one chunk
            vals = data_ref[pl.ds(p, chunk)].astype(F32)
            g = b_ref[cols, pl.ds(j * bn, bn)].astype(F32)  # gather [chunk, bn], rows contiguous
            return acc + jnp.sum(jnp.where(valid[:, None], vals[:, None] * g, 0.0), axis=0)

        acc = jax.lax.fori_loop(jnp.int32(0), (end - start + chunk - 1) // chunk, body,
                                jnp.zeros((bn,), F32))
        o_ref[row, pl.ds(j * bn, bn)] = acc.astype(o_ref.dtype)


def csr_spmm(data, indices, indptr, b, *, shape, interpret=False, config=None):
    """``A @ b`` for CSR ``A`` (``data``/``indices`` ``[nnz]``) and dense ``b`` ``[K, N]``."""
    m, k = shape
    nnz = data.shape[0]
    n = b.shape[1]
    if nnz == 0 or n == 0 or m == 0:
        return jnp.zeros((m, n), data.dtype)
    cfg = config or CsrSpmmConfig.get_default(m, nnz, n)
    chunk, rows, bn = cfg.chunk, cfg.rows_per_program, cfg.bn
    check_tile(chunk, bn)
    n_pad = round_up(n, bn)
    b = pad_axis(b, 1, n_pad)
    # One chunk of padding so that every chunk load is in bounds (masked in the kernel).
    data = pad_axis(data, 0, nnz + chunk)
    indices = pad_axis(indices, 0, nnz + chunk)
    # Pad the row order to whole programs with a dummy empty row m (sliced off the output).
    m_pad = round_up(m, rows)
    order = jnp.concatenate([row_order(indptr),
                             jnp.full((m_pad - m,), m, jnp.int32)])
    indptr = jnp.concatenate([indptr, indptr[-1:]])
    kernel = functools.partial(_csr_spmm_kernel, chunk=chunk, rows=rows, bn=bn)
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // rows, n_pad // bn),
        out_shape=jax.ShapeDtypeStruct((m + 1, n_pad), data.dtype),
        name="jaxsparse_csr_spmm",
        **call_options(interpret, num_warps=cfg.num_warps, num_stages=2),
    )(order, indptr, indices, data, b)
    return out[:m, :n]


# ----------------------------------------------------------------------------------------------
# N:M


@dataclasses.dataclass(frozen=True)
class NmSpmmConfig:
    bm: int  # rows of A per program
    groups: int  # groups of m columns per step: each slot tile is [bm, groups] (>= 16 for dot)
    bn: int  # output columns per program
    num_warps: int

    @classmethod
    def get_default(cls, m: int, k_groups: int, n: int) -> "NmSpmmConfig":
        bn = min(128, max(16, next_pow2(n)))
        bm = min(64, max(16, next_pow2(m)))
        return cls(bm=bm, groups=min(32, max(16, next_pow2(k_groups))), bn=bn,
                   num_warps=4 if bm * bn <= 64 * 64 else 8)


def _nm_spmm_kernel(vals_ref, pos_ref, b_ref, o_ref, *, n, m, bm, groups, bn, steps):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * bm, bm)

    def body(s, acc):
        g0 = s * groups
        vals = [vals_ref[rows, pl.ds(g0 * n + t, groups, stride=n)] for t in range(n)]
        pos = [pos_ref[rows, pl.ds(g0 * n + t, groups, stride=n)].astype(jnp.int32)
               for t in range(n)]
        for slot in range(m):
            # Expand on chip: the dense [bm, groups] tile of column slot `slot` of each group.
            tile = vals[0] * (pos[0] == slot).astype(vals[0].dtype)
            for t in range(1, n):
                tile = tile + vals[t] * (pos[t] == slot).astype(vals[t].dtype)
            bt = b_ref[pl.ds(g0 * m + slot, groups, stride=m), pl.ds(j * bn, bn)]
            acc = acc + jnp.dot(tile, bt, preferred_element_type=F32,
                                  precision=dot_precision(tile.dtype))
        return acc

    acc = jax.lax.fori_loop(jnp.int32(0), jnp.int32(steps), body, jnp.zeros((bm, bn), F32))
    o_ref[...] = acc.astype(o_ref.dtype)


def nm_spmm(values, positions, b, *, shape, nm, interpret=False, config=None):
    """``A @ b`` for N:M ``A`` (``values``/``positions`` ``[M, K / m * n]``), ``b`` ``[K, N]``."""
    rows_a, k = shape
    n, m = nm
    ncols = b.shape[1]
    if rows_a == 0 or ncols == 0 or k == 0:
        return jnp.zeros((rows_a, ncols), values.dtype)
    k_groups = k // m
    cfg = config or NmSpmmConfig.get_default(rows_a, k_groups, ncols)
    bm, groups, bn = cfg.bm, cfg.groups, cfg.bn
    check_tile(bm, groups, bn)
    m_pad, g_pad, n_pad = round_up(rows_a, bm), round_up(k_groups, groups), round_up(ncols, bn)
    # Padding (only for shapes that are not multiples of the tiles): zero values, zero b rows.
    values = pad_axis(pad_axis(values, 0, m_pad), 1, g_pad * n)
    positions = pad_axis(pad_axis(positions, 0, m_pad), 1, g_pad * n)
    b = pad_axis(pad_axis(b, 0, g_pad * m), 1, n_pad)
    kernel = functools.partial(_nm_spmm_kernel, n=n, m=m, bm=bm, groups=groups, bn=bn,
                               steps=g_pad // groups)
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // bm, n_pad // bn),
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), values.dtype),
        name="jaxsparse_nm_spmm",
        **call_options(interpret, num_warps=cfg.num_warps, num_stages=3),
    )(values, positions, b)
    return out[:rows_a, :ncols]
