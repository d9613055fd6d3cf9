"""Pruning functions against independent NumPy computations of the expected masks."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import prune


def check(pruned, mask, w, want):
    np.testing.assert_array_equal(np.asarray(mask), want)
    np.testing.assert_array_equal(np.asarray(pruned), np.where(want, w, 0))
    assert pruned.dtype == jnp.asarray(w).dtype


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_magnitude(rng, sparsity):
    w = rng.standard_normal((12, 10)).astype(np.float32)
    n_drop = int(round(sparsity * w.size))
    thresh = np.sort(np.abs(w).ravel())[n_drop - 1] if n_drop else -1.0
    check(*prune.magnitude(jnp.asarray(w), sparsity), w, np.abs(w) > thresh)


def test_magnitude_ties_are_stable():
    w = np.ones((2, 4), np.float32)
    _, mask = prune.magnitude(w, 0.5)
    np.testing.assert_array_equal(np.asarray(mask).ravel(), [0, 0, 0, 0, 1, 1, 1, 1])


def test_global_magnitude(rng):
    ws = {"a": rng.standard_normal((8, 4)).astype(np.float32),
          "b": 3 * rng.standard_normal((6, 6)).astype(np.float32)}
    allv = np.concatenate([np.abs(v).ravel() for v in ws.values()])
    thresh = np.sort(allv)[int(round(0.6 * allv.size)) - 1]
    pruned, masks = prune.global_magnitude(ws, 0.6)
    for k, w in ws.items():
        check(pruned[k], masks[k], w, np.abs(w) > thresh)
    assert np.asarray(masks["b"]).mean() > np.asarray(masks["a"]).mean()


def test_block(rng):
    w = rng.standard_normal((8, 12)).astype(np.float32)
    norms = np.array([[np.linalg.norm(w[i:i + 2, j:j + 3]) for j in range(0, 12, 3)]
                      for i in range(0, 8, 2)])
    thresh = np.sort(norms.ravel())[int(round(0.5 * norms.size)) - 1]
    want = np.kron(norms > thresh, np.ones((2, 3), bool))
    check(*prune.block(w, 0.5, (2, 3)), w, want)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_n_m(rng, n, m):
    w = rng.standard_normal((5, 16)).astype(np.float32)
    want = np.zeros(w.shape, bool)
    for r in range(w.shape[0]):
        for g in range(0, 16, m):
            grp = np.abs(w[r, g:g + m])
            kth = np.sort(grp)[::-1][n - 1]
            want[r, g:g + m] = grp >= kth
    check(*prune.n_m(w, n, m), w, want)


def test_n_m_ties_keep_lower_index():
    _, mask = prune.n_m(np.ones((1, 4), np.float32), 2, 4)
    np.testing.assert_array_equal(np.asarray(mask), [[True, True, False, False]])


def test_wanda(rng):
    w = rng.standard_normal((6, 10)).astype(np.float32)
    x = rng.standard_normal((3, 7, 10)).astype(np.float32) * np.linspace(0.1, 3, 10)
    norms = np.sqrt((x.reshape(-1, 10).astype(np.float64) ** 2).sum(0))
    score = np.abs(w) * norms
    n_drop = int(round(0.4 * 10))
    want = np.array([score[r] > np.sort(score[r])[n_drop - 1] for r in range(6)])
    check(*prune.wanda(w, x, 0.4), w, want)
    assert (np.asarray(prune.wanda(w, x, 0.4)[1]).sum(1) == 10 - n_drop).all()
    check(*prune.wanda(w, None, 0.4, x_norms=norms), w, want)


def _obs_reference(w, h, keep):
    """The optimal brain surgeon's column-by-column update for a given keep-mask, written from its
    definition: with columns < j fixed, dropping w_j moves the free columns j.. by the optimal
    compensation -w_j [H_jj^-1]_0,: / [H_jj^-1]_00, H_jj^-1 the inverse of H[j:, j:] inverted
    afresh at each step (no Cholesky factor, no blocks)."""
    w = w.astype(np.float64).copy()
    for j in range(w.shape[1]):
        hinv = np.linalg.inv(h[j:, j:])
        drop = ~keep[:, j]
        w[drop, j:] -= np.outer(w[drop, j] / hinv[0, 0], hinv[0])
        w[drop, j] = 0.0
    return w


def _correlated_inputs(rng, n, k):
    return (rng.standard_normal((n, k)) @ (rng.standard_normal((k, k)) * 0.3 + 2 * np.eye(k))
            * rng.uniform(0.1, 3, k))


@pytest.mark.parametrize("block_size", [128, 7])
def test_sparsegpt_matches_obs_reference(rng, block_size):
    # Blocks (lazy updates) change which entries are dropped (saliency is taken per block), not
    # the update of the kept ones.
    w = rng.standard_normal((9, 24)).astype(np.float32)
    x = _correlated_inputs(rng, 60, 24)
    pruned, keep = prune.sparsegpt(w, x, 0.5, block_size=block_size)
    keep = np.asarray(keep)
    assert (~keep).sum() == round(0.5 * w.size)
    h = x.T @ x
    h += 0.01 * np.mean(np.diag(h)) * np.eye(24)
    want = _obs_reference(w, h, keep)
    np.testing.assert_allclose(np.asarray(pruned), want.astype(np.float32), rtol=1e-4, atol=1e-5)
    assert (np.asarray(pruned)[~keep] == 0).all()
    assert pruned.dtype == jnp.float32


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(rng):
    w = rng.standard_normal((32, 150)).astype(np.float32)
    x = _correlated_inputs(rng, 800, 150)
    y = x @ w.T.astype(np.float64)

    def err(wp):
        return np.linalg.norm(y - x @ np.asarray(wp, np.float64).T) / np.linalg.norm(y)

    for s in (0.5, 0.8):
        pruned, keep = prune.sparsegpt(w, x, s)
        keep = np.asarray(keep)
        # The least-squares optimum of the kept weights for the same mask (float64 lstsq) bounds
        # it from below; it must beat Wanda and magnitude, which keep the weights unchanged.
        best = np.zeros(w.shape)
        for r in range(w.shape[0]):
            best[r, keep[r]] = np.linalg.lstsq(x[:, keep[r]], y[:, r], rcond=None)[0]
        assert err(best) - 1e-6 <= err(pruned) <= 1.5 * err(best)
        assert err(pruned) < err(prune.wanda(w, x, s)[0]) < err(prune.magnitude(w, s)[0])


def test_sparsegpt_special_cases(rng):
    w = rng.standard_normal((5, 40)).astype(np.float32)
    x = rng.standard_normal((30, 40))
    pruned, keep = prune.sparsegpt(w, x, 0.0)
    np.testing.assert_array_equal(np.asarray(pruned), w)
    assert np.asarray(keep).all()
    # Uncorrelated inputs of one scale: no compensation, and (one block) the magnitude mask.
    check(*prune.sparsegpt(w, None, 0.6, x_gram=3 * np.eye(40)), w,
          np.asarray(prune.magnitude(w, 0.6)[1]))
    # The Gram matrix is what the activations give.
    a = prune.sparsegpt(w, x, 0.5)
    b = prune.sparsegpt(w, None, 0.5, x_gram=x.T @ x)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_sparsity(bad):
    w = np.ones((4, 4), np.float32)
    for fn in (lambda: prune.magnitude(w, bad), lambda: prune.block(w, bad, 2),
               lambda: prune.wanda(w, w, bad), lambda: prune.sparsegpt(w, w, bad),
               lambda: prune.global_magnitude({"a": w}, bad)):
        with pytest.raises(ValueError, match="sparsity"):
            fn()


def test_bad_sizes():
    w = np.ones((6, 10), np.float32)
    with pytest.raises(ValueError, match=r"block_size=\(4, 4\).*\(6, 10\)"):
        prune.block(w, 0.5, 4)
    with pytest.raises(ValueError, match="m=4.*10"):
        prune.n_m(w, 2, 4)
    with pytest.raises(ValueError, match=r"x_calib.shape\[-1\]=9.*10"):
        prune.wanda(w, np.ones((3, 9), np.float32), 0.5)
    with pytest.raises(ValueError, match=r"x_calib.shape\[-1\]=9.*10"):
        prune.sparsegpt(w, np.ones((3, 9), np.float32), 0.5)
    with pytest.raises(ValueError, match=r"x_gram.shape=\(9, 9\).*\(10, 10\)"):
        prune.sparsegpt(w, None, 0.5, x_gram=np.eye(9))
    with pytest.raises(ValueError, match="x_calib"):
        prune.sparsegpt(w, None, 0.5)
    for kw, what in ((dict(block_size=0), "block_size"), (dict(damp=0.0), "damp")):
        with pytest.raises(ValueError, match=what):
            prune.sparsegpt(w, np.ones((3, 10)), 0.5, **kw)
