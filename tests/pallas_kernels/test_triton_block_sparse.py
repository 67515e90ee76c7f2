"""jax-triton block-sparse attention forward against the dense float32 reference.

The comparison runs only on a GPU with jax_triton installed; the import and argument checks run
everywhere (they must not need triton).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sparse_attention_reference
from pallas_kernels.triton_block_sparse import block_sparse_attention_triton

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def _rel(a, b) -> float:
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(rng, B, T, H, K, E, dtype):
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
               for s in ((B, T, H, E), (B, T, K, E), (B, T, K, E)))


def test_seq_not_multiple_of_block_raises_without_triton():
  q, k, v = _inputs(np.random.default_rng(0), 1, 100, 2, 1, 32, jnp.float32)
  layout = np.ones((1, 4, 4), bool)
  with pytest.raises(ValueError, match="seq_len"):
    block_sparse_attention_triton(q, k, v, layout, block_size=32)


def test_bad_layout_raises_without_triton():
  q, k, v = _inputs(np.random.default_rng(0), 1, 128, 2, 1, 32, jnp.float32)
  with pytest.raises(ValueError, match="layout"):
    block_sparse_attention_triton(q, k, v, np.ones((3, 4, 4), bool), block_size=32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layout_heads,causal", [("H", True), ("K", True), ("1", False)])
def test_matches_reference(dtype, layout_heads, causal):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  pytest.importorskip("jax_triton")
  seed = int(np.random.SeedSequence().entropy % 2**32)
  rng = np.random.default_rng(seed)
  B, T, H, K, E, bs = 2, 512, 4, 2, 64, 64
  n = T // bs
  L = {"H": H, "K": K, "1": 1}[layout_heads]
  q, k, v = _inputs(rng, B, T, H, K, E, dtype)
  layout = rng.random((L, n, n)) < 0.4
  layout[0, 2, :] = False  # a query block that attends nothing: zeros and -inf
  o, lse = block_sparse_attention_triton(q, k, v, layout, block_size=bs, causal=causal,
                                         return_lse=True)
  ro, rlse = block_sparse_attention_reference(q, k, v, layout, block_size=bs, causal=causal,
                                              return_lse=True)
  assert o.shape == q.shape and o.dtype == q.dtype, f"seed {seed}"
  assert lse.shape == (B, T, H) and lse.dtype == jnp.float32, f"seed {seed}"
  tol = TOL[dtype]
  assert _rel(o, ro) < tol, f"seed {seed}: output rel err {_rel(o, ro):.2e}"
  lse, rlse = np.asarray(lse), np.asarray(rlse)
  finite = np.isfinite(rlse)
  np.testing.assert_array_equal(np.isfinite(lse), finite, err_msg=f"seed {seed}: -inf rows")
  assert _rel(lse[finite], rlse[finite]) < tol, f"seed {seed}: lse rel err"
  assert np.all(np.asarray(o, np.float32)[~finite] == 0), f"seed {seed}: empty rows not zero"
