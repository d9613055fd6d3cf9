"""Building blocks shared by the example models: attention, weight loading, timing."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxsparse
from jaxsparse.bench import jit_module, time_interleaved
from jaxsparse.layers import SparseLinear


def linear_gelu(layer: nnx.Module, x: jax.Array) -> jax.Array:
    """Exact GELU of ``layer(x)``. Once :func:`jaxsparse.sparsify` has made ``layer`` a
    :class:`~jaxsparse.layers.SparseLinear`, its kernel adds the bias and applies the GELU to the
    output while it is in cache, instead of XLA doing both in passes of their own."""
    if isinstance(layer, SparseLinear):
        return layer(x, activation="gelu")
    return jax.nn.gelu(layer(x), approximate=False)


ATTENTION_KINDS = ("jaxsparse", "xla")


class SelfAttention(nnx.Module):
    """Multi-head self attention with separate query/key/value/output ``nnx.Linear``.

    ``attention`` chooses how the scores and their softmax are computed (the four projections are
    the same ``nnx.Linear`` layers either way, and :func:`jaxsparse.sparsify` can replace them):
    ``"jaxsparse"`` (the default), :func:`jaxsparse.attention` on :func:`jaxsparse.patterns.full`,
    which on the CPU is one fused native kernel per call that never writes the
    ``[batch, heads, seq, seq]`` scores to memory; ``"xla"``, the same math in ``jnp`` ops for
    XLA to compile (see :meth:`xla_attention`). :func:`set_attention` switches a whole model.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, attention: str = "jaxsparse",
                 rngs: nnx.Rngs):
        if hidden_size % num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.num_heads = num_heads
        self.attention = attention
        self.query = nnx.Linear(hidden_size, hidden_size, rngs=rngs)
        self.key = nnx.Linear(hidden_size, hidden_size, rngs=rngs)
        self.value = nnx.Linear(hidden_size, hidden_size, rngs=rngs)
        self.output = nnx.Linear(hidden_size, hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``x``: [batch, seq, hidden]; ``mask``: optional [batch, seq], nonzero = attend."""
        b, s, d = x.shape
        shape = (b, s, self.num_heads, d // self.num_heads)  # [batch, seq, heads, head_dim]
        q, k, v = (layer(x).reshape(shape) for layer in (self.query, self.key, self.value))
        if self.attention == "jaxsparse":
            keep = None if mask is None else mask[:, None, None, :].astype(bool)
            context = jaxsparse.attention(q, k, v, jaxsparse.patterns.full(s), mask=keep)
        else:
            context = self.xla_attention(q, k, v, mask)
        return self.output(context.reshape(b, s, d))

    @staticmethod
    def xla_attention(q, k, v, mask):
        """Dense attention in ``jnp`` ops, written for XLA on the CPU, where the textbook form
        (token-major einsums, ``jnp.where`` on the [batch, heads, seq, seq] scores,
        ``jax.nn.softmax``) took most of the dense parts' time: heads first, the query scaled
        instead of the scores, the mask added as a [batch, 1, 1, seq] bias (as BERT does), and the
        softmax's division applied to the [.., seq, head_dim] context instead of the
        [.., seq, seq] weights. ``q``, ``k``, ``v``: [batch, seq, heads, head_dim]."""
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        scores = jnp.einsum("bhqd,bhkd->bhqk", q / math.sqrt(q.shape[-1]), k)
        if mask is not None:
            keep = mask[:, None, None, :].astype(bool)
            scores = scores + jnp.where(keep, 0.0, jnp.finfo(scores.dtype).min)
        weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        context = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
        context = context / jnp.sum(weights, axis=-1, keepdims=True)
        return context.transpose(0, 2, 1, 3)


def set_attention(model: nnx.Module, attention: str) -> nnx.Module:
    """Switch every :class:`SelfAttention` of ``model`` to ``attention`` (see its docstring), in
    place; returns ``model``. Jit the model after switching: the choice is static."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, SelfAttention):
            node.attention = attention
    return model


def build_model(make_model: Callable[[], nnx.Module], params: Mapping[str, np.ndarray],
                source: str) -> nnx.Module:
    """Construct ``make_model()`` with every variable taken from ``params``.

    The constructor runs abstractly (``nnx.eval_shape``), so no time is spent
    on random initialisation.  ``params`` maps dotted attribute paths such as
    ``"layers.0.attention.query.kernel"`` to arrays already in the model's
    layout; shapes must match exactly and every variable must be covered.
    ``source`` names the checkpoint in error messages.
    """
    model = nnx.eval_shape(make_model)
    for path, value in params.items():
        variable = model
        for part in path.split("."):
            variable = variable[int(part)] if part.isdigit() else getattr(variable, part)
        if value.shape != variable.shape:
            raise ValueError(f"{source}: {path} has shape {value.shape}, "
                             f"the model expects {variable.shape}")
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
    unset = [".".join(map(str, path)) for path, v in nnx.iter_graph(model)
             if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if unset:
        raise KeyError(f"{source}: no values for {unset}")
    return model


def median_seconds(fn: Callable[..., Any], *args: Any, warmup: int = 2,
                   repeats: int = 10) -> float:
    """Median wall-clock seconds of ``fn(*args)`` over ``repeats`` calls.

    ``fn`` should be jit-compiled.  The first ``warmup`` calls (which include
    compilation) are not timed, and every call is followed by
    ``jax.block_until_ready`` so that asynchronous dispatch does not hide
    device time.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(batch: int, call: tuple[Callable, tuple], repeats: int, warmup: int = 2) -> float:
    """Items per second of ``call = (jitted fn, args)``: ``batch`` over :func:`median_seconds`."""
    fn, args = call
    return batch / median_seconds(fn, *args, warmup=warmup, repeats=repeats)


def paired_throughput(batch: int, dense_call: tuple[Callable, tuple],
                      sparse_call: tuple[Callable, tuple], repeats: int) -> tuple[float, float]:
    """Items per second of the dense and the sparse model, timed alternately in one run.

    ``*_call`` are ``(jitted fn, args)``. Calls of the two alternate (in a random order) and each
    throughput is ``batch`` over the median of ``repeats`` samples, so that the drifts of a shared
    machine hit both alike and their ratio is from the same moments.
    """
    ms = time_interleaved({"dense": dense_call, "sparse": sparse_call}, reps=repeats)
    return batch / (ms["dense"] * 1e-3), batch / (ms["sparse"] * 1e-3)


def jit_method(model: nnx.Module, method: str) -> Callable[..., jax.Array]:
    """Jit-compiled ``getattr(model, method)`` as a plain function of arrays, the model's state
    split and flattened once (:func:`jaxsparse.bench.jit_module`), so that calls carry no
    Python-side graph traversal or flattening of its variables (this matters for timing)."""
    fn, leaves = jit_module(model, lambda m, *args: getattr(m, method)(*args))
    return lambda *args: fn(leaves, *args)
