"""Sparse Flax NNX layers: :class:`SparseLinear`, :class:`SparseMLP`,
:class:`SparseMultiHeadAttention` (and :mod:`jaxsparse.layers.linen` for Flax Linen)."""

from jaxsparse.layers._linear import FrozenWeight, SparseLinear, SparseMLP, SparsityPattern
from jaxsparse.layers._attention import SparseMultiHeadAttention

__all__ = ["FrozenWeight", "SparseLinear", "SparseMLP", "SparseMultiHeadAttention",
           "SparsityPattern"]
