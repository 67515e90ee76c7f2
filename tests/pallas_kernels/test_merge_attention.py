"""merge_attention: two attentions over disjoint key sets combine exactly into one."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
  block_sparse_attention,
  block_sparse_attention_reference,
  merge_attention,
  merge_attention_reference,
)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_merge_of_disjoint_layouts_equals_attention_over_union():
  seed = int(np.random.SeedSequence().entropy % 2**32)
  rng = np.random.default_rng(seed)
  B, T, H, K, E, bs = 2, 96, 4, 2, 64, 16
  n = T // bs
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, h, E)), jnp.float32) for h in (H, K, K))
  union = rng.random((H, n, n)) < 0.7
  split = rng.random((H, n, n)) < 0.5  # a random split of the union into two disjoint parts
  kw = dict(block_size=bs, causal=True, return_lse=True)
  oa, la = block_sparse_attention_reference(q, k, v, union & split, **kw)
  ob, lb = block_sparse_attention_reference(q, k, v, union & ~split, **kw)
  o, lse = merge_attention(oa, la, ob, lb)
  want, want_lse = block_sparse_attention_reference(q, k, v, union, **kw)
  assert _rel(o, want) < 1e-5, f"seed={seed}"
  fin = np.isfinite(np.asarray(want_lse))
  assert (np.isfinite(np.asarray(lse)) == fin).all(), f"seed={seed}"
  assert np.allclose(np.asarray(lse)[fin], np.asarray(want_lse)[fin], atol=1e-5), f"seed={seed}"
  ro, rl = merge_attention_reference(oa, la, ob, lb)
  assert _rel(o, ro) < 1e-6 and np.array_equal(np.isinf(rl), np.isinf(lse))
  # The kernel's own (output, LSE) pairs merge the same way (interpret mode).
  ka = block_sparse_attention(q, k, v, union & split, **kw)
  kb = block_sparse_attention(q, k, v, union & ~split, **kw)
  assert _rel(merge_attention(*ka, *kb)[0], want) < 1e-4, f"seed={seed}"


def test_merge_handles_empty_sets_and_dtype():
  o = jnp.ones((2, 3, 8), jnp.bfloat16)
  empty = jnp.full((2, 3), -jnp.inf)
  out, lse = merge_attention(o, empty, 2 * o, empty)
  assert out.dtype == jnp.bfloat16 and not np.isnan(np.asarray(out, np.float32)).any()
  assert np.all(np.asarray(out, np.float32) == 0) and np.all(np.isneginf(lse))
  out, lse = merge_attention(o, jnp.zeros((2, 3)), 2 * o, empty)  # b empty: a passes through
  assert np.allclose(np.asarray(out, np.float32), 1.0) and np.allclose(lse, 0.0)


def test_merge_bad_shapes_raise():
  with pytest.raises(ValueError, match="out_b"):
    merge_attention(jnp.zeros((2, 8)), jnp.zeros(2), jnp.zeros((3, 8)), jnp.zeros(3))
  with pytest.raises(ValueError, match="lse_b"):
    merge_attention(jnp.zeros((2, 8)), jnp.zeros(2), jnp.zeros((2, 8)), jnp.zeros(3))


@pytest.mark.parametrize("parts", [1, 3, 8, 11])
def test_merge_partials_equals_softmax_over_all_parts(parts):
  """Partials of random logit sets (one whole row of parts empty, single empty parts elsewhere)
  merged along axis 1 against a float64 softmax over the concatenated sets."""
  from pallas_kernels.merge import merge_partials
  seed = 41 + parts
  print(f"seed={seed} parts={parts}")
  rng = np.random.default_rng(seed)
  R, n, E = 5, 6, 4
  s = rng.standard_normal((R, parts, n)) * 3
  v = rng.standard_normal((R, parts, n, E))
  live = rng.random((R, parts)) < 0.8
  live[0] = False  # row 0: every part empty
  ls = np.where(live, np.log(np.exp(s).sum(-1)), -np.inf)
  o = np.einsum("rpn,rpne->rpe", np.exp(s) / np.exp(s).sum(-1, keepdims=True), v)
  o = np.where(live[..., None], o, 0.0)
  out, lse = merge_partials(jnp.asarray(o, jnp.float32), jnp.asarray(ls, jnp.float32), axis=1)
  w = np.where(live[..., None], np.exp(s), 0.0)  # [R, parts, n]: the union's weights
  tot = w.sum((1, 2))
  want = np.einsum("rpn,rpne->re", w, v) / np.where(tot == 0, 1, tot)[:, None]
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)
  assert np.isneginf(np.asarray(lse)[0]) and np.all(np.asarray(out)[0] == 0)
  np.testing.assert_allclose(np.asarray(lse)[1:], np.log(tot[1:]), atol=1e-5)
