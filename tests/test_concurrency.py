"""Concurrency and resources: jitted sparse functions called from many threads at once give the
right answer, and repeated calls of every kernel do not grow resident memory."""

from __future__ import annotations

import gc
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse
from sparse_testing import assert_close, random_sparse

CPU = jax.default_backend() == "cpu"
# The quick run checks the native kernels (the code of this project that threads could race in);
# the pure-JAX reference and the interpreted Pallas kernels run with the slow tests.
BACKENDS = [pytest.param(b, marks=pytest.mark.slow) if b in ("pallas-interpret", "reference") else b
            for b in jaxsparse.BACKENDS
            if not (CPU and (b == "auto" or (b.startswith("pallas") and "interpret" not in b)))]
N_THREADS = 8


def _kernels(rng, backend):
    """(name, jitted fn, args, float64 expected) for every op and format on ``backend``."""
    cases = []
    for fmt in ("csr", "bsr", "nm"):
        a, a64 = random_sparse(rng, (16, 24), 0.3, fmt, jnp.float64)
        x = rng.standard_normal((24, 4))
        y = rng.standard_normal((3, 16))
        l, r = rng.standard_normal((16, 5)), rng.standard_normal((5, 24))
        stored = np.asarray(a.with_values(jnp.ones_like(a.values)).todense()) != 0
        cases += [
            (f"{fmt}-A@X", jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend=backend)),
             (a, x), a64 @ x),
            (f"{fmt}-X@A", jax.jit(lambda a, y: jaxsparse.matmul(y, a, backend=backend)),
             (a, y), y @ a64),
            (f"{fmt}-sddmm", jax.jit(lambda a, l, r: jaxsparse.sddmm(l, r, a,
                                                                     backend=backend).todense()),
             (a, l, r), np.where(stored, l @ r, 0.0)),
        ]
    usable = []
    for name, fn, args, expected in cases:
        try:
            jax.block_until_ready(fn(*args))  # compile once, before the threads start
        except NotImplementedError:
            continue
        usable.append((name, fn, args, expected))
    return usable


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_share_jitted_functions(rng, backend):
    """8 threads call every compiled kernel at once (with their own operands); all results are
    right. Also compiles from several threads at the same time (the first calls of a fresh jit)."""
    kernels = _kernels(rng, backend)
    errors, barrier = [], threading.Barrier(N_THREADS)

    def worker(t):
        try:
            barrier.wait()
            for _ in range(3):
                for name, fn, args, expected in kernels:
                    scale = float(t + 1)
                    sargs = (args[0], args[1] * scale, *args[2:])  # linear in args[1]
                    out = fn(*sargs)
                    assert_close(out, expected * scale, jnp.float64)
            fresh = jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend=backend) * 2.0)
            name, _, args, expected = kernels[0]
            assert_close(fresh(*args), expected * 2.0, jnp.float64)
        except BaseException as e:  # noqa: BLE001 - reported below with the thread id
            errors.append((t, repr(e)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_do_not_grow_memory(rng, backend):
    """10,000 calls of each kernel: resident memory grows by less than a bounded tolerance after
    a warm-up (a leak of even one small buffer per call would show: 10,000 x 16 x 4 x 8 bytes is
    5 MB per kernel)."""
    kernels = [k for k in _kernels(rng, backend) if "X@A" not in k[0]]  # same kernel as A@X
    calls = int(os.environ.get("JAXSPARSE_LEAK_CALLS", "10000"))

    def run(n):
        for name, fn, args, _ in kernels:
            out = None
            for _ in range(n):
                out = fn(*args)
            jax.block_until_ready(out)

    run(200)  # warm-up: allocator pools, caches
    gc.collect()
    before = _rss_bytes()
    run(calls)
    gc.collect()
    grown = _rss_bytes() - before
    tolerance = 16 * 2**20
    assert grown < tolerance, (f"resident memory grew by {grown / 2**20:.1f} MiB over {calls} calls "
                               f"of {len(kernels)} kernels (tolerance {tolerance / 2**20:.0f} MiB)")
