"""Sharding: matmul, sddmm and a tensor-parallel sparse MLP on a 4-device mesh.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before JAX initialises, and the
test process has already initialised it, so the multi-device cases run in one child Python (this
file run as a script) that prints one JSON line per case; the tests assert on those lines.
``split_rows`` itself is tested in-process.

The cases use an ``AxisType.Auto`` mesh, but for the ``explicit-mesh`` ones: on
``AxisType.Explicit`` axes (the default of ``jax.make_mesh``) the products are computed
replicated (the reference path gathers the operands its types shard,
``jaxsparse._formats.gathered``; the native kernels' custom calls take them whole) and their
outputs are replicated. Still a gap there: ``lax.map`` over a
sharded batch of sparse values refuses a sharded leading axis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

N_DEV = 4


# ----------------------------------------------------------------------------------------------
# The child: runs every case on a 4-device CPU mesh.


def _child_cases():
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jaxsparse
    from jaxsparse.sharding import local, split_rows

    assert len(jax.devices()) == N_DEV, jax.devices()
    # Auto axes (GSPMD propagation); Explicit axes: the explicit-mesh cases.
    mesh = jax.make_mesh((N_DEV,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    # The parent names the backends (on CPU "auto" only picks between the native kernels and the
    # reference, which are both run).
    backends = sys.argv[1].split(",")

    from sparse_testing import random_sparse  # tests/ is the child's sys.path[0]

    def sparse(shape, fmt, density=0.3):
        return random_sparse(rng, shape, density, fmt, jnp.float64, block=(2, 2))

    def check(out, expected, tol=1e-10):
        np.testing.assert_allclose(np.asarray(out), expected, rtol=tol, atol=tol)

    cases = {}

    def case(name):
        def register(fn):
            cases[name] = fn
            return fn
        return register

    for backend in backends:
        for fmt in ("csr", "bsr", "nm"):
            @case(f"jit-batch-sharded-{fmt}-{backend}")
            def _(backend=backend, fmt=fmt):
                w, w64 = sparse((16, 12), fmt)  # a weight stored [out, in]
                x = rng.standard_normal((8, 12))
                xs = jax.device_put(x, NamedSharding(mesh, P("x", None)))
                wr = jax.device_put(w, NamedSharding(mesh, P()))
                f = jax.jit(lambda w, x: jaxsparse.matmul(x, w.T, backend=backend),
                            out_shardings=NamedSharding(mesh, P("x", None)))
                out = f(wr, xs)
                check(out, x @ w64.T)
                assert out.sharding.spec == P("x", None), out.sharding

            @case(f"shard_map-batch-{fmt}-{backend}")
            def _(backend=backend, fmt=fmt):
                w, w64 = sparse((16, 12), fmt)
                x = rng.standard_normal((8, 12))

                @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("x", None)),
                                   out_specs=P("x", None))
                def f(w, x):
                    return jaxsparse.matmul(x, w.T, backend=backend)

                check(jax.jit(f)(w, x), x @ w64.T)

            @case(f"sddmm-{fmt}-{backend}")
            def _(backend=backend, fmt=fmt):
                p, p64 = sparse((8, 12), fmt)
                a, b = rng.standard_normal((8, 5)), rng.standard_normal((5, 12))
                stored = np.asarray(p.with_values(jnp.ones_like(p.values)).todense()) != 0
                # Batch of independent SDDMMs (e.g. heads) sharded over the mesh, under jit.
                ab = np.stack([a * (i + 1) for i in range(N_DEV)])
                f = jax.jit(jax.vmap(lambda a: jaxsparse.sddmm(a, b, p, backend=backend).values),
                            in_shardings=NamedSharding(mesh, P("x")))
                out = f(jax.device_put(ab, NamedSharding(mesh, P("x"))))
                for i in range(N_DEV):
                    check(p.with_values(out[i]).todense(), np.where(stored, ab[i] @ b, 0.0))

                @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("x"), P()),
                                   out_specs=P("x"))
                def g(a, b):
                    return jaxsparse.sddmm(a[0], b, p, backend=backend).values[None]

                out = jax.jit(g)(ab, b)
                for i in range(N_DEV):
                    check(p.with_values(out[i]).todense(), np.where(stored, ab[i] @ b, 0.0))

        for fmt in ("csr", "bsr"):
            @case(f"tensor-parallel-mlp-{fmt}-{backend}")
            def _(backend=backend, fmt=fmt):
                # Tensor-parallel sparse MLP: y = relu(x @ W1.T) @ W2.T with W1 [hidden, in] split
                # by output rows and W2 kept as W2t = W2.T [hidden, out] split by rows (its input
                # features): each device computes its slice of the hidden layer and a partial
                # output, summed over the mesh.
                hidden, d_in, d_out = 16, 12, 8
                w1, w164 = sparse((hidden, d_in), fmt)
                w2t, w2t64 = sparse((hidden, d_out), fmt)
                x = rng.standard_normal((6, d_in))
                expected = np.maximum(x @ w164.T, 0) @ w2t64
                w1s, w2s = split_rows(w1, N_DEV), split_rows(w2t, N_DEV)
                spec = NamedSharding(mesh, P("x"))
                w1s, w2s = jax.device_put(w1s, spec), jax.device_put(w2s, spec)

                @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("x"), P("x")),
                                   out_specs=P())
                def mlp(x, w1, w2t):
                    h = jax.nn.relu(jaxsparse.matmul(x, local(w1).T, backend=backend))
                    return jax.lax.psum(jaxsparse.matmul(h, local(w2t), backend=backend), "x")

                out = jax.jit(mlp)(x, w1s, w2s)
                check(out, expected)
                # The same on one device, unsharded, gives the same numbers.
                single = jax.nn.relu(jaxsparse.matmul(x, w1.T, backend=backend))
                check(out, np.asarray(jaxsparse.matmul(single, w2t, backend=backend)))
                # Gradients with respect to the sharded values flow through shard_map.
                g = jax.jit(jax.grad(lambda v: jnp.sum(mlp(x, w1s.with_values(v), w2s) ** 2)))(
                    w1s.values)
                assert g.shape == w1s.values.shape and np.isfinite(np.asarray(g)).all()
        @case(f"explicit-mesh-{backend}")
        def _(backend=backend):
            explicit = jax.make_mesh((N_DEV,), ("x",),
                                     axis_types=(jax.sharding.AxisType.Explicit,))
            w, w64 = sparse((16, 12), "csr")
            x = rng.standard_normal((8, 12))
            bias = rng.standard_normal(16)
            xs = jax.device_put(x, NamedSharding(explicit, P("x", None)))
            with jax.set_mesh(explicit):
                check(jax.jit(lambda w, x: jaxsparse.matmul(x, w.T, backend=backend))(w, xs),
                      x @ w64.T)
                check(jax.jit(lambda w, x: jaxsparse.matmul(w, x.T, backend=backend))(w, xs),
                      w64 @ x.T)
                fused = jax.jit(lambda w, x: jaxsparse.matmul(x, w.T, bias=bias,
                                                              activation="relu", backend=backend))
                check(fused(w, xs), np.maximum(x @ w64.T + bias, 0))
                g = jax.jit(jax.grad(lambda v, x: jnp.sum(
                    jaxsparse.matmul(x, w.with_values(v).T, backend=backend) ** 2)))(w.values, xs)
                stored = np.asarray(w.with_values(jnp.ones_like(w.values)).todense()) != 0
                check(w.with_values(g).todense(), np.where(stored, 2 * (x @ w64.T).T @ x, 0))
                p, _ = sparse((12, 12), "csr")
                out = jax.jit(lambda x: jaxsparse.sddmm(x.T, x, p, backend=backend).values)(xs)
                pat = np.asarray(p.with_values(jnp.ones_like(p.values)).todense()) != 0
                check(p.with_values(out).todense(), np.where(pat, x.T @ x, 0))
    return cases


def _child_main():
    import jax
    jax.config.update("jax_enable_x64", True)
    for name, fn in _child_cases().items():
        try:
            fn()
            result = {"case": name, "ok": True}
        except NotImplementedError as e:
            result = {"case": name, "ok": None, "why": str(e)}
        except Exception:  # noqa: BLE001 - reported to the parent
            result = {"case": name, "ok": False, "why": traceback.format_exc()[-3000:]}
        print("CASE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child_main()
    sys.exit(0)


# ----------------------------------------------------------------------------------------------
# The tests (parent process).

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jaxsparse  # noqa: E402
from jaxsparse.sharding import local, split_rows  # noqa: E402


def run_child(backends):
    """The child's results for ``backends``: {case name: {"ok": ..., "why": ...}}."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={N_DEV}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), ",".join(backends)],
                          env=env, capture_output=True, text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            r = json.loads(line[5:])
            results[r["case"]] = r
    assert proc.returncode == 0 and results, (
        f"child exited with {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-5000:]}")
    return results


# The Pallas kernels in interpret mode take most of the child's time: the quick run leaves them out.
@pytest.mark.parametrize("backends", [("reference", "ffi"),
                                      pytest.param(("pallas-interpret",), marks=pytest.mark.slow)])
def test_multi_device_cases(backends):
    """Every child case passed (or had no kernel on its backend); all are listed on failure."""
    child_results = run_child(backends)
    failed = {k: v["why"] for k, v in child_results.items() if v["ok"] is False}
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
    assert any(k.startswith("tensor-parallel-mlp") and v["ok"] for k, v in child_results.items())
    assert any(k.startswith("shard_map-batch") and v["ok"] for k, v in child_results.items())
    assert any(k.startswith("sddmm") and v["ok"] for k, v in child_results.items())
    assert any(k.startswith("explicit-mesh") and v["ok"] for k, v in child_results.items())


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_split_rows_shards_reassemble(rng, fmt):
    dense = rng.standard_normal((8, 6)) * (rng.random((8, 6)) < 0.4)
    dense[0] = rng.standard_normal(6)  # a full row: shard 0 has the most entries
    dense[4:6] = 0  # an empty shard half
    if fmt == "csr":
        a = jaxsparse.CSR.fromdense(dense)
    else:
        a = jaxsparse.BSR.fromdense(dense, block_size=(2, 3))
    s = split_rows(a, 4)
    assert s.shape == (2, 6) and s.values.shape[0] == 4
    for i in range(4):
        part = jax.tree.map(lambda x: x[i:i + 1], s)
        shard = local(part)
        # Each shard is a valid matrix (the constructor re-validates sorted, unique entries).
        type(a)(shard._children(), shape=shard.shape)
        np.testing.assert_array_equal(np.asarray(shard.todense()), dense[2 * i:2 * i + 2])
    # Shapes line up, so the shards stack and vmap over the leading axis.
    x = rng.standard_normal((6, 3))
    out = jax.vmap(lambda w: jaxsparse.matmul(w, x))(s)
    np.testing.assert_allclose(np.asarray(out).reshape(8, 3), dense @ x, rtol=1e-12, atol=1e-12)
    assert split_rows(a.T, 2).transposed


def test_split_rows_errors():
    a = jaxsparse.CSR.fromdense(np.eye(6))
    with pytest.raises(ValueError, match=r"n_shards=4 must divide the 6 stored rows"):
        split_rows(a, 4)
    with pytest.raises(TypeError, match=r"expected a CSR or BSR"):
        split_rows(jaxsparse.NM.fromdense(np.eye(4), n=1, m=2), 2)
    with pytest.raises(TypeError, match=r"concrete arrays"):
        jax.jit(lambda a: split_rows(a, 2).values)(a)
    with pytest.raises(ValueError, match=r"leading shard axis of size 1"):
        local(split_rows(a, 2))
