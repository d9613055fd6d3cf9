"""One-shot pruning: choose which weights to keep.

Every function takes concrete weights (pruning runs once, on the host, with NumPy) and returns
``(pruned, mask)``: the weight with the dropped entries set to zero (same dtype, a jax array) and the
boolean keep-mask. Weights of a linear layer are taken as ``[out, in]`` (rows = output features,
the layout :class:`jaxsparse.layers.SparseLinear` stores), which matters for :func:`n_m` (groups
run along the last axis) and :func:`wanda` (one comparison group per output row). Only
:func:`sparsegpt` also changes the kept weights (it compensates for the dropped ones).

The number of dropped entries is ``round(sparsity * count)``. Ties are broken deterministically:
among equal scores the entry with the lower flat index (row-major) is dropped first (a stable sort).

>>> w = jnp.array([[1., -3.], [2., 0.5]])
>>> pruned, mask = magnitude(w, 0.5)
>>> mask.tolist()
[[False, True], [True, False]]
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["magnitude", "global_magnitude", "block", "n_m", "wanda", "sparsegpt", "check_sparsity",
           "feature_norms", "feature_gram"]


def check_sparsity(sparsity, where: str) -> float:
    """``sparsity`` as a float in [0, 1), else a ValueError naming it."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: sparsity must be a number in [0, 1), got sparsity={sparsity!r}")
    if not 0.0 <= s < 1.0:
        raise ValueError(f"{where}: sparsity must be in [0, 1), got sparsity={sparsity}")
    return s


def _host(w, where: str, *, ndim: int | None = None) -> np.ndarray:
    if isinstance(w, jax.core.Tracer):
        raise TypeError(f"{where}: pruning needs concrete weights (call it outside jit)")
    a = np.asarray(w)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
        raise TypeError(f"{where}: w must be floating point, got w.dtype={a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{where}: w must be {ndim}-D, got w.shape={a.shape}")
    return a


def _apply(w, mask: np.ndarray):
    w = jnp.asarray(w)
    return jnp.where(jnp.asarray(mask), w, jnp.zeros((), w.dtype)), jnp.asarray(mask)


def _drop_lowest(scores: np.ndarray, n_drop: int) -> np.ndarray:
    """Keep-mask over a flat score vector dropping the ``n_drop`` lowest (stable)."""
    keep = np.ones(scores.shape, bool)
    if n_drop:
        keep[np.argsort(scores, kind="stable")[:n_drop]] = False
    return keep


def _n_drop(sparsity: float, count: int) -> int:
    return min(int(round(sparsity * count)), count)


def magnitude(w, sparsity: float):
    """Drop the ``round(sparsity * w.size)`` entries of smallest ``|w|`` (whole tensor).

    Returns ``(pruned, mask)``.
    """
    s = check_sparsity(sparsity, "magnitude")
    a = _host(w, "magnitude")
    scores = np.abs(a.astype(np.float64)).ravel()
    return _apply(w, _drop_lowest(scores, _n_drop(s, a.size)).reshape(a.shape))


def global_magnitude(weights: Mapping[str, object], sparsity: float):
    """Magnitude pruning with one threshold across several tensors: the ``round(sparsity * total)``
    smallest ``|w|`` over all of them are dropped, so layers end up with different sparsities.

    ``weights`` maps names to arrays; returns ``(pruned, masks)``, two dicts with the same keys.
    Ties break by the dict's order, then by position.
    """
    s = check_sparsity(sparsity, "global_magnitude")
    if not weights:
        return {}, {}
    arrays = {k: _host(v, f"global_magnitude[{k!r}]") for k, v in weights.items()}
    flat = np.concatenate([np.abs(a.astype(np.float64)).ravel() for a in arrays.values()])
    keep = _drop_lowest(flat, _n_drop(s, flat.size))
    pruned, masks, start = {}, {}, 0
    for k, a in arrays.items():
        mask = keep[start:start + a.size].reshape(a.shape)
        start += a.size
        pruned[k], masks[k] = _apply(weights[k], mask)
    return pruned, masks


def _block_size(block_size, shape, where: str) -> tuple[int, int]:
    if block_size is None:
        raise ValueError(f"{where}: block_size is required (an int or (rows, cols))")
    bm, bk = (block_size, block_size) if np.isscalar(block_size) else tuple(block_size)
    bm, bk = int(bm), int(bk)
    if bm < 1 or bk < 1 or shape[0] % bm or shape[1] % bk:
        raise ValueError(f"{where}: block_size={(bm, bk)} must divide the weight shape "
                         f"w.shape={tuple(shape)}")
    return bm, bk


def block(w, sparsity: float, block_size):
    """Drop whole ``block_size = (bm, bk)`` blocks of a 2-D ``w``: the ``round(sparsity * nblocks)``
    blocks with the smallest L2 norm. The kept mask is block-structured (BSR-ready)."""
    s = check_sparsity(sparsity, "block")
    a = _host(w, "block", ndim=2)
    bm, bk = _block_size(block_size, a.shape, "block")
    m, k = a.shape
    blocks = a.astype(np.float64).reshape(m // bm, bm, k // bk, bk)
    scores = np.sqrt(np.square(blocks).sum(axis=(1, 3))).ravel()
    keep = _drop_lowest(scores, _n_drop(s, scores.size)).reshape(m // bm, k // bk)
    return _apply(w, np.repeat(np.repeat(keep, bm, axis=0), bk, axis=1))


def n_m(w, n: int, m: int):
    """N:M pruning: keep the ``n`` largest ``|w|`` in every group of ``m`` consecutive entries of
    the last axis (ties keep the lower index). ``m`` must divide ``w.shape[-1]``."""
    a = _host(w, "n_m")
    n, m = int(n), int(m)
    if not 0 < n <= m:
        raise ValueError(f"n_m: need 0 < n <= m, got n={n}, m={m}")
    if a.ndim < 1 or a.shape[-1] % m:
        raise ValueError(f"n_m: m={m} must divide the last dimension of the weight, "
                         f"w.shape[-1]={a.shape[-1] if a.ndim else None}")
    groups = np.abs(a.astype(np.float64)).reshape(*a.shape[:-1], -1, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return _apply(w, keep.reshape(a.shape))


def _calibration_rows(x_calib, in_features: int | None, where: str) -> np.ndarray:
    """``x_calib [..., in]`` as float64 rows ``[n, in]``, its last axis checked against the weight."""
    x = np.asarray(x_calib).astype(np.float64)
    if in_features is not None and (x.ndim == 0 or x.shape[-1] != in_features):
        raise ValueError(f"{where}: x_calib.shape[-1]={x.shape[-1] if x.ndim else None} must equal "
                         f"the weight's input features w.shape[1]={in_features}")
    return x.reshape(-1, x.shape[-1])


def feature_norms(x_calib, in_features: int | None = None, where: str = "wanda") -> np.ndarray:
    """``||X_j||_2`` of each input feature ``j`` over all calibration rows of ``x_calib [..., in]``."""
    return np.sqrt(np.square(_calibration_rows(x_calib, in_features, where)).sum(axis=0))


def feature_gram(x_calib, in_features: int | None = None, where: str = "sparsegpt") -> np.ndarray:
    """``X^T X`` (float64 ``[in, in]``) of the calibration rows of ``x_calib [..., in]``."""
    x = _calibration_rows(x_calib, in_features, where)
    return x.T @ x


def _input_statistic(where: str, w_shape, x_calib, given, name: str, of_inputs, ndim: int):
    """What a calibrated method needs of the layer's inputs: ``given`` (the argument ``name``, a
    float64 copy, checked to be ``[in]`` or ``[in, in]`` by ``ndim``) or ``of_inputs(x_calib)``."""
    in_f = w_shape[1]
    if given is None:
        if x_calib is None:
            raise ValueError(f"{where}: x_calib (calibration inputs [..., in]) is required")
        return of_inputs(x_calib, in_f, where)
    stat = np.array(given, np.float64)
    want = (in_f,) * ndim
    if stat.shape != want:
        raise ValueError(f"{where}: {name}.shape={stat.shape} must be "
                         f"{'(in,)' if ndim == 1 else '(in, in)'}={want} for w.shape={w_shape}")
    return stat


def wanda(w, x_calib, sparsity: float, *, x_norms=None):
    """Wanda (Sun et al., 2023): score ``|W_ij| * ||X_j||_2`` with ``X`` the calibration inputs of
    the layer, and drop the ``round(sparsity * in)`` lowest-scoring weights of every output row.

    ``w`` is ``[out, in]``, ``x_calib`` ``[..., in]`` (any leading dims). Pass precomputed norms
    ``x_norms [in]`` instead (``x_calib=None``) to avoid holding the activations.
    """
    s = check_sparsity(sparsity, "wanda")
    a = _host(w, "wanda", ndim=2)
    norms = _input_statistic("wanda", a.shape, x_calib, x_norms, "x_norms", feature_norms, 1)
    scores = np.abs(a.astype(np.float64)) * norms[None, :]
    n_drop = _n_drop(s, a.shape[1])
    keep = np.ones(a.shape, bool)
    if n_drop:
        order = np.argsort(scores, axis=1, kind="stable")[:, :n_drop]
        np.put_along_axis(keep, order, False, axis=1)
    return _apply(w, keep)


def sparsegpt(w, x_calib, sparsity: float, *, x_gram=None, block_size: int = 128,
              damp: float = 0.01):
    """SparseGPT (Frantar and Alistarh, 2023): prune ``w [out, in]`` so that the layer's outputs
    on the calibration inputs ``x_calib [..., in]`` change as little as it can, updating the kept
    weights to make up for the dropped ones.

    The columns are visited left to right in blocks of ``block_size``. In each block the entries
    with the lowest saliency ``w^2 / [H^-1]_jj^2`` (``H = X^T X + damp * mean(diag) * I``) are
    dropped, the same count ``round(sparsity * size)`` overall as the other methods (spread over
    the blocks in proportion to their size); then column by column each dropped weight's error is
    pushed onto the columns not yet visited through the Cholesky factor of ``H^-1`` (the optimal
    brain surgeon update). Pass the Gram matrix ``x_gram = X^T X [in, in]`` instead of
    ``x_calib`` (``x_calib=None``) to avoid holding the activations.

    Returns ``(pruned, mask)``: unlike the other methods, ``pruned`` holds the updated weights.
    Inputs that never occur in the calibration data (a zero row of ``X^T X``) leave only the
    damping: their weights are then ranked by magnitude.
    """
    s = check_sparsity(sparsity, "sparsegpt")
    a = _host(w, "sparsegpt", ndim=2)
    in_f = a.shape[1]
    h = _input_statistic("sparsegpt", a.shape, x_calib, x_gram, "x_gram", feature_gram, 2)
    if int(block_size) < 1:
        raise ValueError(f"sparsegpt: block_size must be >= 1, got block_size={block_size}")
    if not damp > 0:
        raise ValueError(f"sparsegpt: damp must be > 0, got damp={damp}")
    bs = int(block_size)
    mean_diag = float(np.mean(np.diag(h)))
    h[np.diag_indices(in_f)] += damp * (mean_diag if mean_diag > 0 else 1.0)
    # U upper triangular with H^-1 = U^T U: row j of U, from the diagonal on, is the update that
    # removing weight j (with columns < j already fixed) makes to the columns after it.
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        raise ValueError("sparsegpt: X^T X + damping is not positive definite; raise damp") from None
    wk = a.astype(np.float64)
    keep = np.ones(a.shape, bool)
    total = _n_drop(s, a.size)
    for j0 in range(0, in_f, bs):
        j1 = min(j0 + bs, in_f)
        w1, u1 = wk[:, j0:j1], u[j0:j1, j0:j1]
        n_drop = int(round(total * j1 / in_f)) - int(round(total * j0 / in_f))
        saliency = (np.square(w1) / np.square(np.diag(u1))[None, :]).ravel()
        keep1 = _drop_lowest(saliency, n_drop).reshape(w1.shape)
        err = np.zeros(w1.shape)
        for j in range(j1 - j0):
            col = w1[:, j]
            e = np.where(keep1[:, j], 0.0, col) / u1[j, j]
            w1[:, j:] -= np.outer(e, u1[j, j:])
            w1[:, j] = np.where(keep1[:, j], w1[:, j], 0.0)
            err[:, j] = e
        wk[:, j1:] -= err @ u[j0:j1, j1:]
        keep[:, j0:j1] = keep1
    pruned = jnp.asarray(np.where(keep, wk, 0.0).astype(a.dtype))
    return pruned, jnp.asarray(keep)
