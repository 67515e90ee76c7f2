"""Split-K block-sparse decode attention (interpret mode on CPU) against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sparse_decode_attention, block_sparse_decode_attention_reference

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _compiled(fn, *args):
  opts = FAST_COMPILE if jax.default_backend() == "cpu" else {}
  return jax.jit(fn).lower(*args).compile(compiler_options=opts)(*args)


@pytest.mark.parametrize("H,K,E,lh,dtype,lists", [
    (4, 2, 64, "H", jnp.float32, False),  # per-head, per-sequence layouts
    (4, 1, 128, "1", jnp.bfloat16, True),  # shared explicit block lists
    (6, 2, 64, "K", jnp.float32, True),  # per-KV-head lists
])
def test_decode_matches_reference(H, K, E, lh, dtype, lists):
  seed = int(np.random.SeedSequence().entropy % 2**32)
  rng = np.random.default_rng(seed)
  B, S, bs = 3, 200, 16
  n = -(-S // bs)
  L = {"H": H, "K": K, "1": 1}[lh]
  q = jnp.asarray(rng.standard_normal((B, H, E)), dtype)
  kc = jnp.asarray(rng.standard_normal((B, S, K, E)), dtype)
  vc = jnp.asarray(rng.standard_normal((B, S, K, E)), dtype)
  lengths = jnp.asarray([S, int(rng.integers(20, S)), 0], jnp.int32)  # the last one is empty
  if lists:
    counts = rng.integers(0, n + 1, (B, L))
    ids = np.stack([np.stack([rng.permutation(n) for _ in range(L)]) for _ in range(B)])
    arg = (jnp.asarray(ids, jnp.int32), jnp.asarray(counts, jnp.int32))
  else:
    arg = rng.random((B, L, n)) < 0.5
  run = lambda q, kc, vc, lengths: block_sparse_decode_attention(
      q, kc, vc, lengths, arg, block_size=bs, num_splits=3, return_lse=True)
  o, lse = _compiled(run, q, kc, vc, lengths)
  ro, rlse = block_sparse_decode_attention_reference(q, kc, vc, lengths, arg, block_size=bs,
                                                     return_lse=True)
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  msg = f"seed={seed}"
  assert o.shape == (B, H, E) and o.dtype == dtype, msg
  assert not np.isnan(np.asarray(o, np.float32)).any(), msg
  assert _rel(o, ro) < tol, (_rel(o, ro), msg)
  assert (np.isinf(lse) == np.isinf(rlse)).all(), msg
  fin = np.isfinite(np.asarray(rlse))
  assert np.allclose(np.asarray(lse)[fin], np.asarray(rlse)[fin], atol=1e-4), msg
  assert np.all(np.asarray(o, np.float32)[2] == 0.0), msg  # length 0: zeros, not NaN


@pytest.mark.parametrize("kwargs,match", [
    (dict(q_shape=(2, 4)), "q must be"),
    (dict(k_shape=(2, 64, 3, 64)), "kv_heads"),
    (dict(lengths_shape=(3,)), "lengths"),
    (dict(layout_shape=(4, 5)), "layout_or_block_lists"),
    (dict(layout_shape=(3, 4)), "layout_or_block_lists"),
    (dict(block_size=48), "block_size"),
])
def test_decode_bad_input_raises(kwargs, match):
  q = jnp.zeros(kwargs.get("q_shape", (2, 4, 64)))
  k = jnp.zeros(kwargs.get("k_shape", (2, 64, 2, 64)))
  lengths = jnp.zeros(kwargs.get("lengths_shape", (2,)), jnp.int32)
  layout = np.ones(kwargs.get("layout_shape", (4, 4)), bool)
  with pytest.raises(ValueError, match=match):
    block_sparse_decode_attention(q, k, k, lengths, layout, block_size=kwargs.get("block_size", 16))
