"""The examples in jaxsparse's docstrings run and print what they show (doctest), with the names
a reader has: ``jaxsparse``, ``jax``, ``jnp``, ``np`` and ``nnx``."""

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsparse

MODULES = sorted(m.name for m in pkgutil.walk_packages(jaxsparse.__path__, "jaxsparse.")
                 if not m.name.startswith("jaxsparse.ffi._"))


def _doctests(name):
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


WITH_EXAMPLES = [name for name in MODULES if _doctests(name)]


def test_docstring_examples_are_found():
    assert {"jaxsparse._spmm", "jaxsparse.patterns", "jaxsparse._sparsify"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    names = dict(jaxsparse=jaxsparse, jax=jax, jnp=jnp, np=np, nnx=nnx)
    for test in _doctests(name):
        test.globs.update(names)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
