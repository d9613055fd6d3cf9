"""A first look at jaxsparse: a pruned linear layer's weight as CSR, used under jit, vmap and grad.

Run: ``make demo`` (or ``python examples/spmm_demo.py`` inside the venv).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse


def median_ms(fn, *args, reps=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main():
    rng = np.random.default_rng(0)
    out_features, in_features, tokens, sparsity = 3072, 768, 128, 0.9
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0.0  # a pruned weight, stored [out, in] like a layer's
    x = rng.standard_normal((tokens, in_features)).astype(np.float32)

    ws = jaxsparse.CSR.fromdense(w)
    print(f"weight: {ws}  ({1 - ws.nnz / w.size:.0%} sparse)")
    print(f"native CPU kernels: {jaxsparse.ffi.AVAILABLE}")

    sparse_fn = jax.jit(lambda w, x: x @ w.T)  # the linear layout: no transposed copy of w
    dense_fn = jax.jit(lambda w, x: x @ w.T)
    y = sparse_fn(ws, x)
    err = np.abs(np.asarray(y, np.float64) - x.astype(np.float64) @ w.T.astype(np.float64)).max()
    print(f"x @ W.T: shape {y.shape}, max |error| vs float64 dense = {err:.2e}")

    t_dense = median_ms(dense_fn, jnp.asarray(w), x)
    t_sparse = median_ms(sparse_fn, ws, x)
    print(f"jit time: dense {t_dense:.3f} ms, sparse {t_sparse:.3f} ms "
          f"({t_dense / t_sparse:.2f}x)")

    # It composes like any lax op: vmap over a batch of inputs, grad with respect to the kept values.
    xb = rng.standard_normal((4, tokens, in_features)).astype(np.float32)
    yb = jax.vmap(lambda x: x @ ws.T)(xb)
    print(f"vmap over 4 inputs: {yb.shape}")
    g = jax.grad(lambda d: jnp.sum((x @ ws.with_values(d).T) ** 2))(ws.data)
    print(f"grad w.r.t. the {g.shape[0]} kept values: |g| = {float(jnp.linalg.norm(g)):.3e}")


if __name__ == "__main__":
    main()
