"""experiments.results: compile_seconds counts JAX's compilations and nothing else."""

import jax
import jax.numpy as jnp

from experiments.results import compile_seconds


def test_compile_seconds_counts_new_shapes_only():
  f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
  start = compile_seconds()
  f(jnp.ones(7)).block_until_ready()
  compiled = compile_seconds()
  assert compiled > start  # a new function and shape: traced, lowered, compiled
  f(jnp.ones(7)).block_until_ready()
  assert compile_seconds() == compiled  # cached: nothing new
