"""SparseMultiHeadAttention: ``nnx.MultiHeadAttention`` with attention on a static sparse pattern."""

from __future__ import annotations

import hashlib

import numpy as np
from flax import nnx

from jaxsparse._attention import attention
from jaxsparse._formats import SparseMatrix

__all__ = ["SparseMultiHeadAttention"]


class StaticPattern:
    """A sparse pattern held on the host as NumPy arrays: hashable and compared by content, so it
    can live in a module's static structure (graphdef) and enter ``jit`` as a constant."""

    def __init__(self, pattern: SparseMatrix):
        if not isinstance(pattern, SparseMatrix):
            raise TypeError(f"pattern must be a jaxsparse matrix (see jaxsparse.patterns), got "
                            f"{type(pattern).__name__}")
        if pattern.transposed:
            raise ValueError("pattern must be passed as stored [q_len, k_len], not a .T view")
        children, aux = pattern.tree_flatten()
        self._cls = type(pattern)
        self._aux = aux
        self._children = tuple(np.asarray(c) for c in children)
        h = hashlib.sha1(repr((self._cls.__name__, aux)).encode())
        for c in self._children[1:]:  # the structure; the values are ignored by attention
            h.update(c.tobytes())
        h.update(repr(self._children[0].shape).encode())
        self._digest = h.hexdigest()

    @property
    def shape(self):
        return self.matrix().shape

    def matrix(self) -> SparseMatrix:
        return self._cls.tree_unflatten(self._aux, self._children)

    def __hash__(self):
        return hash(self._digest)

    def __eq__(self, other):
        return isinstance(other, StaticPattern) and other._digest == self._digest

    def __repr__(self):
        return f"StaticPattern({self.matrix()!r})"


class PatternAttention:
    """``attention_fn`` for ``nnx.MultiHeadAttention``: :func:`jaxsparse.attention` on a fixed
    pattern (static, hashable)."""

    def __init__(self, pattern, *, fold_heads: bool | None = None):
        self.pattern = pattern if isinstance(pattern, StaticPattern) else StaticPattern(pattern)
        self.fold_heads = fold_heads

    def __call__(self, query, key, value, **kwargs):
        return attention(query, key, value, self.pattern.matrix(), fold_heads=self.fold_heads,
                         **kwargs)

    def __hash__(self):
        return hash((self.pattern, self.fold_heads))

    def __eq__(self, other):
        return (isinstance(other, PatternAttention) and other.pattern == self.pattern
                and other.fold_heads == self.fold_heads)


class SparseMultiHeadAttention(nnx.MultiHeadAttention):
    """Multi-head attention whose queries attend only to the keys of a static sparse ``pattern``
    ``[q_len, k_len]`` (see :mod:`jaxsparse.patterns`), computed as SDDMM -> softmax over the
    stored entries -> SpMM, never forming the ``q_len x k_len`` scores.

    The constructor is :class:`flax.nnx.MultiHeadAttention`'s (every keyword passes through, so the
    projections and their parameters are identical) plus the keyword-only ``pattern``; the
    sequence lengths of the inputs must match ``pattern.shape``. A query row without allowed keys
    gives zeros. ``decode`` (autoregressive caching) and dropout inside attention are not
    supported. An extra ``mask`` passed at call time is applied on top of the pattern.

    >>> p = jaxsparse.patterns.local(16, window=2)
    >>> mha = SparseMultiHeadAttention(2, 8, pattern=p, decode=False, rngs=nnx.Rngs(0))
    >>> mha(jnp.ones((1, 16, 8), jnp.float32)).shape
    (1, 16, 8)
    """

    def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
                 out_features: int | None = None, *, pattern: SparseMatrix, rngs: nnx.Rngs,
                 fold_heads: bool | None = None, **kwargs):
        if kwargs.get("attention_fn") is not None:
            raise ValueError("SparseMultiHeadAttention: attention_fn is set by the pattern; use "
                             "nnx.MultiHeadAttention(attention_fn=...) for another one")
        if kwargs.get("decode"):
            raise ValueError("SparseMultiHeadAttention: decode=True is not supported")
        kwargs.pop("attention_fn", None)
        kwargs.setdefault("decode", False)
        super().__init__(num_heads, in_features, qkv_features, out_features,
                         attention_fn=PatternAttention(pattern, fold_heads=fold_heads),
                         rngs=rngs, **kwargs)

    @property
    def pattern(self) -> SparseMatrix:
        """The attention pattern ``[q_len, k_len]``."""
        return self.attention_fn.pattern.matrix()
