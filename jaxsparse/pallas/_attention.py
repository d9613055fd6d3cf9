"""Block-sparse attention, flash style: SDDMM -> online softmax -> SpMM fused in one kernel.

As splash attention does, a fixed block mask is preprocessed once into block metadata
(:class:`BlockMaskInfo`: for each query block, the list of its non-empty key blocks) and the
kernel visits only those blocks. One program per (batch, head, query block) keeps the running
max, the running sum and the ``[block_q, head_dim]`` float32 accumulator on chip; each visited key
block costs two tensor-core dots (``q k^T`` and ``p v``).

Metadata: a concrete pattern (NumPy / committed device arrays, outside ``jit``) is preprocessed on
the host and cached, keyed by the bytes of its block structure, so repeated calls with the same
mask do no work. A traced pattern (a BSR built inside ``jit``) is preprocessed on device with jnp
ops instead; both give the same :class:`BlockMaskInfo`, which can also be built once and passed
in (it is a pytree, so it can cross ``jit``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxsparse._formats import BSR
from jaxsparse.pallas._common import call_options, check_tile, dot_precision

F32 = jnp.float32
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: no inf - inf = nan


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kv_blocks", "counts"],
                   meta_fields=["block_q", "block_k", "seq_q", "seq_k"])
@dataclasses.dataclass(frozen=True)
class BlockMaskInfo:
    """Kernel metadata of a block mask: query block ``i`` visits key blocks
    ``kv_blocks[i, :counts[i]]`` (the rest of the row is padding, never read)."""

    kv_blocks: jax.Array  # int32 [seq_q / block_q, max_count]
    counts: jax.Array  # int32 [seq_q / block_q]
    block_q: int
    block_k: int
    seq_q: int
    seq_k: int

    @property
    def block_mask(self) -> np.ndarray:
        """The boolean block mask ``[seq_q / block_q, seq_k / block_k]`` (host; for inspection)."""
        kv, counts = np.asarray(self.kv_blocks), np.asarray(self.counts)
        out = np.zeros((self.seq_q // self.block_q, self.seq_k // self.block_k), bool)
        for i, c in enumerate(counts):
            out[i, kv[i, :c]] = True
        return out


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 64


def _is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _from_block_mask_host(mask: np.ndarray, block_q, block_k) -> BlockMaskInfo:
    mask = np.asarray(mask, bool)
    nq, nk = mask.shape
    key = ("mask", mask.shape, block_q, block_k, hashlib.sha1(np.packbits(mask)).hexdigest())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    counts = mask.sum(1).astype(np.int32)
    width = max(1, int(counts.max()) if nq else 1)
    kv = np.zeros((nq, width), np.int32)
    for i in range(nq):
        cols = np.flatnonzero(mask[i])
        kv[i, :len(cols)] = cols
        if len(cols):  # pad with the last visited block (a harmless, already cached address)
            kv[i, len(cols):] = cols[-1]
    info = BlockMaskInfo(jnp.asarray(kv), jnp.asarray(counts), block_q, block_k,
                         nq * block_q, nk * block_k)
    _CACHE[key] = info
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return info


def _from_bsr_device(indices, indptr, nk, block_q, block_k) -> BlockMaskInfo:
    nq = indptr.shape[0] - 1
    counts = (indptr[1:] - indptr[:-1]).astype(jnp.int32)
    nnzb = indices.shape[0]
    width = max(1, min(nk, nnzb))  # static bound on blocks per row
    pos = jnp.minimum(indptr[:-1, None] + jnp.arange(width, dtype=jnp.int32)[None, :],
                      max(nnzb - 1, 0))
    kv = indices[pos] if nnzb else jnp.zeros((nq, width), jnp.int32)
    return BlockMaskInfo(kv.astype(jnp.int32), counts, block_q, block_k, nq * block_q,
                         nk * block_k)


def block_mask_info(pattern, *, seq_q: int | None = None, seq_k: int | None = None):
    """:class:`BlockMaskInfo` of ``pattern``: a :class:`jaxsparse.BSR` of shape ``[seq_q, seq_k]``
    (its block size is the kernel's tile), or a boolean block mask ``[nq, nk]`` with ``seq_q``
    and ``seq_k`` given (blocks of ``seq_q / nq`` by ``seq_k / nk``). Cached when concrete."""
    if isinstance(pattern, BlockMaskInfo):
        return pattern
    if isinstance(pattern, BSR):
        if pattern.transposed:
            raise ValueError("block_mask_info: pass the stored (untransposed) BSR pattern")
        bq, bk = pattern.block_size
        sq, sk = pattern.shape
        indices, indptr = pattern.pattern_arrays
        if _is_concrete(indices, indptr):
            ind, ptr = np.asarray(indices), np.asarray(indptr)
            mask = np.zeros((sq // bq, sk // bk), bool)
            mask[np.repeat(np.arange(sq // bq), np.diff(ptr)), ind] = True
            return _from_block_mask_host(mask, bq, bk)
        return _from_bsr_device(indices, indptr, sk // bk, bq, bk)
    mask = np.asarray(pattern, bool)  # a traced block mask fails here, by design
    if mask.ndim != 2 or seq_q is None or seq_k is None:
        raise ValueError("block_mask_info: a block mask must be 2-D [nq, nk] with seq_q and seq_k "
                         f"given; got mask.shape={mask.shape}, {seq_q=}, {seq_k=}")
    nq, nk = mask.shape
    if seq_q % nq or seq_k % nk:
        raise ValueError(f"block_mask_info: mask.shape={mask.shape} must divide "
                         f"{(seq_q, seq_k)}")
    return _from_block_mask_host(mask, seq_q // nq, seq_k // nk)


def local_block_mask(seq_q: int, seq_k: int, block_q: int, block_k: int, window: int,
                     causal: bool = False) -> np.ndarray:
    """Block mask of a local (sliding window) attention: block pairs holding any ``(i, j)`` with
    ``|i - j| < window`` (and ``j <= i`` when causal). Use with ``window=`` for the exact
    token-level mask inside the visited blocks."""
    qs = np.arange(seq_q // block_q)[:, None] * block_q
    ks = np.arange(seq_k // block_k)[None, :] * block_k
    # closest pair of the two blocks: distance between intervals
    lo = qs - (ks + block_k - 1)  # min over the pair of i - j
    hi = (qs + block_q - 1) - ks  # max of i - j
    keep = (hi > -window) & (lo < window)
    if causal:
        keep &= hi >= 0
    return keep


def _attention_kernel(counts_ref, kvb_ref, q_ref, k_ref, v_ref, o_ref, *, bq, bk, scale,
                      causal, window):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    rows = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    lanes = jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    token_mask = causal or window is not None

    def body(t, carry):
        m_prev, l_prev, acc = carry
        kb = kvb_ref[i, t]
        kt = k_ref[b, pl.ds(kb * bk, bk), h, :]
        vt = v_ref[b, pl.ds(kb * bk, bk), h, :]
        prec = dot_precision(q.dtype)
        s = plgpu.dot(q, kt, trans_b=True, precision=prec) * scale  # [bq, bk] float32
        if token_mask:
            cols = kb * bk + lanes
            keep = jnp.ones((bq, bk), jnp.bool_)
            if causal:
                keep = keep & (cols <= rows)
            if window is not None:
                left, right = window
                keep = keep & (cols > rows - left) & (cols < rows + right)
            s = jnp.where(keep, s, _MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        if token_mask:
            p = jnp.where(keep, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(vt.dtype), vt, precision=prec)
        return m_new, l_new, acc

    d = q.shape[-1]
    init = (jnp.full((bq,), _MASK_VALUE, F32), jnp.zeros((bq,), F32), jnp.zeros((bq, d), F32))
    _, l, acc = jax.lax.fori_loop(jnp.int32(0), counts_ref[i], body, init)
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)


def block_sparse_attention(q, k, v, mask, *, scale: float | None = None, causal: bool = False,
                           window: int | tuple[int, int] | None = None,
                           interpret: bool | None = None, num_warps: int | None = None,
                           num_stages: int = 2):
    """Multi-head attention restricted to the non-empty blocks of ``mask``.

    Args:
      q: ``[batch, seq_q, heads, head_dim]``; ``k``, ``v``: ``[batch, seq_k, heads, head_dim]``
        (same dtype: float32, bfloat16 or float16; matmuls accumulate in float32).
      mask: a :class:`BlockMaskInfo`; a :class:`jaxsparse.BSR` pattern of shape
        ``[seq_q, seq_k]`` (its values are ignored; its block size is the kernel tile); or a
        boolean block mask ``[seq_q / block_q, seq_k / block_k]``. Preprocessed once and cached.
      scale: logits scale, default ``1 / sqrt(head_dim)``.
      causal: also mask ``j > i`` inside the visited blocks.
      window: token-level local window inside the visited blocks: ``w`` keeps ``|i - j| < w``,
        ``(left, right)`` keeps ``i - left < j < i + right``.
      interpret: run the kernel in Pallas interpret mode; default: when not on a GPU.

    Returns ``[batch, seq_q, heads, head_dim]`` in ``q.dtype``. Query rows with no visible key
    are 0. Block sizes must be powers of two >= 16, ``head_dim`` a power of two >= 16.
    Forward only: there is no VJP (use the reference ``jaxsparse.attention`` for training).
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[::2] != k.shape[::2] \
            or q.shape[3] != k.shape[3]:
        raise ValueError(f"block_sparse_attention: q, k, v must be [batch, seq, heads, head_dim] "
                         f"with matching batch/heads/head_dim; got q.shape={q.shape}, "
                         f"k.shape={k.shape}, v.shape={v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"block_sparse_attention: dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    batch, sq, heads, d = q.shape
    sk = k.shape[1]
    info = block_mask_info(mask, seq_q=sq, seq_k=sk)
    if (info.seq_q, info.seq_k) != (sq, sk):
        raise ValueError(f"block_sparse_attention: mask covers {(info.seq_q, info.seq_k)} but "
                         f"q/k have sequence lengths {(sq, sk)}")
    bq, bk = info.block_q, info.block_k
    check_tile(bq, bk, d)
    if min(bq, bk, d) < 16:
        raise ValueError(f"block_sparse_attention: blocks {(bq, bk)} and head_dim {d} must be "
                         f">= 16 (tensor-core tiles)")
    if isinstance(window, int):
        window = (window, window)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kernel = functools.partial(_attention_kernel, bq=bq, bk=bk, scale=scale, causal=causal,
                               window=window)
    spec = pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0))
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, h, i: (0,) * x.ndim)
    if num_warps is None:
        num_warps = 4 if bq * d <= 64 * 64 else 8
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, sq // bq),
        in_specs=[whole(info.counts), whole(info.kv_blocks), spec, whole(k), whole(v)],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="jaxsparse_block_sparse_attention",
        **call_options(interpret, num_warps=num_warps, num_stages=num_stages),
    )(info.counts, info.kv_blocks, q, k, v)
