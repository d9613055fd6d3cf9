"""Backend selection: which implementation the sparse primitives lower to.

The choice is resolved when a primitive is bound and stored as a static parameter of the bound
equation, so it takes part in jit's cache key: switching backends never reuses a stale compile.
"""

from __future__ import annotations

import contextlib
import os
import threading

#: ``auto`` picks the fastest implementation available on the platform (the native CPU kernels on
#: CPU, falling back to the reference where a kernel does not apply); ``reference`` is the pure-JAX
#: implementation valid on every platform; ``ffi`` requires the native CPU kernels; ``pallas`` the
#: Pallas (Triton) GPU kernels, ``pallas-interpret`` the same kernels in interpret mode on any
#: platform (slow; for testing). ``auto`` on a GPU uses the Pallas kernels where they apply.
BACKENDS = ("auto", "reference", "ffi", "pallas", "pallas-interpret")

_ENV_VAR = "JAXSPARSE_BACKEND"
_local = threading.local()


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown jaxsparse backend {name!r}; expected one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend in force: ``use_backend`` override, else ``$JAXSPARSE_BACKEND``, else ``auto``."""
    override = getattr(_local, "backend", None)
    if override is not None:
        return override
    return _check(os.environ.get(_ENV_VAR, "auto") or "auto", f"${_ENV_VAR}")


def resolve_backend(backend: str | None) -> str:
    """Validate an explicit ``backend=`` argument, or fall back to :func:`get_backend`."""
    if backend is None:
        return get_backend()
    return _check(backend, "backend")


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager selecting the backend for primitives bound inside it (this thread only).

    >>> a, x = jaxsparse.CSR.fromdense(jnp.eye(2)), jnp.ones(2)
    >>> with jaxsparse.use_backend("reference"):
    ...     print(jaxsparse.matmul(a, x).tolist())
    [1.0, 1.0]
    """
    _check(name, "use_backend")
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous
