"""Test configuration: float64 on (the references are float64), strict dtype promotion so that a
silent upcast inside jaxsparse fails the tests, and a seeded random generator."""

import zlib

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so every test is reproducible on its own."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
