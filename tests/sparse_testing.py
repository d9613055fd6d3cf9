"""Shared test helpers: random sparse operands with their float64 dense twins, tolerances, DLMC.

Every op test compares against a float64 NumPy/SciPy result computed from the *same rounded
inputs* the op sees, so the tolerance only has to cover accumulation and output rounding.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse

FORMATS = ("csr", "bsr", "nm")
DTYPES = (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16)

# (rtol, atol relative to the largest reference magnitude) per dtype.
_TOL = {
    np.dtype(jnp.float64): (1e-10, 1e-12),
    np.dtype(jnp.float32): (1e-5, 1e-5),
    np.dtype(jnp.bfloat16): (2e-2, 2e-2),
    np.dtype(jnp.float16): (4e-3, 4e-3),
}


def assert_close(actual, expected, dtype):
    """Compare ``actual`` (any dtype) with a float64 reference at ``dtype``'s tolerance."""
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float64))
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    rtol, atol = _TOL[np.dtype(dtype)]
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


def rounded(x, dtype):
    """``x`` rounded to ``dtype`` (as a jax array) and the float64 NumPy copy of the rounded values."""
    xj = jnp.asarray(x).astype(dtype)
    return xj, np.asarray(xj.astype(jnp.float64))


def default_block(shape):
    """A small block size dividing ``shape``."""
    return tuple(next(b for b in (4, 2, 1) if s % b == 0) for s in shape)


def default_nm(k):
    return (2, 4) if k % 4 == 0 else (1, 1)


def sparsify_dense(dense, fmt, *, block=None, nm=None, rng=None):
    """Impose ``fmt``'s structure on a float64 dense matrix (zeroing what the format cannot keep)."""
    dense = np.array(dense, dtype=np.float64)
    if fmt == "nm":
        n, m = nm or default_nm(dense.shape[1])
        groups = dense.reshape(dense.shape[0], -1, m)
        order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
        mask = np.zeros_like(groups, dtype=bool)
        np.put_along_axis(mask, order[..., :n], True, axis=-1)
        dense = (groups * mask).reshape(dense.shape)
    return dense


def random_sparse(rng, shape, density, fmt, dtype, *, block=None, nm=None):
    """A random sparse matrix of ``fmt`` and its float64 dense twin (of the rounded values)."""
    m, k = shape
    if fmt == "bsr":
        bm, bk = block or default_block(shape)
        keep = rng.random((m // bm, k // bk)) < density
        mask = np.kron(keep, np.ones((bm, bk), bool)) if m and k else np.zeros(shape, bool)
    else:
        mask = rng.random(shape) < density
    dense = rng.standard_normal(shape) * mask
    if fmt == "nm":
        nm = nm or default_nm(k)
        dense = sparsify_dense(dense, fmt, nm=nm)
    _, dense64 = rounded(dense, dtype)
    return build(dense64, fmt, dtype, block=block, nm=nm), dense64


def build(dense64, fmt, dtype, *, block=None, nm=None):
    """The jaxsparse matrix of ``fmt`` holding exactly ``dense64``'s nonzeros, values in ``dtype``."""
    x = jnp.asarray(dense64).astype(dtype)
    if fmt == "csr":
        return jaxsparse.CSR.fromdense(x)
    if fmt == "bsr":
        return jaxsparse.BSR.fromdense(x, block_size=block or default_block(dense64.shape))
    n, m = nm or default_nm(dense64.shape[1])
    return jaxsparse.NM.fromdense(x, n=n, m=m)


# ----------------------------------------------------------------------------------------------
# DLMC: real pruned-Transformer sparsity patterns, read from a path (never part of the project).


def dlmc_files(sparsities=("0.7", "0.9"), per_level=2):
    """A few DLMC transformer .smtx files (skips the test when the data set is absent)."""
    files = []
    for s in sparsities:
        files += jaxsparse.dlmc.transformer_files(s)[:per_level]
    if not files:
        pytest.skip(f"DLMC patterns not found under {jaxsparse.dlmc.root().resolve()} "
                    f"(set JAXSPARSE_DLMC)")
    return files


# ----------------------------------------------------------------------------------------------
# Quick and slow runs: `make test` deselects tests marked slow; `make test-all` runs them too.


def slow(fn):
    """``fn`` with the ``slow`` mark added, without touching the (base class's) original."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    wrapper.pytestmark = [*getattr(fn, "pytestmark", []), pytest.mark.slow.mark]
    return wrapper


def quick_only(base, keep=()):
    """Class decorator: every test of ``base`` that the subclass neither redefines nor lists in
    ``keep`` is marked ``slow`` (for backend subclasses whose full run repeats another's)."""

    def decorate(cls):
        for name in dir(base):
            if name.startswith("test_") and name not in cls.__dict__ and name not in keep:
                setattr(cls, name, slow(getattr(base, name)))
        return cls

    return decorate
