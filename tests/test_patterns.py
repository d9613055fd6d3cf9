"""Attention patterns against brute-force dense masks built independently with NumPy."""

import numpy as np
import pytest

import jaxsparse
from jaxsparse import patterns


def dense(p):
    return np.asarray(p.todense()) != 0


def brute(n, allowed):
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return allowed(i, j)


@pytest.mark.parametrize("n", [1, 7, 16])
def test_causal(n):
    p = patterns.causal(n)
    assert isinstance(p, jaxsparse.CSR) and p.shape == (n, n)
    np.testing.assert_array_equal(dense(p), brute(n, lambda i, j: j <= i))


@pytest.mark.parametrize("n,w", [(9, 0), (9, 2), (16, 3), (5, 10)])
@pytest.mark.parametrize("causal", [False, True])
def test_local(n, w, causal):
    p = patterns.local(n, w, causal=causal)
    want = brute(n, (lambda i, j: (i - j >= 0) & (i - j <= w)) if causal
                 else (lambda i, j: np.abs(i - j) <= w))
    np.testing.assert_array_equal(dense(p), want)


@pytest.mark.parametrize("n,s", [(16, 4), (13, 3), (8, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_strided(n, s, causal):
    p = patterns.strided(n, s, causal=causal)
    want = brute(n, lambda i, j: ((np.abs(i - j) < s) | ((i - j) % s == 0))
                 & ((j <= i) if causal else True))
    np.testing.assert_array_equal(dense(p), want)


def test_bigbird():
    n, w, g, r = 32, 2, 2, 3
    p = patterns.bigbird(n, w, g, r, seed=1)
    d = dense(p)
    band = brute(n, lambda i, j: np.abs(i - j) <= w)
    assert (d[band]).all()
    assert d[:g].all() and d[:, :g].all()
    extra = d & ~band
    extra[:g] = False
    extra[:, :g] = False
    assert (extra.sum(1) <= r).all() and extra.sum() > 0
    np.testing.assert_array_equal(d, dense(patterns.bigbird(n, w, g, r, seed=1)))  # reproducible
    # the entries are unique and sorted per row (a valid CSR was built)
    assert p.nnz == d.sum()


def test_from_mask_csr_and_bsr(rng):
    m = rng.random((12, 8)) < 0.3
    m[3] = False
    np.testing.assert_array_equal(dense(patterns.from_mask(m)), m)
    b = patterns.from_mask(m, block_size=(4, 2))
    assert isinstance(b, jaxsparse.BSR) and b.block_size == (4, 2)
    blocks = m.reshape(3, 4, 4, 2).any(axis=(1, 3))
    np.testing.assert_array_equal(dense(b), np.kron(blocks, np.ones((4, 2), bool)))


def test_errors():
    with pytest.raises(ValueError, match="seq_len"):
        patterns.causal(0)
    with pytest.raises(ValueError, match="window"):
        patterns.local(8, -1)
    with pytest.raises(ValueError, match="stride"):
        patterns.strided(8, 0)
    with pytest.raises(ValueError, match="block_size"):
        patterns.from_mask(np.ones((6, 6), bool), block_size=4)
