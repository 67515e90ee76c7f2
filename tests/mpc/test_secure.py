"""mpc.secure's decode-step attentions in plain JAX against float64 references on fresh random
inputs, and its one-level selection equal to the plaintext path's (mpc.mpcache.Dynamic)."""

import jax.numpy as jnp
import numpy as np
import pytest

from mpc import secure
from mpc.mpcache import Dynamic


def _attention(q, k, v, allowed=None):
  """float64 [H, E] softmax attention of q [H, E] over k, v [H, T, E] where allowed [H, T]."""
  s = np.einsum("he,hte->ht", q, k)  # q pre-scaled (mpc.secure)
  if allowed is not None:
    s = np.where(allowed, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("ht,hte->he", p / p.sum(-1, keepdims=True), v)


def _inputs(seed, h=3, t=96, e=8, size=8):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal(s) for s in ((h, e), (h, t, e), (h, t, e)))
  kb = k.reshape(h, t // size, size, e)
  return q, k, v, kb.max(2), kb.min(2)


def test_full_baselines_equal_the_reference():
  seed = 81
  print(f"seed={seed}")
  q, k, v, _, _ = _inputs(seed)
  want = _attention(q, k, v)
  for fn in (secure.full_softmax, secure.full_deferred):
    got = fn(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_naive_topk_attends_the_top_scores():
  seed = 82
  print(f"seed={seed}")
  q, k, v, _, _ = _inputs(seed)
  s = np.einsum("he,hte->ht", q, k)
  allowed = s >= np.sort(s, -1)[:, -10][:, None]
  got = secure.naive_topk(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), keep=10)
  np.testing.assert_allclose(np.asarray(got), _attention(q, k, v, allowed), atol=2e-5)


def test_rank_select_is_the_top_k_one_hot():
  seed = 83
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  c = rng.standard_normal((4, 13))
  c[0, 3] = c[0, 7]  # a tie goes to the lower index
  sel = np.asarray(secure.rank_select(jnp.asarray(c, jnp.float32), 5))
  assert sel.shape == (4, 13, 5) and set(np.unique(sel)) <= {0.0, 1.0}
  for h in range(4):
    order = sorted(range(13), key=lambda i: (-np.float32(c[h, i]), i))
    assert [int(np.argmax(sel[h, :, r])) for r in range(5)] == order[:5]
    assert sel[h].sum() == 5


@pytest.mark.parametrize("stabiliser", ["exact", "cluster"])
@pytest.mark.parametrize("length", [96, 91])
def test_mpcache_step_attends_the_selected_clusters(stabiliser, length):
  seed = 84
  print(f"seed={seed}")
  size, keep = 8, 3
  q, k, v, hi, lo = _inputs(seed, size=size)
  if length < 96:  # the last cluster is partly empty: its bounds cover the held tokens only
    kb = k[:, 88:length]
    hi[:, -1], lo[:, -1] = kb.max(1), kb.min(1)
  out, sel = secure.mpcache_step(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, hi, lo)),
                                 size=size, keep=keep, length=length, stabiliser=stabiliser)
  sel = np.asarray(sel)
  c = np.einsum("he,hce->hc", q, 0.6 * hi + 0.4 * lo)[:, 1:-1]
  allowed = np.zeros((3, 96), bool)
  for h in range(3):
    picked = sorted(range(10), key=lambda i: (-c[h, i], i))[:keep]
    assert sorted(int(np.argmax(sel[h, :, r])) for r in range(keep)) == sorted(picked)
    for ci in [0, 11] + [p + 1 for p in picked]:
      allowed[h, ci * size:(ci + 1) * size] = True
  allowed[:, length:] = False
  np.testing.assert_allclose(np.asarray(out), _attention(q, k, v, allowed), atol=5e-5)
  # Cross-layer sharing: a given selection gives the same output.
  again, _ = secure.mpcache_step(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, hi, lo)),
                                 size=size, keep=keep, length=length, sel=jnp.asarray(sel))
  np.testing.assert_allclose(np.asarray(again), np.asarray(out), atol=1e-5)


@pytest.mark.parametrize("score, plain", [("linear", "bounds"), ("upper", "upper")])
def test_the_mpc_selection_equals_the_plaintext_selection(score, plain):
  """One level, a full cache: mpc.secure picks the clusters mpc.mpcache.Dynamic picks."""
  seed = 85
  print(f"seed={seed}")
  size, t = 8, 96
  q, k, v, hi, lo = _inputs(seed, size=size)
  dyn = Dynamic(size=size, keep1=0.3, child=0, score=plain)
  keep, _ = dyn.counts(t)
  _, sel = secure.mpcache_step(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, hi, lo)),
                               size=size, keep=keep, length=t, score=score)
  pos = np.broadcast_to(np.arange(t), (1, 3, t)).astype(np.int32)
  mask = np.asarray(dyn.select(jnp.asarray(q[None, :, None], jnp.float32),
                               jnp.asarray(k[None], jnp.float32), jnp.asarray(pos),
                               jnp.asarray([t - 1])))[0]
  for h in range(3):
    clusters = {int(np.argmax(np.asarray(sel)[h, :, r])) + 1 for r in range(keep)} | {0, 11}
    assert set(np.flatnonzero(mask[h]).tolist()) == {j for j in range(t)
                                                     if j // size in clusters}


def test_unknown_stabiliser_or_score_is_an_error():
  q, k, v, hi, lo = _inputs(0)
  with pytest.raises(ValueError, match="stabiliser"):
    secure.mpcache_step(q, k, v, hi, lo, size=8, keep=2, length=96, stabiliser="nope")
  with pytest.raises(ValueError, match="score"):
    secure.mpcache_step(q, k, v, hi, lo, size=8, keep=2, length=96, score="cosine")


def test_update_bounds_is_the_running_max_and_min():
  seed = 86
  print(f"seed={seed}")
  q, k, v, hi, lo = _inputs(seed)
  k_new = np.random.default_rng(seed).standard_normal((3, 8)) * 2
  h2, l2 = secure.update_bounds(*(jnp.asarray(x, jnp.float32) for x in (hi, lo, k_new)), 5)
  want_h, want_l = hi.copy(), lo.copy()
  want_h[:, 5] = np.maximum(hi[:, 5], k_new)
  want_l[:, 5] = np.minimum(lo[:, 5], k_new)
  np.testing.assert_allclose(np.asarray(h2), want_h, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(l2), want_l, rtol=1e-6)
