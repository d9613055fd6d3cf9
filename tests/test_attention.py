"""Sparse attention against dense masked attention (jax.nn.dot_product_attention and
nnx.MultiHeadAttention) for every pattern kind, under jit / vmap / grad."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsparse
from jaxsparse import patterns
from jaxsparse.layers import SparseMultiHeadAttention

S = 12


def with_empty_row():
    m = np.asarray(patterns.local(S, 2, causal=True).todense()) != 0
    m[5] = False
    return patterns.from_mask(m)


PATTERNS = {
    "causal": lambda: patterns.causal(S),
    "local": lambda: patterns.local(S, 2),
    "local_causal": lambda: patterns.local(S, 3, causal=True),
    "strided": lambda: patterns.strided(S, 4),
    "bigbird": lambda: patterns.bigbird(S, 1, 1, 2, seed=0),
    "mask_empty_row": with_empty_row,
    "mask_bsr": lambda: patterns.from_mask(np.tri(S, dtype=bool), block_size=(4, 3)),
}


def dense_reference(q, k, v, pattern, extra_mask=None):
    allowed = np.asarray(pattern.todense()) != 0
    mask = jnp.asarray(allowed)[None, None]
    if extra_mask is not None:
        mask = mask & extra_mask
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    # jaxsparse gives zeros for rows without any allowed key.
    empty = ~np.asarray(jnp.broadcast_to(mask, (q.shape[0], q.shape[2], S, S)).any(-1))
    return jnp.where(jnp.asarray(empty.transpose(0, 2, 1))[..., None], 0.0, out)


def manual_reference(q, k, v, mask):
    """Dense masked softmax attention in plain jnp (any float dtype); empty rows give zeros."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    logits = jnp.where(mask, logits, -jnp.inf)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    w = jnp.exp(logits - jnp.where(jnp.isfinite(mx), mx, 0.0))
    den = w.sum(-1, keepdims=True)
    w = w / jnp.where(den > 0, den, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


def qkv(rng, b=2, h=3, d=4, dtype=jnp.float32):
    return [jnp.asarray(rng.standard_normal((b, S, h, d)), dtype) for _ in range(3)]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_matches_dense_masked(rng, name):
    p = PATTERNS[name]()
    q, k, v = qkv(rng)
    want = dense_reference(q, k, v, p)
    folds = (True, False) if name in ("causal", "mask_empty_row") else (None,)
    for fold in folds:
        got = jax.jit(functools.partial(jaxsparse.attention, pattern=p, fold_heads=fold))(q, k, v)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    if name == "mask_empty_row":
        assert not np.asarray(got[:, 5]).any()


def test_float64_unbatched_and_padding_mask(rng):
    p = patterns.local(S, 3)
    q, k, v = qkv(rng, b=2, dtype=jnp.float64)
    pad = jnp.asarray(np.arange(S) < 9)[None, None, None, :] & jnp.asarray([True, False])[
        :, None, None, None]  # batch 1 has every key masked
    got = jax.jit(jaxsparse.attention)(q, k, v, p, mask=pad)
    allowed = jnp.asarray(np.asarray(p.todense()) != 0)[None, None]
    want = manual_reference(q, k, v, allowed & pad)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not np.asarray(got[1]).any()
    np.testing.assert_allclose(jax.jit(jaxsparse.attention)(q[0], k[0], v[0], p),
                               manual_reference(q, k, v, allowed)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fold", [True, False])
def test_grad_and_vmap(rng, fold):
    p = patterns.bigbird(S, 1, 1, 1, seed=3)
    q, k, v = qkv(rng, b=1, h=2)
    f_sparse = lambda q, k, v: jnp.sum(jnp.sin(jaxsparse.attention(q, k, v, p, fold_heads=fold)))
    allowed = jnp.asarray(np.asarray(p.todense()) != 0)[None, None]
    f_dense = lambda q, k, v: jnp.sum(jnp.sin(manual_reference(q, k, v, allowed)))
    gs = jax.jit(jax.grad(f_sparse, argnums=(0, 1, 2)))(q, k, v)
    gd = jax.jit(jax.grad(f_dense, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(gs, gd):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    qs, ks, vs = (jnp.stack([x, 2 * x]) for x in (q, k, v))
    got = jax.vmap(lambda q, k, v: jaxsparse.attention(q, k, v, p, fold_heads=fold))(qs, ks, vs)
    np.testing.assert_allclose(got[1], dense_reference(qs[1], ks[1], vs[1], p), rtol=2e-5,
                               atol=2e-5)


def test_multi_head_attention_layer(rng):
    p = patterns.strided(S, 3, causal=True)
    x = jnp.asarray(rng.standard_normal((2, S, 8)), jnp.float32)
    sparse = SparseMultiHeadAttention(2, 8, qkv_features=12, pattern=p, rngs=nnx.Rngs(0))
    dense = nnx.MultiHeadAttention(2, 8, qkv_features=12, decode=False, rngs=nnx.Rngs(0))
    mask = jnp.asarray(np.asarray(p.todense()) != 0)[None, None]
    call = nnx.jit(lambda m, x, **kw: m(x, **kw))
    want = call(dense, x, mask=mask)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(sparse, x), want, rtol=2e-5, atol=2e-5)
    graphdef, state = nnx.split(sparse)
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    # jaxsparse.attention as the attention_fn of a plain nnx.MultiHeadAttention.
    plain = nnx.MultiHeadAttention(2, 8, qkv_features=12, decode=False, rngs=nnx.Rngs(0),
                                   attention_fn=functools.partial(jaxsparse.attention, pattern=p))
    np.testing.assert_allclose(call(plain, x), want, rtol=2e-5, atol=2e-5)
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(sparse)
    gd = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, mask=mask) ** 2)))(dense)
    np.testing.assert_allclose(g["query"]["kernel"][...], gd["query"]["kernel"][...], rtol=1e-4,
                               atol=1e-5)
    # Same pattern -> same (hashable, equal) graphdef: nnx.jit reuses its compilation.
    other = SparseMultiHeadAttention(2, 8, qkv_features=12, pattern=patterns.strided(S, 3,
                                     causal=True), rngs=nnx.Rngs(1))
    assert nnx.graphdef(other) == nnx.graphdef(sparse)


def test_errors(rng):
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match=r"pattern.shape=\(16, 16\).*\(12, 12\)"):
        jaxsparse.attention(q, k, v, patterns.causal(16))
    sparse = SparseMultiHeadAttention(1, 4, pattern=patterns.causal(16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"pattern.shape=\(16, 16\).*\(12, 12\)"):
        nnx.jit(lambda m, x: m(x))(sparse, jnp.ones((1, S, 4), jnp.float32))


def test_fused_pallas_path_for_block_patterns(rng):
    """backend="pallas-interpret" runs the fused block-sparse kernel for a BSR pattern (an empty
    block row included) and agrees with the dense masked reference."""
    s, blk = 64, 16
    blocks = np.tri(s // blk, dtype=bool)
    blocks[2] = False  # queries 32..47 see no key
    p = patterns.from_mask(np.kron(blocks, np.ones((blk, blk), bool)), block_size=(blk, blk))
    q, k, v = (jnp.asarray(rng.standard_normal((1, s, 2, 16)), jnp.float32) for _ in range(3))
    fn = jax.jit(functools.partial(jaxsparse.attention, pattern=p, backend="pallas-interpret"))
    assert "pallas_call" in str(jax.make_jaxpr(fn)(q, k, v))
    allowed = jnp.asarray(np.asarray(p.todense()) != 0)[None, None]
    want = manual_reference(q.astype(jnp.float64), k.astype(jnp.float64), v.astype(jnp.float64),
                            allowed)
    np.testing.assert_allclose(np.asarray(fn(q, k, v), np.float64), want, rtol=1e-4, atol=1e-4)
    assert not np.asarray(fn(q, k, v)[:, 32:48]).any()
    # The reference backend never takes the fused kernel.
    ref = jax.jit(functools.partial(jaxsparse.attention, pattern=p, backend="reference"))
    assert "pallas_call" not in str(jax.make_jaxpr(ref)(q, k, v))
