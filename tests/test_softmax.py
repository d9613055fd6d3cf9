"""row_softmax_p, sparse attention's softmax over the stored entries of each CSR row: the native
kernel (every instruction set, one thread and the pool) and the reference, against float64 NumPy,
with their edge cases (empty rows, masked -inf scores, NaN, +inf), gradients, vmap and malformed
indptr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import ffi
from jaxsparse._softmax import row_softmax
from sparse_testing import assert_close, rounded
from test_ffi import ISAS, isa, max_threads

BACKENDS = ["reference"] + (["ffi"] if ffi.AVAILABLE else [])
needs_ffi = pytest.mark.skipif(not ffi.AVAILABLE, reason=str(ffi.UNAVAILABLE_REASON))


def numpy_softmax(x, indptr):
    """The documented semantics in float64: NaN ignored by the row maximum, a maximum that is not
    finite taken as 0, a sum that is not positive taken as 1."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for i in range(len(indptr) - 1):
        seg = x[..., indptr[i]:indptr[i + 1]]
        if seg.shape[-1] == 0:
            continue
        finite_or_inf = np.where(np.isnan(seg), -np.inf, seg)
        m = finite_or_inf.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m) & ~np.isnan(seg).any(axis=-1, keepdims=True), m, 0.0)
        with np.errstate(over="ignore", invalid="ignore"):
            p = np.exp(seg - m)
            s = p.sum(axis=-1, keepdims=True)
            out[..., indptr[i]:indptr[i + 1]] = p / np.where(s > 0, s, 1.0)
    return out


def _indptr(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


# Rows of every length class: empty, shorter than a vector, a vector and a tail, long.
LENGTHS = [0, 1, 3, 8, 16, 17, 0, 40, 100, 5, 0, 257]


def _edge_cases(x, indptr):
    """Row 3 partly masked (-inf), row 4 all masked, row 5 a NaN, row 7 a +inf, row 8 scores far
    below its maximum (exp underflows)."""
    x = x.copy()
    s = lambda i: slice(indptr[i], indptr[i + 1])
    x[..., s(3)][..., ::2] = -np.inf
    x[..., s(4)] = -np.inf
    x[..., indptr[5] + 2] = np.nan
    x[..., indptr[7] + 1] = np.inf
    x[..., s(8)][..., 1::3] = -120.0
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_matches_numpy(rng, backend, dtype):
    indptr = _indptr(LENGTHS)
    nnz = int(indptr[-1])
    x = _edge_cases(rng.standard_normal((3, nnz)) * 4, indptr)
    xj, x64 = rounded(x, dtype)
    fn = jax.jit(lambda v, ip: row_softmax(v, ip, backend=backend))
    out = np.asarray(fn(xj, jnp.asarray(indptr)).astype(jnp.float64))
    expected = numpy_softmax(x64, indptr)
    assert np.array_equal(np.isnan(out), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert_close(out[finite], expected[finite], dtype)
    # Rows without NaN or +inf sum to 1; masked entries are exactly 0.
    for i in (1, 2, 3, 8, 9, 11):
        np.testing.assert_allclose(out[:, indptr[i]:indptr[i + 1]].sum(axis=-1), 1.0, rtol=1e-5)
    assert (out[:, indptr[3]:indptr[4]][:, ::2] == 0).all()
    assert (out[:, indptr[4]:indptr[5]] == 0).all()


@needs_ffi
def test_isa_paths_and_thread_counts_agree(rng):
    indptr = _indptr(LENGTHS * 25)  # 300 rows: parts of several rows for the threads
    x = _edge_cases(rng.standard_normal((2, int(indptr[-1]))) * 3, indptr)
    xj, x64 = rounded(x, jnp.float32)
    expected = numpy_softmax(x64, indptr)
    fn = jax.jit(lambda v, ip: row_softmax(v, ip, backend="ffi"))
    for name in ISAS:
        with isa(name):
            with max_threads(1):
                one = np.asarray(fn(xj, jnp.asarray(indptr)))
            many = np.asarray(fn(xj, jnp.asarray(indptr)))
        np.testing.assert_array_equal(one, many)  # rows are never split between threads
        finite = ~np.isnan(expected)
        assert np.array_equal(np.isnan(many), ~finite)
        assert_close(many[finite], expected[finite], jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_and_vmap(rng, backend):
    indptr = _indptr([4, 0, 9, 1, 30])
    nnz = int(indptr[-1])
    x = rng.standard_normal((2, nnz))
    w = rng.standard_normal((2, nnz))
    ip = jnp.asarray(indptr)
    loss = lambda v: jnp.sum(row_softmax(v, ip, backend=backend) * w)
    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)))
    p = numpy_softmax(x, indptr)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    row_dot = np.zeros((2, len(indptr) - 1))
    np.add.at(row_dot, (slice(None), rows), p * w)
    assert_close(grad, p * (w - row_dot[:, rows]), jnp.float64)

    one = jax.jit(jax.vmap(lambda v: row_softmax(v, ip, backend=backend)))(jnp.asarray(x))
    assert_close(one, p, jnp.float64)
    # A batch of patterns too (the reference path): each its own indptr.
    ips = jnp.stack([ip, jnp.asarray(_indptr([44, 0, 0, 0, 0]))])
    both = jax.vmap(lambda v, i: row_softmax(v, i, backend=backend))(jnp.asarray(x), ips)
    assert_close(both[0], p[0], jnp.float64)
    assert_close(both[1], numpy_softmax(x[1:], _indptr([44, 0, 0, 0, 0]))[0], jnp.float64)


@needs_ffi
@pytest.mark.parametrize("bad, msg", [
    ([0, 3, 2, 5], "non-decreasing"),
    ([0, 2, 4, 6], r"indptr\[-1\] must equal nnz=5"),
    ([1, 2, 4, 5], r"indptr\[0\] must be 0"),
])
def test_malformed_indptr_inside_jit(bad, msg):
    fn = jax.jit(lambda v, ip: row_softmax(v, ip, backend="ffi"))
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match=msg):
        jax.block_until_ready(fn(jnp.ones((5,), jnp.float32), jnp.asarray(bad, jnp.int32)))


def test_bad_operands():
    ip = jnp.asarray([0, 2], jnp.int32)
    with pytest.raises(TypeError, match="values must be floating point"):
        row_softmax(jnp.ones((2,), jnp.int32), ip)
    with pytest.raises(TypeError, match="indptr must be int32"):
        row_softmax(jnp.ones((2,), jnp.float32), ip.astype(jnp.int64))
    if ffi.AVAILABLE:
        with pytest.raises(NotImplementedError, match="no native row softmax for bfloat16"):
            jax.jit(lambda v: row_softmax(v, ip, backend="ffi"))(jnp.ones((2,), jnp.bfloat16))
