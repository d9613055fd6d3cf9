"""SDDMM kernels (dense x dense sampled at a pattern) for CSR and BSR, Triton-style Pallas.

Both take ``lm = op(lhs)`` ``[M, K]`` and ``rn = op(rhs).T`` ``[N, K]`` (rows of both contiguous in
K) and return the values of ``lm @ rn.T`` at the stored entries, in storage order.

* :func:`csr_sddmm`: the non-zeros are split into equal chunks of ``chunk`` consecutive entries
  (perfect load balance whatever the row lengths, no masked stores); a program gathers the
  ``[chunk, bk]`` rows of ``lm`` and ``rn`` its entries need and reduces along K.
* :func:`bsr_sddmm`: one program per stored block, a tensor-core ``dot`` ``[bm, bk] x [bk, bn]``
  per K step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxsparse._formats import row_ids
from jaxsparse.pallas._common import (call_options, check_tile, dot_precision, next_pow2,
                                      pad_axis, round_up)

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class CsrSddmmConfig:
    chunk: int  # consecutive non-zeros per program
    bk: int  # K elements per step; the gathered tiles are [chunk, bk]
    num_warps: int

    @classmethod
    def get_default(cls, nnz: int, k: int) -> "CsrSddmmConfig":
        return cls(chunk=min(64, max(16, next_pow2(nnz))), bk=min(64, max(16, next_pow2(k))),
                   num_warps=4)


def _csr_sddmm_kernel(rows_ref, cols_ref, lm_ref, rn_ref, o_ref, *, bk, steps):
    rows, cols = rows_ref[...], cols_ref[...]

    def body(s, acc):
        kk = pl.ds(s * bk, bk)
        lt = lm_ref[rows, kk].astype(F32)  # gather [chunk, bk]
        rt = rn_ref[cols, kk].astype(F32)
        return acc + jnp.sum(lt * rt, axis=1)

    acc = jax.lax.fori_loop(jnp.int32(0), jnp.int32(steps), body, jnp.zeros(rows.shape, F32))
    o_ref[...] = acc.astype(o_ref.dtype)


def csr_sddmm(lm, rn, indices, indptr, *, interpret=False, config=None):
    nnz = indices.shape[0]
    k = lm.shape[1]
    if nnz == 0 or k == 0:
        return jnp.zeros((nnz,), lm.dtype)
    cfg = config or CsrSddmmConfig.get_default(nnz, k)
    chunk, bk = cfg.chunk, cfg.bk
    check_tile(chunk, bk)
    nnz_pad, k_pad = round_up(nnz, chunk), round_up(k, bk)
    rows = pad_axis(row_ids(indptr, nnz), 0, nnz_pad)  # padding entries read row 0, column 0
    cols = pad_axis(indices, 0, nnz_pad)
    lm, rn = pad_axis(lm, 1, k_pad), pad_axis(rn, 1, k_pad)
    kernel = functools.partial(_csr_sddmm_kernel, bk=bk, steps=k_pad // bk)
    full = lambda x: pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)
    out = pl.pallas_call(
        kernel,
        grid=(nnz_pad // chunk,),
        in_specs=[pl.BlockSpec((chunk,), lambda i: (i,)), pl.BlockSpec((chunk,), lambda i: (i,)),
                  full(lm), full(rn)],
        out_specs=pl.BlockSpec((chunk,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((nnz_pad,), lm.dtype),
        name="jaxsparse_csr_sddmm",
        **call_options(interpret, num_warps=cfg.num_warps, num_stages=2),
    )(rows, cols, lm, rn)
    return out[:nnz]


@dataclasses.dataclass(frozen=True)
class BsrSddmmConfig:
    bk: int  # K elements per tensor-core step
    num_warps: int
    num_stages: int

    @classmethod
    def get_default(cls, bm: int, bn: int, k: int) -> "BsrSddmmConfig":
        return cls(bk=min(64, max(16, next_pow2(k))), num_warps=8 if bm * bn >= 128 * 64 else 4,
                   num_stages=3)


def _bsr_sddmm_kernel(brows_ref, indices_ref, lm_ref, rn_ref, o_ref, *, bm, bn, bk, steps):
    z = pl.program_id(0)
    br, bc = brows_ref[z], indices_ref[z]

    def body(s, acc):
        kk = pl.ds(s * bk, bk)
        lt = lm_ref[pl.ds(br * bm, bm), kk]
        rt = rn_ref[pl.ds(bc * bn, bn), kk]
        return acc + plgpu.dot(lt, rt, trans_b=True, precision=dot_precision(lt.dtype))

    acc = jax.lax.fori_loop(jnp.int32(0), jnp.int32(steps), body, jnp.zeros((bm, bn), F32))
    o_ref[...] = acc.astype(o_ref.dtype)


def bsr_sddmm(lm, rn, indices, indptr, *, block, interpret=False, config=None):
    nb = indices.shape[0]
    bm, bn = block
    k = lm.shape[1]
    if nb == 0 or k == 0:
        return jnp.zeros((nb, bm, bn), lm.dtype)
    cfg = config or BsrSddmmConfig.get_default(bm, bn, k)
    bk = cfg.bk
    check_tile(bm, bn, bk)
    k_pad = round_up(k, bk)
    lm, rn = pad_axis(lm, 1, k_pad), pad_axis(rn, 1, k_pad)
    brows = row_ids(indptr, nb)
    kernel = functools.partial(_bsr_sddmm_kernel, bm=bm, bn=bn, bk=bk, steps=k_pad // bk)
    return pl.pallas_call(
        kernel,
        grid=(nb,),
        out_specs=pl.BlockSpec((None, bm, bn), lambda z: (z, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((nb, bm, bn), lm.dtype),
        name="jaxsparse_bsr_sddmm",
        **call_options(interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(brows, indices, lm, rn)
