"""The fused block-sparse attention (block_attention_p; a native kernel on the CPU) against float64
dense masked attention in NumPy: shapes around the kernel's tiles and vectors, padding masks,
empty block rows, every instruction set and thread count, NaN, derivatives, vmap, and malformed
patterns inside jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse
from jaxsparse import BSR, ffi, patterns
from jaxsparse._block_attention import block_attention_p
from sparse_testing import assert_close
from test_ffi import ISAS, isa, max_threads

needs_ffi = pytest.mark.skipif(not ffi.AVAILABLE, reason=str(ffi.UNAVAILABLE_REASON))


def numpy_attention(q, k, v, allowed, keep=None, scale=None):
    """float64 dense attention: q [B, Sq, H, D], allowed [Sq, Sk], keep [B or 1, Sk]; a row with
    no allowed key gives zeros (jaxsparse's convention)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, sq, h, d = q.shape
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros((b, sq, h, v.shape[-1]))
    for bi in range(b):
        ok = allowed if keep is None else allowed & np.asarray(keep)[min(bi, len(keep) - 1)][None]
        for hi in range(h):
            s = scale * q[bi, :, hi] @ k[bi, :, hi].T
            s = np.where(ok, s, -np.inf)
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - np.where(np.isfinite(m), m, 0))
            den = p.sum(axis=1, keepdims=True)
            out[bi, :, hi] = (p / np.where(den > 0, den, 1)) @ v[bi, :, hi]
    return out


def random_bsr(rng, sq, sk, bm, bk, density, empty_row=None):
    blocks = rng.random((sq // bm, sk // bk)) < density
    if empty_row is not None:
        blocks[empty_row] = False
    return patterns.from_mask(np.kron(blocks, np.ones((bm, bk), bool)), block_size=(bm, bk))


def allowed_of(p):
    return np.asarray(p.todense()) != 0


def operands(rng, b, sq, sk, h, d, dv):
    return (jnp.asarray(rng.standard_normal((b, sq, h, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, sk, h, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, sk, h, dv)), jnp.float32))


def lowered_to_kernel(fn, *args) -> bool:
    return "jaxsparse_bsr_attention" in jax.jit(fn).lower(*args).as_text()


# (batch, q_len, k_len, heads, head dim, value dim, block rows, block cols, density): head dims
# off the 16-float vectors, keys per row off them (blocks of 3 and 5 columns), block rows of more
# than one tile of 32 rows (70 = 32 + 32 + 6), q_len != k_len, a dense pattern of one block.
CASES = [
    (2, 64, 48, 3, 20, 24, 16, 16, 0.5),
    (1, 40, 45, 2, 16, 40, 8, 5, 0.7),
    (2, 140, 36, 1, 8, 17, 70, 3, 0.6),
    (1, 33, 33, 4, 33, 1, 33, 33, 1.0),
    (3, 128, 128, 2, 32, 32, 128, 128, 1.0),
]


@needs_ffi
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:8])))
def test_matches_numpy(rng, case):
    b, sq, sk, h, d, dv, bm, bk, density = case
    p = random_bsr(rng, sq, sk, bm, bk, density, empty_row=1 if sq // bm > 2 else None)
    q, k, v = operands(rng, b, sq, sk, h, d, dv)
    keep = rng.random((b, sk)) < 0.8
    keep[-1, :] = b == 1  # the last batch element masks every key (unless it is the only one)
    mask = jnp.asarray(keep)[:, None, None, :]
    fn = lambda q, k, v, mask: jaxsparse.attention(q, k, v, p, mask=mask, scale=0.3)
    assert lowered_to_kernel(fn, q, k, v, mask)
    got = jax.jit(fn)(q, k, v, mask)
    want = numpy_attention(q, k, v, allowed_of(p), keep, scale=0.3)
    assert_close(got, want, jnp.float32)
    if b > 1:
        assert not np.asarray(got[-1]).any()
    # No mask, and one mask for every batch element.
    assert_close(jax.jit(lambda q, k, v: jaxsparse.attention(q, k, v, p))(q, k, v),
                 numpy_attention(q, k, v, allowed_of(p)), jnp.float32)
    one = jnp.asarray(keep[:1])[:, None, None, :]
    assert_close(jax.jit(fn)(q, k, v, one),
                 numpy_attention(q, k, v, allowed_of(p), keep[:1], scale=0.3), jnp.float32)


@needs_ffi
def test_instruction_sets_and_threads(rng):
    p = random_bsr(rng, 96, 80, 16, 16, 0.6, empty_row=2)
    q, k, v = operands(rng, 2, 96, 80, 3, 24, 40)
    fn = jax.jit(lambda q, k, v: jaxsparse.attention(q, k, v, p))
    want = numpy_attention(q, k, v, allowed_of(p))
    for name in ISAS:
        with isa(name):
            with max_threads(1):
                one = np.asarray(fn(q, k, v))
            many = np.asarray(fn(q, k, v))
        assert_close(one, want, jnp.float32)
        np.testing.assert_array_equal(one, many)  # a row's result never depends on the split


@needs_ffi
def test_nan_in_a_query_row_stays_in_that_row(rng):
    p = patterns.full(32)
    q, k, v = operands(rng, 1, 32, 32, 2, 16, 16)
    q = q.at[0, 5, 1, 3].set(jnp.nan)
    got = np.asarray(jax.jit(lambda q: jaxsparse.attention(q, k, v, p))(q))
    assert np.isnan(got[0, 5, 1]).all()
    bad = np.zeros(got.shape, bool)
    bad[0, 5, 1] = True
    assert not np.isnan(got[~bad]).any()
    want = numpy_attention(q, k, v, allowed_of(p))
    assert_close(got[~bad], want[~bad], jnp.float32)


def test_full_pattern(rng):
    assert patterns.full(6, 4).shape == (6, 4) and patterns.full(6, 4).block_size == (6, 4)
    p = patterns.full(6, 4, block_size=(3, 2))
    assert p.block_size == (3, 2) and allowed_of(p).all()
    with pytest.raises(ValueError, match=r"full: block_size=\(4, 2\) must divide"):
        patterns.full(6, 4, block_size=(4, 2))
    with pytest.raises(ValueError, match="full: seq_len must be a positive int"):
        patterns.full(0)


def test_backends_agree_and_derivatives_match_float64(rng):
    """The fused primitive's derivatives (the reference's JVP, transposed for grad) against the
    gradient of float64 dense attention; "reference" never binds the fused primitive."""
    p = random_bsr(rng, 32, 32, 8, 8, 0.6, empty_row=0)
    q, k, v = operands(rng, 2, 32, 32, 2, 8, 8)
    keep = jnp.asarray(rng.random((2, 32)) < 0.7)
    mask = keep[:, None, None, :]
    loss = lambda backend: lambda q, k, v: jnp.sum(jnp.sin(
        jaxsparse.attention(q, k, v, p, mask=mask, backend=backend)))
    assert "jaxsparse_block_attention" in str(jax.make_jaxpr(loss("auto"))(q, k, v))
    assert "jaxsparse_block_attention" not in str(jax.make_jaxpr(loss("reference"))(q, k, v))
    allowed = jnp.asarray(allowed_of(p))[None, None] & mask

    def dense64(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(8.0)
        s = jnp.where(allowed, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        w = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
        den = w.sum(-1, keepdims=True)
        return jnp.sum(jnp.sin(jnp.einsum("bhqk,bkhd->bqhd", w / jnp.where(den > 0, den, 1.0), v)))

    want = jax.grad(dense64, argnums=(0, 1, 2))(*(x.astype(jnp.float64) for x in (q, k, v)))
    for backend in ("auto", "reference"):
        got = jax.jit(jax.grad(loss(backend), argnums=(0, 1, 2)))(q, k, v)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    tangent = jax.jvp(lambda q: jaxsparse.attention(q, k, v, p, mask=mask), (q,), (k,))[1]
    ref = jax.jvp(lambda q: jaxsparse.attention(q, k, v, p, mask=mask, backend="reference"),
                  (q,), (k,))[1]
    np.testing.assert_allclose(tangent, ref, rtol=1e-4, atol=1e-5)


def test_vmap_over_operands_and_mask(rng):
    p = random_bsr(rng, 24, 16, 8, 4, 0.7)
    q, k, v = operands(rng, 2, 24, 16, 2, 8, 8)
    keep = rng.random((3, 2, 16)) < 0.7
    masks = jnp.asarray(keep)[:, :, None, None, :]
    fn = lambda q, k, v, m: jaxsparse.attention(q, k, v, p, mask=m)
    qs = jnp.stack([q, 2 * q, -q])
    got = jax.jit(jax.vmap(fn, in_axes=(0, None, None, 0)))(qs, k, v, masks)
    for i in range(3):
        assert_close(got[i], numpy_attention(qs[i], k, v, allowed_of(p), keep[i]), jnp.float32)
    one = jnp.asarray(keep[0, :1])[:, None, None, :]  # one mask row for the whole batch
    got = jax.jit(jax.vmap(fn, in_axes=(None, 0, None, None)))(q, jnp.stack([k, k[::-1]]), v, one)
    assert_close(got[1], numpy_attention(q, k[::-1], v, allowed_of(p), keep[0, :1]), jnp.float32)


@needs_ffi
@pytest.mark.parametrize("bad", ["index", "indptr"])
def test_malformed_pattern_inside_jit(rng, bad):
    q, k, v = operands(rng, 1, 16, 16, 1, 8, 8)
    indices = np.array([0, 1, 1, 3], np.int32)
    indptr = np.array([0, 2, 4], np.int32)
    if bad == "index":
        indices[3], msg = 4, r"bsr_attention: indices\[3\]=4 is out of range \[0, 4\)"
    else:
        indptr[1], msg = 5, r"bsr_attention: indptr must be non-decreasing"

    @jax.jit
    def fn(indices, indptr):
        p = BSR.tree_unflatten(((16, 16), False),
                               (jnp.ones((4, 8, 4), jnp.float32), indices, indptr))
        return jaxsparse.attention(q, k, v, p)

    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match=msg):
        jax.block_until_ready(fn(jnp.asarray(indices), jnp.asarray(indptr)))


def test_other_dtypes_and_masks_take_the_unfused_path(rng):
    p = random_bsr(rng, 16, 16, 4, 4, 0.7)
    q, k, v = (x.astype(jnp.float64) for x in operands(rng, 1, 16, 16, 2, 4, 4))
    fn = functools.partial(jaxsparse.attention, pattern=p)
    assert not lowered_to_kernel(fn, q, k, v)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), numpy_attention(q, k, v, allowed_of(p)),
                               rtol=1e-12, atol=1e-12)
    # A mask that differs between query rows is not a padding mask: the unfused path serves it.
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    rows = jnp.asarray(np.tri(16, dtype=bool))[None, None]
    masked = functools.partial(jaxsparse.attention, pattern=p, mask=rows)
    assert not lowered_to_kernel(masked, q32, k32, v32)
    assert_close(jax.jit(masked)(q32, k32, v32),
                 numpy_attention(q, k, v, allowed_of(p) & np.tri(16, dtype=bool)), jnp.float32)


def test_primitive_checks_its_operands():
    q = jnp.zeros((1, 8, 1, 4), jnp.float32)
    ip, ix = jnp.asarray([0, 1], jnp.int32), jnp.asarray([0], jnp.int32)
    bind = functools.partial(block_attention_p.bind, scale=1.0, block_k=8, fold_heads=None,
                             backend="auto")
    with pytest.raises(TypeError, match=r"keep must be bool \[1 or 1, 8\]"):
        bind(q, q, q, ip, ix, jnp.ones((1, 7), bool))
    with pytest.raises(ValueError, match=r"the blocks \(8 / 1 rows, 3 columns\) must divide"):
        block_attention_p.bind(q, q, q, ip, ix, jnp.ones((1, 8), bool), scale=1.0, block_k=3,
                               fold_heads=None, backend="auto")
    with pytest.raises(TypeError, match="indices must be int32"):
        bind(q, q, q, ip, ix.astype(jnp.int64), jnp.ones((1, 8), bool))
