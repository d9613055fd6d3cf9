"""SparseLinear and SparseMLP: drop-in sparse counterparts of ``nnx.Linear`` and a transformer FFN."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jaxsparse import prune as _prune
from jaxsparse._formats import BSR, CSR, INDEX_DTYPE, NM, POSITION_DTYPE, SparseMatrix
from jaxsparse._pack import PackedCSR, SlicedMatvec, TransposePlan, pack
from jaxsparse._spmm import ACTIVATIONS, matmul

__all__ = ["SparseLinear", "SparseMLP", "SparsityPattern", "FrozenWeight", "METHODS", "FORMATS",
           "fused_activation"]

METHODS = ("magnitude", "block", "n:m", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")  # the methods that need the layer's inputs
FORMATS = ("csr", "bsr", "nm")
_METHOD_FOR_FORMAT = {"csr": "magnitude", "bsr": "block", "nm": "n:m"}

default_kernel_init = initializers.lecun_normal()


class SparsityPattern(nnx.Variable):
    """The fixed index arrays of a sparse weight: state (saved, loaded, split like any variable)
    but not a parameter, so ``nnx.grad``/optimizers with ``wrt=nnx.Param`` leave it alone."""


class FrozenWeight(nnx.Variable):
    """The values of an inference layer (``SparseLinear(..., matvec=True)``) and their sliced
    matrix-vector copy: state, not a parameter, so that ``nnx.grad`` and optimizers with
    ``wrt=nnx.Param`` cannot change the values without their copy."""


def _pair(v, name: str, where: str) -> tuple[int, int]:
    if np.isscalar(v):
        return int(v), int(v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be an int or a pair of ints, got {name}={v!r}")
    return int(a), int(b)


def resolve_method(method, fmt, where: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"{where}: format must be one of {FORMATS}, got format={fmt!r}")
    if method is None:
        method = _METHOD_FOR_FORMAT[fmt]
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}, got method={method!r}")
    if fmt == "bsr" and method != "block":
        raise ValueError(f"{where}: format='bsr' needs method='block' (a block-structured mask), "
                         f"got method={method!r}")
    if fmt == "nm" and method != "n:m":
        raise ValueError(f"{where}: format='nm' needs method='n:m', got method={method!r}")
    return method


def prune_weight(w, *, sparsity, method, block_size=None, n_m=None, calibration=None,
                 x_norms=None, x_gram=None, where="SparseLinear"):
    """Prune ``w [out, in]`` with ``method``; returns the keep-mask (NumPy bool), the resolved
    (block_size, n_m) and the weight to store at the mask (``w`` itself except for sparsegpt,
    which updates the kept weights)."""
    if method == "n:m":
        n, m = _pair(n_m if n_m is not None else (2, 4), "n_m", where)
        if not 0 < n <= m:
            raise ValueError(f"{where}: n_m must satisfy 0 < n <= m, got n_m={(n, m)}")
        if w.shape[1] % m:
            raise ValueError(f"{where}: n_m={(n, m)}: m={m} must divide in_features={w.shape[1]}")
        if sparsity is not None:
            _prune.check_sparsity(sparsity, where)
        _, mask = _prune.n_m(w, n, m)
        return np.asarray(mask), None, (n, m), w
    if sparsity is None:
        raise ValueError(f"{where}: sparsity is required for method={method!r}")
    _prune.check_sparsity(sparsity, where)
    if method == "magnitude":
        _, mask = _prune.magnitude(w, sparsity)
        return np.asarray(mask), None, None, w
    if method == "block":
        if block_size is None:
            raise ValueError(f"{where}: block_size is required for method='block'")
        bs = _pair(block_size, "block_size", where)
        if bs[0] < 1 or bs[1] < 1 or w.shape[0] % bs[0] or w.shape[1] % bs[1]:
            raise ValueError(f"{where}: block_size={bs} must divide the weight "
                             f"[out_features, in_features]={tuple(w.shape)}")
        _, mask = _prune.block(w, sparsity, bs)
        return np.asarray(mask), bs, None, w
    if method in CALIBRATED:  # from the inputs' norms (wanda) or Gram matrix (sparsegpt)
        stat = x_norms if method == "wanda" else x_gram
        if calibration is None and stat is None:
            raise ValueError(f"{where}: method={method!r} needs calibration inputs "
                             f"(calibration=[..., in_features])")
        if stat is None:
            of_inputs = _prune.feature_norms if method == "wanda" else _prune.feature_gram
            stat = of_inputs(calibration, w.shape[1], where)
        if method == "wanda":
            _, mask = _prune.wanda(w, None, sparsity, x_norms=stat)
            return np.asarray(mask), None, None, w
        updated, mask = _prune.sparsegpt(w, None, sparsity, x_gram=stat)
        return np.asarray(mask), None, None, updated
    raise ValueError(f"{where}: method must be one of {METHODS}, got method={method!r}")


def to_sparse(w, mask: np.ndarray, fmt: str, block_size=None, nm=None) -> SparseMatrix:
    """The sparse matrix storing ``w``'s entries at ``mask`` (kept zeros stay stored), on the
    device: its pattern is found with NumPy, but NumPy arrays in a layer's state would be copied
    to the device by every jitted call taking it (72 per all-MiniLM-L6-v2 forward: ~0.9 ms of a
    10 ms one)."""
    wa = jnp.asarray(w)
    out_f, in_f = mask.shape
    if fmt == "csr":
        rows, cols = np.nonzero(mask)
        indptr = np.zeros(out_f + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=out_f), out=indptr[1:])
        return CSR((wa[rows, cols], jnp.asarray(cols, INDEX_DTYPE),
                    jnp.asarray(indptr, INDEX_DTYPE)), shape=mask.shape)
    if fmt == "bsr":
        bm, bk = block_size
        occ = mask.reshape(out_f // bm, bm, in_f // bk, bk).any(axis=(1, 3))
        br, bc = np.nonzero(occ)
        indptr = np.zeros(out_f // bm + 1, np.int64)
        np.cumsum(np.bincount(br, minlength=out_f // bm), out=indptr[1:])
        blocks = wa.reshape(out_f // bm, bm, in_f // bk, bk).transpose(0, 2, 1, 3)
        return BSR((blocks[br, bc], jnp.asarray(bc, INDEX_DTYPE),
                    jnp.asarray(indptr, INDEX_DTYPE)), shape=mask.shape)
    n, m = nm
    groups = mask.reshape(out_f, in_f // m, m)
    # Exactly n kept per group (n_m pruning guarantees it): their positions in increasing order.
    pos = np.argsort(~groups, axis=-1, kind="stable")[..., :n]
    cols = (np.arange(in_f // m)[None, :, None] * m + pos).reshape(out_f, -1)
    values = jnp.take_along_axis(wa, jnp.asarray(cols), axis=1)
    return NM((values, jnp.asarray(pos.reshape(out_f, -1), POSITION_DTYPE)), shape=mask.shape,
              n=n, m=m)


class SparseLinear(nnx.Module):
    """A linear layer ``y = x @ W.T + b`` with a sparse weight ``W`` stored ``[out, in]``.

    The constructor mirrors :class:`flax.nnx.Linear` (same kernel initialisation, so the same
    ``rngs`` give the same dense kernel) and prunes the fresh kernel to ``sparsity`` with
    ``method`` before storing it in ``format``:

    * ``method``: ``"magnitude"`` (per layer), ``"block"`` (``block_size``), ``"n:m"`` (``n_m``,
      default ``(2, 4)``), ``"wanda"`` or ``"sparsegpt"`` (these two only through
      :meth:`from_dense`: they need calibration inputs). ``None`` picks the natural one for
      ``format``.
    * ``format``: ``"csr"`` (any method), ``"bsr"`` (``method="block"``), ``"nm"``
      (``method="n:m"``).

    The kept values are an ``nnx.Param`` (``self.data``: gradients reach them, the pattern stays
    fixed); the index arrays are :class:`SparsityPattern` variables (CSR column indices in 16 bits
    when ``in_features <= 65536``, as :func:`jaxsparse.pack` stores them). The product is one
    :func:`jaxsparse.matmul` of the folded input ``[prod(batch), in]`` with ``W.T`` (SpMM layout
    ``"nk"``, no transposed copy of ``W``). For training, ``transpose_plan=True`` (CSR only) also
    stores the pattern of ``W.T`` (``t_perm``, ``t_indices``, ``t_indptr``: ~6 more bytes per
    stored weight, see :class:`jaxsparse.TransposePlan`), so the gradient with respect to the
    inputs, a product with ``W``, does not rebuild ``W.T`` every step.

    For inference one or a few input vectors at a time (decoding: ``inputs`` holding one row of
    ``in_features``, or up to 5 at 90% sparsity), ``matvec=True`` (CSR, float32) also stores the
    sliced copy of the weight that the native kernel for so few vectors reads (see
    :func:`jaxsparse.pack`; ~7.8 more bytes per stored weight at 90% sparsity): 3072x768 at 90%,
    ~0.05 ms for one vector and ~0.1 ms for four, against ~0.1 and ~0.2 ms for the CSR kernel on
    the development machine (the copy is read on CPUs with AVX-512 only).
    The layer is then for inference: its values are a :class:`FrozenWeight`, not an
    ``nnx.Param``, since a copy made once would not follow an optimizer's updates (gradients
    still reach the inputs and the bias).

    >>> layer = SparseLinear(8, 4, sparsity=0.5, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 3, 8), jnp.float32)).shape
    (2, 3, 4)
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = default_kernel_init,
                 bias_init: Callable = initializers.zeros_init(),
                 sparsity: float | None = 0.0, method: str | None = None, format: str = "csr",
                 block_size=None, n_m=None, transpose_plan: bool = False, matvec: bool = False,
                 rngs: nnx.Rngs | None = None, _weight: SparseMatrix | None = None, _bias=None):
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision  # kept for signature compatibility; the sparse product is exact
        if _weight is None:
            if rngs is None:
                raise TypeError("SparseLinear: rngs is required (e.g. rngs=nnx.Rngs(0))")
            method = resolve_method(method, format, "SparseLinear")
            if method in CALIBRATED:
                raise ValueError(f"SparseLinear: method={method!r} needs calibration inputs; "
                                 "build the layer with SparseLinear.from_dense(linear, "
                                 "calibration=...)")
            kernel = kernel_init(rngs.params(), (self.in_features, self.out_features),
                                 param_dtype)
            w = kernel.T
            mask, bs, nm, w = prune_weight(w, sparsity=sparsity, method=method,
                                           block_size=block_size, n_m=n_m)
            _weight = to_sparse(w, mask, format, bs, nm)
            if use_bias:
                _bias = bias_init(rngs.params(), (self.out_features,), param_dtype)
        if _weight.shape != (self.out_features, self.in_features) or _weight.transposed:
            raise ValueError(f"SparseLinear: weight must be stored [out_features, in_features]="
                             f"{(self.out_features, self.in_features)}, got {_weight.shape}")
        if transpose_plan and _weight.fmt != "csr":
            raise ValueError(f"SparseLinear: transpose_plan=True needs format='csr', got "
                             f"format={_weight.fmt!r}")
        if matvec and (_weight.fmt != "csr" or _weight.dtype != jnp.float32):
            raise ValueError(f"SparseLinear: matvec=True needs format='csr' and float32 values, "
                             f"got format={_weight.fmt!r} and {jnp.dtype(_weight.dtype).name}")
        if _weight.fmt == "csr":  # a fixed pattern: 16-bit column indices when in_features allows
            _weight = pack(_weight, matvec=matvec, transpose=transpose_plan)
        self.format = _weight.fmt
        self.block_size = tuple(_weight.block_size) if _weight.fmt == "bsr" else None
        self.n_m = (_weight.n, _weight.m) if _weight.fmt == "nm" else None
        sliced = getattr(_weight, "matvec", None) if matvec else None
        if matvec and sliced is None:
            raise ValueError("SparseLinear: matvec=True needs concrete values and pattern (the "
                             "sliced copy is built with NumPy), not traced arrays")
        self.matvec = sliced is not None
        self.data = (FrozenWeight if self.matvec else nnx.Param)(_weight.values)
        if self.matvec:
            for name, array in zip(SlicedMatvec._fields, sliced):
                setattr(self, f"mv_{name}", FrozenWeight(array))
        pattern = _weight.pattern_arrays
        if self.format == "nm":
            self.positions = SparsityPattern(pattern[0])
        else:
            self.indices = SparsityPattern(pattern[0])
            self.indptr = SparsityPattern(pattern[1])
        plan = getattr(_weight, "plan", None)
        if transpose_plan and plan is None:
            raise ValueError("SparseLinear: transpose_plan=True needs a concrete pattern (it is "
                             "built with NumPy), not traced arrays")
        self.transpose_plan = plan is not None
        if plan is not None:
            self.t_perm, self.t_indices, self.t_indptr = map(SparsityPattern, plan)
        self.bias = nnx.Param(_bias) if use_bias else None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nnx.Linear, *, sparsity: float | None = None,
                   method: str | None = None, format: str = "csr", block_size=None, n_m=None,
                   calibration=None, x_norms=None, x_gram=None,
                   transpose_plan: bool = False, matvec: bool = False) -> "SparseLinear":
        """Prune an ``nnx.Linear`` (kernel ``[in, out]``) into a SparseLinear.

        ``calibration`` (``method="wanda"`` or ``"sparsegpt"``) is an array of the layer's inputs
        ``[..., in]``; alternatively pass their per-feature L2 norms as ``x_norms [in]`` (wanda)
        or their Gram matrix ``X^T X`` as ``x_gram [in, in]`` (sparsegpt). ``transpose_plan``,
        ``matvec``: as in the constructor.
        """
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"SparseLinear.from_dense: expected an nnx.Linear, got "
                            f"{type(linear).__name__}")
        method = resolve_method(method, format, "SparseLinear.from_dense")
        w = jnp.asarray(linear.kernel[...]).T
        mask, bs, nm, w = prune_weight(w, sparsity=sparsity, method=method,
                                       block_size=block_size, n_m=n_m, calibration=calibration,
                                       x_norms=x_norms, x_gram=x_gram,
                                       where="SparseLinear.from_dense")
        bias = linear.bias[...] if linear.bias is not None else None
        return cls(linear.in_features, linear.out_features, use_bias=linear.use_bias,
                   dtype=linear.dtype, param_dtype=linear.param_dtype,
                   precision=linear.precision, transpose_plan=transpose_plan, matvec=matvec,
                   _weight=to_sparse(w, mask, format, bs, nm), _bias=bias)

    # -- views ----------------------------------------------------------------------------------
    @property
    def weight(self) -> SparseMatrix:
        """The sparse weight ``[out, in]`` (traceable: built from the current variables)."""
        shape = (self.out_features, self.in_features)
        data = self.data[...]
        if self.format == "nm":
            return NM.tree_unflatten(((shape, False), *self.n_m), (data, self.positions[...]))
        if self.transpose_plan or self.matvec:
            plan = sliced = None
            if self.transpose_plan:
                plan = TransposePlan(self.t_perm[...], self.t_indices[...], self.t_indptr[...])
            if self.matvec:
                sliced = SlicedMatvec(*(getattr(self, f"mv_{name}")[...]
                                        for name in SlicedMatvec._fields))
            return PackedCSR.tree_unflatten((shape, False), (data, self.indices[...],
                                                             self.indptr[...], sliced, plan))
        cls = CSR if self.format == "csr" else BSR
        return cls.tree_unflatten((shape, False), (data, self.indices[...], self.indptr[...]))

    @property
    def nnz(self) -> int:
        """Stored weights (explicit zeros included)."""
        return int(np.prod(self.data[...].shape))

    @property
    def sparsity(self) -> float:
        """Fraction of the ``out * in`` weights not stored."""
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def masked_kernel(self):
        """The dense kernel ``[in, out]`` (nnx.Linear's layout) with the pruned entries zero."""
        return self.weight.todense().T

    def mask(self):
        """The boolean keep-mask ``[in, out]`` (nnx.Linear's layout)."""
        w = self.weight
        return w.with_values(jnp.ones(w.values.shape, jnp.float32)).todense().T > 0

    def to_dense(self, rngs: nnx.Rngs | None = None) -> nnx.Linear:
        """The ``nnx.Linear`` with the masked kernel (the inverse of :meth:`from_dense`)."""
        lin = nnx.Linear(self.in_features, self.out_features, use_bias=self.use_bias,
                         dtype=self.dtype, param_dtype=self.param_dtype,
                         precision=self.precision, rngs=rngs or nnx.Rngs(0))
        lin.kernel[...] = self.masked_kernel()
        if self.use_bias:
            lin.bias[...] = self.bias[...]
        return lin

    # -- forward --------------------------------------------------------------------------------
    def __call__(self, inputs: jax.Array, *, activation: str | None = None) -> jax.Array:
        """``inputs @ W.T + b``, or ``activation(inputs @ W.T + b)`` with ``activation`` one of
        :data:`jaxsparse.ACTIVATIONS` (``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``):
        the CPU kernel then adds the bias and applies the activation to each block of the output
        while it is in cache."""
        inputs = jnp.asarray(inputs)
        if inputs.ndim == 0 or inputs.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: inputs.shape[-1]="
                             f"{inputs.shape[-1] if inputs.ndim else None} does not match "
                             f"in_features={self.in_features} (inputs.shape={inputs.shape})")
        weight = self.weight
        bias = self.bias[...] if self.bias is not None else None
        inputs, data, bias = dtypes.promote_dtype((inputs, weight.values, bias), dtype=self.dtype)
        if data.dtype != weight.dtype:  # (the same values keep the sliced copy)
            weight = weight.with_values(data)
        # x @ W.T on the stored [out, in] W: spmm layout "nk", leading dims folded into one.
        return matmul(inputs, weight.T, bias=bias, activation=activation)


def fused_activation(activation) -> str | None:
    """The name in :data:`jaxsparse.ACTIVATIONS` of ``activation`` (a name, or ``jax.nn.relu``,
    ``jax.nn.gelu`` with either ``approximate``, ``jax.nn.silu`` / ``swish``), or None when the
    kernels cannot apply it."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be a callable or one of {tuple(ACTIVATIONS)}, "
                             f"got activation={activation!r}")
        return activation
    if activation is jax.nn.relu:
        return "relu"
    if activation is jax.nn.silu or activation is jax.nn.swish:
        return "silu"
    gelu_kw = {}
    if isinstance(activation, functools.partial) and activation.func is jax.nn.gelu \
            and not activation.args and set(activation.keywords) <= {"approximate"}:
        gelu_kw, activation = activation.keywords, activation.func
    if activation is jax.nn.gelu:
        return "gelu_tanh" if gelu_kw.get("approximate", True) else "gelu"
    return None


class SparseMLP(nnx.Module):
    """Transformer feed-forward block ``fc2(activation(fc1(x)))`` with two :class:`SparseLinear`.

    ``activation`` is a callable or a name of :data:`jaxsparse.ACTIVATIONS`; the ones the CPU
    kernels know (see :func:`fused_activation`; the default ``jax.nn.gelu`` is ``"gelu_tanh"``)
    are applied inside ``fc1``'s product, with its bias.

    >>> mlp = SparseMLP(8, 32, sparsity=0.9, rngs=nnx.Rngs(0))
    >>> mlp(jnp.ones((4, 8), jnp.float32)).shape
    (4, 8)
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 *, activation: Callable | str = jax.nn.gelu, use_bias: bool = True,
                 dtype: Any = None, param_dtype: Any = jnp.float32, sparsity: float | None = 0.0,
                 method: str | None = None, format: str = "csr", block_size=None, n_m=None,
                 kernel_init: Callable = default_kernel_init,
                 bias_init: Callable = initializers.zeros_init(), transpose_plan: bool = False,
                 matvec: bool = False, rngs: nnx.Rngs | None = None,
                 _layers: tuple[SparseLinear, SparseLinear] | None = None):
        if _layers is None:
            out_features = in_features if out_features is None else out_features
            kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, sparsity=sparsity,
                      method=method, format=format, block_size=block_size, n_m=n_m,
                      kernel_init=kernel_init, bias_init=bias_init,
                      transpose_plan=transpose_plan, matvec=matvec, rngs=rngs)
            _layers = (SparseLinear(in_features, hidden_features, **kw),
                       SparseLinear(hidden_features, out_features, **kw))
        fused_activation(activation)  # a name must be one of ACTIVATIONS
        self.fc1, self.fc2 = _layers
        self.activation = activation

    @classmethod
    def from_dense(cls, fc1: nnx.Linear, fc2: nnx.Linear, *,
                   activation: Callable | str = jax.nn.gelu,
                   **prune_kwargs) -> "SparseMLP":
        """Prune two ``nnx.Linear`` layers (``from_dense`` options apply to both). A
        ``calibration`` array holds the MLP's inputs: ``fc2`` is calibrated on
        ``activation(fc1(calibration))`` with the dense ``fc1``."""
        calibration = prune_kwargs.pop("calibration", None)
        act = ACTIVATIONS[activation] if isinstance(activation, str) else activation
        hidden = None if calibration is None else act(fc1(jnp.asarray(calibration)))
        layers = (SparseLinear.from_dense(fc1, calibration=calibration, **prune_kwargs),
                  SparseLinear.from_dense(fc2, calibration=hidden, **prune_kwargs))
        return cls(fc1.in_features, fc1.out_features, fc2.out_features, activation=activation,
                   _layers=layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        fused = fused_activation(self.activation)
        if fused is not None:
            return self.fc2(self.fc1(x, activation=fused))
        return self.fc2(self.activation(self.fc1(x)))
