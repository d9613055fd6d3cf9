"""Malformed input: every public entry point and every kernel path raises a clear error.

Three ways a malformed pattern can reach a kernel, each tested per case:

* ``construct``: concrete arrays; the constructor validates and raises ``ValueError``.
* ``eager``: concrete arrays that skipped validation (``tree_unflatten``); the kernel path
  (native kernel or the reference's run-time check) must raise.
* ``jit``: the matrix is built from *traced* arrays inside ``jit``, so construction sees only
  shapes; the kernel path must raise at run time.

Each is run over every backend that applies on this platform (``jaxsparse.BACKENDS``; a backend
without a kernel for the case skips) and over the ops: ``A @ X``, ``X @ A`` (the ``x @ W.T``
layout), ``A.T @ X``, ``sddmm``, and the gradient with respect to the sparse values (an SDDMM on
the pattern). Errors raised from inside a compiled computation arrive as ``JaxRuntimeError`` (or
``ValueError`` for a native kernel's ``InvalidArgument``) whose message names the problem.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse
from jaxsparse import BSR, CSR, NM
from jaxsparse._sddmm import sddmm_p
from jaxsparse._spmm import spmm_p


def _backends_here():
    """The backends that run on the default platform (GPU-only Pallas is left out on CPU)."""
    cpu = jax.default_backend() == "cpu"
    return [b for b in jaxsparse.BACKENDS
            if not (cpu and b.startswith("pallas") and "interpret" not in b)]


BACKENDS = _backends_here()
# "auto" only chooses among the others on CPU: the long case lists skip it (test_jit_every_op
# and the NaN tests keep it), which keeps the default run fast.
KERNEL_BACKENDS = [b for b in BACKENDS if not (b == "auto" and jax.default_backend() == "cpu")]
RUNTIME_ERRORS = (ValueError, jax.errors.JaxRuntimeError)
OPS = ("A@X", "X@A", "A.T@X", "sddmm", "grad")

# ----------------------------------------------------------------------------------------------
# Well-formed arrays of each format, and the malformations applied to them.

VALID = {
    # [[1, 0, 2, 0], [0, 3, 0, 0], [0, 0, 0, 4]]
    "csr": dict(shape=(3, 4), data=np.array([1.0, 2.0, 3.0, 4.0]),
                indices=np.array([0, 2, 1, 3], np.int32), indptr=np.array([0, 2, 3, 4], np.int32)),
    # 2 x 2 grid of 2 x 3 blocks; blocks at (0, 0), (0, 1), (1, 1)
    "bsr": dict(shape=(4, 6), data=np.arange(1.0, 19.0).reshape(3, 2, 3),
                indices=np.array([0, 1, 1], np.int32), indptr=np.array([0, 2, 3], np.int32)),
    "nm": dict(shape=(2, 8), n=2, m=4, data=np.arange(1.0, 9.0).reshape(2, 4),
               positions=np.array([[0, 3, 1, 2], [1, 2, 0, 3]], np.uint8)),
}

# name -> (format, {array: new value}, regex the message must match)
VALUE_CASES = {
    "csr-index-too-large": ("csr", dict(indices=[0, 4, 1, 3]), r"indices\[1\]=4 is out of range"),
    "csr-index-negative": ("csr", dict(indices=[0, 2, -1, 3]), r"indices\[2\]=-1 is out of range"),
    "csr-index-beyond-int32": ("csr", dict(indices=np.array([0, 2**32 + 1, 1, 3], np.int64)),
                               r"(indices.*out of range|do not fit in int32)"),
    "csr-indptr-decreasing": ("csr", dict(indptr=[0, 3, 2, 4]), r"indptr must be non-decreasing"),
    "csr-indptr-start": ("csr", dict(indptr=[1, 2, 3, 4]), r"indptr\[0\] must be 0"),
    "csr-indptr-end-short": ("csr", dict(indptr=[0, 2, 3, 3]), r"indptr\[-1\] must equal"),
    "csr-indptr-end-long": ("csr", dict(indptr=[0, 2, 3, 9]), r"indptr\[-1\] must equal"),
    "bsr-index-too-large": ("bsr", dict(indices=[0, 2, 1]), r"indices\[1\]=2 is out of range"),
    "bsr-index-negative": ("bsr", dict(indices=[0, 1, -3]), r"indices\[2\]=-3 is out of range"),
    "bsr-indptr-decreasing": ("bsr", dict(indptr=[0, 3, 2]), r"indptr must be non-decreasing"),
    "bsr-indptr-end": ("bsr", dict(indptr=[0, 1, 2]), r"indptr\[-1\] must equal"),
    "nm-position-too-large": ("nm", dict(positions=np.array([[0, 3, 1, 2], [1, 4, 0, 3]], np.uint8)),
                              r"positions\[1, 1\]=4 is out of range \[0, 4\)"),
    # 257 would wrap to a valid-looking 1 as uint8: it must be reported, not wrapped.
    "nm-position-wraps-uint8": ("nm", dict(positions=np.array([[0, 3, 1, 2], [257, 2, 0, 3]],
                                                              np.int32)),
                                r"positions\[1, 0\]=(257|255) is out of range"),
    "nm-position-negative": ("nm", dict(positions=np.array([[0, 3, -1, 2], [1, 2, 0, 3]], np.int32)),
                             r"positions\[0, 2\]=(-1|255) is out of range"),
}


def _arrays(fmt, overrides):
    spec = dict(VALID[fmt])
    for key, value in overrides.items():
        spec[key] = np.asarray(value, dtype=np.asarray(value).dtype if isinstance(value, np.ndarray)
                               else np.int32)
    return spec


def _construct(fmt, spec, *arrays):
    """The constructor call for ``fmt`` on ``arrays`` (concrete or traced)."""
    if fmt == "nm":
        return NM(arrays, shape=spec["shape"], n=spec["n"], m=spec["m"])
    return (CSR if fmt == "csr" else BSR)(arrays, shape=spec["shape"])


def _children(fmt, spec):
    if fmt == "nm":
        return (spec["data"], spec["positions"])
    return (spec["data"], spec["indices"], spec["indptr"])


def _unchecked(fmt, spec):
    """The matrix from concrete arrays *without* validation (as a buggy producer might hand over)."""
    children = [jnp.asarray(c) for c in _children(fmt, spec)]
    if fmt == "nm":
        children[1] = children[1].astype(jnp.uint8) if children[1].dtype != jnp.uint8 else children[1]
        return NM.tree_unflatten(((spec["shape"], False), spec["n"], spec["m"]), children)
    children[1:] = [c.astype(jnp.int32) for c in children[1:]]
    return (CSR if fmt == "csr" else BSR).tree_unflatten((spec["shape"], False), children)


def _apply(op, a, backend):
    """Run ``op`` on the sparse matrix ``a`` with ones as dense operands; returns an array."""
    m, k = a.shape
    if op == "A@X":
        return jaxsparse.matmul(a, jnp.ones((k, 3)), backend=backend)
    if op == "X@A":
        return jaxsparse.matmul(jnp.ones((2, m)), a, backend=backend)
    if op == "A.T@X":
        return jaxsparse.matmul(a.T, jnp.ones((m, 3)), backend=backend)
    if op == "sddmm":
        return jaxsparse.sddmm(jnp.ones((m, 5)), jnp.ones((5, k)), a, backend=backend).values
    if op == "grad":
        x = jnp.ones((k, 3))
        return jax.grad(lambda v: jnp.sum(jaxsparse.matmul(a.with_values(v), x,
                                                           backend=backend)))(a.values)
    raise AssertionError(op)


def _skip_unsupported(fn, *args):
    """Run ``fn``; skip the test when the backend has no kernel for the case."""
    try:
        return jax.block_until_ready(fn(*args))
    except NotImplementedError as e:
        pytest.skip(str(e))


# ----------------------------------------------------------------------------------------------
# Malformed values: construction, eager kernels, traced inside jit.


@pytest.mark.parametrize("case", VALUE_CASES)
def test_construct_rejects(case):
    fmt, overrides, msg = VALUE_CASES[case]
    spec = _arrays(fmt, overrides)
    with pytest.raises(ValueError, match=msg):
        _construct(fmt, spec, *_children(fmt, spec))


@pytest.mark.parametrize("case", VALUE_CASES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eager_kernel_rejects(backend, case, op="A@X"):
    fmt, overrides, msg = VALUE_CASES[case]
    spec = _arrays(fmt, overrides)
    stored = np.uint8 if fmt == "nm" else np.int32
    if any(spec[key].dtype != stored for key in overrides):
        pytest.skip(f"the case needs indices wider than the stored {np.dtype(stored).name}")
    good = _unchecked(fmt, VALID[fmt])
    _skip_unsupported(_apply, op, good, backend)  # the backend handles this op and format
    bad = _unchecked(fmt, spec)
    with pytest.raises(RUNTIME_ERRORS, match=msg):
        jax.block_until_ready(_apply(op, bad, backend))


@pytest.mark.parametrize("op", ["A@X", "sddmm"])
@pytest.mark.parametrize("case", VALUE_CASES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_jit_traced_rejects(backend, case, op):
    fmt, overrides, msg = VALUE_CASES[case]
    spec = _arrays(fmt, overrides)

    @jax.jit
    def run(*arrays):
        return _apply(op, _construct(fmt, spec, *arrays), backend)

    _skip_unsupported(run, *_children(fmt, VALID[fmt]))
    # Same shapes and dtypes as the bad arrays, valid values: the compile is reused below.
    with pytest.raises(RUNTIME_ERRORS, match=msg):
        jax.block_until_ready(run(*_children(fmt, spec)))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_every_op_rejects(backend, fmt, op):
    """Every op (both matmul layouts, the transposed product, SDDMM, the gradient) checks."""
    case = {"csr": "csr-index-too-large", "bsr": "bsr-index-negative",
            "nm": "nm-position-too-large"}[fmt]
    test_jit_traced_rejects(backend, case, op)


def test_jit_check_reports_first_bad_index_only_when_bad():
    """The run-time check stays silent on a valid traced pattern and on nnz = 0 / zero rows."""
    @jax.jit
    def run(d, i, p, x):
        return jaxsparse.matmul(CSR((d, i, p), shape=(p.shape[0] - 1, 4)), x, backend="reference")

    out = run(jnp.ones(0), jnp.zeros(0, jnp.int32), jnp.zeros(4, jnp.int32), jnp.ones((4, 2)))
    np.testing.assert_array_equal(out, np.zeros((3, 2)))
    out = run(jnp.ones(0), jnp.zeros(0, jnp.int32), jnp.zeros(1, jnp.int32), jnp.ones((4, 2)))
    assert out.shape == (0, 2)


# ----------------------------------------------------------------------------------------------
# Malformed shapes and dtypes: caught from static information, eagerly and under jit alike.


def _csr(**kw):
    spec = {**dict(data=np.ones(3), indices=np.array([0, 1, 2], np.int32),
                   indptr=np.array([0, 1, 2, 3], np.int32), shape=(3, 3)), **kw}
    return lambda: CSR((spec["data"], spec["indices"], spec["indptr"]), shape=spec["shape"])


def _bsr(data, indices, indptr, shape):
    return lambda: BSR((data, np.asarray(indices, np.int32), np.asarray(indptr, np.int32)),
                       shape=shape)


def _nm(values, positions, shape, n=2, m=4):
    return lambda: NM((values, positions), shape=shape, n=n, m=m)


STATIC_CASES = {
    "csr-data-indices-length": (_csr(data=np.ones(2)), ValueError, r"equal length.*data.shape=\(2,\)"),
    "csr-indptr-length": (_csr(indptr=np.array([0, 1, 3], np.int32)), ValueError,
                          r"indptr must have shape \(4,\)"),
    "csr-float-indices": (_csr(indices=np.array([0.0, 1.0, 2.0])), TypeError,
                          r"indices must have an integer dtype.*float64"),
    "csr-bool-indptr": (_csr(indptr=np.array([0, 1, 1, 1], bool)), TypeError,
                        r"indptr must have an integer dtype.*bool"),
    "csr-integer-data": (_csr(data=np.ones(3, np.int32)), TypeError, r"floating dtype.*int32"),
    "csr-2d-indices": (_csr(indices=np.zeros((3, 1), np.int32)), ValueError, r"1-D"),
    "csr-negative-shape": (_csr(shape=(3, -3)), ValueError, r"non-negative"),
    "csr-3d-shape": (_csr(shape=(3, 3, 1)), ValueError, r"two non-negative ints"),
    "bsr-block-not-dividing": (_bsr(np.ones((1, 2, 2)), [0], [0, 1], (3, 4)), ValueError,
                               r"block size \(2, 2\).*must divide shape=\(3, 4\)"),
    "bsr-zero-block": (_bsr(np.ones((0, 0, 2)), [], [0, 0], (4, 4)), ValueError,
                       r"block size \(0, 2\)"),
    "bsr-data-2d": (_bsr(np.ones((1, 2)), [0], [0, 1], (2, 2)), ValueError,
                    r"data must be \[nblocks, bm, bk\]"),
    "bsr-indptr-length": (_bsr(np.ones((1, 2, 2)), [0], [0, 1], (4, 4)), ValueError,
                          r"indptr must have shape \(3,\) for 2 block rows"),
    "nm-group-not-dividing": (_nm(np.ones((2, 2)), np.zeros((2, 2), np.uint8), (2, 6)),
                              ValueError, r"m=4 must divide.*shape\[1\]=6"),
    "nm-values-shape": (_nm(np.ones((2, 3)), np.zeros((2, 3), np.uint8), (2, 8)), ValueError,
                        r"must have shape \(2, 4\)"),
    "nm-float-positions": (_nm(np.ones((2, 4)), np.zeros((2, 4)), (2, 8)), TypeError,
                           r"positions must have an integer dtype.*float64"),
    "nm-n-greater-than-m": (_nm(np.ones((2, 8)), np.zeros((2, 8), np.uint8), (2, 8), n=5, m=4),
                            ValueError, r"0 < n <= m <= 255.*n=5, m=4"),
    "nm-m-too-large": (_nm(np.ones((1, 2)), np.zeros((1, 2), np.uint8), (1, 512), n=1, m=256),
                       ValueError, r"m <= 255"),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", STATIC_CASES)
def test_static_structure_errors(case, jit):
    make, exc, msg = STATIC_CASES[case]
    fn = jax.jit(lambda: make().values) if jit else make
    with pytest.raises(exc, match=msg):
        fn()


def _ops_errors():
    a = CSR.fromdense(np.eye(3))
    w = NM.fromdense(np.eye(4), n=1, m=2)
    return {
        "matmul-contraction": (lambda: jaxsparse.matmul(a, jnp.ones((4, 2))), ValueError,
                               r"contraction dimensions do not match.*a.shape=\(3, 3\)"),
        "matmul-x@W-contraction": (lambda: jaxsparse.matmul(jnp.ones((2, 5)), w), ValueError,
                                   r"need a.shape\[-1\] == 4"),
        "matmul-scalar": (lambda: jaxsparse.matmul(a, jnp.ones(())), ValueError, r"contraction"),
        "matmul-both-sparse": (lambda: jaxsparse.matmul(a, a), TypeError, r"both are sparse"),
        "matmul-neither-sparse": (lambda: jaxsparse.matmul(jnp.ones((3, 3)), jnp.ones((3, 3))),
                                  TypeError, r"neither is sparse"),
        "matmul-complex": (lambda: jaxsparse.matmul(a, jnp.ones((3, 2), jnp.complex64)), TypeError,
                           r"complex"),
        # conftest turns on strict promotion: mixed float widths are refused, naming both dtypes.
        "matmul-mixed-dtypes": (lambda: jaxsparse.matmul(a, jnp.ones((3, 2), jnp.float32)),
                                jax.dtypes.TypePromotionError, r"float64.*float32|float32.*float64"),
        "matmul-unknown-backend": (lambda: jaxsparse.matmul(a, jnp.ones((3, 2)), backend="gpu9"),
                                   ValueError, r"unknown jaxsparse backend 'gpu9'"),
        "sddmm-pattern-shape": (lambda: jaxsparse.sddmm(jnp.ones((3, 2)), jnp.ones((2, 4)), a),
                                ValueError, r"a @ b has shape \(3, 4\) but pattern.shape=\(3, 3\)"),
        "sddmm-contraction": (lambda: jaxsparse.sddmm(jnp.ones((3, 2)), jnp.ones((3, 3)), a),
                              ValueError, r"contraction dimensions do not match"),
        "sddmm-1d": (lambda: jaxsparse.sddmm(jnp.ones(3), jnp.ones((1, 3)), a), ValueError,
                     r"must be 2-D"),
        "sddmm-integer": (lambda: jaxsparse.sddmm(jnp.ones((3, 2), jnp.int32),
                                                  jnp.ones((2, 3), jnp.int32), a),
                          TypeError, r"floating point"),
        "sddmm-not-a-pattern": (lambda: jaxsparse.sddmm(jnp.ones((3, 2)), jnp.ones((2, 3)),
                                                        np.eye(3)),
                                TypeError, r"pattern must be a jaxsparse matrix"),
        # The primitives themselves, for callers below the public functions.
        "spmm_p-dtype-mismatch": (lambda: spmm_p.bind(
            a.data.astype(jnp.float32), *a.pattern_arrays, jnp.ones((3, 2)), fmt="csr",
            shape=(3, 3), nm=None, transpose_a=False, layout="kn", backend="reference"),
            TypeError, r"dtypes must match.*data.dtype=float32, b.dtype=float64"),
        "spmm_p-int64-indices": (lambda: spmm_p.bind(
            a.data, a.indices.astype(jnp.int64), a.indptr, jnp.ones((3, 2)), fmt="csr",
            shape=(3, 3), nm=None, transpose_a=False, layout="kn", backend="reference"),
            TypeError, r"indices must be 1-D int32.*int64"),
        "spmm_p-indptr-rows": (lambda: spmm_p.bind(
            a.data, a.indices, a.indptr, jnp.ones((4, 2)), fmt="csr", shape=(4, 4), nm=None,
            transpose_a=False, layout="kn", backend="reference"),
            ValueError, r"indptr.shape=\(4,\) does not match 4 rows"),
        "spmm_p-unknown-format": (lambda: spmm_p.bind(
            a.data, a.indices, a.indptr, jnp.ones((3, 2)), fmt="coo", shape=(3, 3), nm=None,
            transpose_a=False, layout="kn", backend="reference"),
            ValueError, r"unknown sparse format 'coo'"),
        "sddmm_p-dtype-mismatch": (lambda: sddmm_p.bind(
            jnp.ones((3, 2), jnp.float32), jnp.ones((2, 3)), *a.pattern_arrays, fmt="csr",
            shape=(3, 3), nm=None, block=None, transpose_lhs=False, transpose_rhs=False,
            backend="reference"),
            TypeError, r"lhs and rhs dtypes must match"),
        "sddmm_p-bsr-no-block": (lambda: sddmm_p.bind(
            jnp.ones((3, 2)), jnp.ones((2, 3)), *a.pattern_arrays, fmt="bsr", shape=(3, 3),
            nm=None, block=None, transpose_lhs=False, transpose_rhs=False, backend="reference"),
            ValueError, r"needs its block size"),
    }


OP_CASES = ("matmul-contraction", "matmul-x@W-contraction", "matmul-scalar", "matmul-both-sparse",
            "matmul-neither-sparse", "matmul-complex", "matmul-mixed-dtypes",
            "matmul-unknown-backend", "sddmm-pattern-shape", "sddmm-contraction", "sddmm-1d",
            "sddmm-integer", "sddmm-not-a-pattern", "spmm_p-dtype-mismatch",
            "spmm_p-int64-indices", "spmm_p-indptr-rows", "spmm_p-unknown-format",
            "sddmm_p-dtype-mismatch", "sddmm_p-bsr-no-block")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", OP_CASES)
def test_op_argument_errors(case, jit):
    fn, exc, msg = _ops_errors()[case]
    if jit:
        fn = jax.jit(fn)
    with pytest.raises(exc, match=msg):
        jax.block_until_ready(fn())


# ----------------------------------------------------------------------------------------------
# Zero-size dimensions are valid input: empty results of the right shape, no error, no crash.


@pytest.mark.parametrize("shape_n", [((0, 4), 3), ((4, 0), 3), ((4, 8), 0)], ids=str)
@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_zero_size_dimensions(backend, fmt, shape_n):
    for op in ("A@X", "X@A", "sddmm"):  # more forms and shapes: test_fuzz.py
        _check_zero_size(backend, fmt, shape_n, op)


def _check_zero_size(backend, fmt, shape_n, op):
    (m, k), n = shape_n
    dense = np.zeros((m, k))
    if m and k:
        dense[0, 0], dense[-1, -1] = 1.0, 2.0
    if fmt == "csr":
        a = CSR.fromdense(dense)
    elif fmt == "bsr":
        a = BSR.fromdense(dense, block_size=(2 if m else 1, 2 if k else 1))
    else:
        a = NM.fromdense(dense, n=1, m=4)
    if op == "A@X":
        x = np.ones((k, n))
        fn, expected = (lambda a, x: jaxsparse.matmul(a, x, backend=backend)), dense @ x
    elif op == "X@A":
        x = np.ones((n, m))
        fn, expected = (lambda a, x: jaxsparse.matmul(x, a, backend=backend)), x @ dense
    elif op == "A.T@X":
        x = np.ones((m, n))
        fn, expected = (lambda a, x: jaxsparse.matmul(a.T, x, backend=backend)), dense.T @ x
    else:
        x = (np.ones((m, n)), np.ones((n, k)))
        fn = lambda a, x: jaxsparse.sddmm(x[0], x[1], a, backend=backend).todense()
        expected = np.where(dense != 0, x[0] @ x[1], 0.0)
    try:
        out = jax.block_until_ready(jax.jit(fn)(a, x))
    except NotImplementedError:
        return  # no kernel for this op on this backend
    assert out.shape == expected.shape, (op, out.shape, expected.shape)
    np.testing.assert_allclose(np.asarray(out), expected)


# ----------------------------------------------------------------------------------------------
# NaN / Inf semantics: only stored entries take part in a product.


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_semantics_spmm(backend, fmt):
    """A structural zero times NaN/Inf contributes nothing (a dense product would give NaN); a
    *stored* zero times NaN gives NaN, as in a dense product."""
    dense = np.zeros((4, 8))
    dense[0, 0] = 1.0   # row 0: a stored value in column 0
    dense[1, 4] = 2.0   # row 1: touches column 4 only
    if fmt == "csr":
        a = CSR.fromdense(dense)
        a_stored_zero = CSR((np.array([0.0]), np.array([1], np.int32),
                             np.array([0, 0, 0, 0, 1], np.int32)), shape=(4, 8))
    elif fmt == "bsr":
        a = BSR.fromdense(dense, block_size=(1, 4))
        a_stored_zero = BSR((np.zeros((1, 1, 4)), np.array([0], np.int32),
                             np.array([0, 0, 0, 0, 1], np.int32)), shape=(4, 8))
    else:
        a = NM.fromdense(dense, n=1, m=4)
        # N:M stores a slot for every group: rows 2 and 3 hold stored zeros at position 0 and 1.
        pos = np.zeros((4, 2), np.uint8)
        pos[3, 0] = 1
        a_stored_zero = NM((np.zeros((4, 2)), pos), shape=(4, 8), n=1, m=4)
    x = np.ones((8, 2))
    x[1] = np.nan   # column 1 of A is structurally zero in rows 0 and 1
    x[2, 0] = np.inf
    out = _skip_unsupported(jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend=backend)), a, x)
    # Expected: the sum over the *stored* entries only (BSR stores whole blocks, zeros included).
    stored = np.asarray(a.with_values(jnp.ones_like(a.values)).todense()) != 0
    with np.errstate(invalid="ignore"):
        expected = np.stack([(dense[i, stored[i], None] * x[stored[i]]).sum(0) for i in range(4)])
    np.testing.assert_array_equal(np.asarray(out), expected)
    if fmt != "bsr":
        np.testing.assert_array_equal(expected, [[1, 1], [2, 2], [0, 0], [0, 0]])
    with np.errstate(invalid="ignore"):
        assert np.isnan(dense @ x).all(axis=1).any()  # the dense product differs: NaN rows
    out = _skip_unsupported(jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend=backend)),
                            a_stored_zero, x)
    assert np.isnan(np.asarray(out)[3]).all(), "a stored zero times NaN must be NaN"
    assert np.isfinite(np.asarray(out)[:3]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_semantics_sddmm(backend):
    """SDDMM equals the dense product sampled at the pattern: NaN in a row of ``a`` reaches only
    the stored entries of that row."""
    pattern = CSR.fromdense(np.eye(3))
    a = np.ones((3, 2))
    a[1, 0] = np.nan
    out = _skip_unsupported(jax.jit(lambda a, p: jaxsparse.sddmm(a, np.ones((2, 3)), p,
                                                                 backend=backend).values),
                            a, pattern)
    np.testing.assert_array_equal(np.isnan(np.asarray(out)), [False, True, False])
