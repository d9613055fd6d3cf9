"""Flax Linen counterpart of :class:`jaxsparse.layers.SparseLinear`: :class:`SparseDense`.

The kept weights are the ``"kernel_data"`` param; the pattern lives in the ``"sparsity"``
collection (not trained: pass only ``params`` to the optimizer). At ``init`` a dense kernel drawn
from ``kernel_init`` (``[in, features]``, like ``nn.Dense``) is pruned by magnitude to ``sparsity``
(CSR) or to ``n_m`` (N:M) with a fixed number of stored entries, so ``init`` also works under
``jit``. To convert trained dense weights use :meth:`SparseDense.variables_from_dense`.

>>> layer = SparseDense(4, sparsity=0.5)
>>> variables = layer.init(jax.random.key(0), jnp.ones((2, 8), jnp.float32))
>>> layer.apply(variables, jnp.ones((2, 8), jnp.float32)).shape
(2, 4)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import prune as _prune
from jaxsparse._formats import CSR, INDEX_DTYPE, NM, POSITION_DTYPE
from jaxsparse._spmm import matmul

__all__ = ["SparseDense"]


def _magnitude_csr(w, sparsity: float):
    """Traceable magnitude pruning of ``w [out, in]`` into CSR with a static nnz."""
    out_f, in_f = w.shape
    size = out_f * in_f
    nnz = size - min(int(round(sparsity * size)), size)
    order = jnp.argsort(jnp.abs(w).reshape(-1), stable=True)
    keep = jnp.zeros((size,), bool).at[order[size - nnz:]].set(True).reshape(w.shape)
    rows, cols = jnp.nonzero(keep, size=nnz)
    indptr = jnp.concatenate([jnp.zeros((1,), INDEX_DTYPE),
                              jnp.cumsum(jnp.bincount(rows, length=out_f), dtype=INDEX_DTYPE)])
    return w[rows, cols], (cols.astype(INDEX_DTYPE), indptr)


def _nm(w, n: int, m: int):
    groups = w.reshape(w.shape[0], -1, m)
    keep = jnp.sort(jnp.argsort(-jnp.abs(groups), axis=-1, stable=True)[..., :n], axis=-1)
    values = jnp.take_along_axis(groups, keep, axis=-1).reshape(w.shape[0], -1)
    return values, (keep.astype(POSITION_DTYPE).reshape(w.shape[0], -1),)


class SparseDense(nn.Module):
    """``y = x @ W.T + b`` with ``W`` sparse ``[features, in]`` (CSR, or N:M when ``n_m``)."""

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    sparsity: float = 0.0
    n_m: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, inputs):
        inputs = jnp.asarray(inputs)
        in_f = inputs.shape[-1]
        _prune.check_sparsity(self.sparsity, "SparseDense")
        if self.n_m is not None:
            n, m = self.n_m
            if in_f % m:
                raise ValueError(f"SparseDense: n_m={self.n_m}: m={m} must divide the input "
                                 f"features inputs.shape[-1]={in_f}")
        cache = {}

        def pruned(rng=None):
            if "v" not in cache:
                kernel = self.kernel_init(rng, (in_f, self.features),
                                          self.param_dtype)
                w = kernel.T
                cache["v"] = (_nm(w, *self.n_m) if self.n_m is not None
                              else _magnitude_csr(w, self.sparsity))
            return cache["v"]

        data = self.param("kernel_data", lambda rng: pruned(rng)[0])
        names = ("positions",) if self.n_m is not None else ("indices", "indptr")
        pattern = [self.variable("sparsity", name, lambda i=i: pruned()[1][i]).value
                   for i, name in enumerate(names)]
        shape = (self.features, in_f)
        if self.n_m is not None:
            w = NM.tree_unflatten(((shape, False), *self.n_m), (data, *pattern))
        else:
            if pattern[1].shape[0] != self.features + 1:
                raise ValueError(f"SparseDense: inputs.shape[-1]={in_f} does not match the "
                                 f"stored weight")
            w = CSR.tree_unflatten((shape, False), (data, *pattern))
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, data, bias = nn.dtypes.promote_dtype(inputs, w.values, bias, dtype=self.dtype)
        return matmul(inputs, w.with_values(data).T, bias=bias)  # the kernel adds the bias

    @staticmethod
    def variables_from_dense(kernel, bias=None, *, sparsity: float = 0.0, n_m=None) -> dict:
        """Variables for :meth:`apply` from a trained ``nn.Dense`` kernel ``[in, features]`` (and
        bias), pruned by magnitude (or to ``n_m``)."""
        w = jnp.asarray(kernel).T
        if n_m is not None:
            _, mask = _prune.n_m(w, *n_m)
            values, pattern = _nm(jnp.where(mask, w, 0), *n_m)
            sp = {"positions": pattern[0]}
        else:
            _, mask = _prune.magnitude(w, sparsity)
            rows, cols = np.nonzero(np.asarray(mask))
            indptr = np.zeros(w.shape[0] + 1, np.int64)
            np.cumsum(np.bincount(rows, minlength=w.shape[0]), out=indptr[1:])
            values = w[rows, cols]
            sp = {"indices": jnp.asarray(cols.astype(INDEX_DTYPE)),
                  "indptr": jnp.asarray(indptr.astype(INDEX_DTYPE))}
        params = {"kernel_data": values}
        if bias is not None:
            params["bias"] = jnp.asarray(bias)
        return {"params": params, "sparsity": sp}
