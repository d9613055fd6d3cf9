"""jaxsparse: sparse inference for JAX.

Sparse formats (:class:`CSR`, :class:`BSR`, :class:`NM`), the primitives :data:`spmm_p`
(:data:`spmm_fused_p`: with a bias and an activation) and :data:`sddmm_p` with autodiff and
batching, and their public functions :func:`matmul` and :func:`sddmm`; sparse attention
(:func:`attention`, :mod:`patterns`), pruning (:mod:`prune`), Flax layers (:mod:`layers`) and
model sparsification (:func:`sparsify`, :func:`densify`, :func:`save_state`, :func:`load_state`).
On CPU the primitives lower to native kernels through XLA FFI where available.
"""

from jaxsparse._config import BACKENDS, get_backend, use_backend
from jaxsparse._formats import BSR, CSR, NM, SparseMatrix
from jaxsparse._sddmm import sddmm, sddmm_p
from jaxsparse._spmm import ACTIVATIONS, matmul, spmm_fused_p, spmm_p
from jaxsparse._attention import attention
from jaxsparse._pack import PackedCSR, SlicedMatvec, TransposePlan, pack
from jaxsparse import dlmc, ffi  # ffi registers the native CPU kernels and lowerings
from jaxsparse import pallas  # Pallas GPU kernels (+ interpret mode); chains after ffi's CPU rule
from jaxsparse import patterns, prune, sharding

# Flax is optional: the layers and the model-level functions load on first use.
_LAZY = {"layers": None, "sparsify": "_sparsify", "densify": "_sparsify",
         "save_state": "_sparsify", "load_state": "_sparsify"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxsparse' has no attribute {name!r}")
    import importlib
    if _LAZY[name] is None:
        return importlib.import_module(f"jaxsparse.{name}")
    return getattr(importlib.import_module(f"jaxsparse.{_LAZY[name]}"), name)


__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "BACKENDS", "BSR", "CSR", "NM", "PackedCSR", "SlicedMatvec", "SparseMatrix",
    "TransposePlan", "attention", "densify", "dlmc", "ffi", "get_backend", "layers", "load_state",
    "matmul", "pack", "pallas", "patterns", "prune", "save_state", "sddmm", "sddmm_p", "sharding",
    "sparsify", "spmm_fused_p", "spmm_p", "use_backend",
]
