"""Pallas kernels (jaxsparse.pallas) in interpret mode on CPU, against float64 NumPy references.

The shared SpMM/SDDMM bases rerun through ``backend="pallas-interpret"``: their float32/half
dtype cases reach the kernels (CSR, N:M); float64 cases and small BSR blocks fall back to the
reference with a warning, so those base tests, which would only repeat the reference run under the
slow interpreter, are marked ``slow``. Targeted tests then exercise each kernel at the tile sizes
the GPU uses (BSR blocks 16..128, layouts kn and nk, empty rows, nnz = 0), the metadata
preprocessing and block-sparse attention. GPU-only tests skip without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse
from jaxsparse import pallas as jsp
from sparse_testing import assert_close, quick_only, rounded, slow
from test_sddmm import SddmmTestBase
from test_spmm import SpmmTestBase

BACKEND = "pallas-interpret"
ON_GPU = jax.devices()[0].platform == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
pytestmark = pytest.mark.filterwarnings("ignore:jaxsparse pallas. no .* kernel applies")


@quick_only(SpmmTestBase)
class TestSpmmPallasInterpret(SpmmTestBase):
    backend = BACKEND

    # Under pallas-interpret the float64 base cases (most of them) reach the reference fallback
    # only, repeating the reference run under a slower lowering; the quick run keeps the cases
    # that reach the CSR and N:M kernels (transpose_a=False: A@X, x@W.T); the full
    # dtype x form grid stays as test_dtypes_all (slow). BSR: the targeted tests below.
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: np.dtype(d).name)
    @pytest.mark.parametrize("form", ["A@X", "x@W.T"])
    @pytest.mark.parametrize("fmt", ["csr", "nm"])
    def test_dtypes(self, rng, fmt, form, dtype):
        SpmmTestBase.test_dtypes(self, rng, fmt, form, dtype)

    test_dtypes_all = slow(SpmmTestBase.test_dtypes)
    test_errors = SpmmTestBase.test_errors


@quick_only(SddmmTestBase)
class TestSddmmPallasInterpret(SddmmTestBase):
    backend = BACKEND

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: np.dtype(d).name)
    def test_dtypes(self, rng, dtype):
        SddmmTestBase.test_dtypes(self, rng, "csr", dtype)

    test_dtypes_all = slow(SddmmTestBase.test_dtypes)
    test_errors = SddmmTestBase.test_errors


# ----------------------------------------------------------------------------------------------
# Helpers

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}


def _close(actual, expected, dtype):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, atol=TOL[dtype] * scale, rtol=TOL[dtype])


def _block_dense(rng, m, k, block, density, empty_row=True):
    bm, bk = block
    keep = rng.random((m // bm, k // bk)) < density
    if empty_row and keep.shape[0] > 1:
        keep[1] = False
    keep[0, 0] = True
    return np.kron(keep, np.ones(block)) * rng.standard_normal((m, k))


def _unstructured(rng, m, k, density):
    dense = rng.standard_normal((m, k)) * (rng.random((m, k)) < density)
    dense[2] = 0  # an empty row
    dense[0] = rng.standard_normal(k)  # a long row (exercises the row swizzle and chunk loop)
    return dense


def _two_four(rng, m, k):
    dense = rng.standard_normal((m, k)).reshape(m, k // 4, 4)
    drop = np.argsort(rng.random(dense.shape), axis=-1)[..., :2]
    np.put_along_axis(dense, drop, 0.0, axis=-1)
    dense = dense.reshape(m, k)
    dense[1] = 0
    return dense


def _build(dense64, fmt, dtype, block=None):
    x = jnp.asarray(dense64, dtype)
    if fmt == "csr":
        return jaxsparse.CSR.fromdense(x)
    if fmt == "bsr":
        return jaxsparse.BSR.fromdense(x, block_size=block)
    return jaxsparse.NM.fromdense(x, n=2, m=4)


# ----------------------------------------------------------------------------------------------
# SpMM through the primitive (kn: A @ X; nk: X @ A.T, the linear layer)


# CSR and N:M in every dtype and both layouts run through the base class's test_dtypes above.
SPMM_CASES = [
    ("bsr", (16, 16), jnp.float32, "kn"), ("bsr", (32, 32), jnp.bfloat16, "nk"),
    ("bsr", (16, 64), jnp.float16, "kn"), ("bsr", (128, 128), jnp.bfloat16, "kn"),
    ("csr", None, jnp.bfloat16, "nk"), ("nm", None, jnp.bfloat16, "kn"),
]


@pytest.mark.parametrize("fmt,block,dtype,layout", SPMM_CASES, ids=str)
def test_spmm_kernels(rng, fmt, block, dtype, layout):
    m, k, n = (256, 256, 24) if block == (128, 128) else (64, 128, 40)
    if fmt == "bsr":
        dense = _block_dense(rng, m, k, block, 0.4)
    elif fmt == "csr":
        dense = _unstructured(rng, m, k, 0.1)
    else:
        dense = _two_four(rng, m, k)
    a = _build(dense, fmt, dtype, block)
    a64 = np.asarray(a.todense().astype(jnp.float32), np.float64)
    x, x64 = rounded(rng.standard_normal((k, n) if layout == "kn" else (n, k)), dtype)
    assert jsp.select_spmm([a.values], dict(fmt=fmt, transpose_a=False))[0] is not None
    if layout == "kn":
        out = jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend=BACKEND))(a, x)
        expected = a64 @ x64
    else:
        out = jax.jit(lambda a, x: jaxsparse.matmul(x, a.T, backend=BACKEND))(a, x)
        expected = x64 @ a64.T
    assert out.dtype == dtype
    _close(out, expected, dtype)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_spmm_nnz0_and_empty(fmt):
    a = _build(np.zeros((32, 64)), fmt, jnp.float32, (16, 16))
    out = jaxsparse.matmul(a, jnp.ones((64, 8), jnp.float32), backend=BACKEND)
    np.testing.assert_array_equal(out, np.zeros((32, 8)))


def test_csr_spmm_config_and_swizzle(rng):
    """Rows of very different lengths, several rows per program, a chunk smaller than most rows."""
    dense = _unstructured(rng, 37, 96, 0.15)
    dense[5, :90] = 1.0
    a = jaxsparse.CSR.fromdense(jnp.asarray(dense, jnp.float32))
    x = rng.standard_normal((96, 20))
    for cfg in (jsp.CsrSpmmConfig(chunk=16, rows_per_program=4, bn=16, num_warps=4),):
        out = jsp.csr_spmm(a.values, *a.pattern_arrays, jnp.asarray(x, jnp.float32), shape=a.shape,
                           interpret=True, config=cfg)
        _close(out, dense @ x, jnp.float32)


def test_row_order_metadata():
    indptr = jnp.asarray([0, 2, 2, 7, 8, 8, 11], jnp.int32)  # lengths 2 0 5 1 0 3
    np.testing.assert_array_equal(jsp._common.row_order(indptr), [2, 5, 0, 3, 1, 4])
    # traced inside jit: the metadata is computed on device
    np.testing.assert_array_equal(jax.jit(jsp._common.row_order)(indptr), [2, 5, 0, 3, 1, 4])


def test_cuda_default_configs_are_triton_tiles():
    for bm in (16, 32, 64, 128):
        for n in (1, 24, 256, 4096):
            c = jsp.BsrSpmmConfig.get_default(bm, bm, n)
            assert jsp._common.is_pow2(c.bn) and c.bn >= 16
    c = jsp.CsrSpmmConfig.get_default(4096, 4096 * 410, 256)
    assert (c.chunk, c.bn) == (64, 128)
    assert jsp.CsrSpmmConfig.get_default(100, 300, 8).rows_per_program > 1


# ----------------------------------------------------------------------------------------------
# SDDMM


@pytest.mark.parametrize("fmt,block,dtype,transpose_rhs", [
    ("csr", None, jnp.bfloat16, True), ("bsr", (16, 32), jnp.float32, False),
    ("bsr", (32, 16), jnp.bfloat16, True)], ids=str)
def test_sddmm_kernels(rng, fmt, block, dtype, transpose_rhs):
    m, n, k = 64, 96, 40
    pattern = (_block_dense(rng, m, n, block, 0.4) if fmt == "bsr"
               else _unstructured(rng, m, n, 0.15)) != 0
    p = _build(pattern.astype(np.float64), fmt, dtype, block)
    lhs, l64 = rounded(rng.standard_normal((m, k)), dtype)
    rhs, r64 = rounded(rng.standard_normal((n, k) if transpose_rhs else (k, n)), dtype)
    fn = jax.jit(lambda l, r, p: jaxsparse._sddmm.sddmm_values(
        l, r, p, transpose_rhs=transpose_rhs, backend=BACKEND))
    vals = fn(lhs, rhs, p)
    assert vals.dtype == dtype
    got = np.asarray(p.with_values(vals).todense().astype(jnp.float32), np.float64)
    expected = (l64 @ (r64.T if transpose_rhs else r64)) * pattern
    _close(got, expected, dtype)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_sddmm_nnz0(fmt):
    p = _build(np.zeros((32, 32)), fmt, jnp.float32, (16, 16))
    out = jaxsparse.sddmm(jnp.ones((32, 8), jnp.float32), jnp.ones((8, 32), jnp.float32), p,
                          backend=BACKEND)
    assert out.data.size == 0


def test_grad_through_kernels(rng):
    """SpMM's transpose is an SDDMM: both run as kernels under jax.grad."""
    dense = _unstructured(rng, 16, 32, 0.3)
    a = jaxsparse.CSR.fromdense(jnp.asarray(dense, jnp.float32))
    x = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    loss = lambda v, x: jnp.sum(jaxsparse.matmul(a.with_values(v), x, backend=BACKEND) ** 2)
    gv, gx = jax.grad(loss, argnums=(0, 1))(a.values, x)
    x64 = np.asarray(x, np.float64)
    g_out = 2 * dense @ x64
    np.testing.assert_allclose(a.with_values(gv).todense(), (g_out @ x64.T) * (dense != 0),
                               atol=1e-4)
    np.testing.assert_allclose(gx, dense.T @ g_out, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Selection, fallback and the backend switch


def test_fallback_warns_and_matches_reference(rng):
    a = jaxsparse.CSR.fromdense(jnp.asarray(_unstructured(rng, 8, 16, 0.3)))  # float64
    x = jnp.asarray(rng.standard_normal((16, 4)))
    jsp._lowering._warned.clear()
    with pytest.warns(RuntimeWarning, match="no SpMM kernel applies .dtype float64"):
        out = jaxsparse.matmul(a, x, backend=BACKEND)
    np.testing.assert_allclose(out, np.asarray(a.todense()) @ np.asarray(x), atol=1e-12)
    assert "transpose_a" in jsp.select_spmm([a.values], dict(fmt="csr", transpose_a=True))[1]
    bad = jsp.select_sddmm([jnp.zeros(3, jnp.float32)], dict(fmt="bsr", block=(4, 4)))[1]
    assert "block" in bad


def test_pallas_backend_needs_gpu(rng):
    if ON_GPU:
        pytest.skip("on a GPU 'pallas' compiles")
    a = jaxsparse.CSR.fromdense(jnp.eye(4, dtype=jnp.float32))
    with pytest.raises(NotImplementedError, match="pallas-interpret"):
        jaxsparse.matmul(a, jnp.ones((4, 2), jnp.float32), backend="pallas")


def test_backend_switch_env_and_context(monkeypatch):
    assert "pallas-interpret" in jaxsparse.BACKENDS
    with jaxsparse.use_backend("pallas-interpret"):
        assert jaxsparse.get_backend() == "pallas-interpret"
    monkeypatch.setenv("JAXSPARSE_BACKEND", "pallas-interpret")
    assert jaxsparse.get_backend() == "pallas-interpret"
    a = jaxsparse.CSR.fromdense(jnp.eye(16, dtype=jnp.float32))
    lower = lambda: jax.jit(lambda a, x: a @ x).lower(a, jnp.ones((16, 16), jnp.float32)).as_text()
    assert "stablehlo.while" in lower()  # the interpreted grid loop of the kernel
    monkeypatch.setenv("JAXSPARSE_BACKEND", "reference")
    assert "stablehlo.while" not in lower()


# ----------------------------------------------------------------------------------------------
# Block-sparse attention


def _attention64(q, k, v, token_mask, scale=None):
    q, k, v = (np.asarray(jnp.asarray(t, jnp.float32), np.float64) for t in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = np.where(token_mask, s, -np.inf)
    mx = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(mx), mx, 0))
    denom = p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p / np.where(denom == 0, 1, denom), v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_block_mask(rng, dtype):
    b, s, h, d = 2, 64, 2, 16
    q, k, v = (rounded(rng.standard_normal((b, s, h, d)), dtype)[0] for _ in range(3))
    mask = rng.random((4, 4)) < 0.5
    mask[0, 0], mask[2] = True, False  # query block 2 sees nothing: its rows are 0
    out = jsp.block_sparse_attention(q, k, v, mask, interpret=True)
    assert out.shape == q.shape and out.dtype == dtype
    _close(out, _attention64(q, k, v, np.kron(mask, np.ones((16, 16), bool))), dtype)
    assert np.all(np.asarray(out[:, 32:48], np.float32) == 0)


def test_attention_local_window_causal_and_bsr_pattern(rng):
    b, s, h, d, window = 1, 128, 2, 32, 40
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3))
    blocks = jsp.local_block_mask(s, s, 32, 16, window, causal=True)
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    token = (np.abs(i - j) < window) & (j <= i)
    # every token pair kept by the window lies in a visited block
    assert np.all(np.kron(blocks, np.ones((32, 16), bool))[token])
    out = jsp.block_sparse_attention(q, k, v, blocks, window=window, causal=True, scale=0.3,
                                     interpret=True)
    _close(out, _attention64(q, k, v, token, scale=0.3), jnp.float32)
    # the same mask given as a BSR pattern, under jit (traced pattern: metadata on device)
    pattern = jaxsparse.BSR.fromdense(jnp.asarray(np.kron(blocks, np.ones((32, 16))), jnp.float32),
                                      block_size=(32, 16))
    fn = jax.jit(lambda q, k, v, p: jsp.block_sparse_attention(
        q, k, v, p, window=window, causal=True, scale=0.3, interpret=True))
    np.testing.assert_allclose(fn(q, k, v, pattern), out, atol=1e-5)


def test_block_mask_info_host_device_and_cache(rng):
    mask = rng.random((4, 8)) < 0.4
    mask[1] = False
    host = jsp.block_mask_info(mask, seq_q=64, seq_k=128)
    assert jsp.block_mask_info(mask.copy(), seq_q=64, seq_k=128) is host  # cached by content
    np.testing.assert_array_equal(host.block_mask, mask)
    assert (host.block_q, host.block_k) == (16, 16)
    pattern = jaxsparse.BSR.fromdense(jnp.asarray(np.kron(mask, np.ones((16, 16))), jnp.float32),
                                      block_size=(16, 16))
    from_bsr = jsp.block_mask_info(pattern)
    np.testing.assert_array_equal(from_bsr.block_mask, mask)
    dev = jax.jit(lambda p: jsp.block_mask_info(p))(pattern)
    np.testing.assert_array_equal(dev.block_mask, mask)
    np.testing.assert_array_equal(dev.counts, mask.sum(1))


def test_attention_validation(rng):
    q = jnp.zeros((1, 64, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="k.shape"):
        jsp.block_sparse_attention(q, q[:, :, :1], q, np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="mask.shape"):
        jsp.block_sparse_attention(q, q, q, np.ones((3, 4), bool))


# ----------------------------------------------------------------------------------------------
# GPU only: the compiled Triton kernels


@gpu_only
@pytest.mark.parametrize("fmt,block", [("bsr", (32, 32)), ("csr", None), ("nm", None)])
def test_gpu_spmm_compiled(rng, fmt, block):
    dense = (_block_dense(rng, 256, 256, block, 0.3) if fmt == "bsr" else
             _unstructured(rng, 256, 256, 0.1) if fmt == "csr" else _two_four(rng, 256, 256))
    a = _build(dense, fmt, jnp.bfloat16, block)
    x, x64 = rounded(rng.standard_normal((256, 128)), jnp.bfloat16)
    out = jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend="pallas"))(a, x)
    _close(out, np.asarray(a.todense().astype(jnp.float32), np.float64) @ x64, jnp.bfloat16)


@gpu_only
def test_gpu_attention_compiled(rng):
    q, k, v = (jnp.asarray(rng.standard_normal((1, 512, 2, 64)), jnp.bfloat16) for _ in range(3))
    mask = jsp.local_block_mask(512, 512, 64, 64, 128)
    out = jsp.block_sparse_attention(q, k, v, mask, window=128)
    i, j = np.arange(512)[:, None], np.arange(512)[None, :]
    _close(out, _attention64(q, k, v, np.abs(i - j) < 128), jnp.bfloat16)


# ----------------------------------------------------------------------------------------------
# No GPU needed: lower for the cuda platform, which runs the Pallas -> Triton IR lowering of every
# kernel (Triton's shape rules, gathers, strided loads, dots); the Triton compiler itself and the
# kernels' behaviour on a GPU are not exercised here.


def _lower_for_cuda(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("case", ["bsr32", "bsr128-f16-nk", "csr", "nm", "csr-sddmm",
                                  "bsr-sddmm-f32", "attention"])
def test_kernels_lower_to_triton(rng, monkeypatch, case):
    monkeypatch.setattr(jsp._lowering, "gpu_capability_reason", lambda: None)
    bf = jnp.bfloat16
    x = jnp.ones((256, 64), bf)
    spmm = lambda a, x: jaxsparse.matmul(a, x, backend="pallas")
    if case == "bsr32":
        a = _build(_block_dense(rng, 256, 256, (32, 32), 0.3), "bsr", bf, (32, 32))
        text = _lower_for_cuda(spmm, a, x)
    elif case == "bsr128-f16-nk":
        a = _build(_block_dense(rng, 256, 256, (128, 128), 0.5), "bsr", jnp.float16, (128, 128))
        text = _lower_for_cuda(lambda a, x: jaxsparse.matmul(x, a.T, backend="pallas"), a,
                               x.T.astype(jnp.float16))
    elif case in ("csr", "nm"):
        dense = _unstructured(rng, 256, 256, 0.1) if case == "csr" else _two_four(rng, 256, 256)
        text = _lower_for_cuda(spmm, _build(dense, case, bf), x)
    elif case.endswith("sddmm") or case.endswith("sddmm-f32"):
        fmt = case.split("-")[0]
        dtype = jnp.float32 if case.endswith("f32") else bf
        mask = (_block_dense(rng, 256, 256, (32, 32), 0.3) if fmt == "bsr"
                else _unstructured(rng, 256, 256, 0.1)) != 0
        p = _build(mask.astype(np.float64), fmt, dtype, (32, 32))
        text = _lower_for_cuda(lambda l, r, p: jaxsparse.sddmm(l, r, p, backend="pallas").values,
                               x.astype(dtype), x.T.astype(dtype), p)
    else:
        q = jnp.ones((1, 512, 2, 128), bf)
        mask = jsp.local_block_mask(512, 512, 128, 64, 128)
        text = _lower_for_cuda(lambda q, k, v: jsp.block_sparse_attention(
            q, k, v, mask, window=128, interpret=False), q, q, q)
    assert text.count("__gpu$xla.gpu.triton") == 1
