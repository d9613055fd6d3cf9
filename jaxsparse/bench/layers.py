"""Layer benchmark (CPU): the sparse transformer blocks against their dense Flax twins under jit.

* MLP block 768 -> 3072 -> 768 (GELU) on 128 tokens at 90% unstructured sparsity:
  :class:`jaxsparse.layers.SparseMLP` (bias and GELU fused into the kernels) vs the dense
  ``nnx.Linear`` pair, and the same sparse layers with the GELU applied by XLA in between
  (``jaxsparse-unfused``); and the gradients of a loss through the same block (a fine-tuning
  step's backward pass: SDDMM for the kept weights, transposed SpMM through the layers'
  transposition plans for the input).
* The same MLP block on one token and on four (decoding one or a few input vectors at a time):
  layers built with ``matvec=True`` (the sliced copy of the weights) vs the default layers
  (``jaxsparse-csr``) vs dense.
* Attention restricted to ``local(4096, window=128)``, 8 heads, head dim 64, batch 1:
  :func:`jaxsparse.attention` vs ``jax.nn.dot_product_attention`` with the dense mask, time and
  peak memory (XLA's compiled memory analysis: arguments + outputs + temporaries); and the sparse
  attention alone at sequence length 16384.
* Dense attention (:func:`jaxsparse.patterns.full`, which :func:`jaxsparse.attention` computes in
  one fused pass: a native kernel on the CPU) vs ``jax.nn.dot_product_attention`` at the shapes of
  all-MiniLM-L6-v2 (128 tokens, 12 heads x 32, batch 1 and 8) and ViT-B/16 (197 tokens,
  12 heads x 64, batch 1).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse
from jaxsparse.bench import Case, jit_module, machine_info, time_interleaved, write_results


def _mlp_pair(transpose_plan=False, matvec=False, tokens=128):
    """The 90% sparse twin of a dense nnx MLP block, ``tokens`` tokens, and the dense block's
    arguments to :func:`_dense_mlp` (fc1 and fc2 kernels and biases, then the tokens)."""
    from flax import nnx

    from jaxsparse.layers import SparseMLP

    rngs = nnx.Rngs(0)
    fc1, fc2 = nnx.Linear(768, 3072, rngs=rngs), nnx.Linear(3072, 768, rngs=rngs)
    sparse = SparseMLP.from_dense(fc1, fc2, sparsity=0.9, transpose_plan=transpose_plan,
                                  matvec=matvec)
    x = jax.random.normal(jax.random.key(0), (tokens, 768), jnp.float32)
    return sparse, x, (fc1.kernel[...], fc1.bias[...], fc2.kernel[...], fc2.bias[...], x)


def _dense_mlp(w1, b1, w2, b2, x):
    return jax.nn.gelu(x @ w1 + b1) @ w2 + b2


def _mlp_case(reps):
    sparse, x, dense_args = _mlp_pair()
    fused, leaves = jit_module(sparse)
    unfused, _ = jit_module(sparse, lambda mlp, x: mlp.fc2(jax.nn.gelu(mlp.fc1(x))))
    times = time_interleaved({"jaxsparse": (fused, (leaves, x)),
                              "jaxsparse-unfused": (unfused, (leaves, x)),
                              "dense": (jax.jit(_dense_mlp), dense_args)}, reps)
    return Case("layers", "MLP 768->3072->768, 128 tokens, s=0.9",
                dict(kind="mlp", tokens=128, sparsity=0.9), times)


def _mlp_token_case(reps, tokens=1):
    """A few tokens through the MLP block (decoding): the layers' sliced copy (``matvec=True``)
    against their CSR product and the dense block."""
    methods = {}
    for name, matvec in (("jaxsparse", True), ("jaxsparse-csr", False)):
        sparse, x, dense_args = _mlp_pair(matvec=matvec, tokens=tokens)
        fn, leaves = jit_module(sparse)
        methods[name] = (fn, (leaves, x))
    methods["dense"] = (jax.jit(_dense_mlp), dense_args)
    label = f"MLP 768->3072->768, {tokens} token{'s' * (tokens > 1)} (matvec=True layers), s=0.9"
    return Case("layers", label, dict(kind="mlp_token", tokens=tokens, sparsity=0.9),
                time_interleaved(methods, reps))


def _mlp_grad_case(reps):
    """A fine-tuning step's gradients: of a squared-error loss with respect to every weight and
    bias and to the input (the kept values only for the sparse block: its pattern is fixed). The
    sparse layers hold transposition plans (``transpose_plan=True``), as layers to be fine-tuned
    should: the backward pass multiplies by W as well as by W.T."""
    from flax import nnx

    sparse, x, dense_args = _mlp_pair(transpose_plan=True)
    target = jax.random.normal(jax.random.key(1), (128, 768), jnp.float32)
    graphdef, params, rest = nnx.split(sparse, nnx.Param, ...)
    sparse_loss = lambda p, x: jnp.mean((nnx.merge(graphdef, p, rest)(x) - target) ** 2)
    dense_loss = lambda w1, b1, w2, b2, x: jnp.mean((_dense_mlp(w1, b1, w2, b2, x) - target) ** 2)
    times = time_interleaved({
        "jaxsparse": (jax.jit(jax.grad(sparse_loss, argnums=(0, 1))), (params, x)),
        "dense": (jax.jit(jax.grad(dense_loss, argnums=tuple(range(5)))), dense_args)}, reps)
    label = "MLP 768->3072->768 gradients (weights, biases, input), 128 tokens, s=0.9"
    return Case("layers", label, dict(kind="mlp_grad", tokens=128, sparsity=0.9), times)


def _peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def _attention_case(reps, seq=4096, window=128, heads=8, head_dim=64, dense=True):
    pattern = jaxsparse.patterns.local(seq, window)
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(kk, (1, seq, heads, head_dim), jnp.float32) for kk in keys)
    sparse = jax.jit(lambda q, k, v: jaxsparse.attention(q, k, v, pattern)).lower(q, k, v).compile()
    methods = {"jaxsparse": (sparse, (q, k, v))}
    params = dict(kind="attention", seq=seq, window=window, heads=heads, head_dim=head_dim,
                  peak_mb={"jaxsparse": _peak_bytes(sparse) / 2**20})
    if dense:
        mask = jnp.asarray(np.asarray(pattern.todense()) != 0)[None, None]
        dense_c = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m)).lower(
            q, k, v, mask).compile()
        methods["dense"] = (dense_c, (q, k, v, mask))
        params["peak_mb"]["dense"] = _peak_bytes(dense_c) / 2**20
    times = time_interleaved(methods, reps)
    label = f"attention local({seq}, {window}), {heads} heads x {head_dim}, batch 1"
    return Case("layers", label, params, times)


def _full_attention_case(reps, batch, seq, heads, head_dim):
    """Every query attends to every key: the fused kernel against XLA's dense attention."""
    pattern = jaxsparse.patterns.full(seq)
    keys = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(kk, (batch, seq, heads, head_dim), jnp.float32) for kk in keys)
    fused = jax.jit(lambda q, k, v: jaxsparse.attention(q, k, v, pattern)).lower(q, k, v).compile()
    dense = jax.jit(jax.nn.dot_product_attention).lower(q, k, v).compile()
    params = dict(kind="full_attention", batch=batch, seq=seq, heads=heads, head_dim=head_dim,
                  peak_mb={"jaxsparse": _peak_bytes(fused) / 2**20,
                           "dense": _peak_bytes(dense) / 2**20})
    times = time_interleaved({"jaxsparse": (fused, (q, k, v)), "dense": (dense, (q, k, v))}, reps)
    label = f"attention full({seq}), {heads} heads x {head_dim}, batch {batch}"
    return Case("layers", label, params, times)


def summary_lines(cases) -> list[str]:
    mlp = next(c for c in cases if c.params["kind"] == "mlp")
    grad = next(c for c in cases if c.params["kind"] == "mlp_grad")
    tokens = [c for c in cases if c.params["kind"] == "mlp_token"]
    att = next(c for c in cases if c.params["kind"] == "attention" and "dense" in c.times_ms)
    mem = att.params["peak_mb"]
    big = [c for c in cases if c.params["kind"] == "attention" and "dense" not in c.times_ms]
    rows = [("MLP block s=0.9 vs dense nnx MLP", 3.5, mlp.speedup("jaxsparse")),
            ("local(4096,128) attention vs dense masked", 5, att.speedup("jaxsparse")),
            ("attention peak memory: dense / sparse", 10, mem["dense"] / mem["jaxsparse"])]
    lines = ["## Targets", "", "| target | required | measured | met |", "|---|---|---|---|"]
    for name, need, got in rows:
        lines.append(f"| {name} | {need}x | {got:.2f}x | {'yes' if got >= need else '**no**'} |")
    lines += ["", f"MLP with the GELU applied by XLA between the sparse layers (not fused into "
              f"fc1's kernel): {mlp.times_ms['jaxsparse-unfused']:.3f} ms, "
              f"{mlp.speedup('jaxsparse-unfused'):.2f}x "
              f"(fused: {mlp.times_ms['jaxsparse']:.3f} ms).",
              f"MLP gradients (fine-tuning step's backward pass): "
              f"{grad.times_ms['jaxsparse']:.3f} ms sparse, {grad.times_ms['dense']:.3f} ms dense, "
              f"{grad.speedup('jaxsparse'):.2f}x.",
              *(f"MLP on {c.params['tokens']} token(s): {c.times_ms['jaxsparse']:.3f} ms with "
                f"matvec=True layers ({c.speedup('jaxsparse'):.2f}x over dense), "
                f"{c.times_ms['jaxsparse-csr']:.3f} ms with the default layers "
                f"({c.speedup('jaxsparse-csr'):.2f}x), {c.times_ms['dense']:.3f} ms dense."
                for c in tokens),
              f"Peak memory (compiled): sparse {mem['jaxsparse']:.0f} MiB, dense "
              f"{mem['dense']:.0f} MiB."]
    for c in (c for c in cases if c.params["kind"] == "full_attention"):
        lines.append(f"Dense attention ({c.label}): {c.times_ms['jaxsparse']:.3f} ms with "
                     f"jaxsparse.attention on patterns.full, {c.times_ms['dense']:.3f} ms with "
                     f"jax.nn.dot_product_attention ({c.speedup('jaxsparse'):.2f}x); peak memory "
                     f"{c.params['peak_mb']['jaxsparse']:.1f} / {c.params['peak_mb']['dense']:.1f}"
                     " MiB.")
    for c in big:
        lines.append(f"Sparse attention at sequence {c.params['seq']}: "
                     f"{c.times_ms['jaxsparse']:.0f} ms, peak {c.params['peak_mb']['jaxsparse']:.0f} MiB "
                     f"(the dense scores alone would take "
                     f"{c.params['seq'] ** 2 * c.params['heads'] * 4 / 2**30:.0f} GiB).")
    return lines


def main(args):
    from tqdm import tqdm

    reps = args.reps or 7
    info = machine_info()
    steps = [lambda: _mlp_case(reps), lambda: _mlp_grad_case(reps), lambda: _mlp_token_case(reps),
             lambda: _mlp_token_case(reps, tokens=4),
             lambda: _attention_case(reps),
             lambda: _attention_case(3, seq=16384, dense=False),
             lambda: _full_attention_case(reps, 1, 128, 12, 32),
             lambda: _full_attention_case(reps, 8, 128, 12, 32),
             lambda: _full_attention_case(reps, 1, 197, 12, 64)]
    cases = []
    for step in tqdm(steps, desc="layer benchmark", unit="case"):
        cases.append(step())
    summary = summary_lines(cases)
    paths = write_results(args.name, cases, ["jaxsparse", "jaxsparse-unfused", "jaxsparse-csr",
                                             "dense"],
                          Path(args.out), info, summary)
    print("\n".join(summary))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
