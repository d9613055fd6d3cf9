"""Reading the DLMC (Deep Learning Matrix Collection) sparsity patterns.

DLMC ``.smtx`` files hold only a CSR pattern (three lines: ``rows, cols, nnz``; the ``indptr``;
the column indices). The data set is not part of jaxsparse: point :func:`root` at a copy with the
``JAXSPARSE_DLMC`` environment variable (default ``../shared/dlmc`` relative to the working directory).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxsparse._formats import CSR

__all__ = ["root", "load_smtx", "transformer_files"]


def root() -> Path:
    """The DLMC directory: ``$JAXSPARSE_DLMC`` or ``../shared/dlmc``."""
    return Path(os.environ.get("JAXSPARSE_DLMC", "../shared/dlmc"))


def load_smtx(path, *, seed: int = 0, dtype=np.float32) -> CSR:
    """Load an ``.smtx`` pattern as a :class:`CSR` (device arrays, like ``CSR.fromdense``) with
    seeded standard-normal values."""
    path = Path(path)
    with path.open() as f:
        header = f.readline().replace(",", " ").split()
        if len(header) != 3:
            raise ValueError(f"load_smtx: {path}: first line must be 'rows, cols, nnz', "
                             f"got {header!r}")
        rows, cols, nnz = (int(h) for h in header)
        indptr = np.array(f.readline().split(), dtype=np.int64)
        indices = np.array(f.readline().split(), dtype=np.int64) if nnz else np.zeros(0, np.int64)
    if indptr.shape != (rows + 1,) or indices.shape != (nnz,):
        raise ValueError(f"load_smtx: {path}: expected {rows + 1} row offsets and {nnz} indices, "
                         f"got {indptr.shape[0]} and {indices.shape[0]}")
    data = np.random.default_rng(seed).standard_normal(nnz).astype(dtype)
    return CSR((jnp.asarray(data), jnp.asarray(indices.astype(np.int32)),
                jnp.asarray(indptr.astype(np.int32))), shape=(rows, cols))


def transformer_files(sparsity: str = "0.9", method: str = "magnitude_pruning",
                      directory=None) -> list[Path]:
    """The transformer ``.smtx`` files of one pruning method and sparsity ([] when absent)."""
    base = Path(directory) if directory is not None else root()
    return sorted((base / "transformer" / method / sparsity).glob("*.smtx"))
