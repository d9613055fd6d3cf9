"""SparseLinear / SparseMLP / SparseDense against dense Flax layers holding the masked weights,
under nnx.jit, jax.jit, nnx.vmap, jax.vmap and grad; sparsify / densify / save and load."""

import functools
import json

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

import jaxsparse
from jaxsparse.layers import FrozenWeight, SparseLinear, SparseMLP
from jaxsparse.layers.linen import SparseDense

CALL = nnx.jit(lambda m, x: m(x))
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.float64: dict(rtol=1e-12, atol=1e-12)}
CASES = [  # (format, method, options)
    ("csr", "magnitude", {}),
    ("csr", "n:m", {"n_m": (2, 4)}),
    ("bsr", "block", {"block_size": (2, 4)}),
    ("nm", "n:m", {"n_m": (1, 4)}),
]


def dense_twin(layer: SparseLinear) -> nnx.Linear:
    lin = nnx.Linear(layer.in_features, layer.out_features, use_bias=layer.use_bias,
                     param_dtype=layer.param_dtype, rngs=nnx.Rngs(1))
    lin.kernel[...] = layer.masked_kernel()
    if layer.use_bias:
        lin.bias[...] = layer.bias[...]
    return lin


def assert_device_state(layer):
    # Every array of the state is a device array: a NumPy one (as pruning builds the pattern)
    # would be copied to the device by every jitted call that takes the state.
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(layer))
    assert leaves and all(isinstance(v, jax.Array) for _, v in leaves), [
        jax.tree_util.keystr(p) for p, v in leaves if not isinstance(v, jax.Array)]


def make(fmt, method, opts, sparsity=0.5, dtype=jnp.float32, use_bias=True, shape=(16, 12)):
    layer = SparseLinear(*shape, sparsity=sparsity, method=method, format=fmt,
                         param_dtype=dtype, use_bias=use_bias,
                         bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0), **opts)
    return layer


@pytest.mark.parametrize("fmt,method,opts,dtype", [c + (jnp.float32,) for c in CASES]
                         + [CASES[0] + (jnp.float64,)])
def test_matches_dense_masked(rng, fmt, method, opts, dtype):
    layer = make(fmt, method, opts, dtype=dtype)
    lin = dense_twin(layer)
    mask = np.asarray(layer.mask())
    assert mask.shape == (16, 12)
    if method != "n:m":
        assert abs(layer.sparsity - 0.5) < 0.01 and abs(1 - mask.mean() - 0.5) < 0.01
    if fmt == "csr":  # the fixed pattern is stored with 16-bit column indices (jaxsparse.pack)
        assert layer.indices[...].dtype == np.uint16
    assert_device_state(layer)
    for shape in [(16,), (2, 3, 16)]:
        x = jnp.asarray(rng.standard_normal(shape), dtype)
        y = CALL(layer, x)
        assert y.shape == shape[:-1] + (12,) and y.dtype == dtype
        np.testing.assert_allclose(y, CALL(lin, x), **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_zero_sparsity_equals_linear(rng, dtype):
    # Same rngs -> same dense kernel as nnx.Linear; 0% sparsity keeps every weight.
    layer = SparseLinear(16, 12, sparsity=0.0, param_dtype=dtype, rngs=nnx.Rngs(3))
    lin = nnx.Linear(16, 12, param_dtype=dtype, rngs=nnx.Rngs(3))
    assert layer.nnz == 16 * 12
    np.testing.assert_array_equal(layer.masked_kernel(), lin.kernel[...])
    x = jnp.asarray(rng.standard_normal((4, 16)), dtype)
    np.testing.assert_allclose(CALL(layer, x), CALL(lin, x), **TOL[dtype])
    conv = SparseLinear.from_dense(lin, sparsity=0.0)
    np.testing.assert_allclose(CALL(conv, x), CALL(lin, x), **TOL[dtype])


@pytest.mark.parametrize("fmt,method,opts", CASES)
def test_transforms(rng, fmt, method, opts):
    layer = make(fmt, method, opts)
    lin = dense_twin(layer)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    want = CALL(lin, x)
    tol = TOL[jnp.float32]
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), want, **tol)
    graphdef, state = nnx.split(layer)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    np.testing.assert_allclose(jitted(state, x), want, **tol)
    np.testing.assert_allclose(nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(layer, x), want,
                               **tol)
    np.testing.assert_allclose(jax.vmap(jitted, in_axes=(None, 0))(state, x), want, **tol)


@pytest.mark.parametrize("fmt,method,opts", CASES)
def test_grad(rng, fmt, method, opts):
    layer = make(fmt, method, opts)
    lin = dense_twin(layer)
    x = jnp.asarray(rng.standard_normal((6, 16)), jnp.float32)
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
    g_sparse = nnx.grad(loss, argnums=(0, 1))(layer, x)
    g_dense = nnx.grad(loss, argnums=(0, 1))(lin, x)
    tol = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_sparse[1], g_dense[1], **tol)
    np.testing.assert_allclose(g_sparse[0]["bias"][...], g_dense[0]["bias"][...], **tol)
    # d/d values = the dense kernel gradient sampled at the pattern.
    grad_w = layer.weight.with_values(g_sparse[0]["data"][...]).todense().T
    np.testing.assert_allclose(grad_w, g_dense[0]["kernel"][...] * layer.mask().astype(jnp.float32), **tol)
    assert "indices" not in g_sparse[0] and "positions" not in g_sparse[0]
    # jax.grad through split/merge (params only; the pattern rides along as non-differentiable).
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    f = lambda p, x: loss(nnx.merge(graphdef, p, rest), x)
    g = jax.jit(jax.grad(f))(params, x)
    np.testing.assert_allclose(g["data"][...], g_sparse[0]["data"][...], **tol)


def test_mlp(rng):
    mlp = SparseMLP(16, 32, sparsity=0.8, rngs=nnx.Rngs(0))
    fc1, fc2 = dense_twin(mlp.fc1), dense_twin(mlp.fc2)
    x = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
    np.testing.assert_allclose(CALL(mlp, x), jax.jit(lambda x: fc2(jax.nn.gelu(fc1(x))))(x),
                               rtol=2e-5, atol=2e-5)
    mlp2 = SparseMLP.from_dense(fc1, fc2, sparsity=0.5)
    assert mlp2.fc1.nnz == 16 * 32 // 2 and mlp2.fc2.nnz == 16 * 32 // 2
    # Calibrated: fc2 sees the dense hidden activations.
    fc1, fc2 = nnx.Linear(16, 32, rngs=nnx.Rngs(1)), nnx.Linear(32, 16, rngs=nnx.Rngs(2))
    x = x * jnp.linspace(0.1, 4, 16, dtype=jnp.float32)
    hidden = jax.nn.gelu(fc1(x))
    for method, prune_fn in (("wanda", jaxsparse.prune.wanda),
                             ("sparsegpt", jaxsparse.prune.sparsegpt)):
        mlp3 = SparseMLP.from_dense(fc1, fc2, sparsity=0.5, method=method, calibration=x)
        for layer, dense, inputs in ((mlp3.fc1, fc1, x), (mlp3.fc2, fc2, hidden)):
            w, keep = prune_fn(dense.kernel[...].T, inputs, 0.5)
            np.testing.assert_array_equal(np.asarray(layer.mask()).T, np.asarray(keep))
            np.testing.assert_allclose(np.asarray(layer.masked_kernel()).T, np.asarray(w),
                                       rtol=1e-4, atol=1e-5)


def test_fused_activation_names():
    from jaxsparse.layers._linear import fused_activation

    for activation, fused in ((jax.nn.relu, "relu"), (jax.nn.gelu, "gelu_tanh"),
                              (functools.partial(jax.nn.gelu, approximate=False), "gelu"),
                              (functools.partial(jax.nn.gelu, approximate=True), "gelu_tanh"),
                              (jax.nn.silu, "silu"), ("gelu", "gelu"), (jnp.tanh, None),
                              (functools.partial(jax.nn.gelu, 1.0), None)):
        assert fused_activation(activation) == fused, activation


@pytest.mark.parametrize("activation, fused", [
    (functools.partial(jax.nn.gelu, approximate=False), "gelu"), ("silu", "silu"),
    (jnp.tanh, None)])
def test_mlp_activations(rng, activation, fused):
    """The activations the kernels know run inside fc1's product (SparseLinear(x, activation=));
    any other callable is applied in between. Both equal the dense twin."""
    mlp = SparseMLP(16, 32, activation=activation, sparsity=0.8, rngs=nnx.Rngs(0))
    fc1, fc2 = dense_twin(mlp.fc1), dense_twin(mlp.fc2)
    act = jaxsparse.ACTIVATIONS[activation] if isinstance(activation, str) else activation
    x = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
    np.testing.assert_allclose(CALL(mlp, x), jax.jit(lambda x: fc2(act(fc1(x))))(x),
                               rtol=2e-5, atol=2e-5)
    if fused is not None:
        np.testing.assert_allclose(CALL(mlp.fc1, x), jax.jit(lambda x: fc1(x))(x),
                                   rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(mlp.fc1(x, activation=fused), act(fc1(x)), rtol=2e-5,
                                   atol=2e-5)
    with pytest.raises(ValueError, match=r"activation must be a callable or one of .*'tanh'"):
        SparseMLP(16, 32, activation="tanh", rngs=nnx.Rngs(0))


def test_errors():
    layer = SparseLinear(8, 4, sparsity=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"inputs.shape\[-1\]=6.*in_features=8"):
        layer(jnp.ones((2, 6), jnp.float32))
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match="sparsity"):
            SparseLinear(8, 4, sparsity=bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"block_size=\(3, 3\).*\(4, 8\)"):
        SparseLinear(8, 4, sparsity=0.5, format="bsr", block_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"m=3 must divide in_features=8"):
        SparseLinear(8, 4, format="nm", n_m=(1, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="format='bsr' needs method='block'"):
        SparseLinear(8, 4, sparsity=0.5, format="bsr", method="magnitude", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="calibration"):
        SparseLinear.from_dense(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), sparsity=0.5, method="wanda")
    with pytest.raises(ValueError, match=r"x_calib.shape\[-1\]=5.*8"):
        SparseLinear.from_dense(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), sparsity=0.5, method="wanda",
                                calibration=jnp.ones((3, 5), jnp.float32))


# -- Linen ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_linen_sparse_dense(rng, n_m):
    x = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)
    layer = SparseDense(8, sparsity=0.75, n_m=n_m)
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    data = variables["params"]["kernel_data"]
    assert data.size == 16 * 8 // 4 * (2 if n_m else 1)
    # The same kernel draw as nn.Dense, pruned.
    kernel = nn.Dense(8).init(jax.random.key(0), x)["params"]["kernel"]
    want_vars = SparseDense.variables_from_dense(kernel, variables["params"]["bias"],
                                                 sparsity=0.75, n_m=n_m)
    for a, b in zip(jax.tree.leaves(want_vars), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
    mask = (np.asarray(jaxsparse.prune.n_m(kernel.T, *n_m)[1]) if n_m else
            np.asarray(jaxsparse.prune.magnitude(kernel.T, 0.75)[1])).T
    want = nn.Dense(8).apply({"params": {"kernel": jnp.where(mask, kernel, 0.0),
                                         "bias": variables["params"]["bias"]}}, x)
    y = jax.jit(layer.apply)(variables, x)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    g = jax.grad(lambda p: layer.apply({**variables, "params": p}, x).sum())(variables["params"])
    assert g["kernel_data"].shape == data.shape


# -- Model level -----------------------------------------------------------------------------

class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, x):
        return self.norm(x + self.down(jax.nn.relu(self.up(x))))


class Model(nnx.Module):
    def __init__(self, d=16, n=2, *, rngs):
        self.embed = nnx.Linear(8, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, rngs) for _ in range(n)])
        self.head = nnx.Linear(d, 4, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def masked_twin(sparse_model):
    twin = nnx.clone(sparse_model)
    return jaxsparse.densify(twin)


@pytest.mark.parametrize("method,fmt,kw", [("magnitude", "csr", {}), ("block", "bsr",
                                           {"block_size": 4}), ("wanda", "csr", {})])
def test_sparsify_equals_dense_masked(rng, method, fmt, kw):
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    dense = Model(rngs=nnx.Rngs(0))
    model = nnx.clone(dense)
    cal = (x,) if method == "wanda" else None
    model, report = jaxsparse.sparsify(model, sparsity=0.7, method=method, format=fmt,
                                       calibration=cal, **kw)
    assert len(report) == 6 and all(isinstance(m, SparseLinear) for m in
                                    (model.embed, model.blocks[1].down, model.head))
    json.loads(json.dumps(report))
    table = str(report)
    assert "blocks.0.up" in table and "total" in table
    if method != "n:m":
        assert all(abs(r["sparsity"] - 0.7) <= 0.1 for r in report)
    twin = masked_twin(model)
    assert isinstance(twin.head, nnx.Linear)
    np.testing.assert_allclose(CALL(model, x), CALL(twin, x), rtol=1e-4,
                               atol=1e-5)
    # The masked kernels are the dense model's kernels where kept.
    k = np.asarray(twin.blocks[0].up.kernel[...])
    kd = np.asarray(dense.blocks[0].up.kernel[...])
    np.testing.assert_array_equal(k[k != 0], kd[k != 0])


def test_sparsify_wanda_uses_activations(rng):
    # With the same weights, a calibration run that scales input feature j changes the mask
    # exactly as prune.wanda on the recorded inputs says; a callable calibration works under jit.
    x = jnp.asarray(rng.standard_normal((4, 8)) * np.linspace(0.1, 5, 8), jnp.float32)
    model = Model(n=1, rngs=nnx.Rngs(0))
    want = np.asarray(jaxsparse.prune.wanda(model.embed.kernel[...].T, x, 0.5)[1])
    h = model.embed(x)
    want_up = np.asarray(jaxsparse.prune.wanda(model.blocks[0].up.kernel[...].T, h, 0.5)[1])
    model, _ = jaxsparse.sparsify(model, sparsity=0.5, method="wanda",
                                  calibration=lambda m: nnx.jit(lambda m, x: m(x))(m, x))
    np.testing.assert_array_equal(np.asarray(model.embed.mask()).T, want)
    np.testing.assert_array_equal(np.asarray(model.blocks[0].up.mask()).T, want_up)


def test_sparsify_sparsegpt_uses_inputs(rng):
    # Each layer holds what prune.sparsegpt gives for its recorded inputs (the dense model's):
    # the mask and the updated kept weights; the model equals its densified twin.
    x = jnp.asarray(rng.standard_normal((3, 6, 8)) * np.linspace(0.1, 5, 8), jnp.float32)
    model = Model(n=1, rngs=nnx.Rngs(0))
    want = jaxsparse.prune.sparsegpt(model.embed.kernel[...].T, x, 0.5)
    h = model.embed(x)
    want_up = jaxsparse.prune.sparsegpt(model.blocks[0].up.kernel[...].T, h, 0.5)
    model, report = jaxsparse.sparsify(model, sparsity=0.5, method="sparsegpt", calibration=(x,))
    assert {r["method"] for r in report} == {"sparsegpt"}
    for layer, (w, keep) in ((model.embed, want), (model.blocks[0].up, want_up)):
        np.testing.assert_array_equal(np.asarray(layer.mask()).T, np.asarray(keep))
        np.testing.assert_allclose(np.asarray(layer.masked_kernel()).T, np.asarray(w),
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(CALL(model, x), CALL(masked_twin(model), x), rtol=1e-4, atol=1e-5)
    lin = nnx.Linear(8, 4, rngs=nnx.Rngs(1))
    layer = SparseLinear.from_dense(lin, sparsity=0.5, method="sparsegpt", calibration=x)
    w, keep = jaxsparse.prune.sparsegpt(lin.kernel[...].T, x, 0.5)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x @ w.T + lin.bias[...]),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="method='sparsegpt' needs calibration"):
        SparseLinear(8, 4, sparsity=0.5, method="sparsegpt", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="method='sparsegpt' needs calibration"):
        SparseLinear.from_dense(lin, sparsity=0.5, method="sparsegpt")
    with pytest.raises(ValueError, match="method='sparsegpt' needs calibration"):
        jaxsparse.sparsify(Model(rngs=nnx.Rngs(0)), sparsity=0.5, method="sparsegpt")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sparsify_calibration_memory_groups(rng, method):
    # A budget below every layer's statistic records one layer per calibration run, each run on
    # the dense model: the same pruned layers as one run with no limit.
    x = jnp.asarray(rng.standard_normal((3, 6, 8)) * np.linspace(0.1, 5, 8), jnp.float32)
    runs = []

    def calibration(m):
        runs.append(len(runs))
        return m(x)

    one, _ = jaxsparse.sparsify(Model(rngs=nnx.Rngs(0)), sparsity=0.5, method=method,
                                calibration=calibration, calibration_memory=None)
    assert len(runs) == 1
    runs.clear()
    grouped, report = jaxsparse.sparsify(Model(rngs=nnx.Rngs(0)), sparsity=0.5, method=method,
                                         calibration=calibration, calibration_memory=1)
    assert len(runs) == len(report) == 6
    for path in ("embed", "blocks.0.up", "blocks.1.down", "head"):
        a, b = (functools.reduce(getattr, path.split("."), m) for m in (one, grouped))
        np.testing.assert_array_equal(np.asarray(b.mask()), np.asarray(a.mask()))
        np.testing.assert_allclose(np.asarray(b.masked_kernel()), np.asarray(a.masked_kernel()),
                                   rtol=1e-6, atol=1e-7)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="calibration_memory must be a positive"):
            jaxsparse.sparsify(Model(rngs=nnx.Rngs(0)), sparsity=0.5, method=method,
                               calibration=(x,), calibration_memory=bad)


def test_sparsify_filter():
    model = Model(rngs=nnx.Rngs(0))
    model, report = jaxsparse.sparsify(nnx.clone(model), sparsity=0.5, filter=r"blocks\.\d+\.up")
    assert [r["path"] for r in report] == ["blocks.0.up", "blocks.1.up"]
    assert isinstance(model.blocks[0].down, nnx.Linear)
    model, report = jaxsparse.sparsify(Model(rngs=nnx.Rngs(0)), sparsity=0.5,
                                       filter=lambda path, m: m.out_features == 4)
    assert [r["path"] for r in report] == ["head"]
    with pytest.raises(ValueError, match=r"'blocks.0.down'.*block_size=\(3, 3\).*\(16, 64\)"):
        jaxsparse.sparsify(Model(rngs=nnx.Rngs(0)), sparsity=0.5, format="bsr", block_size=3)
    with pytest.raises(ValueError, match="sparsity"):
        jaxsparse.sparsify(Model(rngs=nnx.Rngs(0)), sparsity=1.0)


def _transposed_products(fn, *args):
    """The number of transposed SpMMs in ``fn``'s jaxpr: (with a transposition plan, without)."""
    counts = [0, 0]

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "jaxsparse_spmm" and eqn.params["transpose_a"]:
                counts[len(eqn.invars) != 7] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return tuple(counts)


def test_sparse_linear_transpose_plan(rng):
    # transpose_plan=True: the same layer (forward and gradients, against float64), whose input
    # gradient multiplies by W through the plan; sparsify passes the option on; CSR only.
    lin = nnx.Linear(24, 40, rngs=nnx.Rngs(0))
    plain = SparseLinear.from_dense(lin, sparsity=0.8)
    planned = SparseLinear.from_dense(lin, sparsity=0.8, transpose_plan=True)
    assert planned.transpose_plan and planned.weight.plan is not None
    assert_device_state(planned)
    x = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.float32)
    w64 = np.asarray(plain.masked_kernel(), np.float64)
    loss = lambda layer, x: jnp.sum(jnp.sin(layer(x, activation="gelu")))
    for layer in (plain, planned):
        np.testing.assert_allclose(layer(x), np.asarray(x, np.float64) @ w64
                                   + np.asarray(lin.bias[...], np.float64),
                                   **TOL[jnp.float32])
    g_plain = nnx.grad(loss, argnums=(0, 1))(plain, x)
    g_planned = nnx.grad(loss, argnums=(0, 1))(planned, x)
    np.testing.assert_allclose(g_planned[1], g_plain[1], **TOL[jnp.float32])
    np.testing.assert_allclose(g_planned[0].data[...], g_plain[0].data[...], **TOL[jnp.float32])
    grad_x = lambda layer: (lambda x: jax.grad(lambda x: loss(layer, x))(x))
    assert _transposed_products(grad_x(planned), x) == (1, 0)
    assert _transposed_products(grad_x(plain), x) == (0, 1)
    model, _ = jaxsparse.sparsify(Model(rngs=nnx.Rngs(0)), sparsity=0.5, transpose_plan=True)
    assert model.blocks[0].up.transpose_plan and model.head.weight.plan is not None
    with pytest.raises(ValueError, match="transpose_plan=True needs format='csr'"):
        SparseLinear(8, 4, sparsity=0.5, format="bsr", block_size=2, transpose_plan=True,
                     rngs=nnx.Rngs(0))


def test_sparse_linear_matvec(rng):
    # matvec=True: one input vector at a time goes through the sliced copy (the native
    # matrix-vector product), more rows through the CSR product; both against float64. The values
    # are frozen (not a Param: an optimizer cannot change them without their copy); gradients
    # still reach the inputs and the bias. sparsify passes the option on; CSR float32 only.
    lin = nnx.Linear(150, 70, rngs=nnx.Rngs(0))  # 3 column windows; 70 rows: a partial slice
    plain = SparseLinear.from_dense(lin, sparsity=0.8)
    mv = SparseLinear.from_dense(lin, sparsity=0.8, matvec=True)
    assert mv.matvec and not plain.matvec and isinstance(mv.data, FrozenWeight)
    assert mv.weight.matvec is not None
    assert_device_state(mv)
    w64 = np.asarray(plain.masked_kernel(), np.float64)
    b64 = np.asarray(lin.bias[...], np.float64)
    for shape in [(150,), (1, 150), (1, 1, 150), (4, 150)]:
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        ref = np.asarray(x, np.float64) @ w64 + b64
        np.testing.assert_allclose(CALL(mv, x), ref, **TOL[jnp.float32])
        gelu = nnx.jit(lambda m, x: m(x, activation="gelu"))(mv, x)
        np.testing.assert_allclose(gelu, ref * (1 + scipy.special.erf(ref / np.sqrt(2))) / 2,
                                   **TOL[jnp.float32])
    x = jnp.asarray(rng.standard_normal((1, 150)), jnp.float32)
    uses_sliced = lambda layer: "jaxsparse_sell_spmv" in str(jax.make_jaxpr(layer)(x))
    assert uses_sliced(mv) and not uses_sliced(plain)
    loss = lambda layer, x: jnp.sum(jnp.sin(layer(x)))
    g_mv = nnx.grad(loss, argnums=(0, 1))(mv, x)
    g_plain = nnx.grad(loss, argnums=(0, 1))(plain, x)
    np.testing.assert_allclose(g_mv[1], g_plain[1], **TOL[jnp.float32])
    assert list(nnx.to_pure_dict(g_mv[0])) == ["bias"]
    np.testing.assert_allclose(g_mv[0].bias[...], g_plain[0].bias[...], **TOL[jnp.float32])
    x = jnp.asarray(rng.standard_normal((8,)), jnp.float32)
    model, _ = jaxsparse.sparsify(Model(rngs=nnx.Rngs(0)), sparsity=0.5, matvec=True)
    assert model.blocks[0].up.matvec and model.head.weight.matvec is not None
    np.testing.assert_allclose(CALL(model, x), CALL(masked_twin(model), x), rtol=1e-4,
                               atol=1e-5)
    for kw in ({"format": "bsr", "block_size": 2}, {"param_dtype": jnp.float64}):
        with pytest.raises(ValueError, match="matvec=True needs format='csr' and float32"):
            SparseLinear(8, 4, sparsity=0.5, matvec=True, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("fmt,kw", [("csr", {}), ("bsr", {"block_size": 4}),
                                    ("nm", {"n_m": (2, 4)}), ("csr", {"transpose_plan": True}),
                                    ("csr", {"matvec": True})])
def test_save_load_round_trip(tmp_path, rng, fmt, kw):
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    model, _ = jaxsparse.sparsify(Model(rngs=nnx.Rngs(0)), sparsity=0.6, format=fmt,
                                  filter="blocks", **kw)
    jaxsparse.save_state(tmp_path / "m.npz", model)
    # Load into a fresh *dense* model of the same architecture (other random weights).
    loaded = jaxsparse.load_state(tmp_path / "m.npz", Model(rngs=nnx.Rngs(7)))
    assert isinstance(loaded.blocks[1].up, SparseLinear) and isinstance(loaded.head, nnx.Linear)
    a = nnx.to_pure_dict(nnx.state(model))
    b = nnx.to_pure_dict(nnx.state(loaded))
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (_, u), (_, v) in zip(la, lb):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(CALL(loaded, x), CALL(model, x))
    assert nnx.graphdef(loaded) == nnx.graphdef(model)
