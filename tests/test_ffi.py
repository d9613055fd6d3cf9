"""The native CPU kernels (``jaxsparse.ffi``): every shared SpMM/SDDMM case with backend="ffi",
plus the paths the shared bases cannot pick: each instruction-set build, thread counts, N = 1,
the nk (linear-layer) layout, and malformed sparse structure that only the kernel can see.
"""

import contextlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
import pytest

import jaxsparse
from jaxsparse import ffi
from sparse_testing import assert_close, random_sparse, rounded
from test_sddmm import SddmmTestBase
from test_spmm import SpmmTestBase

pytestmark = pytest.mark.skipif(not ffi.AVAILABLE, reason=str(ffi.UNAVAILABLE_REASON))

_KN = jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend="ffi"))
_NK = jax.jit(lambda a, x: jaxsparse.matmul(x, a.T, backend="ffi"))
_SDDMM = jax.jit(lambda l, r, p: jaxsparse.sddmm(l, r, p, backend="ffi").values)

ISAS = [isa for isa in ("avx512", "avx2", "scalar") if ffi.AVAILABLE and ffi.isa_supported(isa)]
# Products of a packed matrix compile to its sliced kernel only where the AVX-512 kernels run
# (elsewhere the CSR kernel is faster); set_isa then runs the sliced kernel of any build.
SLICED_KERNEL = ffi.AVAILABLE and ffi.SLICED_KERNEL


class TestSpmmFFI(SpmmTestBase):
    backend = "ffi"


class TestSddmmFFI(SddmmTestBase):
    backend = "ffi"


@contextlib.contextmanager
def isa(name):
    ffi.set_isa(name)
    try:
        yield
    finally:
        ffi.set_isa("auto")


@contextlib.contextmanager
def max_threads(n):
    ffi.set_max_threads(n)
    try:
        yield
    finally:
        ffi.set_max_threads(0)


@contextlib.contextmanager
def gather(mode):
    ffi.set_gather(mode)
    try:
        yield
    finally:
        ffi.set_gather("auto")


def _skewed(rng, shape, fmt, dtype, density=0.2):
    """A random matrix with empty rows and a few very long ones (DLMC-like skew)."""
    m, k = shape
    if fmt == "bsr":
        return random_sparse(rng, shape, density, fmt, dtype, block=(4, 8))
    if fmt == "nm":
        return random_sparse(rng, shape, 1.0, fmt, dtype, nm=(2, 4))
    mask = rng.random(shape) < density
    mask[::5] = False
    mask[3] = True
    mask[m // 2, ::2] = True
    dense = rng.standard_normal(shape) * mask
    _, dense64 = rounded(dense, dtype)
    return jaxsparse.CSR.fromdense(jnp.asarray(dense64).astype(dtype)), dense64


def _products(a, n, rng, dtype):
    """kn (A @ X) and nk (X @ A.T) with their float64 references."""
    m, k = a.shape
    a64 = np.asarray(a.todense().astype(jnp.float64))
    x, x64 = rounded(rng.standard_normal((k, n)), dtype)
    xt, xt64 = rounded(rng.standard_normal((n, k)), dtype)
    return [(_KN, x, a64 @ x64), (_NK, xt, xt64 @ a64.T)]


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_native_targets_in_hlo(rng, fmt):
    """auto lowers kn, nk, N = 1, A transposed and SDDMM of every format to the native kernels
    (no silent fallback)."""
    a, _ = random_sparse(rng, (16, 32), 0.3, fmt, jnp.float32)
    target = f"jaxsparse_{fmt}_spmm"
    for fn, x in [(lambda a, x: jaxsparse.matmul(a, x), jnp.ones((32, 8), jnp.float32)),
                  (lambda a, x: jaxsparse.matmul(x, a.T), jnp.ones((8, 32), jnp.float32)),
                  (lambda a, x: a @ x, jnp.ones((32,), jnp.float32)),
                  (lambda a, x: x @ a.T, jnp.ones((3, 5, 32), jnp.float32)),
                  (lambda a, x: a.T @ x, jnp.ones((16, 8), jnp.float32)),
                  (lambda a, x: x @ a, jnp.ones((8, 16), jnp.float32))]:
        assert target in jax.jit(fn).lower(a, x).as_text()
    assert target not in jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend="reference")).lower(
        a, jnp.ones((32, 8), jnp.float32)).as_text()
    p = jax.jit(lambda l, r, p: jaxsparse.sddmm(l, r, p).values).lower(
        jnp.ones((16, 4)), jnp.ones((4, 32)), a).as_text()
    assert f"jaxsparse_{fmt}_sddmm" in p


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_isa_paths_agree(rng, fmt, dtype):
    """Each instruction-set build gives the reference result, for strip widths, tails and N = 1."""
    a, _ = _skewed(rng, (40, 72), fmt, dtype)
    # N = 1 SpMV; a tail only (AVX-512: 256-bit up to 8 columns, masked 512-bit past 8); strips
    # of 4, 2 and 1 vectors and a tail; strips of 8 vectors
    for n in (1, 5, 13, 117, 128):
        for fn, x, expected in _products(a, n, rng, dtype):
            outs = []
            for name in ISAS:
                with isa(name):
                    assert ffi.get_isa() == name
                    outs.append(np.asarray(fn(a, x).astype(jnp.float32)))
                assert_close(outs[-1], expected, dtype)
            for o in outs[1:]:  # builds differ only in summation order
                assert_close(o, outs[0].astype(np.float64), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: np.dtype(d).name)
def test_matvec_gather_modes(rng, dtype):
    """The CSR matrix-vector product reading x with vector gathers and entry by entry, for 32-
    and 16-bit indices (packed without the sliced copy), rows of every length mod 4 and empty
    ones, each instruction set, 1 and 2 threads, both layouts: all give the float64 result."""
    a, _ = _skewed(rng, (45, 300), "csr", dtype)
    for m in (a, jaxsparse.pack(a, matvec=False)):
        for fn, x, expected in _products(m, 1, rng, dtype):
            assert "jaxsparse_csr_spmm" in fn.lower(m, x).as_text()
            for name, mode, threads in itertools.product(ISAS, ("vector", "scalar"), (1, 2)):
                with isa(name), gather(mode), max_threads(threads):
                    assert_close(fn(m, x), expected, dtype)
    assert ffi.get_gather() in ("vector", "scalar")
    with pytest.raises(ValueError, match="set_gather: unknown mode 'simd'"):
        ffi.set_gather("simd")

def test_epilogue_paths(rng):
    """The fused bias + activation on every path of the kernels (N = 1: along the output vector;
    117 = groups of four vectors, single vectors and a tail, 37 = vectors and a tail, 5 = a tail
    only; the nk token slices and chunks of 117 and 300 columns), each instruction set, float32;
    bfloat16 and float64 (the portable build) for gelu. Against float64 NumPy."""
    from test_spmm import activation_reference

    def fused(layout, activation):
        if layout == "kn":
            return jax.jit(lambda a, x, b: jaxsparse.matmul(a, x, bias=b, activation=activation,
                                                            backend="ffi"))
        return jax.jit(lambda a, x, b: jaxsparse.matmul(x, a.T, bias=b, activation=activation,
                                                        backend="ffi"))

    cases = [(jnp.float32, 117, act) for act in (None, *jaxsparse.ACTIVATIONS)]
    cases += [(jnp.float32, n, "gelu") for n in (1, 5, 37, 300)]
    cases += [(dtype, 117, "gelu") for dtype in (jnp.bfloat16, jnp.float64)]
    for dtype, n, activation in cases:
        a, _ = _skewed(rng, (40, 72), "csr", dtype)
        bias, bias64 = rounded(rng.standard_normal(40) * 2, dtype)
        for (_, x, prod), layout in zip(_products(a, n, rng, dtype), ("kn", "nk")):
            pre = prod + (bias64[:, None] if layout == "kn" else bias64)
            expected = activation_reference(activation, pre)
            for name in ISAS if dtype == jnp.float32 else ["auto"]:
                with isa(name):
                    out = fused(layout, activation)(a, x, bias)
                assert out.dtype == dtype
                assert_close(out, expected, dtype)


def test_bad_operands_in_ffi_call():
    """The kernel checks the bias and shapes it is handed (the Python API never passes wrong
    ones)."""
    a = jaxsparse.CSR.fromdense(jnp.eye(4, 6, dtype=jnp.float32))  # stored [4, 6]

    def call(b, bias, out_shape=(4, 2), ta=False, act=0, plan=(jnp.zeros(0, jnp.int32),) * 3):
        fn = jax.ffi.ffi_call("jaxsparse_csr_spmm", jax.ShapeDtypeStruct(out_shape, jnp.float32))
        return fn(a.values, a.indices, a.indptr, *plan, b, bias, nk=np.bool_(False),
                  ta=np.bool_(ta), act=np.int64(act))

    with pytest.raises(Exception, match=r"csr_spmm: bias must hold 4 values of the output's "
                                        r"dtype, got 3"):
        call(jnp.ones((6, 2), jnp.float32), jnp.ones(3, jnp.float32))
    with pytest.raises(Exception, match="csr_spmm: unknown activation code 9"):
        call(jnp.ones((6, 2), jnp.float32), jnp.ones(0, jnp.float32), act=9)
    # A.T [6, 4] @ b: b must have 4 rows, and the bias 6 values.
    with pytest.raises(Exception, match=r"csr_spmm: b's contracting dimension does not match "
                                        r"A's 4 rows \(A transposed\)"):
        call(jnp.ones((6, 2), jnp.float32), jnp.ones(0, jnp.float32), (6, 2), ta=True)
    with pytest.raises(Exception, match=r"csr_spmm: bias must hold 6 values"):
        call(jnp.ones((4, 2), jnp.float32), jnp.ones(4, jnp.float32), (6, 2), ta=True)
    b = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.testing.assert_array_equal(call(jnp.asarray(b), jnp.ones(0, jnp.float32), (6, 2), ta=True),
                                  np.eye(4, 6).T @ b)
    # A transposition plan of the wrong sizes (the Python API checks them before the call).
    with pytest.raises(Exception, match=r"csr_spmm: the transposition plan must hold perm \[nnz\], "
                                        r"t_indices \[nnz\] and t_indptr \[K \+ 1\] = \[7\]; "
                                        r"got 4, 4 and 5 entries"):
        call(jnp.asarray(b), jnp.ones(0, jnp.float32), (6, 2), ta=True,
             plan=(jnp.arange(4, dtype=jnp.int32),) * 2 + (jnp.zeros(5, jnp.int32),))


# Operand layouts of sddmm's kernel: lhs [M, K] or [K, M], rhs [K, N] or [N, K] (the transposes
# are folded into the call inside jit and done by the kernel).
_SDDMM_LAYOUTS = {
    "a@b": jax.jit(lambda l, r, p: jaxsparse.sddmm(l, r, p, backend="ffi").values),
    "a@bt.T": jax.jit(lambda l, rt, p: jaxsparse.sddmm(l, rt.T, p, backend="ffi").values),
    "at.T@b": jax.jit(lambda lt, r, p: jaxsparse.sddmm(lt.T, r, p, backend="ffi").values),
}


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_isa_paths_agree_sddmm(rng, fmt):
    pattern, _ = _skewed(rng, (40, 72), fmt, jnp.float32)
    mask = np.asarray(pattern.with_values(jnp.ones_like(pattern.values)).todense()) != 0
    # K = 7: masked tail only; 33, 64, 70, 96: whole vectors held in registers, with and without a
    # tail; 130: the generic loop over K.
    cases = [(k, jnp.float32, layout) for k in (7, 33, 64, 70, 96, 130) for layout in _SDDMM_LAYOUTS]
    cases += [(k, jnp.bfloat16, "a@b") for k in (7, 70)]
    for k, dtype, layout in cases:
        lhs, l64 = rounded(rng.standard_normal((40, k)), dtype)
        rhs, r64 = rounded(rng.standard_normal((k, 72)), dtype)
        expected = np.where(mask, l64 @ r64, 0)
        args = {"a@b": (lhs, rhs), "a@bt.T": (lhs, rhs.T), "at.T@b": (lhs.T, rhs)}[layout]
        for name in ISAS:
            with isa(name):
                out = _SDDMM_LAYOUTS[layout](*args, pattern.astype(dtype))
            assert_close(pattern.with_values(out).todense(), expected, dtype)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_thread_counts_agree(rng, fmt):
    """One thread and the whole pool give bitwise equal results (rows never split a sum)."""
    a, _ = _skewed(rng, (200, 96), fmt, jnp.float32)
    for n in (1, 40):
        for fn, x, expected in _products(a, n, rng, jnp.float32):
            with max_threads(1):
                one = np.asarray(fn(a, x))
            many = np.asarray(fn(a, x))
            np.testing.assert_array_equal(one, many)
            assert_close(many, expected, jnp.float32)
    l, r = jnp.ones((200, 9), jnp.float32), jnp.asarray(rng.standard_normal((9, 96)), jnp.float32)
    with max_threads(1):
        one = np.asarray(_SDDMM(l, r, a))
    np.testing.assert_array_equal(one, np.asarray(_SDDMM(l, r, a)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fmt", ["csr", "packed", "bsr", "nm"])
def test_transposed_products(rng, fmt, dtype):
    """A.T @ Y and Y @ A: the kernel transposes A (a counting sort by column, in parallel; BSR
    blocks transposed, N:M becomes CSR); one thread and the whole pool agree bitwise."""
    a, a64 = _skewed(rng, (200, 96), "csr" if fmt == "packed" else fmt, dtype)
    if fmt == "packed":
        a = jaxsparse.pack(a)
    kn = jax.jit(lambda a, y: jaxsparse.matmul(a.T, y, backend="ffi"))
    nk = jax.jit(lambda a, y: jaxsparse.matmul(y, a, backend="ffi"))
    for n in (1, 40):
        y, y64 = rounded(rng.standard_normal((200, n)), dtype)
        yt, yt64 = rounded(rng.standard_normal((n, 200)), dtype)
        for fn, x, expected in [(kn, y, a64.T @ y64), (nk, yt, yt64 @ a64)]:
            with max_threads(1):
                one = fn(a, x)
            many = fn(a, x)
            np.testing.assert_array_equal(np.asarray(one), np.asarray(many))
            assert_close(many, expected, dtype)


def test_transposed_product_of_many_rows(rng):
    """A with more than 65536 rows: its transpose keeps 32-bit column indices."""
    a, a64 = random_sparse(rng, (70000, 8), 0.01, "csr", jnp.float32)
    y, y64 = rounded(rng.standard_normal((70000, 3)), jnp.float32)
    assert_close(jaxsparse.matmul(a.T, y, backend="ffi"), a64.T @ y64, jnp.float32)


def test_knobs_validate():
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        ffi.set_isa("sse9")
    assert ffi.get_isa() in ISAS
    with max_threads(3):
        assert ffi.get_max_threads() == 3
    assert ffi.get_max_threads() == 0


# ----------------------------------------------------------------------------------------------
# Malformed structure built from traced arrays inside jit: Python cannot check the values, the
# kernel must refuse them instead of reading out of bounds.


def _run_csr(data, indices, indptr, shape, layout, n=3):
    @jax.jit
    def f(data, indices, indptr):
        a = jaxsparse.CSR((data, indices, indptr), shape=shape)
        if layout == "kn":
            return jaxsparse.matmul(a, jnp.ones((shape[1], n), jnp.float32), backend="ffi")
        return jaxsparse.matmul(jnp.ones((n, shape[1]), jnp.float32), a.T, backend="ffi")

    return jax.block_until_ready(f(jnp.asarray(data, jnp.float32), jnp.asarray(indices, jnp.int32),
                                   jnp.asarray(indptr, jnp.int32)))


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("case, indices, indptr, message", [
    ("column out of range", [0, 6, 1], [0, 2, 3], r"indices\[1\]=6 is out of range \[0, 6\)"),
    ("negative column", [0, -1, 1], [0, 2, 3], r"indices\[1\]=-1 is out of range"),
    ("indptr decreasing", [0, 1, 2], [0, 3, 2], r"indptr must be non-decreasing"),
    ("indptr past nnz", [0, 1, 2], [0, 1, 9], r"indptr\[-1\] must equal nnz=3, got 9"),
    ("indptr[0] not 0", [0, 1, 2], [1, 2, 3], r"indptr\[0\] must be 0"),
])
def test_malformed_csr_in_jit(case, indices, indptr, message, layout):
    with pytest.raises(Exception, match=f"csr_spmm: {message}"):
        _run_csr(np.ones(3), indices, indptr, (2, 6), layout)


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("n", [300, 128])
def test_malformed_csr_several_column_chunks(layout, n):
    """N = 300: tasks of 128 columns, whose parts are all checked before any is computed. N = 128
    in the linear layout on 2+ threads: a small A is computed in slices of the tokens, one per
    thread, each over every row, so its rows are likewise all checked first."""
    rows, cols = 64, 40
    indptr = np.arange(rows + 1) * 2
    indices = np.tile([0, 39], rows)
    indices[2 * 50 + 1] = 40
    with pytest.raises(Exception, match=r"csr_spmm: indices\[101\]=40 is out of range \[0, 40\)"):
        _run_csr(np.ones(2 * rows), indices, indptr, (rows, cols), layout, n=n)
    indices[2 * 50 + 1] = 39
    out = _run_csr(np.ones(2 * rows), indices, indptr, (rows, cols), layout, n=n)
    np.testing.assert_array_equal(out, np.full(out.shape, 2.0))


@pytest.mark.parametrize("at", [(1,), (77,), (100,), (77, 95)])
def test_malformed_long_indptr_names_the_first_decrease(at):
    """indptr is checked in a vectorized pass, then searched for the culprit: a decrease anywhere
    in a long indptr (vector body or tail) is found and named, the first of several."""
    rows, cols = 100, 8
    indptr = np.arange(rows + 1) * 2
    for i in at:
        indptr[i] -= 3
    indices = np.zeros(2 * rows)
    if at[-1] == rows:
        indices = indices[:-3]  # indptr[-1] must still equal nnz
    i = at[0]
    message = (rf"csr_spmm: indptr must be non-decreasing, but indptr\[{i}\]={indptr[i]} < "
               rf"indptr\[{i - 1}\]={indptr[i - 1]}")
    with pytest.raises(Exception, match=message):
        _run_csr(np.ones(len(indices)), indices, indptr, (rows, cols), "kn")


def test_malformed_bsr_nm_sddmm_in_jit():
    @jax.jit
    def bsr(data, indices, indptr):
        a = jaxsparse.BSR((data, indices, indptr), shape=(4, 8))
        return jaxsparse.matmul(a, jnp.ones((8, 2), jnp.float32), backend="ffi")

    data = jnp.ones((2, 2, 4), jnp.float32)
    with pytest.raises(Exception, match=r"bsr_spmm: indices\[1\]=2 is out of range \[0, 2\)"):
        jax.block_until_ready(bsr(data, jnp.array([0, 2], jnp.int32), jnp.array([0, 1, 2], jnp.int32)))
    with pytest.raises(Exception, match=r"bsr_spmm: indptr\[-1\] must equal nnz=2"):
        jax.block_until_ready(bsr(data, jnp.array([0, 1], jnp.int32), jnp.array([0, 1, 5], jnp.int32)))

    @jax.jit
    def nm(values, positions):
        a = jaxsparse.NM((values, positions), shape=(2, 8), n=2, m=4)
        return jaxsparse.matmul(jnp.ones((3, 8), jnp.float32), a.T, backend="ffi")

    pos = jnp.array([[0, 1, 2, 3], [1, 2, 0, 7]], jnp.int32)
    with pytest.raises(Exception, match=r"nm_spmm: positions\[1, 3\]=7 is out of range \[0, 4\)"):
        jax.block_until_ready(nm(jnp.ones((2, 4), jnp.float32), pos))

    @jax.jit
    def sddmm(indices, indptr):
        p = jaxsparse.CSR((jnp.ones(3, jnp.float32), indices, indptr), shape=(2, 6))
        return jaxsparse.sddmm(jnp.ones((2, 4), jnp.float32), jnp.ones((4, 6), jnp.float32), p,
                               backend="ffi").values

    with pytest.raises(Exception, match=r"csr_sddmm: indices\[2\]=60 is out of range \[0, 6\)"):
        jax.block_until_ready(sddmm(jnp.array([0, 1, 60], jnp.int32), jnp.array([0, 2, 3], jnp.int32)))

    @jax.jit
    def bsr_sddmm(indices, indptr):
        p = jaxsparse.BSR((jnp.ones((1, 2, 3), jnp.float32), indices, indptr), shape=(4, 6))
        return jaxsparse.sddmm(jnp.ones((4, 4), jnp.float32), jnp.ones((4, 6), jnp.float32), p,
                               backend="ffi").values

    with pytest.raises(Exception, match=r"bsr_sddmm: indices\[0\]=2 is out of range \[0, 2\)"):
        jax.block_until_ready(bsr_sddmm(jnp.array([2], jnp.int32), jnp.array([0, 1, 1], jnp.int32)))


@pytest.mark.parametrize("m", [1024, 1040, 1030])
def test_linear_layout_large_output(rng, m):
    """x @ A.T with an output over 1 MiB: written with streaming stores when its rows are a
    multiple of 4 KiB apart (M = 1024), with plain stores otherwise, in whole 16-row tiles (1040)
    or partial ones (1030); every format, one thread and the pool."""
    for fmt in ("csr", "bsr", "nm"):
        a, a64 = random_sparse(rng, (m, 64), 0.2 if fmt != "nm" else 1.0, fmt, jnp.float32,
                               block=(2, 8), nm=(2, 4))
        x = rng.standard_normal((272, 64)).astype(np.float32)
        expected = x.astype(np.float64) @ a64.T
        for threads in (1, 0):
            with max_threads(threads):
                assert_close(_NK(a, x), expected, jnp.float32)


@pytest.mark.parametrize("bm", [1, 2, 3, 6, 8, 16])
def test_bsr_row_groups(rng, bm):
    """BSR strips of 64 columns take a block's rows in groups of 6, 4, 2 and 1 (16 = 6 + 6 + 4,
    3 = 2 + 1), then 32, 16 and a tail (N = 101 = 64 + 32 + 5); float32 and bfloat16, both
    layouts, each instruction set."""
    for dtype in (jnp.float32, jnp.bfloat16):
        a, _ = random_sparse(rng, (4 * bm, 48), 0.4, "bsr", dtype, block=(bm, 8))
        for fn, x, expected in _products(a, 101, rng, dtype):
            for name in ISAS:
                with isa(name):
                    assert_close(fn(a, x).astype(jnp.float32), expected, dtype)


def test_k_blocked_products(rng):
    """K large enough that a strip of B is visited in K-blocks for L2 (float32, K = 2400 at
    N >= 128; rows too sparse for blocks in L1, but for a few long ones), strips of 8 vectors, 1
    vector and a scalar tail (N = 149), both layouts, CSR and N:M; and a CSR as sparse whose rows
    are not sorted, which the blocked kernel must still sum exactly once per entry."""
    for fmt in ("csr", "nm"):
        a, a64 = (_skewed(rng, (50, 2400), fmt, jnp.float32, density=0.1) if fmt == "csr" else
                  random_sparse(rng, (50, 2400), 1.0, fmt, jnp.float32, nm=(1, 8)))
        for fn, x, expected in _products(a, 149, rng, jnp.float32):
            assert_close(fn(a, x), expected, jnp.float32)
    _check_unsorted_rows(rng, (40, 2400), 0.1)  # ~6 entries per 64 columns: blocks for L2


def _check_unsorted_rows(rng, shape, density):
    """A float32 CSR product (N = 130) whose rows' indices are shuffled, built inside jit (where
    construction cannot check them), against the float64 product: each entry added once."""
    m, k = shape
    s = sp.random(m, k, density=density, format="csr", random_state=0, dtype=np.float64)
    order = np.concatenate([rng.permutation(np.arange(s.indptr[i], s.indptr[i + 1]))
                            for i in range(m)])
    x = rng.standard_normal((k, 130)).astype(np.float32)

    @jax.jit
    def unsorted(data, indices, indptr, x):
        a = jaxsparse.CSR((data, indices, indptr), shape=shape)
        return jaxsparse.matmul(a, x, backend="ffi")

    out = unsorted(jnp.asarray(s.data[order], jnp.float32),
                   jnp.asarray(s.indices[order], jnp.int32), jnp.asarray(s.indptr, jnp.int32), x)
    assert_close(out, s.astype(np.float32).astype(np.float64) @ x.astype(np.float64), jnp.float32)


def _dense_rows(rng, shape):
    """A float32 CSR dense enough for blocks of 64 columns in L1 (>= 12 entries per block on
    average), with rows the blocks must still get right: empty, full, entries only in the first
    block or only in the last (partial) one."""
    m, k = shape
    mask = rng.random(shape) < 0.4
    mask[1] = False
    mask[2] = True
    mask[3] = False
    mask[3, :5] = True
    mask[4] = False
    mask[4, -3:] = True
    _, dense64 = rounded(rng.standard_normal(shape) * mask, jnp.float32)
    return jaxsparse.CSR.fromdense(jnp.asarray(dense64, jnp.float32)), dense64


def test_dense_rows_take_l1_k_blocks(rng):
    """Rows dense enough (40%) at N >= 128 take K-blocks of 64 columns at any K: K = 200 (four
    blocks, the last partial), 600 rows (groups of 256 and a partial one), strips of 8 vectors,
    1 and a tail (N = 149), three column chunks (N = 300); int32 and packed indices, N:M 2:4, both
    layouts, each instruction set, one thread and the pool."""
    a, _ = _dense_rows(rng, (600, 200))
    nm, _ = random_sparse(rng, (300, 200), 1.0, "nm", jnp.float32, nm=(2, 4))
    for mat in (a, jaxsparse.pack(a, matvec=False), nm):
        for n in (128, 149, 300):
            for fn, x, expected in _products(mat, n, rng, jnp.float32):
                for name, threads in itertools.product(ISAS, (1, 0)):
                    with isa(name), max_threads(threads):
                        assert_close(fn(mat, x), expected, jnp.float32)


def test_dense_rows_unsorted_and_wide(rng):
    """L1 K-blocks with unsorted indices (built inside jit, where construction cannot check: each
    entry still added exactly once) and with K past what the bounds of blocks of 64 columns can
    hold on the stack (K = 70000, int32 indices: the rows take blocks for L2 instead)."""
    _check_unsorted_rows(rng, (300, 256), 0.4)
    wide, _ = _dense_rows(rng, (6, 70000))
    for fn, x, expected in _products(wide, 128, rng, jnp.float32):
        assert_close(fn(wide, x), expected, jnp.float32)


@pytest.mark.parametrize("density", [0.05, 0.8], ids=["small-a", "large-a"])
def test_column_chunk_orders(rng, density):
    """Columns in chunks of 128: a small A (~50 KiB) takes (chunk, part) tasks chunk-major, a
    large one (0.5-1 MiB, past the 1-thread limit) one task per part with all its chunks. N = 300
    (three chunks), N = 197 (rows of B not a whole number of cache lines: kn copies B, nk pads
    its panel), CSR int32 and packed, float32 and bfloat16, both layouts, 1 thread and the pool."""
    s = sp.random(200, 800, density=density, format="csr", random_state=1, dtype=np.float64)
    for dtype in (jnp.float32, jnp.bfloat16):
        a64 = rounded(s.toarray(), dtype)[1]
        a = jaxsparse.CSR.fromdense(jnp.asarray(a64).astype(dtype))
        for mat in (a, jaxsparse.pack(a, matvec=False)):
            for n in (300, 197):
                for fn, x, expected in _products(mat, n, rng, dtype):
                    for threads in (1, 0):
                        with max_threads(threads):
                            assert_close(fn(mat, x).astype(jnp.float32), expected, dtype)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_kn_padded_copy_of_b(rng, fmt):
    """kn with N = 256 float32 / bfloat16 (rows of B 1 KiB apart): B is copied with padded rows
    before the product (widened at the same time for bfloat16); one thread and the pool agree."""
    for dtype in (jnp.float32, jnp.bfloat16):
        a, a64 = _skewed(rng, (72, 48), fmt, dtype)
        x, x64 = rounded(rng.standard_normal((48, 256)), dtype)
        with max_threads(1):
            one = np.asarray(_KN(a, x))
        many = np.asarray(_KN(a, x))
        np.testing.assert_array_equal(one, many)
        assert_close(many, a64 @ x64, dtype)


def test_large_k_and_long_rows(rng):
    """A row longer than every vector strip, K > 2**16, N = 1 gather path with tails."""
    k = 70001
    cols = np.unique(rng.integers(0, k, 3000)).astype(np.int32)
    import scipy.sparse as sp
    s = sp.csr_matrix((rng.standard_normal(cols.size), (np.zeros(cols.size, int), cols)),
                      shape=(3, k))
    a = jaxsparse.CSR.from_scipy(s.astype(np.float32))
    x = rng.standard_normal(k).astype(np.float32)
    assert_close(jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend="ffi"))(a, x),
                 s.astype(np.float64) @ x.astype(np.float64), jnp.float32)


# ----------------------------------------------------------------------------------------------
# jaxsparse.pack: 16-bit column indices and the sliced matrix-vector layout for fixed weights.


def test_pack_matches_unpacked_on_every_path(rng):
    a, a64 = _skewed(rng, (40, 300), "csr", jnp.float32)
    p = jaxsparse.pack(a)
    assert isinstance(p, jaxsparse.PackedCSR) and p.indices.dtype == np.uint16
    assert jaxsparse.pack(p) is p
    for n in (1, 37):
        for fn, x, expected in _products(p, n, rng, jnp.float32):
            target = "jaxsparse_sell_spmv" if n == 1 and SLICED_KERNEL else "jaxsparse_csr_spmm"
            assert target in fn.lower(p, x).as_text()
            for name in ISAS:
                with isa(name):
                    assert_close(fn(p, x), expected, jnp.float32)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    ref = jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend="reference"))(p, x)
    assert_close(ref, a64 @ x, jnp.float32)
    # Gradients with respect to the values: the native SDDMM on the packed (16-bit) pattern,
    # d sum(A x) / d A[i, k] = sum(x[k, :]).
    grad = jax.jit(jax.grad(lambda v: jnp.sum(jaxsparse.matmul(p.with_values(v), x))))
    assert "jaxsparse_csr_sddmm" in grad.lower(p.data).as_text()
    cols = np.asarray(p.indices).astype(np.int64)
    assert_close(grad(p.data), x.astype(np.float64).sum(axis=1)[cols], jnp.float32)
    lhs, rhs = rng.standard_normal((40, 8)), rng.standard_normal((8, 300))
    mask = a64 != 0
    for name in ISAS:
        with isa(name):
            out = jaxsparse.sddmm(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), p)
        assert_close(out.todense(), np.where(mask, lhs @ rhs, 0), jnp.float32)


def test_pack_leaves_other_formats_and_large_k():
    b = jaxsparse.BSR.fromdense(jnp.ones((4, 4), jnp.float32), block_size=(2, 2))
    assert jaxsparse.pack(b) is b
    import scipy.sparse as sp
    wide = jaxsparse.CSR.from_scipy(sp.eye(2, 70000, format="csr", dtype=np.float32))
    assert jaxsparse.pack(wide, matvec=False) is wide  # too wide for 16-bit indices
    packed = jaxsparse.pack(wide)
    assert packed.indices.dtype == np.int32 and packed.matvec is not None
    x = np.arange(70000, dtype=np.float32)
    np.testing.assert_array_equal(packed @ x, [0.0, 1.0])
    with pytest.raises(TypeError, match="pack: expected a jaxsparse matrix"):
        jaxsparse.pack(np.ones((2, 2)))


def test_malformed_packed_indices_in_jit():
    @jax.jit
    def f(indices):
        p = jaxsparse.PackedCSR.tree_unflatten(((2, 6), False), (
            jnp.ones(3, jnp.float32), indices, jnp.array([0, 2, 3], jnp.int32)))
        return jaxsparse.matmul(p, jnp.ones((6,), jnp.float32), backend="ffi")

    with pytest.raises(Exception, match=r"csr_spmm: indices\[2\]=9 is out of range \[0, 6\)"):
        jax.block_until_ready(f(jnp.array([0, 1, 9], jnp.uint16)))

    @jax.jit
    def g(indices):  # the SDDMM widens 16-bit indices and validates them as any others
        p = jaxsparse.PackedCSR.tree_unflatten(((2, 6), False), (
            jnp.ones(3, jnp.float32), indices, jnp.array([0, 2, 3], jnp.int32)))
        return jaxsparse.sddmm(jnp.ones((2, 4)), jnp.ones((4, 6)), p, backend="ffi").values

    with pytest.raises(Exception, match=r"csr_sddmm: indices\[2\]=65535 is out of range"):
        jax.block_until_ready(g(jnp.array([0, 1, 65535], jnp.uint16)))


# Shapes around the slice (16 rows) and window (63 columns) edges: partial last slice and window,
# a single window narrower than 63, one exactly 63 wide, several windows.
_SLICED_SHAPES = [(40, 300), (16, 64), (5, 7), (33, 126), (70, 63)]


@pytest.mark.parametrize("shape", _SLICED_SHAPES, ids=str)
def test_pack_sliced_matvec(rng, shape):
    a, a64 = _skewed(rng, shape, "csr", jnp.float32)
    p = jaxsparse.pack(a)
    assert p.matvec is not None and p.matvec.values.shape[0] % 16 == 0
    m, k = shape
    x, x64 = rounded(rng.standard_normal(k), jnp.float32)
    forms = {  # every way of writing A x that reaches the sliced kernel
        "a@x": (jax.jit(lambda a, x: a @ x), x, a64 @ x64),
        "a@x[K,1]": (jax.jit(lambda a, x: a @ x), x[:, None], (a64 @ x64)[:, None]),
        "x@a.T": (jax.jit(lambda a, x: x @ a.T), x, a64 @ x64),
        "x[1,K]@a.T": (jax.jit(lambda a, x: x @ a.T), x[None], (a64 @ x64)[None]),
    }
    for fn, xx, expected in forms.values():
        assert ("jaxsparse_sell_spmv" in fn.lower(p, xx).as_text()) == SLICED_KERNEL
        for name in ISAS:
            for threads in (1, 2):
                with isa(name), max_threads(threads):
                    assert_close(fn(p, xx), expected, jnp.float32)
    ref = jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend="reference"))
    assert "sell" not in ref.lower(p, x).as_text()
    assert_close(ref(p, x), a64 @ x64, jnp.float32)


@pytest.mark.parametrize("shape", _SLICED_SHAPES, ids=str)
def test_pack_sliced_several_vectors(rng, shape):
    """The sliced kernel on 2 to 9 vectors (passes of up to four: 9 = 4 + 4 + 1), both layouts,
    every ISA, one and two threads, against float64, with a NaN in one vector that only its own
    products of stored entries may see."""
    from jaxsparse._pack import sell_spmv
    a, a64 = _skewed(rng, shape, "csr", jnp.float32)
    p = jaxsparse.pack(a)
    m, k = shape
    kn = jax.jit(lambda p, x: sell_spmv(p, x, layout="kn", backend="ffi"))
    nk = jax.jit(lambda p, x: sell_spmv(p, x, layout="nk", backend="ffi"))
    for n in (2, 3, 4, 5, 9):
        x, x64 = rounded(rng.standard_normal((k, n)), jnp.float32)
        x, x64 = np.array(x), x64.copy()
        x[0, 1] = x64[0, 1] = np.nan  # vector 1 at column 0 of A, which most rows do not store
        expected = a64 @ np.nan_to_num(x64)
        expected[a64[:, 0] != 0, 1] = np.nan
        xt = np.ascontiguousarray(x.T)
        for name in ISAS:
            for threads in (1, 2):
                with isa(name), max_threads(threads):
                    got_kn, got_nk = np.asarray(kn(p, x)), np.asarray(nk(p, xt))
                for got in (got_kn, got_nk.T):
                    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
                    assert_close(np.nan_to_num(got), np.nan_to_num(expected), jnp.float32)


def test_pack_sliced_routing(rng):
    """matmul takes the sliced copy for one vector, and for a few while N times the slots per
    stored entry stays within 8 (jaxsparse._pack.takes_sliced); the CSR kernel otherwise."""
    from jaxsparse._pack import takes_sliced
    two_vectors = set()
    # Six entries in six windows take a slot of 16 lanes each, in any row order.
    lone = np.zeros((96, 400), np.float32)
    lone[[3, 17, 40, 41, 70, 95], [0, 70, 130, 200, 260, 399]] = rng.standard_normal(6)
    for w in (*(rng.standard_normal((96, 400)).astype(np.float32) * (rng.random((96, 400)) < d)
                for d in (0.1, 0.02)), lone):
        p = jaxsparse.pack(jaxsparse.CSR.fromdense(w))
        ratio = p.matvec.values.shape[0] / p.nnz
        for n in range(1, 10):
            x = rng.standard_normal((400, n)).astype(np.float32)
            sliced = n == 1 or n * ratio <= 8
            assert takes_sliced(p, n) == sliced
            expected = w.astype(np.float64) @ x.astype(np.float64)
            for fn, xx, out in ((lambda p, x: p @ x, x, lambda y: y),
                                (lambda p, x: x @ p.T, x.T, lambda y: y.T)):
                text = jax.jit(fn).lower(p, xx).as_text()
                assert ("jaxsparse_sell_spmv" in text) == (sliced and SLICED_KERNEL)
                assert ("jaxsparse_csr_spmm" in text) != (sliced and SLICED_KERNEL)
                assert_close(out(jax.jit(fn)(p, xx)), expected, jnp.float32)
        two_vectors.add(takes_sliced(p, 2))
    assert two_vectors == {True, False}  # ~1.5 slots per stored entry at 10%, 16 for `lone`


def test_pack_sliced_row_order(rng):
    """pack orders the rows so that each slice of 16 needs few slots: the layout's slots are those
    its row order implies (per slice and window, the most entries a row has there), fewer than
    the natural order's, and every row is in one lane."""
    m, k = 400, 300
    w = rng.standard_normal((m, k)).astype(np.float32) * (rng.random((m, k)) < 0.1)
    p = jaxsparse.pack(jaxsparse.CSR.fromdense(w))
    rows = np.asarray(p.matvec.rows)
    np.testing.assert_array_equal(np.sort(rows), np.arange(m))
    per_window = np.add.reduceat(w != 0, np.arange(0, k, 63), axis=1)

    def slots(order):
        padded = np.concatenate([per_window[order], np.zeros((-m % 16, per_window.shape[1]))])
        return int(padded.reshape(-1, 16, per_window.shape[1]).max(1).sum())
    assert p.matvec.values.shape[0] == 16 * slots(rows)
    assert slots(rows) < 0.9 * slots(np.arange(m))  # ~0.83 on such matrices


def test_pack_sliced_matvec_transforms(rng):
    """grad (to the CSR values and to x), vmap (N > 1 through the CSR kernel), the transposed
    product, and the copies that drop the sliced layout."""
    a, a64 = _skewed(rng, (50, 100), "csr", jnp.float32)
    p = jaxsparse.pack(a)
    x = rng.standard_normal(100).astype(np.float32)
    loss = lambda v, x: jnp.sum(jnp.sin(p.with_values(v) @ x))
    loss_packed = lambda p, x: jnp.sum(jnp.sin(p @ x))
    g_vals = jax.grad(loss_packed, allow_int=True)(p, x).data
    g_x = jax.grad(loss_packed, argnums=1)(p, x)
    rows = np.repeat(np.arange(50), np.diff(np.asarray(a.indptr)))
    cos = np.cos(a64 @ x.astype(np.float64))
    assert_close(g_vals, cos[rows] * x.astype(np.float64)[np.asarray(a.indices)], jnp.float32)
    assert_close(g_x, a64.T @ cos, jnp.float32)
    assert_close(jax.grad(loss)(p.data, x), cos[rows] * x.astype(np.float64)[np.asarray(a.indices)],
                 jnp.float32)
    xs = rng.standard_normal((3, 100)).astype(np.float32)
    assert_close(jax.vmap(lambda x: p @ x)(xs), xs.astype(np.float64) @ a64.T, jnp.float32)
    y = rng.standard_normal(50).astype(np.float32)
    assert_close(p.T @ y, a64.T @ y.astype(np.float64), jnp.float32)
    assert p.with_values(p.data * 2).matvec is None and p.astype(jnp.float64).matvec is None
    assert_close(p.with_values(p.data * 2) @ x, 2 * a64 @ x.astype(np.float64), jnp.float32)


def test_pack_sliced_matvec_nan_in_x():
    """Padding lanes never multiply x: a NaN or Inf in a column a row does not store leaves that
    row finite (row 0 has one entry in the window, row 1 two, so row 0 has a padded slot)."""
    a = jaxsparse.pack(jaxsparse.CSR.fromdense(np.array([[0, 0, 0, 0, 0, 2.0, 0],
                                                        [3.0, 0, 0, 4.0, 0, 0, 0]], np.float32)))
    for bad in (np.nan, np.inf):
        x = np.arange(7, dtype=np.float32)
        x[[0, 6]] = bad
        for name in ISAS:
            with isa(name):
                y = np.asarray(jax.jit(lambda a, x: a @ x)(a, x))
                assert y[0] == 10.0 and not np.isfinite(y[1])


def test_pack_numpy_arrays_to_device(rng):
    # A CSR built from NumPy arrays packs into device arrays (jit would copy host arrays to the
    # device on every call that takes the matrix), with the same products.
    a, a64 = _skewed(rng, (20, 40), "csr", jnp.float32)
    host = jaxsparse.CSR(tuple(np.asarray(v) for v in (a.data, a.indices, a.indptr)),
                         shape=a.shape)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    for kw in ({}, {"matvec": False}, {"transpose": True}):
        p = jaxsparse.pack(host, **kw)
        assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(p)), kw
        assert p.indices.dtype == np.uint16
        assert_close(jax.jit(lambda p, x: p @ x)(p, x), a64 @ x.astype(np.float64), jnp.float32)


def test_pack_without_sliced_layout(rng):
    a, a64 = _skewed(rng, (20, 40), "csr", jnp.float32)
    x = rng.standard_normal(40).astype(np.float32)
    assert jaxsparse.pack(a, matvec=False).matvec is None
    assert jaxsparse.pack(a.astype(jnp.bfloat16)).matvec is None
    traced = jax.jit(lambda a, x: (lambda p: (p.matvec is None, p @ x))(jaxsparse.pack(a)))
    none, y = traced(a, x)
    assert none and y.shape == (20,)
    assert_close(y, a64 @ x.astype(np.float64), jnp.float32)


def _sliced_call(arrays, m, k):
    """The sliced kernel on hand-made layout arrays (what a malformed matrix would reach)."""
    @jax.jit
    def f(*arrays):
        p = jaxsparse.PackedCSR.tree_unflatten(((m, k), False), (
            jnp.zeros(1, jnp.float32), jnp.zeros(1, jnp.uint16), jnp.zeros(m + 1, jnp.int32).at[
                1:].set(1), jaxsparse.SlicedMatvec(*arrays)))
        return jaxsparse.matmul(p, jnp.ones((k,), jnp.float32), backend="ffi")
    return jax.block_until_ready(f(*arrays))


def _layout(columns, window, group_ptr, slice_ptr, rows=tuple(range(20))):
    columns = np.asarray(columns, np.uint8)
    return (np.ones(columns.shape, np.float32), columns, np.asarray(window, np.int32),
            np.asarray(group_ptr, np.int32), np.asarray(slice_ptr, np.int32),
            np.asarray(rows, np.int32))


@pytest.mark.skipif(not SLICED_KERNEL, reason="the sliced kernel is compiled only where the "
                    "AVX-512 kernels run")
@pytest.mark.parametrize("name", ISAS)
def test_malformed_sliced_layout_in_jit(name):
    m, k = 20, 100  # two slices, two windows (the second 37 wide)
    ok = _layout(np.r_[np.arange(47) % 37, 63], [0, 1, 1], [0, 1, 2, 3], [0, 1, 3])
    bad = {
        r"group 1 \(window 2\) reaches past K=100": _layout(np.zeros(48), [0, 2, 1], [0, 1, 2, 3],
                                                             [0, 1, 3]),
        r"group 2 \(window 1\) reaches past K=100": _layout(np.r_[np.zeros(47), 37], [0, 1, 1],
                                                             [0, 1, 2, 3], [0, 1, 3]),
        r"group 0 \(window 0\) reaches past K=100": _layout(np.r_[64, np.zeros(47)], [0, 1, 1],
                                                             [0, 1, 2, 3], [0, 1, 3]),
        r"slice_ptr must be non-decreasing": _layout(np.zeros(48), [0, 1, 1], [0, 1, 2, 3],
                                                     [0, 3, 1]),
        r"group_ptr\[-1\] must equal len\(values\) / 16=3, got 4": _layout(
            np.zeros(48), [0, 1, 1], [0, 1, 2, 4], [0, 1, 3]),
        r"slice_ptr must have ceil\(M / 16\) \+ 1 = 3 entries": _layout(
            np.zeros(48), [0, 1, 1], [0, 1, 2, 3], [0, 3]),
        r"rows must have M = 20 entries, got 19": _layout(
            np.zeros(48), [0, 1, 1], [0, 1, 2, 3], [0, 1, 3], range(19)),
    }
    # A row twice (here in both slices) or out of range.
    bad = [*bad.items(), *((r"rows\[0:20\] must hold each of the rows 0 to 19 once", _layout(
        np.zeros(48), [0, 1, 1], [0, 1, 2, 3], [0, 1, 3], rows))
        for rows in (np.r_[0:3, 17, 4:20], np.r_[-1, 1:20], np.r_[0:19, 20]))]
    with isa(name):
        # x = 1 and values 1: rows 0-15 have one slot (group 0), rows 16-19 two (groups 1, 2);
        # the last lane of group 2 (row 31, past M) is the padding column, which reads 0.
        assert_close(_sliced_call(ok, m, k), np.r_[np.ones(16), 2 * np.ones(4)], jnp.float32)
        # The same layout with its rows in another order: lane j of slice s gives row
        # rows[16 s + j].
        order = np.r_[19:3:-1, 3, 0, 2, 1].astype(np.int32)
        assert_close(_sliced_call((*ok[:5], order), m, k),
                     np.r_[2 * np.ones(4), np.ones(16)], jnp.float32)
        for message, arrays in bad:
            with pytest.raises(Exception, match=message):
                _sliced_call(arrays, m, k)


@pytest.mark.skipif(not SLICED_KERNEL, reason="the sliced kernel is compiled only where the "
                    "AVX-512 kernels run")
@pytest.mark.parametrize("name", ISAS)
def test_malformed_sliced_layout_many_groups(rng, name):
    """The checks past their first 16 groups (where the AVX-512 ones take 16 at a time): a window
    past K, a column past K in the narrow last window (37 columns), a column of 64 or more."""
    m, k = 300, 100
    w = rng.standard_normal((m, k)).astype(np.float32) * (rng.random((m, k)) < 0.2)
    sliced = jaxsparse.pack(jaxsparse.CSR.fromdense(w)).matvec
    windows, group_ptr = np.asarray(sliced.group_window), np.asarray(sliced.group_ptr)
    last = np.flatnonzero(windows == 1)
    g_last, g_any = int(last[last >= 20][0]), 21
    bad_window = windows.copy()
    bad_window[g_any] = 2
    cases = [(rf"group {g_any} \(window 2\) reaches past K=100", 2, bad_window)]
    for column, g in ((40, g_last), (64, g_any), (200, g_last)):
        columns = np.array(sliced.columns)
        columns[16 * group_ptr[g] + 3] = column
        cases.append((rf"group {g} \(window {windows[g]}\) reaches past K=100", 1, columns))
    with isa(name):
        assert_close(_sliced_call(sliced, m, k), w.astype(np.float64).sum(1), jnp.float32)
        for message, field, array in cases:
            arrays = list(sliced)
            arrays[field] = array
            with pytest.raises(Exception, match=message):
                _sliced_call(arrays, m, k)


@pytest.mark.skipif(not SLICED_KERNEL, reason="the sliced kernel is compiled only where the "
                    "AVX-512 kernels run")
def test_sliced_rows_stay_in_their_block(rng):
    """pack reorders rows within blocks of 128 (8 slices), which the kernel's threads split
    between them: a row moved to another block is an error, on one thread or two."""
    m, k = 300, 100
    w = rng.standard_normal((m, k)).astype(np.float32) * (rng.random((m, k)) < 0.2)
    sliced = jaxsparse.pack(jaxsparse.CSR.fromdense(w)).matvec
    rows = np.asarray(sliced.rows)
    for b0 in range(0, m, 128):
        np.testing.assert_array_equal(np.sort(rows[b0:b0 + 128]), np.arange(b0, min(m, b0 + 128)))
    assert not np.array_equal(rows, np.arange(m))
    moved = rows.copy()
    moved[[5, 290]] = moved[[290, 5]]
    for threads in (1, 2):
        with max_threads(threads):
            assert_close(_sliced_call(sliced, m, k), w.astype(np.float64).sum(1), jnp.float32)
            with pytest.raises(Exception, match=r"rows\[0:128\] must hold each of the rows 0 to "
                               r"127 once \(rows are reordered within blocks of 128\)"):
                _sliced_call((*sliced[:5], moved), m, k)


# ----------------------------------------------------------------------------------------------
# jaxsparse.pack(a, transpose=True): the pattern of A.T and a permutation, for products with A.T.

_TKN = jax.jit(lambda a, x, backend: jaxsparse.matmul(a.T, x, backend=backend),
               static_argnums=2)
_TNK = jax.jit(lambda a, x, backend: jaxsparse.matmul(x, a, backend=backend), static_argnums=2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
@pytest.mark.parametrize("shape", [(40, 300), (300, 7), (5, 1)], ids=str)
def test_transpose_plan_products(rng, shape, dtype):
    # A.T @ X and x @ A with the plan, on every ISA, 1 and 2 threads, the reference and the
    # Pallas kernels (interpreted), with and without a fused bias and activation.
    a, a64 = _skewed(rng, shape, "csr", dtype)
    p = jaxsparse.pack(a, transpose=True, matvec=False)
    assert p.plan is not None and "transpose plan" in repr(p)
    m, k = shape
    x, x64 = rounded(rng.standard_normal((m, 9)), dtype)
    xt, xt64 = rounded(rng.standard_normal((9, m)), dtype)
    bias, bias64 = rounded(rng.standard_normal(k), dtype)
    assert "jaxsparse_csr_spmm" in _TKN.lower(p, x, "ffi").as_text()
    backends = ["ffi", "reference"] + (["pallas-interpret"] if dtype != jnp.float64 else [])
    for backend in backends:
        for name in ISAS if backend == "ffi" else ["auto"]:
            for threads in (1, 2) if backend == "ffi" else (0,):
                with isa(name), max_threads(threads):
                    assert_close(_TKN(p, x, backend), a64.T @ x64, dtype)
                    assert_close(_TNK(p, xt, backend), xt64 @ a64, dtype)
    fused = jaxsparse.matmul(xt, p, bias=bias, activation="relu")
    assert_close(fused, np.maximum(xt64 @ a64 + bias64, 0), dtype)


def test_transpose_plan_layout_and_values(rng):
    # The plan orders A's entries by column, by row within a column: A.T's CSR with sorted
    # indices. with_values / astype keep it (it depends on the pattern only); int32 row indices
    # past 65536 rows; traced arrays get no plan.
    a, a64 = _skewed(rng, (30, 20), "csr", jnp.float32)
    perm, t_indices, t_indptr = jaxsparse.pack(a, transpose=True).plan
    t = sp.csr_matrix(a64.T)
    t.sort_indices()
    np.testing.assert_array_equal(np.asarray(t_indptr), t.indptr)
    np.testing.assert_array_equal(np.asarray(t_indices), t.indices)
    np.testing.assert_array_equal(np.asarray(a.data)[np.asarray(perm)], t.data)
    p = jaxsparse.pack(a, transpose=True)
    v = rng.standard_normal(p.nnz).astype(np.float32)
    q = p.with_values(jnp.asarray(v))
    assert q.plan is p.plan and q.matvec is None
    x = rng.standard_normal((30, 3)).astype(np.float32)
    ref = np.asarray(a.with_values(jnp.asarray(v)).todense(), np.float64).T @ x
    assert_close(_TKN(q, x, "ffi"), ref, jnp.float32)
    assert p.astype(jnp.bfloat16).plan is p.plan
    added = jaxsparse.pack(jaxsparse.pack(a), transpose=True)  # a packed matrix gets its plan
    assert added.matvec is not None and np.array_equal(added.plan.perm, p.plan.perm)
    tall = jaxsparse.CSR.from_scipy(sp.random(70000, 3, density=0.001, format="csr",
                                              dtype=np.float32, random_state=0))
    pt = jaxsparse.pack(tall, transpose=True)
    assert pt.plan.indices.dtype == np.int32
    xt = rng.standard_normal((70000, 2)).astype(np.float32)
    assert_close(_TKN(pt, xt, "ffi"), tall.to_scipy().toarray().astype(np.float64).T @ xt,
                 jnp.float32)
    traced = jax.jit(lambda a: jaxsparse.pack(a, transpose=True).plan is None)(a)
    assert bool(traced)


def test_transpose_plan_gradients(rng):
    # Gradients through products with the plan: with respect to the dense operand (A.T @ ct, a
    # product with the plan in the backward pass of A @ x too) and to the values (an SDDMM on
    # A's pattern), equal to the float64 formulas.
    a, a64 = _skewed(rng, (24, 40), "csr", jnp.float32)
    p = jaxsparse.pack(a, transpose=True)
    x = rng.standard_normal((8, 40)).astype(np.float32)
    w = rng.standard_normal((8, 24)).astype(np.float32)
    loss = lambda v, x: jnp.sum(w * jaxsparse.matmul(x, p.with_values(v).T))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    g_v, g_x = grad(p.data, jnp.asarray(x))
    assert_close(g_x, w.astype(np.float64) @ a64, jnp.float32)
    rows = np.repeat(np.arange(24), np.diff(np.asarray(p.indptr)))
    cols = np.asarray(p.indices).astype(np.int64)
    assert_close(g_v, (w.T.astype(np.float64) @ x)[rows, cols], jnp.float32)


def _planned(plan, backend="ffi"):
    """A 2x6 PackedCSR (entries (0, 0), (0, 5), (1, 2)) with the given plan, times ones."""
    @jax.jit
    def f(perm, t_indices, t_indptr):
        p = jaxsparse.PackedCSR.tree_unflatten(((2, 6), False), (
            jnp.asarray([1.0, 2.0, 3.0], jnp.float32), jnp.asarray([0, 5, 2], jnp.uint16),
            jnp.asarray([0, 2, 3], jnp.int32), None,
            jaxsparse.TransposePlan(perm, t_indices, t_indptr)))
        return jaxsparse.matmul(p.T, jnp.ones((2, 1), jnp.float32), backend=backend)

    return f(*(jnp.asarray(v) for v in plan))


def test_malformed_transpose_plan_in_jit():
    ok = (np.array([0, 2, 1], np.int32), np.array([0, 1, 0], np.uint16),
          np.array([0, 1, 1, 2, 2, 2, 3], np.int32))
    np.testing.assert_array_equal(np.asarray(_planned(ok))[:, 0], [1, 0, 3, 0, 0, 2])
    bad = {
        r"perm\[1\]=3 is out of range \[0, 3\)": (np.array([0, 3, 1], np.int32), *ok[1:]),
        r"perm\[0\]=-1 is out of range": (np.array([-1, 2, 1], np.int32), *ok[1:]),
        r"t_indices\[2\]=2 is out of range \[0, 2\)": (ok[0], np.array([0, 1, 2], np.uint16),
                                                        ok[2]),
        r"t_indptr must be non-decreasing": (*ok[:2], np.array([0, 2, 1, 2, 2, 2, 3], np.int32)),
        r"t_indptr\[-1\] must equal nnz=3, got 2": (*ok[:2],
                                                    np.array([0, 1, 1, 2, 2, 2, 2], np.int32)),
    }
    for message, plan in bad.items():
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(_planned(plan))
    with pytest.raises(TypeError, match=r"transposition plan t_indptr must be 1-D int32 \[7\]"):
        _planned((*ok[:2], np.array([0, 1, 3], np.int32)))
    with pytest.raises(TypeError, match=r"transposition plan perm must be 1-D int32 \[3\]"):
        _planned((ok[0].astype(np.int64), *ok[1:]))
