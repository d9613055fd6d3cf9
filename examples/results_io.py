"""Helpers shared by the pruning examples: machine description, tables, JSON/Markdown writers."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Sequence

import jax


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(argv: Sequence[str] | None = None) -> dict:
    """Where and how a benchmark ran: CPU, cores usable, date (UTC), versions, command line."""
    import jaxsparse

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    argv = sys.argv if argv is None else argv
    return dict(
        cpu=cpu_model(), cores=cores, platform=platform.platform(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        python=platform.python_version(), jax=jax.__version__,
        jax_backend=jax.default_backend(), jaxsparse=jaxsparse.__version__,
        native_kernels=native_kernels_loaded(),
        command=" ".join(shlex.quote(a) for a in ["python", *argv]),
    )


def native_kernels_loaded() -> bool:
    """Whether jaxsparse found its compiled CPU kernels (else it falls back to pure JAX)."""
    try:
        from jaxsparse import ffi
        for name in ("AVAILABLE", "available", "HAVE_NATIVE", "_LIB"):
            if hasattr(ffi, name):
                v = getattr(ffi, name)
                return bool(v() if callable(v) else v)
    except Exception:  # noqa: BLE001 - informational only
        pass
    return any(p.name.startswith("_jaxsparse_cpu")
               for p in Path(__import__("jaxsparse").__file__).parent.joinpath("ffi").glob("*.so"))


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths),
                      *(line(r) for r in cells[1:])])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_markdown(machine: dict) -> str:
    return "\n".join([
        f"- Machine: {machine['cpu']}, {machine['cores']} cores usable ({machine['platform']})",
        f"- Date: {machine['date']}",
        f"- Versions: jax {machine['jax']} ({machine['jax_backend']}), "
        f"jaxsparse {machine['jaxsparse']}, Python {machine['python']}; "
        f"native CPU kernels: {'yes' if machine['native_kernels'] else 'no'}",
        f"- Command: `{machine['command']}`",
    ])


def write_json(path: Path, results: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return path


def write_figure(path: Path, fig) -> Path:
    """Save a matplotlib figure (and close it)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def attention_markdown(results: dict) -> str:
    """How the dense and pruned models computed attention in this run."""
    how = {"jaxsparse": "`jaxsparse.attention` on `patterns.full` (the fused native kernel: no "
                        "[batch, heads, seq, seq] scores in memory)",
           "xla": "`jnp` ops compiled by XLA (`SelfAttention.xla_attention`)"}
    kind = results.get("attention", "xla")  # runs before the option existed used jnp ops
    return (f"Attention (not pruned; the same in the dense and the pruned models): "
            f"{how[kind]} (`--attention {kind}`).")
