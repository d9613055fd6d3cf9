"""Benchmarks: jaxsparse against the alternatives a user would pick, measured in one run.

``python -m jaxsparse.bench cpu`` (see ``--help``). Every case times all its methods in the same
process, interleaving their repetitions, and reports medians and ratios to dense XLA; results go to
``benchmarks/results/`` as JSON, a Markdown table and a PNG plot, stating machine, date and command.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, Callable

import numpy as np

__all__ = ["Case", "Timer", "jit_module", "machine_info", "time_interleaved",
           "write_results"]


@dataclass
class Case:
    """One benchmark case: what was measured and each method's median time in milliseconds."""

    group: str
    label: str
    params: dict[str, Any]
    times_ms: dict[str, float] = field(default_factory=dict)
    baseline: str = "dense"

    def speedup(self, method: str) -> float | None:
        """How many times faster ``method`` ran than the baseline (None if either is missing)."""
        base, t = self.times_ms.get(self.baseline), self.times_ms.get(method)
        if base is None or t is None or t <= 0:
            return None
        return base / t


def _block(x):
    """Wait for a result: JAX arrays (and pytrees of them), torch tensors, anything else as is."""
    try:
        import jax
        jax.block_until_ready(x)
    except Exception:  # noqa: BLE001 - non-JAX results (NumPy, SciPy, torch) are already computed
        pass
    return x


class Timer:
    """Calls ``fn(*args)`` in batches sized so one sample lasts at least ``min_sample_s``.

    A batch of several calls starts with one untimed call, so that a sample sees the operands in
    cache and the thread pools awake, as the layers of a model calling one another do, and not the
    state the previous method left behind. Calls as long as a sample get no such call: refilling
    the caches is a small part of them."""

    def __init__(self, fn: Callable, args: tuple, min_sample_s: float = 10e-3):
        self.fn, self.args = fn, args
        _block(fn(*args))  # compile / warm up; the batch is sized on a later call
        t0 = perf_counter()
        _block(fn(*args))
        once = max(perf_counter() - t0, 1e-7)
        self.inner = max(1, min(1000, int(min_sample_s / once)))

    def sample(self) -> float:
        """Seconds per call, averaged over one batch."""
        if self.inner > 1:
            _block(self.fn(*self.args))
        t0 = perf_counter()
        out = None
        for _ in range(self.inner):
            out = self.fn(*self.args)
        _block(out)
        return (perf_counter() - t0) / self.inner


def jit_module(module, body: Callable = lambda m, *args: m(*args)):
    """``(fn, leaves)``: ``fn(leaves, *args)`` is ``body(module, *args)`` under jit, with the Flax
    NNX module's state passed as the flat list of arrays ``leaves`` (split and flattened once, as
    a dense baseline gets its arrays), so that no call spends time flattening nnx variables
    (~0.4 ms of a 9 ms all-MiniLM-L6-v2 forward at batch 1)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    merge = lambda leaves: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return jax.jit(lambda leaves, *args: body(merge(leaves), *args)), leaves


def time_interleaved(methods: dict[str, tuple[Callable, tuple]], reps: int = 15) -> dict[str, float]:
    """Median milliseconds per call of each method, repetitions interleaved across methods so slow
    drifts of the machine (frequency, other load) hit all of them alike. Every repetition runs the
    methods in a new (seeded) random order, so that no method always follows the same one."""
    timers = {name: Timer(fn, args) for name, (fn, args) in methods.items()}
    samples: dict[str, list[float]] = {name: [] for name in timers}
    names, order = list(timers), np.random.default_rng(0)
    for _ in range(reps):
        for i in order.permutation(len(names)):
            samples[names[i]].append(timers[names[i]].sample())
    return {name: 1e3 * float(np.median(s)) for name, s in samples.items()}


def machine_info() -> dict[str, Any]:
    """The machine, software and moment of a run."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                   if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
        isa = [f for f in ("avx512f", "avx2", "fma") if f" {f}" in flags]
    except (OSError, StopIteration):
        isa = []
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m jaxsparse.bench " + " ".join(sys.argv[1:]),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": isa,
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def _fmt_ms(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.3f}" if t < 10 else f"{t:.1f}"


def markdown_table(cases: list[Case], methods: list[str], focus: str = "jaxsparse") -> str:
    """Median times (ms) per method and the speedup of ``focus`` (and others) over the baseline."""
    others = [m for m in methods if m != "dense"]
    head = ["group", "case", *[f"{m} ms" for m in methods], *[f"{m} x" for m in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        row = [c.group, c.label, *[_fmt_ms(c.times_ms.get(m)) for m in methods]]
        for m in others:
            s = c.speedup(m)
            cell = "-" if s is None else f"{s:.2f}"
            row.append(f"**{cell}**" if m == focus and s is not None else cell)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_results(name: str, cases: list[Case], methods: list[str], out_dir: Path,
                  info: dict[str, Any], summary: list[str] | None = None,
                  plot: Callable[[Path], None] | None = None) -> dict[str, Path]:
    """Write ``name.json``, ``name.md`` (and ``name.png`` through ``plot``) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    payload = {"machine": info, "methods": methods, "summary": summary or [],
               "cases": [asdict(c) | {"speedup": {m: c.speedup(m) for m in c.times_ms}}
                         for c in cases]}
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    header = (f"# {name}\n\nMachine: {info['cpu']}, {info['cores']} cores ({', '.join(info['isa'])}); "
              f"jax {info['jax']}; measured {info['date']}.\n\nCommand: `{info['command']}`\n\n"
              "Median milliseconds per call (repetitions interleaved across methods in one "
              "process) and speedup over dense XLA (`x` columns; higher is better).\n")
    body = "\n".join(summary or [])
    paths["md"].write_text(header + ("\n" + body + "\n" if body else "") + "\n" +
                           markdown_table(cases, methods) + "\n")
    if plot is not None:
        paths["png"] = out_dir / f"{name}.png"
        plot(paths["png"])
    return paths
