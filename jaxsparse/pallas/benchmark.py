"""GPU benchmark of the Pallas kernels against what a user would otherwise pick.

    python -m jaxsparse.pallas.benchmark            # on a GPU: the full sizes below
    python -m jaxsparse.pallas.benchmark --smoke    # anywhere: tiny sizes, interpret mode

Compares, in one run, on ``M = K = 4096`` weights with ``N`` in {256, 4096}:

* unstructured (CSR) and 32x32-block (BSR) SpMM at 50/70/90/95 % sparsity, 2:4 SpMM: Pallas vs
  dense ``jnp.dot`` (cuBLAS) on the densified matrix and ``jax.experimental.sparse.BCSR``;
* CSR SDDMM (``K`` in {256, 4096}) vs dense-then-sample (``(a @ b)[rows, cols]``);
* block-sparse attention (batch 1, sequence 8192, 16 heads, head dim 128, local window 512) vs
  ``jax.nn.dot_product_attention`` with the same local window (XLA, and cuDNN where available).

Writes ``benchmarks/results/pallas_gpu_<date>.json`` and ``.md`` (``pallas_smoke_*`` for
``--smoke``) with the device, date and jax version. Targets on an H200 (not yet measured): BSR
32x32 bf16 90 % N=4096 >= 6x dense; CSR bf16 90 % N=256 >= 1.5x dense and >= 5x BCSR; 2:4 N=256
>= 1.2x dense; SDDMM 90 % >= 4x dense-then-sample; attention >= 5x dense attention.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse
from jaxsparse import pallas as jsp

TARGETS = {  # (op, fmt, sparsity, n) -> (baseline, minimum speedup)
    ("spmm", "bsr32", 0.9, 4096): ("dense", 6.0),
    ("spmm", "csr", 0.9, 256): ("dense", 1.5),
    ("spmm", "csr*", 0.9, 256): ("bcsr", 5.0),
    ("spmm", "2:4", 0.5, 256): ("dense", 1.2),
    ("sddmm", "csr", 0.9, 256): ("dense", 4.0),
    ("attention", "local", None, None): ("dense", 5.0),
}


def _time(fn, *args, repeats: int, warmup: int = 2) -> float:
    """Median wall time in ms of ``fn(*args)`` (compiled beforehand, synchronised)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _try(fn, *args, repeats):
    try:
        return _time(fn, *args, repeats=repeats), None
    except Exception as e:  # a baseline that does not apply on this device: record why
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _sparse_dense(rng, m, k, sparsity, kind):
    if kind == "csr":
        mask = rng.random((m, k)) >= sparsity
    elif kind == "bsr32":
        mask = np.kron(rng.random((m // 32, k // 32)) >= sparsity, np.ones((32, 32), bool))
    else:  # 2:4: keep 2 random positions of every 4
        order = np.argsort(rng.random((m, k // 4, 4)), axis=-1)
        mask = np.zeros((m, k // 4, 4), bool)
        np.put_along_axis(mask, order[..., :2], True, axis=-1)
        mask = mask.reshape(m, k)
    return (rng.standard_normal((m, k), np.float32) * mask).astype(np.float32)


def bench_spmm(rng, sizes, sparsities, ns, dtype, backend, repeats, records):
    from jax.experimental import sparse as jsparse

    m = k = sizes
    dense_dot = jax.jit(lambda a, x: jnp.dot(a, x, preferred_element_type=jnp.float32)
                        .astype(a.dtype))
    sp_dot = jax.jit(lambda a, x: jaxsparse.matmul(a, x, backend=backend))
    bcsr_dot = jax.jit(lambda a, x: a @ x)
    cases = [("csr", s) for s in sparsities] + [("bsr32", s) for s in sparsities] + [("2:4", 0.5)]
    for kind, sparsity in cases:
        w = _sparse_dense(rng, m, k, sparsity, kind)
        wd = jnp.asarray(w, dtype)
        if kind == "csr":
            a = jaxsparse.CSR.fromdense(wd)
        elif kind == "bsr32":
            a = jaxsparse.BSR.fromdense(wd, block_size=(32, 32))
        else:
            a = jaxsparse.NM.fromdense(wd, n=2, m=4)
        bcsr = jsparse.BCSR.fromdense(wd) if kind == "csr" else None
        for n in ns:
            x = jnp.asarray(rng.standard_normal((k, n), np.float32), dtype)
            t_sp, err = _try(sp_dot, a, x, repeats=repeats)
            t_dense, _ = _try(dense_dot, wd, x, repeats=repeats)
            t_bcsr, err_b = (_try(bcsr_dot, bcsr, x, repeats=repeats) if bcsr is not None
                             else (None, None))
            records.append(dict(op="spmm", fmt=kind, sparsity=sparsity, m=m, k=k, n=n,
                                dtype=jnp.dtype(dtype).name, pallas_ms=t_sp, dense_ms=t_dense,
                                bcsr_ms=t_bcsr, error=err, bcsr_error=err_b))
            print(_row(records[-1]), flush=True)


def bench_sddmm(rng, sizes, sparsities, ks, dtype, backend, repeats, records):
    m = n = sizes
    for sparsity in sparsities:
        p = jaxsparse.CSR.fromdense(jnp.asarray(rng.random((m, n)) >= sparsity, dtype))
        indices, indptr = p.pattern_arrays
        rows = jaxsparse._formats.row_ids(indptr, indices.shape[0])
        sp = jax.jit(lambda a, b, p: jaxsparse.sddmm(a, b, p, backend=backend).values)
        dense_then_sample = jax.jit(
            lambda a, b, r, c: jnp.dot(a, b, preferred_element_type=jnp.float32)[r, c]
            .astype(a.dtype))
        for k in ks:
            a = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
            b = jnp.asarray(rng.standard_normal((k, n), np.float32), dtype)
            t_sp, err = _try(sp, a, b, p, repeats=repeats)
            t_dense, _ = _try(dense_then_sample, a, b, rows, indices, repeats=repeats)
            records.append(dict(op="sddmm", fmt="csr", sparsity=sparsity, m=m, k=k, n=n,
                                dtype=jnp.dtype(dtype).name, pallas_ms=t_sp, dense_ms=t_dense,
                                bcsr_ms=None, error=err))
            print(_row(records[-1]), flush=True)


def bench_attention(rng, batch, seq, heads, head_dim, window, block, dtype, interpret, repeats,
                    records):
    q, k, v = (jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim), np.float32), dtype)
               for _ in range(3))
    info = jsp.block_mask_info(jsp.local_block_mask(seq, seq, block, block, window),
                               seq_q=seq, seq_k=seq)
    sparse = jax.jit(lambda q, k, v, info: jsp.block_sparse_attention(
        q, k, v, info, window=window, interpret=interpret))
    t_sp, err = _try(sparse, q, k, v, info, repeats=repeats)
    # |i - j| < window  <=>  local_window_size = (window - 1, window - 1)
    dense = {impl: jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q, k, v, local_window_size=(window - 1, window - 1), implementation=impl))
        for impl in ("xla", "cudnn")}
    t_xla, _ = _try(dense["xla"], q, k, v, repeats=repeats)
    t_cudnn, err_c = _try(dense["cudnn"], q, k, v, repeats=repeats)
    nq = seq // block
    density = float(np.asarray(info.counts).sum()) / (nq * nq)
    records.append(dict(op="attention", fmt="local", sparsity=1 - density, m=seq, k=head_dim,
                        n=heads, dtype=jnp.dtype(dtype).name, pallas_ms=t_sp, dense_ms=t_xla,
                        cudnn_ms=t_cudnn, bcsr_ms=None, error=err, cudnn_error=err_c,
                        window=window, block=block, batch=batch))
    print(_row(records[-1]), flush=True)


def _ratio(a, b):
    return None if a is None or b is None or a == 0 else b / a


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _row(r):
    return (f"{r['op']:9s} {r['fmt']:6s} sp={_fmt(r['sparsity'], '.2f')} k={r['k']:5d} "
            f"n={r['n']:5d} "
            f"pallas={_fmt(r['pallas_ms'])}ms dense={_fmt(r['dense_ms'])}ms "
            f"bcsr={_fmt(r.get('bcsr_ms'))}ms "
            f"x_dense={_fmt(_ratio(r['pallas_ms'], r['dense_ms']), '.2f')}"
            + (f"  [{r['error']}]" if r.get("error") else ""))


def _markdown(meta, records):
    smoke = " (SMOKE: interpret mode, tiny sizes; not a measurement)" if meta["smoke"] else ""
    lines = [f"# Pallas kernels: GPU benchmark{smoke}",
             "", f"- device: {meta['device']}", f"- date: {meta['date']}",
             f"- jax {meta['jax']}, jaxlib {meta['jaxlib']}, python {meta['python']}",
             f"- backend: {meta['backend']}, repeats: {meta['repeats']} (median)", "",
             "| op | format | sparsity | M | K | N/heads | dtype | pallas ms | dense ms | BCSR ms "
             "| cuDNN ms | x dense | x BCSR |", "|" + "---|" * 13]
    for r in records:
        lines.append(
            f"| {r['op']} | {r['fmt']} | {_fmt(r['sparsity'], '.2f')} | {r['m']} | {r['k']} | "
            f"{r['n']} | {r['dtype']} | {_fmt(r['pallas_ms'])} | {_fmt(r['dense_ms'])} | "
            f"{_fmt(r.get('bcsr_ms'))} | {_fmt(r.get('cudnn_ms'))} | "
            f"{_fmt(_ratio(r['pallas_ms'], r['dense_ms']), '.2f')} | "
            f"{_fmt(_ratio(r['pallas_ms'], r.get('bcsr_ms')), '.2f')} |")
    errors = [r for r in records if r.get("error") or r.get("bcsr_error") or r.get("cudnn_error")]
    if errors:
        lines += ["", "Errors (a missing figure):"]
        for r in errors:
            for key in ("error", "bcsr_error", "cudnn_error"):
                if r.get(key):
                    lines.append(f"- {r['op']} {r['fmt']} n={r['n']} {key}: {r[key]}")
    if not meta["smoke"]:
        lines += ["", "Targets:"]
        for r in records:
            key = (r["op"], r["fmt"], r["sparsity"] if r["op"] != "attention" else None,
                   r["n"] if r["op"] != "attention" else None)
            for star in ("", "*"):
                t = TARGETS.get((key[0], key[1] + star, *key[2:]))
                if t:
                    base, goal = t
                    got = _ratio(r["pallas_ms"], r[f"{base}_ms"])
                    ok = "met" if got is not None and got >= goal else "NOT met"
                    lines.append(f"- {r['op']} {r['fmt']} sp={r['sparsity']} n={r['n']}: "
                                 f"{_fmt(got, '.2f')}x over {base} (target {goal}x): {ok}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Run the benchmark. ``argv``: a list of arguments, or an ``argparse.Namespace`` holding
    any of ``smoke``, ``repeats``, ``out``, ``only`` (the rest take their defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes in Pallas interpret mode (runs on CPU; checks the script)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--only", choices=["spmm", "sddmm", "attention"], action="append")
    if isinstance(argv, argparse.Namespace):  # from a wrapper CLI (python -m jaxsparse.bench gpu)
        args = parser.parse_args([])
        args.__dict__.update({k: v for k, v in vars(argv).items() if k in vars(args)})
    else:
        args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if not args.smoke and not on_gpu:
        parser.error(f"no GPU (jax.default_backend()={jax.default_backend()!r}); "
                     "use --smoke to check the script in interpret mode")
    if not args.smoke and jsp.gpu_capability_reason():
        parser.error(f"the Pallas kernels do not run here: {jsp.gpu_capability_reason()}")
    backend = "pallas-interpret" if args.smoke else "pallas"
    repeats = args.repeats or (1 if args.smoke else 20)
    only = set(args.only or ["spmm", "sddmm", "attention"])
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    records: list[dict] = []
    if args.smoke:
        size, ns, sparsities = 128, (16, 64), (0.5, 0.9)
        att = dict(batch=1, seq=256, heads=2, head_dim=32, window=64, block=32)
    else:
        size, ns, sparsities = 4096, (256, 4096), (0.5, 0.7, 0.9, 0.95)
        att = dict(batch=1, seq=8192, heads=16, head_dim=128, window=512, block=128)
    if "spmm" in only:
        bench_spmm(rng, size, sparsities, ns, dtype, backend, repeats, records)
    if "sddmm" in only:
        bench_sddmm(rng, size, sparsities, ns, dtype, backend, repeats, records)
    if "attention" in only:
        bench_attention(rng, dtype=dtype, interpret=args.smoke, repeats=repeats, records=records,
                        **att)
    dev = jax.devices()[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(device=f"{dev.platform}: {dev.device_kind}", date=now.isoformat(timespec="seconds"),
                jax=jax.__version__, jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__")
                else jax.__version__, python=platform.python_version(), backend=backend,
                repeats=repeats, smoke=args.smoke)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"pallas_{'smoke' if args.smoke else 'gpu'}_"
                                  f"{now.strftime('%Y%m%d-%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, results=records), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(meta, records))
    print(f"wrote {stem}.json and {stem}.md")
    return records


if __name__ == "__main__":
    main()
