"""SpMM (``jaxsparse.matmul`` / ``spmm_p``) against float64 dense results.

``SpmmTestBase`` holds every case; each backend reruns all of them through a one-line subclass.
A case the chosen backend has no kernel for skips (``NotImplementedError`` from the lowering).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxsparse
from sparse_testing import (DTYPES, FORMATS, assert_close, build, dlmc_files, quick_only,
                            random_sparse, rounded)

SHAPES = [(1, 1, 1), (7, 96, 40), (16, 32, 8), (12, 8, 1)]
FORMS = ("A@X", "X@A", "x@W.T", "A.T@X")


def activation_reference(name, z):
    """jaxsparse.ACTIVATIONS[name] in float64 NumPy / SciPy."""
    from scipy.special import erfc

    z = np.asarray(z, np.float64)
    if name is None:
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "gelu":
        return 0.5 * z * erfc(-z / np.sqrt(2.0))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    raise ValueError(name)


def _operands(rng, form, shape, density, fmt, dtype):
    """(sparse operand, dense operand, float64 expected) for one product form."""
    m, k, n = shape
    if form in ("A@X", "X@A"):
        a, a64 = random_sparse(rng, (m, k), density, fmt, dtype)
    else:  # stored transposed: the logical matrix is [m, k], stored as [k, m]
        a, a64 = random_sparse(rng, (k, m), density, fmt, dtype)
        a, a64 = a.T, a64.T
    if form in ("A@X", "A.T@X"):
        x, x64 = rounded(rng.standard_normal((k, n)), dtype)
        return a, x, a64 @ x64
    x, x64 = rounded(rng.standard_normal((n, m)), dtype)
    return a, x, x64 @ a64


class SpmmTestBase:
    backend = "reference"

    def call(self, fn, *args):
        try:
            return fn(*args)
        except NotImplementedError as e:
            pytest.skip(f"backend {self.backend!r}: {e}")

    def matmul(self, a, b):
        return jaxsparse.matmul(a, b, backend=self.backend)

    def product(self, form, a, x):
        return self.matmul(a, x) if form in ("A@X", "A.T@X") else self.matmul(x, a)

    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_forms(self, rng, fmt, shape, form):
        a, x, expected = _operands(rng, form, shape, 0.3, fmt, jnp.float64)
        fn = jax.jit(functools.partial(self.product, form))
        assert_close(self.call(fn, a, x), expected, jnp.float64)

    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_forms_eager(self, rng, fmt, form):
        a, x, expected = _operands(rng, form, (7, 96, 40), 0.3, fmt, jnp.float64)
        assert_close(self.call(self.product, form, a, x), expected, jnp.float64)

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_dtypes(self, rng, fmt, form, dtype):
        a, x, expected = _operands(rng, form, (24, 64, 16), 0.2, fmt, dtype)
        out = self.call(jax.jit(functools.partial(self.product, form)), a, x)
        assert out.dtype == dtype
        assert_close(out, expected, dtype)

    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("case", ["empty_rows", "nnz0", "dense"])
    def test_structure_edge_cases(self, rng, fmt, case):
        dense = rng.standard_normal((16, 24))
        if case == "empty_rows":
            dense[::3] = 0
            dense[:, ::5] = 0
        elif case == "nnz0":
            dense[:] = 0
        from sparse_testing import sparsify_dense
        dense = sparsify_dense(dense, fmt)
        a = build(dense, fmt, jnp.float64)
        x = rng.standard_normal((24, 5))
        y = rng.standard_normal((3, 16))
        assert_close(self.call(jax.jit(self.matmul), a, x), dense @ x, jnp.float64)
        assert_close(self.call(jax.jit(self.matmul), y, a), y @ dense, jnp.float64)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_vector_and_batch_operands(self, rng, fmt):
        a, a64 = random_sparse(rng, (8, 12), 0.4, fmt, jnp.float64)
        v = rng.standard_normal(12)
        assert_close(self.call(self.matmul, a, v), a64 @ v, jnp.float64)
        u = rng.standard_normal(8)
        assert_close(self.call(self.matmul, u, a), u @ a64, jnp.float64)
        xb = rng.standard_normal((2, 3, 12, 5))
        assert_close(self.call(self.matmul, a, xb), np.einsum("mk,abkn->abmn", a64, xb),
                     jnp.float64)
        yb = rng.standard_normal((2, 3, 8))
        assert_close(self.call(self.matmul, yb, a), yb @ a64, jnp.float64)
        # Operators, and the linear-layer layout on a weight stored [out, in].
        assert_close(self.call(lambda: a @ v), a64 @ v, jnp.float64)
        assert_close(self.call(lambda: u @ a), u @ a64, jnp.float64)  # NumPy defers to us
        assert_close(self.call(lambda: jnp.asarray(u) @ a), u @ a64, jnp.float64)
        xs = rng.standard_normal((4, 12))
        assert_close(self.call(jax.jit(lambda w, x: x @ w.T), a, xs), xs @ a64.T, jnp.float64)

    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("form", ["A@X", "x@W.T"])
    def test_vmap_dense(self, rng, fmt, form):
        a, _, _ = _operands(rng, form, (8, 12, 3), 0.4, fmt, jnp.float64)
        a64 = np.asarray(a.todense())
        if form == "A@X":
            xs = rng.standard_normal((5, 12, 3))
            fn = jax.vmap(self.matmul, in_axes=(None, 0))
            expected = np.einsum("mk,bkn->bmn", a64, xs)
        else:
            xs = rng.standard_normal((5, 3, 8))
            fn = jax.vmap(lambda w, x: self.matmul(x, w), in_axes=(None, 0))
            expected = xs @ a64
        assert_close(self.call(jax.jit(fn), a, xs), expected, jnp.float64)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_vmap_sparse_values(self, rng, fmt):
        a, a64 = random_sparse(rng, (8, 12), 0.5, fmt, jnp.float64)
        scales = rng.standard_normal(4)
        batch = jnp.stack([a.values * s for s in scales])
        x = rng.standard_normal((12, 3))
        fn = jax.vmap(lambda d, x: self.matmul(a.with_values(d), x), in_axes=(0, None))
        expected = np.stack([s * a64 @ x for s in scales])
        assert_close(self.call(jax.jit(fn), batch, x), expected, jnp.float64)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_vmap_both(self, rng, fmt):
        a, a64 = random_sparse(rng, (8, 12), 0.5, fmt, jnp.float64)
        scales = rng.standard_normal(3)
        batch = jnp.stack([a.values * s for s in scales])
        xs = rng.standard_normal((3, 12, 2))
        fn = jax.vmap(lambda d, x: self.matmul(a.with_values(d), x))
        expected = np.stack([s * a64 @ x for s, x in zip(scales, xs)])
        assert_close(self.call(fn, batch, xs), expected, jnp.float64)

    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_grads(self, rng, fmt, form):
        a, x, _ = _operands(rng, form, (6, 8, 3), 0.5, fmt, jnp.float64)

        def f(values, x):
            return self.product(form, a.with_values(values), x)

        self.call(check_grads, f, (a.values, x), 1, ("fwd", "rev"))
        # Against the gradient of the dense product, masked to the pattern.
        a64 = np.asarray(a.todense())
        ct = rng.standard_normal(np.shape(self.call(f, a.values, x)))
        dense_f = (lambda ad, x: ad @ x) if form in ("A@X", "A.T@X") else (lambda ad, x: x @ ad)
        g_dense, gx_dense = jax.grad(lambda ad, x: jnp.sum(dense_f(ad, x) * ct), (0, 1))(
            jnp.asarray(a64), x)
        g_vals, gx = jax.grad(lambda v, x: jnp.sum(f(v, x) * ct), (0, 1))(a.values, x)
        assert_close(gx, gx_dense, jnp.float64)
        expected_vals = a.with_values(jnp.ones_like(a.values))
        mask = np.asarray(expected_vals.todense()) != 0
        assert_close(a.with_values(g_vals).todense(), np.where(mask, g_dense, 0), jnp.float64)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_bias_activation(self, rng, fmt, activation="gelu"):
        """matmul(..., bias=, activation=) = activation(product + bias), bias per output feature,
        in both layouts, N = 37 (vectors and a tail) and N = 1; a vector operand without bias.
        (Each activation, other dtypes and the kernels' paths: test_ffi.py.)"""
        for form, n in (("A@X", 37), ("x@W.T", 37), ("x@W.T", 1)):
            a, x, prod = _operands(rng, form, (24, 64, n), 0.3, fmt, jnp.float32)
            features = prod.shape[0] if form == "A@X" else prod.shape[1]
            bias, bias64 = rounded(rng.standard_normal(features), jnp.float32)
            pre = prod + (bias64[:, None] if form == "A@X" else bias64)
            fn = jax.jit(lambda a, x, b: self.product_with(form, a, x, bias=b,
                                                           activation=activation))
            out = self.call(fn, a, x, bias)
            assert out.dtype == jnp.float32
            assert_close(out, activation_reference(activation, pre), jnp.float32)
        a, x, prod = _operands(rng, "A@X", (24, 64, 1), 0.3, fmt, jnp.float32)
        out = self.call(lambda: jaxsparse.matmul(a, x[:, 0], activation=activation,
                                                 backend=self.backend))
        assert_close(out, activation_reference(activation, prod[:, 0]), jnp.float32)

    def product_with(self, form, a, x, **epilogue):
        if form == "A@X":
            return jaxsparse.matmul(a, x, backend=self.backend, **epilogue)
        return jaxsparse.matmul(x, a, backend=self.backend, **epilogue)

    def test_bias_activation_grads_and_vmap(self, rng, activation="gelu"):
        """Gradients (values, input, bias) are those of the unfused composition, checked against
        the dense float64 one; vmap over the input folds into the fused call."""
        a, x, _ = _operands(rng, "x@W.T", (6, 8, 3), 0.5, "csr", jnp.float64)  # x [3, 6] @ [6, 8]
        bias = rng.standard_normal(8)
        act = jaxsparse.ACTIVATIONS[activation]

        def f(values, x, b):
            return self.product_with("x@W.T", a.with_values(values), x, bias=b,
                                     activation=activation)

        self.call(check_grads, f, (a.values, x, bias), 1, ("fwd", "rev"))
        a64 = np.asarray(a.todense())
        ct = rng.standard_normal((3, 8))
        g_dense = jax.grad(lambda ad, x, b: jnp.sum(act(x @ ad + b) * ct), (0, 1, 2))(
            jnp.asarray(a64), x, bias)
        g_vals, gx, gb = jax.grad(lambda v, x, b: jnp.sum(f(v, x, b) * ct), (0, 1, 2))(
            a.values, x, bias)
        assert_close(gx, g_dense[1], jnp.float64)
        assert_close(gb, g_dense[2], jnp.float64)
        mask = np.asarray(a.with_values(jnp.ones_like(a.values)).todense()) != 0
        assert_close(a.with_values(g_vals).todense(), np.where(mask, g_dense[0], 0), jnp.float64)
        xs = rng.standard_normal((4, 3, 6))
        out = self.call(jax.jit(jax.vmap(lambda x: f(a.values, x, bias))), xs)
        assert_close(out, activation_reference(activation, xs @ a64 + bias), jnp.float64)

    def test_bias_activation_errors(self, rng):
        a, _ = random_sparse(rng, (8, 12), 0.5, "csr", jnp.float32)
        x = jnp.ones((12, 3), jnp.float32)
        with pytest.raises(ValueError, match=r"activation must be None or one of.*'tanh'"):
            jaxsparse.matmul(a, x, activation="tanh")
        with pytest.raises(ValueError, match=r"bias must have one value per output feature, "
                                             r"shape \(8,\), got bias.shape=\(12,\)"):
            jaxsparse.matmul(a, x, bias=jnp.ones(12))
        with pytest.raises(ValueError, match=r"shape \(12,\), got bias.shape=\(8,\)"):
            jaxsparse.matmul(jnp.ones((3, 8), jnp.float32), a, bias=jnp.ones(8))

    def test_dlmc_patterns(self, rng):
        for path in dlmc_files():
            a = jaxsparse.dlmc.load_smtx(path, dtype=np.float64)
            x = rng.standard_normal((a.shape[1], 16))
            expected = a.to_scipy() @ x
            assert_close(self.call(jax.jit(self.matmul), a, x), expected, jnp.float64)
            xt = rng.standard_normal((16, a.shape[1]))
            assert_close(self.call(jax.jit(lambda w, x: self.matmul(x, w.T)), a, xt),
                         (a.to_scipy() @ xt.T).T, jnp.float64)

    def test_errors(self, rng):
        a, _ = random_sparse(rng, (8, 12), 0.5, "csr", jnp.float32)
        with pytest.raises(ValueError, match=r"contraction dimensions.*b.shape=\(11, 3\)"):
            self.matmul(a, jnp.ones((11, 3), jnp.float32))
        with pytest.raises(ValueError, match=r"contraction dimensions.*a.shape=\(3, 9\)"):
            self.matmul(jnp.ones((3, 9), jnp.float32), a)
        with pytest.raises(TypeError, match="exactly one operand"):
            self.matmul(a, a)
        with pytest.raises(TypeError, match="exactly one operand"):
            self.matmul(jnp.ones((8, 12)), jnp.ones((12, 2)))
        with pytest.raises(ValueError, match="unknown jaxsparse backend 'nope'"):
            jaxsparse.matmul(a, jnp.ones((12, 2), jnp.float32), backend="nope")
        with pytest.raises(TypeError, match="complex"):
            self.matmul(a, jnp.ones((12, 2), jnp.complex64))


class TestSpmmReference(SpmmTestBase):
    backend = "reference"


# On CPU "auto" is the native kernels (test_ffi.py runs every case with "ffi") plus the reference
# where no kernel applies; the quick run keeps the cases that mix the two (gradients, vmap).
@quick_only(SpmmTestBase, keep=("test_grads", "test_vmap_sparse_values", "test_vmap_both",
                                 "test_vector_and_batch_operands"))
class TestSpmmAuto(SpmmTestBase):
    backend = "auto"


def test_mixed_dtypes_promote(rng):
    a, a64 = random_sparse(rng, (8, 12), 0.5, "csr", jnp.bfloat16)
    x = rng.standard_normal((12, 2)).astype(np.float32)
    with jax.numpy_dtype_promotion("standard"):
        out = jaxsparse.matmul(a, x)
    assert out.dtype == jnp.float32
    assert_close(out, a64 @ x.astype(np.float64), jnp.float32)


def test_primitive_shape_checks(rng):
    a, _ = random_sparse(rng, (8, 12), 0.5, "csr", jnp.float32)
    b = jnp.ones((12, 2), jnp.float64)
    with pytest.raises(TypeError, match=r"dtypes must match.*data.dtype=float32.*b.dtype=float64"):
        jaxsparse.spmm_p.bind(a.data, a.indices, a.indptr, b, fmt="csr", shape=(8, 12), nm=None,
                              transpose_a=False, layout="kn", backend="reference")
    with pytest.raises(TypeError, match=r"indices must be 1-D int32"):
        jaxsparse.spmm_p.bind(a.data, a.indices.astype(jnp.int64), a.indptr, b.astype(jnp.float32),
                              fmt="csr", shape=(8, 12), nm=None, transpose_a=False, layout="kn",
                              backend="reference")


def test_backend_switch_reaches_the_lowering(rng, monkeypatch):
    """auto/ffi lower CSR SpMM to the native kernel on CPU; reference never does."""
    a, _ = random_sparse(rng, (8, 12), 0.5, "csr", jnp.float32)
    x = jnp.ones((12, 2), jnp.float32)

    def hlo(backend):
        return jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend=backend)).lower(a, x).as_text()

    if not jaxsparse.ffi.AVAILABLE:
        pytest.skip(jaxsparse.ffi.UNAVAILABLE_REASON)
    assert "jaxsparse_csr_spmm" in hlo("auto")
    assert "jaxsparse_csr_spmm" in hlo("ffi")
    assert "jaxsparse_csr_spmm" not in hlo("reference")
    with jaxsparse.use_backend("reference"):
        assert jaxsparse.get_backend() == "reference"
        assert "jaxsparse_csr_spmm" not in jax.jit(jaxsparse.matmul).lower(a, x).as_text()
    monkeypatch.setenv("JAXSPARSE_BACKEND", "reference")
    assert jaxsparse.get_backend() == "reference"
