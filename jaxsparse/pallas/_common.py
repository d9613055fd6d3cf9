"""Shared helpers of the Pallas kernels: tile arithmetic, padding, pallas_call options.

The kernels are written in the Triton flavour of Pallas (``jax.experimental.pallas.triton``): no
scalar prefetch, every data-dependent access is a load from a whole-array ref with a computed
index (``ref[pl.ds(start, size)]``, or an integer vector for a gather). Triton needs every tile
dimension to be a power of two and ``dot`` operands at least 16 x 16; :func:`check_tile` asserts
that, so a configuration that passes in interpret mode on CPU has the shapes Triton accepts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Input dtypes the kernels take (half types accumulate in float32). float64 falls back.
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def kernel_dtype(dtype) -> bool:
    return any(dtype == d for d in KERNEL_DTYPES)


def dot_precision(dtype):
    """float32 operands multiply in full precision (Triton ``ieee``, not its TF32 default), so
    float32 results match the reference; half types take the tensor cores as they are."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def check_tile(*dims: int) -> None:
    for d in dims:
        assert is_pow2(d), f"Triton tiles must be powers of two, got {dims}"


def pad_axis(x, axis: int, size: int, value=0):
    """``x`` zero-padded along ``axis`` up to ``size`` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def call_options(interpret: bool, *, num_warps: int = 4, num_stages: int = 2) -> dict:
    """``pallas_call`` keyword arguments: interpret mode, or the Triton compiler parameters."""
    if interpret:
        return dict(interpret=True)
    from jax.experimental.pallas import triton as plgpu

    return dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))


def row_order(indptr):
    """Row swizzle: the rows of a compressed layout ordered by decreasing length (stable), int32.

    Launching the longest rows first is longest-processing-time scheduling across the GPU's
    multiprocessors, and consecutive programs get rows of similar length (Sputnik's row swizzle).
    Computed on device with jnp ops, so it works when the pattern is traced (inside jit).
    """
    lengths = indptr[1:] - indptr[:-1]
    return jnp.argsort(-lengths, stable=True).astype(jnp.int32)
