"""Builders the Pallas kernel tests share: a fresh printed seed, and a compile-and-run helper
that keeps interpret-mode kernels cheap to compile on the CPU."""

import jax
import numpy as np
import pytest

# Interpret-mode kernels compile to large CPU programs; LLVM's optimisations only cost time here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture
def seed() -> int:
  """A fresh seed per test, printed so a failure can be replayed."""
  s = int(np.random.SeedSequence().entropy % 2**32)
  print(f"seed={s}")
  return s


def _compiled(fn, *args):
  opts = FAST_COMPILE if jax.default_backend() == "cpu" else {}
  return jax.jit(fn).lower(*args).compile(compiler_options=opts)(*args)


@pytest.fixture
def compiled():
  """compiled(fn, *args): jit, compile (fast on CPU) and run fn on args."""
  return _compiled
