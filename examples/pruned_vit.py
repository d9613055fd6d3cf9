"""Prune ViT-B/16 with jaxsparse: images/s dense vs sparse on CPU.

The model is examples/vit.py's ViT-B/16 (224x224, 197 tokens), randomly initialised unless
``--weights PATH`` gives a timm or Hugging Face safetensors checkpoint (then also pass
``--hf-eps`` for Hugging Face checkpoints, which use LayerNorm epsilon 1e-12). Random weights say
nothing about accuracy, so this example measures speed only, plus one correctness check: at 0%
sparsity the sparsified model gives the dense model's logits.

Pruned: every linear layer of the 12 encoder blocks (query/key/value/attention output, fc1,
fc2). Not pruned: the patch embedding (a convolution), LayerNorms, attention itself, and the
classification head, which is small (768x1000, ~1% of the weights) and the most
accuracy-sensitive layer, as users usually keep it dense. Dense and pruned models compute
attention the same way: jaxsparse's fused attention on a full pattern by default, or jnp ops with
``--attention xla``. Variants:

* ``magnitude``: unstructured, per-layer magnitude, CSR;
* ``2:4``: ``method="n:m"``, ``format="nm"`` (50%);
* ``block16``: 16x16 blocks, ``method="block"``, ``format="bsr"``.

    python examples/pruned_vit.py           # batch 1 and 8, all variants
    python examples/pruned_vit.py --quick   # 0% check, batch 1, 90% magnitude only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import jaxsparse
from model_utils import ATTENTION_KINDS, jit_method, paired_throughput, set_attention, throughput
from results_io import (attention_markdown, format_table, machine_info, machine_markdown,
                        markdown_table, write_json, write_figure, write_text)
from vit import VIT_B16, ViT, ViTConfig, load_vit, throughput_call

BATCHES = (1, 8)
ENCODER_LINEARS = r"^blocks\."  # the head ("head") is left dense
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

# name -> sparsify keyword arguments
VARIANTS = {
    "magnitude 90%": dict(sparsity=0.9, method="magnitude", format="csr"),
    "magnitude 95%": dict(sparsity=0.95, method="magnitude", format="csr"),
    "2:4": dict(sparsity=None, method="n:m", format="nm", n_m=(2, 4)),
    "block16 90%": dict(sparsity=0.9, method="block", format="bsr", block_size=(16, 16)),
}
QUICK_VARIANTS = ("magnitude 90%",)


def prune(model: nnx.Module, filter=ENCODER_LINEARS, **kwargs):
    """A sparsified copy of ``model`` (the dense one is untouched) and jaxsparse's report."""
    return jaxsparse.sparsify(nnx.clone(model), filter=filter, **kwargs)


def random_images(config: ViTConfig, batch: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed),
                             (batch, config.image_size, config.image_size, config.in_channels),
                             jnp.float32)


def zero_sparsity_check(dense: nnx.Module, batch: int = 2) -> dict:
    """Logits of the model sparsified at 0% (CSR, every entry kept) vs the dense model."""
    sparse, report = prune(dense, sparsity=0.0, method="magnitude", format="csr")
    images = random_images(dense.config, batch, seed=1)
    a = np.asarray(jit_method(dense, "__call__")(images))
    b = np.asarray(jit_method(sparse, "__call__")(images))
    err = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(a)))
    return dict(batch=batch, layers=len(report), max_abs_diff=err, max_abs_logit=scale,
                ok=bool(np.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, scale))),
                same_argmax=bool(np.all(a.argmax(-1) == b.argmax(-1))))


def speed_table(dense: nnx.Module, variants: dict, *, batches=BATCHES, repeats=5,
                progress=None) -> dict:
    bar = progress or (lambda *a, **k: None)
    dense_calls = {b: throughput_call(dense, b) for b in batches}
    dense_speed = {}
    for b in batches:
        bar(f"dense, batch {b}")
        dense_speed[b] = throughput(b, dense_calls[b], repeats, warmup=1)
    out = {"dense": {"images_per_s": {str(b): v for b, v in dense_speed.items()}}, "rows": []}
    for name, kw in variants.items():
        bar(f"{name}: prune")
        sparse, report = prune(dense, **kw)
        row = dict(variant=name, **{k: (list(v) if isinstance(v, tuple) else v)
                                    for k, v in kw.items()},
                   layers=len(report), measured_sparsity=report.total_sparsity,
                   images_per_s={}, speedup={})
        row["dense_images_per_s"] = {}
        for b in batches:  # timed alternately with dense: the ratio is from the same moments
            bar(f"{name}, batch {b} (alternating with dense)")
            d, s = paired_throughput(b, dense_calls[b], throughput_call(sparse, b), repeats)
            row["images_per_s"][str(b)] = s
            row["dense_images_per_s"][str(b)] = d
            row["speedup"][str(b)] = s / d
        out["rows"].append(row)
        del sparse
    return out


def table_rows(res: dict, batches=BATCHES):
    d = res["dense"]
    rows = [["dense", "-", "-", *[f"{d['images_per_s'][str(b)]:.2f}" for b in batches],
             *["1.00x" for _ in batches]]]
    for r in res["rows"]:
        rows.append([r["variant"], r["format"], f"{r['measured_sparsity']:.1%}",
                     *[f"{r['images_per_s'][str(b)]:.2f}" for b in batches],
                     *[f"{r['speedup'][str(b)]:.2f}x" for b in batches]])
    return (["variant", "format", "sparsity", *[f"img/s b{b}" for b in batches],
             *[f"speedup b{b}" for b in batches]], rows)


def to_markdown(results: dict) -> str:
    batches = tuple(results["batches"])
    c = results["zero_sparsity_check"]
    parts = ["# Pruned ViT-B/16 (jaxsparse)", "", machine_markdown(results["machine"]), "",
             f"Weights: {results['weights']}. Pruned: the {c['layers']} linear layers of the 12 "
             "encoder blocks; the patch embedding (conv), LayerNorms, attention and the "
             "classification head stay dense. Images 224x224, jit, median of "
             f"{results['repeats']} calls; each pruned model is timed alternately with the "
             "dense one and its speedup is the ratio of that run (the dense row is its own "
             "run).", "",
             attention_markdown(results), "",
             "## 0% sparsity check", "",
             f"Sparsified at 0% (CSR, all entries stored) vs dense, batch {c['batch']}: max |diff| "
             f"{c['max_abs_diff']:.2e} (max |logit| {c['max_abs_logit']:.2f}) -> "
             f"{'PASS' if c['ok'] else 'FAIL'}; same argmax: {c['same_argmax']}.", "",
             "## Throughput", "", markdown_table(*table_rows(results["speed"], batches)), ""]
    if results.get("notes"):
        parts += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(parts)


def plot(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["speed"]["rows"]
    batches = results["batches"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(batches)
    x = np.arange(len(rows))
    for i, b in enumerate(batches):
        ax.bar(x + i * width, [r["speedup"][str(b)] for r in rows], width, label=f"batch {b}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(x + width * (len(batches) - 1) / 2, [r["variant"] for r in rows])
    ax.set(ylabel="speedup vs dense (jit, CPU)", title="ViT-B/16 224x224, encoder linears pruned")
    ax.legend()
    fig.tight_layout()
    return write_figure(path, fig)


def speed_notes(results: dict) -> list[str]:
    """What the table says, in words (the fastest variant, anything slower than dense)."""
    rows, notes = results["speed"]["rows"], []
    for b in results["batches"]:
        best = max(rows, key=lambda r: r["speedup"][str(b)], default=None)
        if best:
            notes.append(f"batch {b}: fastest is {best['variant']} ({best['format']}) at "
                         f"{best['speedup'][str(b)]:.2f}x dense.")
        slow = [r["variant"] for r in rows if r["speedup"][str(b)] < 1.0]
        if slow:
            notes.append(f"batch {b}: slower than dense: {', '.join(slow)}.")
    notes.append("The classification head (768x1000) is not pruned: it is ~1% of the weights and "
                 "the layer users keep dense; random weights, so no accuracy is reported.")
    return notes


def write_results(results: dict, out_dir: Path, name: str = "pruned_vit",
                  png: bool = True) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [write_json(out_dir / f"{name}.json", results),
             write_text(out_dir / f"{name}.md", to_markdown(results))]
    if png and results["speed"]["rows"]:
        paths.append(plot(results, out_dir / f"{name}.png"))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None,
                    help="timm or Hugging Face ViT-B/16 safetensors file (default: random init)")
    ap.add_argument("--hf-eps", action="store_true",
                    help="LayerNorm epsilon 1e-12 (Hugging Face checkpoints)")
    ap.add_argument("--quick", action="store_true",
                    help="0%% check, batch 1, 90%% magnitude only; no files unless --out")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results directory (default {RESULTS_DIR} for a full run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention", choices=ATTENTION_KINDS, default="jaxsparse",
                    help="how dense and pruned models alike compute attention: jaxsparse's fused "
                         "kernel on a full pattern (default) or jnp ops compiled by XLA")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    machine = machine_info(None if argv is None else [sys.argv[0], *argv])
    print(f"jaxsparse {machine['jaxsparse']} / jax {machine['jax']} on {machine['cpu']} "
          f"({machine['cores']} cores)")
    if args.weights is not None:
        config = ViTConfig(layer_norm_eps=1e-12) if args.hf_eps else VIT_B16
        dense, weights = load_vit(args.weights, config), str(args.weights)
    else:
        dense, weights = ViT(VIT_B16, rngs=nnx.Rngs(0)), "random init (seed 0)"
    set_attention(dense, args.attention)
    batches = (1,) if args.quick else BATCHES
    variants = ({k: VARIANTS[k] for k in QUICK_VARIANTS} if args.quick else VARIANTS)
    check = zero_sparsity_check(dense)
    print(f"0% sparsity check: max |sparse - dense| = {check['max_abs_diff']:.2e} -> "
          f"{'PASS' if check['ok'] else 'FAIL'}")
    with tqdm(total=len(batches) * (1 + len(variants)) + len(variants), desc="pruned_vit",
              unit="step", dynamic_ncols=True) as pbar:
        def progress(msg):
            pbar.set_postfix_str(msg)
            pbar.update(1)

        speed = speed_table(dense, variants, batches=batches, repeats=args.repeats,
                            progress=progress)
    results = {"machine": machine, "weights": weights, "attention": args.attention,
               "batches": list(batches),
               "repeats": args.repeats, "image_size": dense.config.image_size,
               "pruned": "encoder linear layers (blocks.*); head, patch embedding, LayerNorm, "
                         "attention dense", "zero_sparsity_check": check, "speed": speed}
    results["notes"] = speed_notes(results)
    print()
    print(format_table(*table_rows(speed, batches)))
    for n in results["notes"]:
        print("note:", n)
    print(f"[{time.perf_counter() - t0:.0f} s]")
    out = args.out if args.out is not None else (None if args.quick else RESULTS_DIR)
    if out is not None:
        for p in write_results(results, out, "pruned_vit_quick" if args.quick else "pruned_vit"):
            print("wrote", p)
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
