"""Property-based tests: every op and format against a float64 dense reference.

Random shapes (0 and 1 included), densities, dtypes, product forms, batch dimensions, backends
and transforms (none, ``jit``, ``vmap``, ``grad``). The default run is bounded (15 examples per
property, derandomized so CI is reproducible); ``JAXSPARSE_HYPOTHESIS_PROFILE=deep`` runs 500
random examples per property:

    JAXSPARSE_HYPOTHESIS_PROFILE=deep .venv/bin/pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

# Profiles are registered here (tests/conftest.py is shared) and applied per test, so loading one
# does not change the settings of other modules' hypothesis tests.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
# The default run does not shrink (a shrink recompiles for every candidate and can take minutes);
# the failing example is printed as drawn. The deep profile shrinks.
settings.register_profile("jaxsparse-default", max_examples=15, derandomize=True,
                          phases=[Phase.explicit, Phase.generate], **_COMMON)
settings.register_profile("deep", max_examples=500, **_COMMON)
_PROFILE = os.environ.get("JAXSPARSE_HYPOTHESIS_PROFILE", "default")
FUZZ = settings.get_profile("jaxsparse-default" if _PROFILE == "default" else _PROFILE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsparse  # noqa: E402
from sparse_testing import assert_close  # noqa: E402

CPU = jax.default_backend() == "cpu"
BACKENDS = [b for b in jaxsparse.BACKENDS
            if not (CPU and b.startswith("pallas") and "interpret" not in b)]
DTYPES = [jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16]
FORMS = ("A@X", "X@A", "x@W.T", "A.T@X")


@st.composite
def sparse_operand(draw, *, dtype):
    """(sparse matrix, float64 dense twin) of any format, shapes down to 0 x 0."""
    fmt = draw(st.sampled_from(["csr", "bsr", "nm"]))
    density = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if fmt == "bsr":
        bm, bk = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 4]))
        m, k = bm * draw(st.integers(0, 3)), bk * draw(st.integers(0, 3))
        keep = rng.random((m // bm, k // bk)) < density
        mask = np.kron(keep, np.ones((bm, bk), bool)) if keep.size else np.zeros((m, k), bool)
    else:
        if fmt == "nm":
            n, g = draw(st.sampled_from([(1, 1), (1, 2), (2, 4), (1, 4), (3, 4)]))
            m, k = draw(st.integers(0, 7)), g * draw(st.integers(0, 3))
        else:
            m, k = draw(st.integers(0, 9)), draw(st.integers(0, 9))
        mask = rng.random((m, k)) < density
    dense = rng.standard_normal((m, k)) * mask
    if fmt == "nm":
        groups = dense.reshape(m, k // g, g)
        order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
        keep = np.zeros(groups.shape, bool)
        np.put_along_axis(keep, order[..., :n], True, axis=-1)
        dense = (groups * keep).reshape(m, k)
    x = jnp.asarray(dense).astype(dtype)
    dense64 = np.asarray(x.astype(jnp.float64))
    if fmt == "csr":
        a = jaxsparse.CSR.fromdense(x)
    elif fmt == "bsr":
        a = jaxsparse.BSR.fromdense(x, block_size=(bm, bk))
    else:
        a = jaxsparse.NM.fromdense(x, n=n, m=g)
    return a, dense64


def _dense(rng, shape, dtype):
    x = jnp.asarray(rng.standard_normal(shape)).astype(dtype)
    return x, np.asarray(x.astype(jnp.float64))


def _value_grad_reference(a, dense_grad64):
    """The gradient with respect to ``a.values`` given the dense gradient: each stored value gets
    the dense gradient at its position (found by labelling the values 1..nnz)."""
    labels = jnp.arange(1, a.values.size + 1, dtype=jnp.float64).reshape(a.values.shape)
    where = np.asarray(a.astype(jnp.float64).with_values(labels).todense()).astype(np.int64)
    g = np.zeros(a.values.size)
    hit = where > 0
    g[where[hit] - 1] = dense_grad64[hit]
    return g.reshape(a.values.shape)


def _run(backend, fn, *args):
    try:
        return jax.block_until_ready(fn(*args))
    except NotImplementedError:  # the backend has no kernel for this case
        return None


@FUZZ
@given(data=st.data(), dtype=st.sampled_from(DTYPES), form=st.sampled_from(FORMS),
       backend=st.sampled_from(BACKENDS),
       transform=st.sampled_from(["none", "jit", "vmap", "grad"]),
       n=st.sampled_from([0, 1, 3]), batch=st.sampled_from([(), (2,), (1, 2)]))
def test_matmul_matches_dense(data, dtype, form, backend, transform, n, batch):
    if transform == "grad" and dtype != jnp.float64:
        dtype = jnp.float64  # gradients are compared in float64 only
    a, a64 = data.draw(sparse_operand(dtype=dtype))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if form in ("x@W.T", "A.T@X"):  # stored transposed: the logical matrix is a64.T
        a, a64 = a.T, a64.T
    m, k = a64.shape
    sparse_left = form in ("A@X", "A.T@X")

    def product(a, x):
        out = jaxsparse.matmul(a, x, backend=backend) if sparse_left else \
            jaxsparse.matmul(x, a, backend=backend)
        return out

    if sparse_left:
        x, x64 = _dense(rng, (*batch, k, n), dtype)
        expected = np.matmul(a64, x64)
    else:
        x, x64 = _dense(rng, (*batch, n, m), dtype)
        expected = np.matmul(x64, a64)

    if transform == "grad":
        ct = rng.standard_normal(expected.shape)
        fn = jax.grad(lambda v, x: jnp.sum(product(a.with_values(v), x) * ct), (0, 1))
        got = _run(backend, jax.jit(fn), a.values, x)
        if got is None:
            return
        g_vals, g_x = got
        nb = int(np.prod(batch))  # not -1 in the reshapes: n may be 0
        if sparse_left:  # out = A x: dA = ct x^T (summed over batch), dx = A^T ct
            dense_grad = np.einsum("bmn,bkn->mk", ct.reshape(nb, m, n), x64.reshape(nb, k, n))
            gx = np.matmul(a64.T, ct)
        else:  # out = x A: dA = x^T ct, dx = ct A^T
            dense_grad = np.einsum("bnm,bnk->mk", x64.reshape(nb, n, m), ct.reshape(nb, n, k))
            gx = np.matmul(ct, a64.T)
        assert_close(g_vals, _value_grad_reference(a, dense_grad), jnp.float64)
        assert_close(g_x, gx, jnp.float64)
        return
    if transform == "vmap":  # a batch of 2 dense operands over a new leading axis
        x2, x264 = _dense(rng, (2, *x.shape), dtype)
        fn = jax.jit(jax.vmap(product, in_axes=(None, 0)))
        out = _run(backend, fn, a, x2)
        expected = np.stack([np.matmul(a64, xi) if sparse_left else np.matmul(xi, a64)
                             for xi in x264])
    else:
        fn = jax.jit(product) if transform == "jit" else product
        out = _run(backend, fn, a, x)
    if out is None:
        return
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype)


@FUZZ
@given(data=st.data(), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS),
       transform=st.sampled_from(["none", "jit", "vmap", "grad"]),
       kdim=st.sampled_from([0, 1, 4]), transposed=st.booleans())
def test_sddmm_matches_dense(data, dtype, backend, transform, kdim, transposed):
    if transform == "grad" and dtype != jnp.float64:
        dtype = jnp.float64
    p, p64 = data.draw(sparse_operand(dtype=dtype))
    if transposed:
        p, p64 = p.T, p64.T
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    m, n = p.shape
    a, a64 = _dense(rng, (m, kdim), dtype)
    b, b64 = _dense(rng, (kdim, n), dtype)
    stored = np.asarray(p.with_values(jnp.ones_like(p.values)).todense()) != 0

    def values(a, b):
        return jaxsparse.sddmm(a, b, p, backend=backend).values

    if transform == "grad":
        ct = rng.standard_normal(p.values.shape)
        fn = jax.jit(jax.grad(lambda a, b: jnp.sum(values(a, b) * ct), (0, 1)))
        got = _run(backend, fn, a, b)
        if got is None:
            return
        # d/da sum(ct * (a @ b)[pattern]) = C @ b.T with C the cotangent scattered on the pattern.
        c = np.asarray(p.astype(jnp.float64).with_values(jnp.asarray(ct)).todense())
        assert_close(got[0], c @ b64.T, jnp.float64)
        assert_close(got[1], a64.T @ c, jnp.float64)
        return
    if transform == "vmap":
        a2, a264 = _dense(rng, (2, m, kdim), dtype)
        out = _run(backend, jax.jit(jax.vmap(values, in_axes=(0, None))), a2, b)
        if out is None:
            return
        for i in range(2):
            dense_out = np.asarray(p.with_values(out[i]).astype(jnp.float64).todense())
            assert_close(dense_out, np.where(stored, a264[i] @ b64, 0.0), dtype)
        return
    fn = jax.jit(values) if transform == "jit" else values
    out = _run(backend, fn, a, b)
    if out is None:
        return
    assert out.dtype == dtype and out.shape == p.values.shape
    dense_out = np.asarray(p.with_values(out).astype(jnp.float64).todense())
    assert_close(dense_out, np.where(stored, a64 @ b64, 0.0), dtype)
