"""Shared pytest setup: CPU by default, the `gpu` marker skips where no GPU is present, and the
model builders the cache, decoding and S2 tests share."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@functools.cache
def _spread_decoder(cfg, seed: int):
  from flax import nnx

  from colm.model import Decoder
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  new = [1.0 + 0.5 * rng.standard_normal(x.shape) if x.ndim == 1
         else rng.standard_normal(x.shape) * (1.5 / np.sqrt(x.shape[0])) for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(
      treedef, [jnp.asarray(y, x.dtype) for x, y in zip(leaves, new)]))


@pytest.fixture(scope="session")
def spread_decoder():
  """make(cfg, seed) -> a Decoder with NumPy weights scaled so logits spread out (greedy choices
  far from ties), built abstractly (eager init would compile a kernel per parameter shape)."""
  return _spread_decoder


@functools.cache
def _forward_fn(graphdef, num_chains):
  from flax import nnx
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, num_chains=num_chains))


@pytest.fixture(scope="session")
def full_forward():
  """forward(model, tokens [B, T], num_chains=None) -> numpy logits [B, T, V] (jit, cached)."""
  def forward(model, tokens, num_chains=None):
    from flax import nnx
    graphdef, state = nnx.split(model)
    return np.asarray(_forward_fn(graphdef, num_chains)(state, jnp.asarray(tokens)))
  return forward


def run_on_cpu_devices(code: str, *args: str, n: int = 8, timeout: int = 600) -> str:
  """Runs `code` (with sys.argv[1:] = args) in a fresh Python with n simulated CPU devices (XLA
  reads the device count when jax starts, so it cannot change in this process); returns its
  stdout, failing the test with stdout and stderr when it exits non-zero."""
  import os
  import subprocess
  import sys
  from pathlib import Path
  repo = Path(__file__).resolve().parents[1]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)}
  r = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=repo, capture_output=True,
                     text=True, timeout=timeout)
  if r.returncode:
    pytest.fail(f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}")
  return r.stdout


@pytest.fixture(scope="session")
def cpu_devices():
  """run(code, *args, n=8) -> stdout of code run with n simulated CPU devices
  (run_on_cpu_devices)."""
  return run_on_cpu_devices
