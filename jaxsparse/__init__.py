"""jaxsparse: sparse inference for JAX.

Sparse formats (:class:`CSR`, :class:`BSR`, :class:`NM`), the primitives :data:`spmm_p` and
:data:`sddmm_p` with autodiff and batching, and their public functions :func:`matmul` and
:func:`sddmm`. On CPU the primitives lower to native kernels through XLA FFI where available.
"""

from jaxsparse._config import BACKENDS, get_backend, use_backend
from jaxsparse._formats import BSR, CSR, NM, SparseMatrix
from jaxsparse._sddmm import sddmm, sddmm_p
from jaxsparse._spmm import matmul, spmm_p
from jaxsparse import dlmc, ffi  # ffi registers the native CPU kernels and lowerings
from jaxsparse import sharding

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BSR", "CSR", "NM", "SparseMatrix", "dlmc", "ffi", "get_backend", "matmul", "sddmm",
    "sddmm_p", "sharding", "spmm_p", "use_backend",
]
