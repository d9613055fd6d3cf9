"""The sparse formats: construction, validation, conversion and pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from jax.experimental import sparse as jsparse

import jaxsparse
from jaxsparse import BSR, CSR, NM
from sparse_testing import FORMATS, assert_close, build, random_sparse


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_dense(rng, fmt):
    a, a64 = random_sparse(rng, (8, 12), 0.4, fmt, jnp.float64)
    np.testing.assert_array_equal(np.asarray(a.todense()), a64)
    np.testing.assert_array_equal(np.asarray(a.T.todense()), a64.T)
    assert a.shape == (8, 12) and a.T.shape == (12, 8) and a.T.T.shape == (8, 12)
    assert a.dtype == jnp.float64 and a.ndim == 2
    assert a.astype(jnp.float32).dtype == jnp.float32
    np.testing.assert_array_equal(a.to_scipy().toarray(), a64)
    np.testing.assert_array_equal(a.T.to_scipy().toarray(), a64.T)


def test_csr_fields_and_nnz():
    x = np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])
    a = CSR.fromdense(x)
    assert a.nnz == 3
    assert a.indices.tolist() == [1, 0, 2] and a.indptr.tolist() == [0, 1, 1, 3]
    assert a.indices.dtype == jnp.int32 and a.indptr.dtype == jnp.int32
    b = BSR.fromdense(np.kron(np.array([[1.0, 0.0], [0.0, 2.0]]), np.ones((2, 3))), block_size=(2, 3))
    assert b.block_size == (2, 3) and b.nnz == 12 and b.indices.tolist() == [0, 1]
    n = NM.fromdense(np.array([[1.0, 0, 0, 2, 0, 0, 3, 0]]), n=2, m=4)
    assert n.nnz == 4 and n.positions.tolist() == [[0, 3, 0, 2]]
    np.testing.assert_array_equal(np.asarray(n.todense()), [[1.0, 0, 0, 2, 0, 0, 3, 0]])


@pytest.mark.parametrize("fmt", FORMATS)
def test_fromdense_inside_jit(rng, fmt):
    a, a64 = random_sparse(rng, (8, 12), 0.4, fmt, jnp.float64)
    if fmt == "csr":
        f = jax.jit(lambda x: CSR.fromdense(x, nse=a.nnz + 3).todense())
    elif fmt == "bsr":
        f = jax.jit(lambda x: BSR.fromdense(x, block_size=a.block_size, nse=a.indices.shape[0] + 1)
                    .todense())
    else:
        f = jax.jit(lambda x: NM.fromdense(x, n=a.n, m=a.m).todense())
    np.testing.assert_array_equal(np.asarray(f(a64)), a64)


def test_fromdense_inside_jit_needs_nse():
    with pytest.raises(ValueError, match="static nse"):
        jax.jit(CSR.fromdense)(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="static nse"):
        jax.jit(lambda x: BSR.fromdense(x, block_size=(1, 1)))(jnp.ones((2, 2)))


def test_from_scipy_sums_duplicates_and_sorts(rng):
    coo = sp.coo_matrix(([1.0, 2.0, 3.0, 4.0], ([0, 0, 1, 0], [2, 2, 0, 1])), shape=(2, 3))
    a = CSR.from_scipy(coo)
    np.testing.assert_array_equal(np.asarray(a.todense()), coo.toarray())
    assert a.indices.tolist() == [1, 2, 0]
    dense = np.kron(rng.standard_normal((3, 2)) * (rng.random((3, 2)) < 0.6), np.ones((2, 2)))
    b = BSR.from_scipy(sp.bsr_matrix(dense, blocksize=(2, 2)))
    assert b.block_size == (2, 2)
    np.testing.assert_array_equal(np.asarray(b.todense()), dense)
    np.testing.assert_array_equal(np.asarray(BSR.from_scipy(sp.csr_matrix(dense),
                                                            block_size=(1, 2)).todense()), dense)
    with pytest.raises(ValueError, match="block_size is required"):
        BSR.from_scipy(sp.csr_matrix(dense))
    with pytest.raises(TypeError, match="expected a scipy.sparse matrix"):
        CSR.from_scipy(dense)


@pytest.mark.parametrize("fmt", FORMATS)
def test_from_jax_sparse(rng, fmt):
    _, a64 = random_sparse(rng, (8, 12), 0.4, fmt, jnp.float64)
    kwargs = {"bsr": {"block_size": (4, 4)}, "nm": {"n": 2, "m": 4}}.get(fmt, {})
    cls = {"csr": CSR, "bsr": BSR, "nm": NM}[fmt]
    for m in (jsparse.BCOO.fromdense(a64), jsparse.BCSR.fromdense(a64)):
        np.testing.assert_array_equal(np.asarray(cls.from_jax_sparse(m, **kwargs).todense()), a64)
    with pytest.raises(TypeError, match="expected a BCOO or BCSR"):
        cls.from_jax_sparse(a64)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pytree(rng, fmt):
    a, a64 = random_sparse(rng, (8, 12), 0.4, fmt, jnp.float64)
    leaves, treedef = jax.tree_util.tree_flatten(a)
    assert all(isinstance(x, jax.Array) for x in leaves)
    doubled = jax.tree_util.tree_map(lambda x: x * 2 if x.dtype == jnp.float64 else x, a)
    np.testing.assert_array_equal(np.asarray(doubled.todense()), 2 * a64)
    # Static metadata is hashable and part of the treedef: jit specializes on it.
    hash(treedef)
    out = jax.jit(lambda s: s.T)(a)
    assert type(out) is type(a) and out.shape == (12, 8)
    np.testing.assert_array_equal(np.asarray(out.todense()), a64.T)


def test_csr_validation_messages():
    d = jnp.ones(3)
    ok_idx, ok_ptr = jnp.array([0, 2, 1], jnp.int32), jnp.array([0, 2, 3], jnp.int32)
    CSR((d, ok_idx, ok_ptr), shape=(2, 3))
    cases = [
        ((d, jnp.array([0, 3, 1]), ok_ptr), ValueError, r"indices\[1\]=3 is out of range \[0, 3\)"),
        ((d, jnp.array([0, -1, 1]), ok_ptr), ValueError, r"indices\[1\]=-1 is out of range"),
        ((d, ok_idx, jnp.array([0, 3, 2])), ValueError, r"non-decreasing.*indptr\[2\]=2 < indptr\[1\]=3"),
        ((d, ok_idx, jnp.array([0, 1, 2])), ValueError, r"indptr\[-1\] must equal.*len\(indices\)=3\), got indptr\[-1\]=2"),
        ((d, ok_idx, jnp.array([1, 2, 3])), ValueError, r"indptr\[0\] must be 0, got indptr\[0\]=1"),
        ((d, ok_idx, jnp.array([0, 3])), ValueError, r"indptr must have shape \(3,\).*indptr.shape=\(2,\)"),
        ((jnp.ones(2), ok_idx, ok_ptr), ValueError, r"data.shape=\(2,\), indices.shape=\(3,\)"),
        ((d, jnp.array([2, 0, 1]), ok_ptr), ValueError, r"sorted within each row; row 0"),
        ((d, jnp.array([1, 1, 1]), ok_ptr), ValueError, r"duplicate entry at row 0, column 1"),
        ((d, ok_idx.astype(jnp.float32), ok_ptr), TypeError, r"indices must have an integer dtype"),
        ((jnp.ones(3, jnp.int32), ok_idx, ok_ptr), TypeError, r"data must have a floating dtype"),
        ((d, ok_idx), ValueError, r"expected \(data, indices, indptr\)"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            CSR(args, shape=(2, 3))
    with pytest.raises(ValueError, match=r"shape must be two non-negative ints"):
        CSR((d, ok_idx, ok_ptr), shape=(2, 3, 1))
    # int64 indices are accepted and narrowed to int32.
    assert CSR((d, ok_idx.astype(jnp.int64), ok_ptr), shape=(2, 3)).indices.dtype == jnp.int32


def test_bsr_and_nm_validation_messages():
    with pytest.raises(ValueError, match=r"block size \(2, 2\).*must divide shape=\(3, 4\)"):
        BSR((jnp.ones((1, 2, 2)), jnp.array([0]), jnp.array([0, 1])), shape=(3, 4))
    with pytest.raises(ValueError, match=r"indices\[0\]=2 is out of range \[0, 2\)"):
        BSR((jnp.ones((1, 2, 2)), jnp.array([2]), jnp.array([0, 1, 1])), shape=(4, 4))
    with pytest.raises(ValueError, match="must divide x.shape"):
        BSR.fromdense(jnp.ones((3, 4)), block_size=(2, 2))
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 0, columns 0..3 hold 3 nonzeros"):
        NM.fromdense(jnp.array([[1.0, 1.0, 1.0, 0.0]]), n=2, m=4)
    with pytest.raises(ValueError, match=r"m=4 must divide the number of columns x.shape\[1\]=6"):
        NM.fromdense(jnp.ones((2, 6)), n=2, m=4)
    with pytest.raises(ValueError, match=r"positions\[0, 1\]=4 is out of range \[0, 4\)"):
        NM((jnp.ones((1, 2)), jnp.array([[0, 4]])), shape=(1, 4), n=2, m=4)
    with pytest.raises(ValueError, match=r"positions must increase within each group"):
        NM((jnp.ones((1, 2)), jnp.array([[3, 1]])), shape=(1, 4), n=2, m=4)
    with pytest.raises(ValueError, match=r"must have shape \(1, 2\)"):
        NM((jnp.ones((1, 3)), jnp.zeros((1, 3), jnp.uint8)), shape=(1, 4), n=2, m=4)


def test_dlmc_loader(tmp_path):
    path = tmp_path / "m.smtx"
    path.write_text("3, 4, 3\n0 1 1 3\n2 0 3\n")
    a = jaxsparse.dlmc.load_smtx(path, dtype=np.float64)
    assert a.shape == (3, 4) and a.nnz == 3
    assert a.indices.tolist() == [2, 0, 3] and a.indptr.tolist() == [0, 1, 1, 3]
    path.write_text("3, 4, 3\n0 1 3\n2 0 3\n")
    with pytest.raises(ValueError, match="expected 4 row offsets and 3 indices, got 3 and 3"):
        jaxsparse.dlmc.load_smtx(path)
