"""MPCache's plaintext path against slow loop references: cluster bounds (and their incremental
update), the static eviction, one- and two-level dynamic selection with GQA, cross-layer
sharing, and generate end to end (a budget and selection that keep everything change nothing)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from mpc.mpcache import Dynamic, MPCache, append_bounds, cluster_bounds


def _loop_bounds(k, valid, size):
  n, e = k.shape
  c = -(-n // size)
  hi, lo, filled = np.zeros((c, e)), np.zeros((c, e)), np.zeros(c, bool)
  for ci in range(c):
    rows = [k[j] for j in range(ci * size, min(n, (ci + 1) * size)) if valid[j]]
    if rows:
      hi[ci], lo[ci], filled[ci] = np.max(rows, 0), np.min(rows, 0), True
  return hi, lo, filled


def test_cluster_bounds_and_their_incremental_update_match_a_loop():
  seed = 71
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((2, 3, 40, 5)).astype(np.float32)
  count = np.array([[39, 17, 1], [32, 33, 0]])
  valid = np.arange(40)[None, None] < count[..., None]
  hi, lo, filled = cluster_bounds(jnp.asarray(k), jnp.asarray(valid), 8)
  for b in range(2):
    for h in range(3):
      want = _loop_bounds(k[b, h], valid[b, h], 8)
      np.testing.assert_allclose(hi[b, h], want[0], rtol=1e-6)
      np.testing.assert_allclose(lo[b, h], want[1], rtol=1e-6)
      assert (np.asarray(filled[b, h]) == want[2]).all()
  # Appending each sequence's next token equals recomputing from scratch.
  slot = count  # the next free slot of each head
  k_new = rng.standard_normal((2, 3, 5)).astype(np.float32)
  grown_k = k.copy()
  grown_valid = valid.copy()
  for b in range(2):
    for h in range(3):
      grown_k[b, h, slot[b, h]] = k_new[b, h]
      grown_valid[b, h, slot[b, h]] = True
  inc = append_bounds(hi, lo, filled, jnp.asarray(k_new), jnp.asarray(slot), 8)
  full = cluster_bounds(jnp.asarray(grown_k), jnp.asarray(grown_valid), 8)
  for a, w in zip(inc, full):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(w, np.float32), rtol=1e-6)


def _loop_select(dyn, q, k, pos, q_pos):
  """Slow reference of Dynamic.select for one (sequence, KV head): q [G, E], k [N, E]."""
  n = len(pos)
  valid = (pos >= 0) & (pos <= q_pos)
  k1, k2 = dyn.counts(n)

  def clusters(size):
    hi, lo, filled = _loop_bounds(k, valid, size)
    score = (q.sum(0)[None] * (dyn.alpha * hi + (1 - dyn.alpha) * lo)).sum(-1)
    if dyn.score == "upper":  # Quest's bound: each channel's larger of the two products
      score = np.maximum(q.sum(0)[None] * hi, q.sum(0)[None] * lo).sum(-1)
    if dyn.score == "exact":  # each cluster's largest q . k over its valid tokens
      dots = k @ q.sum(0)
      score = np.array([max([dots[j] for j in range(c * size, min((c + 1) * size, n))
                             if valid[j]], default=-np.inf) for c in range(len(filled))])
    return score, filled

  def top(score, allowed, count):
    order = sorted([i for i in range(len(score)) if allowed[i]], key=lambda i: (-score[i], i))
    return set(order[:count])

  score, filled = clusters(dyn.size)
  last = (valid.sum() - 1) // dyn.size
  always = {0, int(last)}
  picked = top(score, [filled[i] and i not in always for i in range(len(score))], k1)
  if dyn.child:
    cs, cf = clusters(dyn.child)
    per = dyn.size // dyn.child
    kids = top(cs, [cf[i] and (i // per) in picked for i in range(len(cs))], k2)
    slots = {j for j in range(n) if j // dyn.child in kids or j // dyn.size in always}
  else:
    slots = {j for j in range(n) if j // dyn.size in picked | always}
  slots |= {j for j in range(n) if pos[j] > q_pos - dyn.recent}  # the last `recent` tokens
  return {j for j in slots if valid[j]}


@pytest.mark.parametrize("dyn", [Dynamic(size=8, keep1=0.5, child=4, keep2=0.2),
                                 Dynamic(size=8, keep1=0.3, child=0),
                                 Dynamic(size=8, keep1=0.3, child=4, keep2=0.2, recent=24),
                                 Dynamic(size=8, keep1=0.5, child=4, keep2=0.2, score="exact"),
                                 Dynamic(size=8, keep1=0.5, child=4, keep2=0.2, score="upper")],
                         ids=["two", "one", "recent", "exact", "upper"])
def test_dynamic_selection_matches_the_loop_reference(dyn):
  seed = 72
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  b, kh, g, n, e = 2, 2, 3, 64, 6
  q = rng.standard_normal((b, kh, g, e)).astype(np.float32)
  k = rng.standard_normal((b, kh, n, e)).astype(np.float32)
  held = np.array([64, 45])
  pos = np.where(np.arange(n)[None] < held[:, None], np.arange(n)[None] * 2, -1)
  pos = np.broadcast_to(pos[:, None], (b, kh, n)).astype(np.int32)
  q_pos = np.array([130, 88])
  got = np.asarray(dyn.select(jnp.asarray(q), jnp.asarray(k), jnp.asarray(pos),
                              jnp.asarray(q_pos)))
  for bi in range(b):
    for h in range(kh):
      want = _loop_select(dyn, q[bi, h], k[bi, h], pos[bi, h], q_pos[bi])
      assert set(np.flatnonzero(got[bi, h]).tolist()) == want, (bi, h)


@pytest.mark.parametrize("heads", ["all", "group"])
def test_static_eviction_matches_the_loop_reference(press_inputs, kept_positions, heads):
  seed = 73
  print(f"seed={seed}")
  cache, scores, lengths = press_inputs(seed)
  press = MPCache(20, window=8, tau=0.02, window_ratio=0.2, sink=2, recent=4, room=3,
                  heads=heads)
  out = press(cache, scores)
  assert out.budgets() == ((23, 23),) * 4
  for li in range(4):
    probs = np.asarray(scores[li][0])  # [B, K, G, W, N]
    for b in range(2):
      w = int(np.ceil(0.2 * lengths[b]))
      for h in range(2):
        mean = probs[b, h].mean(axis=0) if heads == "group" else probs[b].mean(axis=(0, 1))
        imp = mean[-min(w, 8):].max(axis=0)  # mean [W, N] -> [N]
        pos = np.asarray(cache.layers[li].groups[0].pos[b, h])
        forced = {int(p) for p in pos if 0 <= p < 2 or p >= lengths[b] - 4}
        cand = sorted([(float(imp[j]), int(pos[j])) for j in range(len(pos)) if pos[j] >= 0
                       and pos[j] not in forced], key=lambda c: (-c[0], -c[1]))
        top = {p for _, p in cand[:20 - len(forced)]}
        want = forced | {p for p in top if imp[p] >= 0.02}
        assert kept_positions(out, li, b, h) == want, (li, b, h)


def test_cross_layer_sharing_reuses_the_group_leaders_selection(press_inputs, kept_positions):
  seed = 74
  print(f"seed={seed}")
  cache, scores, _ = press_inputs(seed)
  out = MPCache(12, window=8, tau=0.0, sink=1, recent=2, share=2)(cache, scores)
  for b in range(2):
    for h in range(2):
      assert kept_positions(out, 1, b, h) == kept_positions(out, 0, b, h)
      assert kept_positions(out, 3, b, h) == kept_positions(out, 2, b, h)
  assert any(kept_positions(out, 0, b, h) != kept_positions(out, 2, b, h)
             for b in range(2) for h in range(2))


def test_bad_settings_are_one_line_errors():
  with pytest.raises(ValueError, match="tau"):
    MPCache(16, tau=1.5)
  with pytest.raises(ValueError, match="score"):
    Dynamic(score="cosine")
  with pytest.raises(ValueError, match="keep1"):
    Dynamic(keep1=0.0)
  with pytest.raises(ValueError, match="multiple"):
    Dynamic(size=32, child=12)
  with pytest.raises(ValueError, match="share"):
    MPCache(16, share=0)
  with pytest.raises(ValueError, match="heads"):
    MPCache(16, heads="some")


def test_generate_with_mpcache_end_to_end(spread_decoder):
  """Keeping every token and selecting every cluster gives plain generate's tokens; static +
  two-level dynamic selection at a small budget runs batch 2 and holds budget + room slots."""
  from colm.config import ModelConfig
  from kvcache import generate
  cfg = ModelConfig.tiny(max_seq_len=128, n_kv_heads=2, n_heads=4, n_layers=2)
  model = spread_decoder(cfg, 7)
  seed = 75
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, cfg.vocab_size, 40).tolist(),
             rng.integers(0, cfg.vocab_size, 29).tolist()]
  plain = generate(model, prompts, max_new_tokens=6, pad_to=48)
  everything = MPCache(48, window=16, tau=0.0, recent=4, room=8,
                       dynamic=Dynamic(size=8, keep1=1.0, child=4, keep2=1.0))
  assert generate(model, prompts, max_new_tokens=6, pad_to=48,
                  compression=everything.compression()) == plain
  small = MPCache(24, window=16, tau=1e-3, recent=4, room=8, share=2,
                  dynamic=Dynamic(size=8, keep1=0.5, child=4, keep2=0.3))
  out, info = generate(model, prompts, max_new_tokens=6, pad_to=48,
                       compression=small.compression(), return_info=True)
  assert [len(o) for o in out] == [6, 6]
  cache = info["cache"]
  assert cache.budgets() == ((32, 32), (32, 32))
  assert all(layer.decode_attn == small.dynamic.name for layer in cache.layers)
  assert dataclasses.replace(small, dynamic=None).dynamic is None


def test_upper_score_bounds_every_clusters_exact_score():
  seed = 75
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((2, 2, 3, 6)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 2, 40, 6)), jnp.float32)
  valid = jnp.asarray(rng.random((2, 2, 40)) < 0.8)
  hi, lo, filled = cluster_bounds(k, valid, 8)
  upper = Dynamic(size=8, child=0, score="upper")._score(q, k, valid, hi, lo, 8)
  exact = Dynamic(size=8, child=0, score="exact")._score(q, k, valid, hi, lo, 8)
  assert bool(jnp.all(jnp.where(filled, upper >= exact - 1e-5, True)))
  assert bool(jnp.any(jnp.where(filled, upper > exact + 1e-3, False)))  # a bound, not equal
