"""CPU benchmark: jaxsparse vs dense XLA, jax.experimental.sparse, SciPy and torch.sparse.

Cases (float32 unless stated): unstructured SpMM on 768x768, 3072x768 and 768x3072 weights for
N in {1, 32, 128, 512} and sparsity in {0.5 .. 0.98}, in both layouts (``W @ X`` and the linear
layout ``x @ W.T``); BSR 4x4 and 16x16 and 2:4 at the 3072x768 shape; bfloat16; the weight
transposed (``W.T @ X``, ``x @ W``); a few vectors (N = 2, 4, 8 and 16, the packed weight against
its CSR product); SDDMM; and every DLMC transformer matrix at N=128.

The ``jaxsparse`` CSR operands are prepared once with :func:`jaxsparse.pack` (16-bit column
indices, and the sliced layout of the float32 matrix-vector product), as a fixed inference weight
would be; BSR and N:M operands are used as built.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

import jaxsparse
from jaxsparse.bench import Case, machine_info, time_interleaved, write_results

SHAPES = ((768, 768), (3072, 768), (768, 3072))
NS = (1, 32, 128, 512)
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
METHODS = ["jaxsparse", "dense", "jax.sparse", "scipy", "torch"]

try:
    import torch
except ImportError:  # torch is optional: its column is left out
    torch = None
else:
    warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")


def _jit_pair(layout: str):
    """(sparse-operand fn, dense-operand fn) computing W @ X (kn) or x @ W.T (nk)."""
    if layout == "kn":
        return jax.jit(lambda w, x: w @ x), jax.jit(lambda w, x: w @ x)
    return jax.jit(lambda w, x: x @ w.T), jax.jit(lambda w, x: x @ w.T)


def _bcsr_fn(layout: str):
    if layout == "kn":
        return jax.jit(lambda w, x: w @ x)
    return jax.jit(lambda w, x: (w @ x.T).T)


def _torch_fn(layout: str):
    def run(w, x):
        with torch.no_grad():
            return w @ x if layout == "kn" else (w @ x.T).T
    return run


def _scipy_fn(layout: str):
    return (lambda w, x: w @ x) if layout == "kn" else (lambda w, x: (w @ x.T).T)


def _packed(w):
    """The CSR of ``w`` as a fixed inference weight is used: prepared once by jaxsparse.pack."""
    return jaxsparse.pack(jaxsparse.CSR.fromdense(w))


def spmm_methods(w: np.ndarray, x: np.ndarray, layout: str, *, sparse=None, extra=None,
                 torch_layout: str = "csr", scipy_matrix=None) -> dict[str, tuple[Callable, tuple]]:
    """Every method computing the same product of the float32 weight ``w`` (dense, zeros pruned)."""
    from jax.experimental import sparse as jsparse

    sparse_fn, dense_fn = _jit_pair(layout)
    ws = sparse if sparse is not None else _packed(w)
    methods = {
        "jaxsparse": (sparse_fn, (ws, jnp.asarray(x))),
        "dense": (dense_fn, (jnp.asarray(w), jnp.asarray(x))),
        "jax.sparse": (_bcsr_fn(layout), (jsparse.BCSR.fromdense(jnp.asarray(w)), jnp.asarray(x))),
        "scipy": (_scipy_fn(layout), (scipy_matrix if scipy_matrix is not None
                                      else sp.csr_matrix(w), x)),
    }
    if torch is not None and w.dtype == np.float32:
        tw = torch.from_numpy(np.array(w))
        tw = tw.to_sparse_csr() if torch_layout == "csr" else tw.to_sparse_bsr(torch_layout)
        methods["torch"] = (_torch_fn(layout), (tw, torch.from_numpy(x)))
    methods.update(extra or {})
    return methods


def _pruned(rng, shape, sparsity, block=None):
    m, k = shape
    if block is None:
        keep = rng.random(shape) >= sparsity
    else:
        bm, bk = block
        keep = np.kron(rng.random((m // bm, k // bk)) >= sparsity, np.ones(block, bool))
    return (rng.standard_normal(shape) * keep).astype(np.float32)


def _dense_x(rng, k, n, layout):
    if n == 1 and layout == "kn":
        return rng.standard_normal(k).astype(np.float32)
    shape = (k, n) if layout == "kn" else (n, k)
    return rng.standard_normal(shape).astype(np.float32)


def unstructured_cases(rng, shapes, ns, sparsities, reps, progress):
    cases = []
    for (m, k) in shapes:
        for n in ns:
            for layout in ("kn", "nk"):
                for s in sparsities:
                    w = _pruned(rng, (m, k), s)
                    x = _dense_x(rng, k, n, layout)
                    times = time_interleaved(spmm_methods(w, x, layout), reps)
                    form = "W@X" if layout == "kn" else "x@W.T"
                    cases.append(Case("unstructured", f"{m}x{k} {form} N={n} s={s}",
                                      dict(m=m, k=k, n=n, layout=layout, sparsity=s), times))
                    progress()
    return cases


def structured_cases(rng, reps, progress):
    """BSR 4x4 and 16x16 at 90%, 2:4, and bfloat16, on the 3072x768 weight at N=128."""
    m, k, n = 3072, 768, 128
    cases = []
    for layout in ("kn", "nk"):
        form = "W@X" if layout == "kn" else "x@W.T"
        x = _dense_x(rng, k, n, layout)
        for block in ((4, 4), (16, 16)):
            w = _pruned(rng, (m, k), 0.9, block)
            methods = spmm_methods(
                w, x, layout, sparse=jaxsparse.BSR.fromdense(w, block_size=block),
                torch_layout=block, scipy_matrix=sp.bsr_matrix(w, blocksize=block),
                extra={"jaxsparse-csr": (_jit_pair(layout)[0], (_packed(w), jnp.asarray(x)))})
            cases.append(Case("bsr", f"{m}x{k} {form} N={n} BSR {block[0]}x{block[1]} s=0.9",
                              dict(m=m, k=k, n=n, layout=layout, block=block, sparsity=0.9),
                              time_interleaved(methods, reps)))
            progress()
        w = np.asarray(jaxsparse.NM.fromdense(  # 2:4: keep the 2 largest of every 4
            _top_n_of_m(rng.standard_normal((m, k)).astype(np.float32), 2, 4), n=2, m=4).todense())
        methods = spmm_methods(w, x, layout, sparse=jaxsparse.NM.fromdense(w, n=2, m=4),
                               extra={"jaxsparse-csr": (_jit_pair(layout)[0],
                                                        (_packed(w), jnp.asarray(x)))})
        cases.append(Case("2:4", f"{m}x{k} {form} N={n} 2:4", dict(m=m, k=k, n=n, layout=layout,
                                                                  sparsity=0.5),
                          time_interleaved(methods, reps)))
        progress()
        w = _pruned(rng, (m, k), 0.9)
        sparse_fn, dense_fn = _jit_pair(layout)
        w16, x16 = jnp.asarray(w, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16)
        methods = {
            "jaxsparse": (sparse_fn, (_packed(w16), x16)),
            "dense": (dense_fn, (jnp.asarray(w), jnp.asarray(x))),
            "jaxsparse-f32": (sparse_fn, (_packed(w), jnp.asarray(x))),
            "dense-bf16": (dense_fn, (w16, x16)),
        }
        cases.append(Case("bf16", f"{m}x{k} {form} N={n} s=0.9 bf16 (baseline: dense f32)",
                          dict(m=m, k=k, n=n, layout=layout, sparsity=0.9, dtype="bfloat16"),
                          time_interleaved(methods, reps)))
        progress()
    return cases


def few_vector_cases(rng, reps, progress):
    """N = 2, 4, 8 and 16 at 90% (decoding a few sequences at a time): the packed weight, whose
    sliced copy takes products of up to 5 vectors at 90%, and (``jaxsparse-csr``) packed without
    it, so the CSR kernel computes them (both are the CSR kernel at N = 8 and 16)."""
    cases = []
    for (m, k) in ((3072, 768), (768, 3072)):
        for n in (2, 4, 8, 16):
            for layout in ("kn", "nk"):
                w = _pruned(rng, (m, k), 0.9)
                x = _dense_x(rng, k, n, layout)
                csr = jaxsparse.pack(jaxsparse.CSR.fromdense(w), matvec=False)
                extra = {"jaxsparse-csr": (_jit_pair(layout)[0], (csr, jnp.asarray(x)))}
                form = "W@X" if layout == "kn" else "x@W.T"
                cases.append(Case("few vectors", f"{m}x{k} {form} N={n} s=0.9",
                                  dict(m=m, k=k, n=n, layout=layout, sparsity=0.9),
                                  time_interleaved(spmm_methods(w, x, layout, extra=extra), reps)))
                progress()
    return cases


def transposed_cases(rng, reps, progress):
    """The stored 3072x768 weight transposed (op(A) = A.T) at 90%, N=128: ``W.T @ X`` and
    ``x @ W`` (a weight stored [in, out]; also the gradients of ``W @ X`` and ``x @ W.T`` with
    respect to the dense operand). jaxsparse: the packed weight, whose A.T the kernel builds per
    call, and (``jaxsparse-plan``) packed with ``transpose=True``, whose stored transposition plan
    leaves only the values to gather. jax.sparse: BCOO (its BCSR has no transpose)."""
    from jax.experimental import sparse as jsparse

    m, k, n = 3072, 768, 128
    cases = []
    for layout, form in (("kn", "W.T@X"), ("nk", "x@W")):
        w = _pruned(rng, (m, k), 0.9)
        x = _dense_x(rng, m, n, layout)
        if layout == "kn":
            product, torch_fn = (lambda w, x: w.T @ x), (lambda w, x: w.t() @ x)
        else:
            product = torch_fn = lambda w, x: x @ w
        fn = jax.jit(product)
        methods = {
            "jaxsparse": (fn, (_packed(w), jnp.asarray(x))),
            "jaxsparse-plan": (fn, (jaxsparse.pack(jaxsparse.CSR.fromdense(w), transpose=True),
                                    jnp.asarray(x))),
            "dense": (fn, (jnp.asarray(w), jnp.asarray(x))),
            "jax.sparse": (fn, (jsparse.BCOO.fromdense(jnp.asarray(w)), jnp.asarray(x))),
            "scipy": (product, (sp.csr_matrix(w), x)),
        }
        if torch is not None:
            methods["torch"] = (torch_fn, (torch.from_numpy(w).to_sparse_csr(),
                                           torch.from_numpy(x)))
        cases.append(Case("transposed", f"{m}x{k} {form} N={n} s=0.9",
                          dict(m=m, k=k, n=n, layout=layout, sparsity=0.9),
                          time_interleaved(methods, reps)))
        progress()
    return cases


def _top_n_of_m(w, n, m):
    g = w.reshape(w.shape[0], -1, m)
    order = np.argsort(-np.abs(g), axis=-1, kind="stable")
    mask = np.zeros(g.shape, bool)
    np.put_along_axis(mask, order[..., :n], True, axis=-1)
    return (g * mask).reshape(w.shape)


def sddmm_cases(rng, reps, progress):
    """SDDMM on a 3072x768 pattern at 90% with K=64: vs dense matmul then sampling."""
    from jax.experimental import sparse as jsparse

    m, n, kk = 3072, 768, 64
    cases = []
    for s in (0.9, 0.95):
        w = _pruned(rng, (m, n), s)
        pattern = jaxsparse.CSR.fromdense(w)
        a = jnp.asarray(rng.standard_normal((m, kk)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((kk, n)), jnp.float32)
        rows, cols = (jnp.asarray(i, jnp.int32) for i in np.nonzero(w))
        bcoo_idx = jnp.stack([rows, cols], axis=1)
        methods = {
            "jaxsparse": (jax.jit(lambda a, b, p: jaxsparse.sddmm(a, b, p).data), (a, b, pattern)),
            "dense": (jax.jit(lambda a, b, r, c: (a @ b)[r, c]), (a, b, rows, cols)),
            "jax.sparse": (jax.jit(lambda a, b, i: jsparse.bcoo_dot_general_sampled(
                a, b, i, dimension_numbers=(([1], [0]), ([], [])))), (a, b, bcoo_idx)),
            "scipy": (lambda a, b, r, c: np.einsum("pk,pk->p", a[r], b.T[c]),
                      (np.asarray(a), np.asarray(b), np.asarray(rows), np.asarray(cols))),
        }
        if torch is not None:
            tp = torch.from_numpy(w).to_sparse_csr()
            ta, tb = torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))

            def torch_sddmm(p, a, b):
                with torch.no_grad():
                    return torch.sparse.sampled_addmm(p, a, b, beta=0.0)
            methods["torch"] = (torch_sddmm, (tp, ta, tb))
        cases.append(Case("sddmm", f"{m}x{n} pattern s={s} K={kk}",
                          dict(m=m, n=n, k=kk, sparsity=s), time_interleaved(methods, reps)))
        progress()
    return cases


def dlmc_files(levels) -> list[Path]:
    return [p for lvl in levels for p in jaxsparse.dlmc.transformer_files(lvl)]


def dlmc_cases(files, reps, progress, n=128):
    """Each DLMC transformer matrix W (seeded random values) times a dense [K, N=128]."""
    rng = np.random.default_rng(0)
    cases = []
    for path in files:
        a = jaxsparse.dlmc.load_smtx(path)
        w = a.to_scipy().toarray().astype(np.float32)
        x = rng.standard_normal((w.shape[1], n)).astype(np.float32)
        level = path.parent.name
        times = time_interleaved(spmm_methods(w, x, "kn", sparse=jaxsparse.pack(a)), reps)
        cases.append(Case(f"dlmc {level}", f"{path.stem} {w.shape[0]}x{w.shape[1]} N={n}",
                          dict(path=str(path), m=w.shape[0], k=w.shape[1], n=n,
                               sparsity=1 - a.nnz / w.size), times))
        progress()
    return cases


def _geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _find(cases, group, **params):
    for c in cases:
        if c.group == group and all(c.params.get(k) == v for k, v in params.items()):
            return c
    return None


def targets(cases) -> list[tuple[str, float, float | None]]:
    """(target, required ratio, measured ratio) for each speed target of the CPU kernels."""
    out = []

    def add(name, need, case, method="jaxsparse"):
        out.append((name, need, None if case is None else case.speedup(method)))

    add("3072x768 W@X s=0.9 N=128 vs dense", 4, _find(cases, "unstructured", m=3072, k=768,
                                                         n=128, layout="kn", sparsity=0.9))
    c = _find(cases, "unstructured", m=3072, k=768, n=128, layout="kn", sparsity=0.9)
    if c is not None:
        out.append(("3072x768 W@X s=0.9 N=128 vs jax.sparse BCSR", 3,
                    c.times_ms["jax.sparse"] / c.times_ms["jaxsparse"]))
    add("3072x768 x@W.T s=0.9 N=128 vs dense", 4, _find(cases, "unstructured", m=3072, k=768,
                                                           n=128, layout="nk", sparsity=0.9))
    add("3072x768 W@x s=0.9 N=1 vs dense", 4, _find(cases, "unstructured", m=3072, k=768, n=1,
                                                       layout="kn", sparsity=0.9))
    add("3072x768 W@X s=0.7 N=128 vs dense", 1.5, _find(cases, "unstructured", m=3072, k=768,
                                                           n=128, layout="kn", sparsity=0.7))
    add("3072x768 W@X s=0.6 N=128 vs dense (break-even at <= 0.6)", 1,
        _find(cases, "unstructured", m=3072, k=768, n=128, layout="kn", sparsity=0.6))
    add("BSR 16x16 s=0.9 N=128 vs dense", 6, _find(cases, "bsr", layout="kn", block=(16, 16)))
    add("SDDMM 3072x768 s=0.9 K=64 vs dense+sample", 4, _find(cases, "sddmm", sparsity=0.9))
    dl = [c.speedup("jaxsparse") for c in cases if c.group == "dlmc 0.9"]
    if dl:
        out.append(("DLMC magnitude_pruning/0.9 N=128 geomean vs dense", 4, _geomean(dl)))
    bf = _find(cases, "bf16", layout="kn")
    if bf is not None:
        out.append(("bf16 sparse vs f32 sparse (>= 1 means not slower)", 1,
                    bf.times_ms["jaxsparse-f32"] / bf.times_ms["jaxsparse"]))
    return out


def summary_lines(cases) -> list[str]:
    lines = ["## Targets", "", "| target | required | measured | met |", "|---|---|---|---|"]
    for name, need, got in targets(cases):
        met = "-" if got is None else ("yes" if got >= need else "**no**")
        lines.append(f"| {name} | {need}x | {'-' if got is None else f'{got:.2f}x'} | {met} |")
    groups = sorted({c.group for c in cases if c.group.startswith("dlmc")})
    if groups:
        lines += ["", "## DLMC geometric-mean speedup over dense (N=128)", "",
                  "| sparsity | matrices | " + " | ".join(METHODS[:1] + METHODS[2:]) + " |",
                  "|---|---|" + "---|" * (len(METHODS) - 1)]
        for g in groups:
            sel = [c for c in cases if c.group == g]
            cells = []
            for m in METHODS[:1] + METHODS[2:]:
                gm = _geomean([c.speedup(m) for c in sel])
                cells.append("-" if gm is None else f"{gm:.2f}x")
            lines.append(f"| {g.split()[1]} | {len(sel)} | " + " | ".join(cells) + " |")
    return lines


def plot(cases, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, layout, title in zip(axes, ("kn", "nk"), ("W @ X", "x @ W.T (linear layout)")):
        sel = sorted((c for c in cases if c.group == "unstructured" and c.params["m"] == 3072
                      and c.params["k"] == 768 and c.params["n"] == 128
                      and c.params["layout"] == layout), key=lambda c: c.params["sparsity"])
        if not sel:
            continue
        xs = [c.params["sparsity"] for c in sel]
        for m in METHODS:
            ys = [c.speedup(m) for c in sel]
            if any(y is not None for y in ys):
                ax.plot(xs, [y if y is not None else np.nan for y in ys], "o-", label=m)
        ax.plot(xs, [1 / (1 - s) for s in xs], "k:", label="ideal (1 / density)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title(f"3072x768 fp32, N=128: {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup over dense XLA")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> list[Case]:
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    quick = args.quick
    shapes = ((3072, 768),) if quick else SHAPES
    ns = (1, 128) if quick else NS
    sparsities = (0.5, 0.6, 0.7, 0.9, 0.98) if quick else SPARSITIES
    files = dlmc_files(args.dlmc_levels or (("0.9",) if quick else ("0.7", "0.8", "0.9", "0.95")))
    if quick:
        files = files[:8]
    reps = args.reps or (5 if quick else 15)
    total = len(shapes) * len(ns) * 2 * len(sparsities) + 6 + 16 + 2 + 2 + len(files)
    with tqdm(total=total, desc="cpu benchmark", unit="case") as bar:
        step = bar.update
        cases = unstructured_cases(rng, shapes, ns, sparsities, reps, step)
        cases += structured_cases(rng, reps, step)
        cases += few_vector_cases(rng, reps, step)
        cases += transposed_cases(rng, reps, step)
        cases += sddmm_cases(rng, reps, step)
        cases += dlmc_cases(files, reps, step)
    return cases


def main(args):
    info = machine_info()
    info["threads"] = "XLA default intra-op pool"
    cases = run(args)
    methods = [m for m in METHODS if any(m in c.times_ms for c in cases)]
    methods += sorted({m for c in cases for m in c.times_ms} - set(methods))
    summary = summary_lines(cases)
    paths = write_results(args.name, cases, methods, Path(args.out), info, summary,
                          plot=lambda p: plot(cases, p))
    print("\n".join(summary))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
