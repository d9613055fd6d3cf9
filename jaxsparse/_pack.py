"""One-time preparation of a fixed (inference) weight for the native kernels: :func:`pack`.

Weights do not change at inference time, so their layout can be chosen for the kernels once.
:func:`pack` stores a CSR matrix's column indices in 16 bits when ``K <= 65536`` (6 bytes per
float32 nonzero instead of 8; 4 for bfloat16), which matters most to the memory-bound
matrix-vector product (N = 1). The result is still a :class:`CSR` (a subclass, a pytree with the
same children and static metadata), so ``jaxsparse.matmul``, ``jit``, ``.T`` and the reference
backend (every non-CPU platform) take it unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse._formats import BSR, CSR, NM, SparseMatrix

__all__ = ["pack", "PackedCSR"]

_MAX_K16 = 1 << 16


@jax.tree_util.register_pytree_node_class
class PackedCSR(CSR):
    """A :class:`CSR` whose ``indices`` are ``uint16`` (made by :func:`pack`, not by hand)."""

    def _repr_extra(self):
        return ", packed=uint16 indices"


def pack(a: SparseMatrix) -> SparseMatrix:
    """A kernel-friendly copy of ``a`` for repeated products with a fixed sparse weight.

    * :class:`CSR` with ``K <= 65536`` stored columns: a :class:`PackedCSR` with 16-bit column
      indices (values and row offsets unchanged); larger ``K`` is returned as is.
    * :class:`BSR` and :class:`NM` are already compact (one index per block, 8-bit positions)
      and are returned as is.

    The packed matrix works with ``jaxsparse.matmul`` in both layouts (``W @ x`` and
    ``x @ W.T``), under ``jit``, on every backend, and gives the same result as ``a``.
    Differentiating with respect to its values falls back to the reference SDDMM.

    >>> w = jaxsparse.CSR.fromdense(jnp.eye(3))
    >>> jaxsparse.pack(w).indices.dtype
    dtype('uint16')
    """
    if not isinstance(a, SparseMatrix):
        raise TypeError(f"pack: expected a jaxsparse matrix, got {type(a).__name__}")
    if isinstance(a, PackedCSR) or isinstance(a, (BSR, NM)) or type(a) is not CSR:
        return a
    if a.stored_shape[1] > _MAX_K16:
        return a
    indices = a.indices
    if isinstance(indices, np.ndarray):
        indices = indices.astype(np.uint16)
    else:
        indices = jnp.asarray(indices).astype(jnp.uint16)
    return PackedCSR.tree_unflatten(a._aux(), (a.data, indices, a.indptr))
