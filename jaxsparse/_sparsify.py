"""Model-level sparsification: swap every ``nnx.Linear`` of a model for a pruned SparseLinear.

``sparsify`` (like torchao's ``sparsify_``) modifies the model in place and returns it with a
:class:`SparsifyReport`; ``densify`` undoes it. ``save_state`` / ``load_state`` write a (sparsified)
model's state to a NumPy ``.npz`` file and read it back into a model of the same architecture,
dense or sparse: the sparse layers' structure (format, shapes, block size, N:M) is stored with the
arrays, so no pickle and no extra package are needed.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse import prune as _prune
from jaxsparse._formats import BSR, CSR, NM
from jaxsparse.layers._linear import CALIBRATED, SparseLinear, resolve_method

__all__ = ["sparsify", "densify", "SparsifyReport", "save_state", "load_state"]


class SparsifyReport(list):
    """One dict per replaced layer: ``path``, ``shape`` ([out, in]), ``format``, ``method``,
    ``nnz``, ``size``, ``sparsity``. A plain list of plain dicts (``json.dumps(report)`` works);
    ``str(report)`` is a table with a total row."""

    @property
    def total_sparsity(self) -> float:
        size = sum(r["size"] for r in self)
        return 1.0 - sum(r["nnz"] for r in self) / size if size else 0.0

    def to_json(self, **kwargs) -> str:
        return json.dumps(list(self), **kwargs)

    def __str__(self) -> str:
        head = ("layer", "shape [out, in]", "format", "method", "nnz", "sparsity")
        rows = [(r["path"], "x".join(map(str, r["shape"])), r["format"], r["method"],
                 str(r["nnz"]), f"{r['sparsity']:.2%}") for r in self]
        rows.append(("total", "", "", "", str(sum(r["nnz"] for r in self)),
                     f"{self.total_sparsity:.2%}"))
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        sep = "  ".join("-" * w for w in widths)
        return "\n".join([line(head), sep, *map(line, rows)])

    __repr__ = list.__repr__


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def _child(node, key):
    if isinstance(node, (list, tuple, dict, nnx.List, nnx.Dict)) or not isinstance(key, str):
        return node[key]
    return getattr(node, key)


def _set_child(node, key, value):
    if isinstance(node, (list, dict, nnx.List, nnx.Dict)) or not isinstance(key, str):
        node[key] = value
    else:
        setattr(node, key, value)


def _find(model, cls, filter) -> list[tuple[tuple, Any]]:
    if isinstance(filter, str):
        regex = re.compile(filter)
        select = lambda path, mod: regex.search(_path_str(path)) is not None
    elif filter is None:
        select = lambda path, mod: True
    elif callable(filter):
        select = lambda path, mod: bool(filter(_path_str(path), mod))
    else:
        raise TypeError(f"sparsify: filter must be None, a regex string or a callable "
                        f"(path, module) -> bool, got {type(filter).__name__}")
    found = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, cls) and path and select(path, node):
            found.append((tuple(path), node))
    return found


def _replace(model, path, new):
    parent = model
    for key in path[:-1]:
        parent = _child(parent, key)
    _set_child(parent, path[-1], new)


_TAG = "_jaxsparse_calibration_key"


def _capture_inputs(model, linears, calibration, gram: bool) -> dict[str, np.ndarray]:
    """Run the model on the calibration data and return, keyed by path, each Linear's
    per-input-feature L2 norm (``gram=False``) or the Gram matrix ``X^T X`` of its inputs. For the
    run, each selected Linear carries a static tag (it survives ``nnx.jit``'s copies) and
    ``nnx.Linear.__call__`` is wrapped to record tagged inputs; the sums leave through
    ``jax.debug.callback``, so a jitted calibration fn works too."""
    sums = {_path_str(p): np.zeros((lin.in_features,) * (2 if gram else 1), np.float64)
            for p, lin in linears}
    original = nnx.Linear.__call__

    def recording_call(self, inputs, *args, **kwargs):
        acc = sums.get(getattr(self, _TAG, None))
        if acc is not None:
            x = jnp.asarray(inputs)
            x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            stat = (jnp.matmul(x.T, x, precision="highest") if gram
                    else jnp.sum(jnp.square(x), axis=0))

            def add(v, acc=acc):
                acc += np.asarray(v, np.float64)

            jax.debug.callback(add, stat)
        return original(self, inputs, *args, **kwargs)

    for p, lin in linears:
        setattr(lin, _TAG, _path_str(p))
    nnx.Linear.__call__ = recording_call
    try:
        if callable(calibration) and not isinstance(calibration, (tuple, list)):
            out = calibration(model)
        elif isinstance(calibration, (tuple, list)):
            out = model(*calibration)
        else:
            raise TypeError("sparsify: calibration must be a tuple of model arguments or a "
                            f"callable fn(model), got {type(calibration).__name__}")
        jax.block_until_ready(out)
        jax.effects_barrier()
    finally:
        nnx.Linear.__call__ = original
        for _, lin in linears:
            if hasattr(lin, _TAG):
                delattr(lin, _TAG)
    return sums if gram else {k: np.sqrt(v) for k, v in sums.items()}


def _calibration_groups(linears, gram: bool, budget: int | None) -> list[list]:
    """``linears`` in order, cut into consecutive groups whose recorded statistics (float64: an
    ``[in, in]`` matrix each for sparsegpt, ``[in]`` for wanda) fit ``budget`` bytes together; a
    layer whose own statistic is larger makes a group of its own. ``None``: one group."""
    groups, used = [], 0
    for path, lin in linears:
        size = 8 * lin.in_features ** (2 if gram else 1)
        if not groups or (budget is not None and used + size > budget):
            groups.append([])
            used = 0
        groups[-1].append((path, lin))
        used += size
    return groups


def sparsify(model: nnx.Module, *, sparsity: float | None = None, method: str | None = None,
             format: str = "csr", filter=None, calibration=None, block_size=None, n_m=None,
             calibration_memory: int | None = 1 << 30, transpose_plan: bool = False,
             matvec: bool = False):
    """Replace every ``nnx.Linear`` of ``model`` (selected by ``filter``) with a pruned
    :class:`~jaxsparse.layers.SparseLinear`; returns ``(model, report)``. The model is modified in
    place (pass a copy, e.g. ``nnx.clone(model)``, to keep the dense one).

    * ``method``: ``"magnitude"`` (per layer), ``"block"``, ``"n:m"``, ``"wanda"`` or
      ``"sparsegpt"`` (which also updates the kept weights, see :func:`jaxsparse.prune.sparsegpt`);
      ``None`` picks the natural one for ``format`` (csr: magnitude, bsr: block, nm: n:m).
    * ``format``: ``"csr"``, ``"bsr"`` (needs ``block_size``), ``"nm"`` (``n_m``, default (2, 4)).
    * ``filter``: ``None`` (all), a regex searched in the dotted path (``"layers.0.output"``), or a
      callable ``(path: str, module) -> bool``.
    * ``calibration`` (``method="wanda"`` or ``"sparsegpt"``): a tuple of positional arguments
      such that ``model(*calibration)`` runs the model, or a callable ``fn(model)``. Each selected
      layer's inputs are recorded during that run (as per-feature sums of squares for wanda, as
      ``X^T X`` for sparsegpt), all on the dense model: the layers are pruned independently.
    * ``calibration_memory``: the most bytes of recorded statistics held at once (default 1 GiB;
      ``None``: no limit). sparsegpt keeps an ``[in, in]`` float64 matrix per layer (BERT-base's
      72 layers: ~1.2 GB): when they do not fit, the calibration runs once per group of layers
      that does, each run on the still dense model, so the result is the same.
    * ``transpose_plan`` (csr): store each layer's :class:`jaxsparse.TransposePlan` too, for
      fine-tuning the sparse model (see :class:`~jaxsparse.layers.SparseLinear`).
    * ``matvec`` (csr, float32): store each layer's sliced copy too, for inference on one or a
      few input vectors at a time (decoding a few tokens or samples); the layers' values are then
      :class:`~jaxsparse.layers.FrozenWeight`, not parameters (see
      :class:`~jaxsparse.layers.SparseLinear`).

    >>> model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), jax.nn.relu)
    >>> model, report = jaxsparse.sparsify(model, sparsity=0.9)
    >>> type(model.layers[0]).__name__, round(report.total_sparsity, 2)
    ('SparseLinear', 0.9)
    >>> text = str(report)  # a table; json.dumps(report) works as well
    """
    method = resolve_method(method, format, "sparsify")
    if calibration_memory is not None and (
            isinstance(calibration_memory, bool) or not isinstance(calibration_memory, int)
            or calibration_memory <= 0):
        raise ValueError("sparsify: calibration_memory must be a positive number of bytes or "
                         f"None, got {calibration_memory!r}")
    linears = _find(model, nnx.Linear, filter)
    gram = method == "sparsegpt"
    if method in CALIBRATED and calibration is None:
        raise ValueError(f"sparsify: method={method!r} needs calibration (a tuple of model "
                         "arguments, or a callable fn(model))")
    groups = (_calibration_groups(linears, gram, calibration_memory) if method in CALIBRATED
              else [linears])
    stat_arg = "x_gram" if gram else "x_norms"
    built = []  # every group is calibrated on the dense model: layers are swapped in at the end
    for group in groups:
        stats = (_capture_inputs(model, group, calibration, gram) if method in CALIBRATED
                 else {})
        for path, lin in group:
            where = f"sparsify (layer {_path_str(path)!r})"
            try:
                new = SparseLinear.from_dense(lin, sparsity=sparsity, method=method,
                                              format=format, block_size=block_size, n_m=n_m,
                                              transpose_plan=transpose_plan, matvec=matvec,
                                              **{stat_arg: stats.pop(_path_str(path), None)})
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            built.append((path, new))
    report = SparsifyReport()
    for path, new in built:
        _replace(model, path, new)
        size = new.in_features * new.out_features
        report.append(dict(path=_path_str(path), shape=[new.out_features, new.in_features],
                           format=format, method=method, nnz=new.nnz, size=size,
                           sparsity=1.0 - new.nnz / size))
    return model, report


def densify(model: nnx.Module) -> nnx.Module:
    """Replace every :class:`SparseLinear` of ``model`` (in place) with the ``nnx.Linear`` holding
    its masked kernel; returns the model."""
    for path, layer in _find(model, SparseLinear, None):
        _replace(model, path, layer.to_dense())
    return model


# ----------------------------------------------------------------------------------------------
# Saving and loading

_META_KEY = "__jaxsparse_layers__"


def save_state(path, model: nnx.Module) -> None:
    """Write the model's whole state (parameters, sparsity patterns, any other variable) to a
    NumPy ``.npz`` file, with the structure of its sparse layers, so :func:`load_state` can
    rebuild them in a fresh model of the same architecture."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            name = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                walk(v, name)
            else:
                flat[name] = np.asarray(v)

    walk(nnx.to_pure_dict(nnx.state(model)), "")
    layers = {}
    for p, layer in _find(model, SparseLinear, None):
        layers["/".join(map(str, p))] = dict(
            in_features=layer.in_features, out_features=layer.out_features,
            use_bias=layer.use_bias, format=layer.format, block_size=layer.block_size,
            n_m=layer.n_m, transpose_plan=layer.transpose_plan, matvec=layer.matvec,
            param_dtype=np.dtype(layer.param_dtype).name,
            dtype=None if layer.dtype is None else np.dtype(layer.dtype).name)
    flat[_META_KEY] = np.asarray(json.dumps(layers))
    np.savez(path, **flat)


def load_state(path, model: nnx.Module) -> nnx.Module:
    """Load a :func:`save_state` file into ``model`` (in place; also returned). ``model`` has the
    saved architecture, dense or sparsified in any way: layers saved sparse become
    :class:`SparseLinear` of the saved structure, then every variable takes its saved value."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    layers = json.loads(str(arrays.pop(_META_KEY)))
    for p, meta in layers.items():
        keys = tuple(int(k) if k.isdigit() else k for k in p.split("/"))
        get = lambda name: arrays[f"{p}/{name}"]
        shape = (meta["out_features"], meta["in_features"])
        if meta["format"] == "nm":
            n, m = meta["n_m"]
            w = NM.tree_unflatten(((shape, False), n, m), (jnp.asarray(get("data")),
                                                           jnp.asarray(get("positions"))))
        else:
            cls = CSR if meta["format"] == "csr" else BSR
            w = cls.tree_unflatten((shape, False), (jnp.asarray(get("data")),
                                                     jnp.asarray(get("indices")),
                                                     jnp.asarray(get("indptr"))))
        bias = jnp.asarray(get("bias")) if meta["use_bias"] else None
        layer = SparseLinear(meta["in_features"], meta["out_features"], use_bias=meta["use_bias"],
                             dtype=meta["dtype"] and jnp.dtype(meta["dtype"]),
                             param_dtype=jnp.dtype(meta["param_dtype"]),
                             transpose_plan=meta.get("transpose_plan", False),
                             matvec=meta.get("matvec", False), _weight=w, _bias=bias)
        _replace(model, keys, layer)
    state = nnx.state(model)

    def fill(node, prefix):
        for k in list(node.keys()):
            name = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(node[k], dict):
                fill(node[k], name)
            elif name not in arrays:
                raise ValueError(f"load_state: the file has no value for {name!r} "
                                 f"(architecture mismatch?)")
            else:
                node[k] = jnp.asarray(arrays[name])

    pure = nnx.to_pure_dict(state)
    fill(pure, "")
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model
