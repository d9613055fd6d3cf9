"""SDDMM (``jaxsparse.sddmm`` / ``sddmm_p``) against float64 dense results sampled at the pattern."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxsparse
from jaxsparse._sddmm import sddmm_values
from sparse_testing import (DTYPES, FORMATS, assert_close, build, dlmc_files, quick_only,
                            random_sparse, rounded)


def _sampled(pattern, full64):
    """The dense product restricted to the pattern's stored entries (as a dense matrix)."""
    mask = np.asarray(pattern.with_values(jnp.ones_like(pattern.values)).todense()) != 0
    return np.where(mask, full64, 0.0)


class SddmmTestBase:
    backend = "reference"

    def call(self, fn, *args):
        try:
            return fn(*args)
        except NotImplementedError as e:
            pytest.skip(f"backend {self.backend!r}: {e}")

    def sddmm(self, a, b, pattern):
        return jaxsparse.sddmm(a, b, pattern, backend=self.backend)

    @pytest.mark.parametrize("transposed", [False, True], ids=["P", "P.T"])
    @pytest.mark.parametrize("mkn", [(1, 1, 1), (7, 40, 96), (16, 8, 12)], ids=str)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_values(self, rng, fmt, mkn, transposed):
        self.check_values(rng, fmt, mkn, transposed, jit=True)

    @pytest.mark.parametrize("transposed", [False, True], ids=["P", "P.T"])
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_values_eager(self, rng, fmt, transposed):
        self.check_values(rng, fmt, (7, 40, 96), transposed, jit=False)

    def check_values(self, rng, fmt, mkn, transposed, jit):
        m, k, n = mkn
        shape = (n, m) if transposed else (m, n)
        pattern, _ = random_sparse(rng, shape, 0.3, fmt, jnp.float64)
        if transposed:
            pattern = pattern.T
        a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
        fn = jax.jit(self.sddmm) if jit else self.sddmm
        out = self.call(fn, a, b, pattern)
        assert type(out) is type(pattern) and out.shape == pattern.shape
        np.testing.assert_array_equal(np.asarray(out.pattern_arrays[0]),
                                      np.asarray(pattern.pattern_arrays[0]))
        assert_close(out.todense(), _sampled(pattern, a @ b), jnp.float64)

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_dtypes(self, rng, fmt, dtype):
        pattern, _ = random_sparse(rng, (24, 16), 0.3, fmt, dtype)
        a, a64 = rounded(rng.standard_normal((24, 32)), dtype)
        b, b64 = rounded(rng.standard_normal((32, 16)), dtype)
        out = self.call(jax.jit(self.sddmm), a, b, pattern)
        assert out.dtype == dtype
        assert_close(out.todense(), _sampled(pattern, a64 @ b64), dtype)

    @pytest.mark.parametrize("tl", [False, True])
    @pytest.mark.parametrize("tr", [False, True])
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_operand_layouts(self, rng, fmt, tl, tr):
        pattern, _ = random_sparse(rng, (8, 12), 0.4, fmt, jnp.float64)
        a, b = rng.standard_normal((8, 5)), rng.standard_normal((5, 12))
        lhs, rhs = (a.T if tl else a), (b.T if tr else b)
        vals = self.call(jax.jit(lambda l, r: sddmm_values(
            l, r, pattern, transpose_lhs=tl, transpose_rhs=tr, backend=self.backend)), lhs, rhs)
        assert_close(pattern.with_values(vals).todense(), _sampled(pattern, a @ b), jnp.float64)

    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("case", ["empty_rows", "nnz0", "dense"])
    def test_structure_edge_cases(self, rng, fmt, case):
        dense = np.ones((8, 12))
        if case == "empty_rows":
            dense[::3] = 0
        elif case == "nnz0":
            dense[:] = 0
        from sparse_testing import sparsify_dense
        pattern = build(sparsify_dense(dense * rng.standard_normal((8, 12)), fmt), fmt,
                        jnp.float64)
        a, b = rng.standard_normal((8, 4)), rng.standard_normal((4, 12))
        out = self.call(jax.jit(self.sddmm), a, b, pattern)
        assert_close(out.todense(), _sampled(pattern, a @ b), jnp.float64)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_vmap(self, rng, fmt):
        pattern, _ = random_sparse(rng, (8, 12), 0.4, fmt, jnp.float64)
        a = rng.standard_normal((3, 8, 5))
        b = rng.standard_normal((3, 5, 12))
        b1 = b[0]
        fn = lambda a, b: self.sddmm(a, b, pattern).values
        both = self.call(jax.jit(jax.vmap(fn)), a, b)
        lhs_only = self.call(jax.vmap(fn, in_axes=(0, None)), a, b1)
        for i in range(3):
            assert_close(pattern.with_values(both[i]).todense(), _sampled(pattern, a[i] @ b[i]),
                         jnp.float64)
            assert_close(pattern.with_values(lhs_only[i]).todense(),
                         _sampled(pattern, a[i] @ b1), jnp.float64)
        # Batched pattern values do not matter to SDDMM, but a batched pattern structure does.
        pats = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), pattern)
        per_pattern = self.call(jax.vmap(lambda p: self.sddmm(a[0], b[0], p).values), pats)
        assert_close(pattern.with_values(per_pattern[1]).todense(),
                     _sampled(pattern, a[0] @ b[0]), jnp.float64)

    @pytest.mark.parametrize("transposed", [False, True], ids=["P", "P.T"])
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_grads(self, rng, fmt, transposed):
        pattern, _ = random_sparse(rng, (12, 8) if transposed else (8, 12), 0.5, fmt, jnp.float64)
        if transposed:
            pattern = pattern.T
        a, b = rng.standard_normal((8, 5)), rng.standard_normal((5, 12))
        f = lambda a, b: self.sddmm(a, b, pattern).values
        self.call(check_grads, f, (a, b), 1, ("fwd", "rev"))
        mask = _sampled(pattern, np.ones((8, 12))) != 0
        ct_dense = np.where(mask, rng.standard_normal((8, 12)), 0.0)
        ct = self.sddmm(np.eye(8), ct_dense, pattern).values  # ct_dense at the pattern
        ga, gb = jax.grad(lambda a, b: jnp.sum(f(a, b) * ct), (0, 1))(a, b)
        assert_close(ga, ct_dense @ b.T, jnp.float64)
        assert_close(gb, a.T @ ct_dense, jnp.float64)

    def test_dlmc_patterns(self, rng):
        for path in dlmc_files(per_level=1):
            pattern = jaxsparse.dlmc.load_smtx(path, dtype=np.float64)
            m, n = pattern.shape
            a, b = rng.standard_normal((m, 16)), rng.standard_normal((16, n))
            out = self.call(jax.jit(self.sddmm), a, b, pattern)
            sp = pattern.to_scipy().tocoo()
            expected = np.einsum("pk,pk->p", a[sp.row], b[:, sp.col].T)
            got = out.to_scipy().tocoo()
            order = np.lexsort((got.col, got.row))
            assert_close(got.data[order], expected, jnp.float64)

    def test_errors(self, rng):
        pattern, _ = random_sparse(rng, (8, 12), 0.5, "csr", jnp.float32)
        a = jnp.ones((8, 4), jnp.float32)
        with pytest.raises(ValueError, match=r"contraction.*a.shape=\(8, 4\), b.shape=\(5, 12\)"):
            self.sddmm(a, jnp.ones((5, 12), jnp.float32), pattern)
        with pytest.raises(ValueError, match=r"\(8, 13\) but pattern.shape=\(8, 12\)"):
            self.sddmm(a, jnp.ones((4, 13), jnp.float32), pattern)
        with pytest.raises(TypeError, match="pattern must be a jaxsparse matrix"):
            self.sddmm(a, jnp.ones((4, 12), jnp.float32), np.ones((8, 12)))
        with pytest.raises(TypeError, match="floating point"):
            self.sddmm(jnp.ones((8, 4), jnp.int32), jnp.ones((4, 12), jnp.int32), pattern)
        with pytest.raises(ValueError, match="must be 2-D"):
            self.sddmm(jnp.ones((2, 8, 4), jnp.float32), jnp.ones((4, 12), jnp.float32), pattern)


class TestSddmmReference(SddmmTestBase):
    backend = "reference"


@quick_only(SddmmTestBase, keep=("test_grads", "test_vmap"))
class TestSddmmAuto(SddmmTestBase):
    backend = "auto"


def test_sddmm_never_forms_the_dense_product():
    """A 2**16 x 2**16 pattern (dense product: 32 GiB in float64) with a few entries runs."""
    n = 2**16
    rows = np.array([0, 5, n - 1])
    cols = np.array([3, n - 2, 0])
    import scipy.sparse as sp
    pattern = jaxsparse.CSR.from_scipy(sp.csr_matrix((np.ones(3), (rows, cols)), shape=(n, n)))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, 4)), rng.standard_normal((4, n))
    out = jax.jit(jaxsparse.sddmm)(a, b, pattern)
    assert_close(out.data, np.einsum("pk,kp->p", a[rows], b[:, cols]), jnp.float64)
