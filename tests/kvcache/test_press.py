"""The press abstraction and the top-k methods (StreamingLLM, H2O, SnapKV, PyramidKV) against
slow loop references on random caches and scores; budgets held exactly; generate end to end."""

import numpy as np
import pytest

from kvcache.h2o import H2O
from kvcache.press import arithmetic_budgets
from kvcache.pyramidkv import PyramidKV
from kvcache.snapkv import SnapKV
from kvcache.streamingllm import StreamingLLM


def _loop_topk(imp, pos, length, budget, forced):
  """Slow reference: the forced positions, then the most important others (ties: later)."""
  cand = [(float(imp[n]), int(pos[n])) for n in range(len(pos)) if pos[n] >= 0]
  keep = {p for _, p in cand if p in forced}
  rest = sorted([c for c in cand if c[1] not in keep], key=lambda c: (-c[0], -c[1]))
  return keep | {p for _, p in rest[:max(0, budget - len(keep))]}


def _pool(x, kernel):
  pad = kernel // 2
  xp = np.pad(x, (pad, pad), constant_values=-np.inf)
  return np.asarray([xp[i:i + kernel].max() for i in range(len(x))])


def _reference(press, probs, pos, length, budget):
  n = len(pos)
  t = probs.sum(axis=(0, 1)) if probs is not None else None  # [N]
  window = {p for p in pos if p >= length - press.window and p >= 0}
  if isinstance(press, StreamingLLM):
    return _loop_topk(pos.astype(float), pos, length, budget,
                      {p for p in pos if 0 <= p < press.sinks})
  if isinstance(press, H2O):
    recent = int(budget * press.recent_ratio)
    return _loop_topk(t, pos, length, budget, {p for p in pos if p >= length - recent >= -n
                                               and p >= 0})
  return _loop_topk(_pool(t, press.kernel), pos, length, budget, window)


PRESSES = [StreamingLLM(12, sinks=3), H2O(14, window=8), SnapKV(16, window=8),
           SnapKV(0.5, window=8, kernel=3), PyramidKV(14, window=8, beta=4.0, room=5)]


@pytest.mark.parametrize("press", PRESSES, ids=lambda p: type(p).__name__)
def test_press_keeps_what_the_loop_reference_keeps(press, press_inputs, kept_positions):
  seed = 61
  print(f"seed={seed}")
  cache, scores, lengths = press_inputs(seed)
  out = press(cache, scores)
  budgets = press.layer_budgets(len(cache.layers), 2, cache.max_len)
  assert out.budgets() == tuple(tuple(b + press.room for b in bl) for bl in budgets)
  for li in range(len(cache.layers)):
    for b in range(2):
      for h in range(2):
        pos = np.asarray(cache.layers[li].groups[0].pos[b, h])
        probs = np.asarray(scores[li][0][b, h])
        want = _reference(press, probs, pos, int(lengths[b]), budgets[li][h])
        assert kept_positions(out, li, b, h) == want, (li, b, h)
        assert len(want) == min(budgets[li][h], int(lengths[b]))


def test_pyramid_budgets_fall_arithmetically_with_the_uniform_total():
  per = arithmetic_budgets(100 * 8, 8, 20.0, 1)
  assert per == sorted(per, reverse=True) and abs(sum(per) - 800) <= 8
  assert per[-1] == 5 and per[0] == 195
  p = PyramidKV(32, window=8).layer_budgets(4, 2, 64)
  assert p[0][0] > p[-1][0] and p[0] == (p[0][0],) * 2


def test_bad_budgets_and_names_are_one_line_errors(press_inputs):
  for bad in (0, -3, 1.5, 0.0, "half", True):
    with pytest.raises(ValueError, match="budget"):
      SnapKV(bad)
  cache, scores, _ = press_inputs(1)
  with pytest.raises(ValueError, match="above the prompt length 40"):
    SnapKV(41, window=8)(cache, scores)
  with pytest.raises(ValueError, match="below the observation window"):
    SnapKV(4, window=8)(cache, scores)


def test_generate_with_a_press_end_to_end(spread_decoder):
  """A full budget keeps every prompt token: the same greedy tokens as no compression; a small
  budget runs batch 2 and holds budget + room slots per head."""
  from colm.config import ModelConfig
  from kvcache import generate
  cfg = ModelConfig.tiny(max_seq_len=128, n_kv_heads=2, n_heads=4, n_layers=2)
  model = spread_decoder(cfg, 5)
  rng = np.random.default_rng(62)
  print("seed=62")
  prompts = [rng.integers(0, cfg.vocab_size, 30).tolist(), rng.integers(0, cfg.vocab_size,
                                                                        22).tolist()]
  plain = generate(model, prompts, max_new_tokens=6, pad_to=32)
  full = SnapKV(32, window=8, room=6)
  assert generate(model, prompts, max_new_tokens=6, pad_to=32,
                  compression=full.compression()) == plain
  small = SnapKV(12, window=8, room=6)
  out, info = generate(model, prompts, max_new_tokens=6, pad_to=32,
                       compression=small.compression(), return_info=True)
  assert [len(o) for o in out] == [6, 6]
  assert info["cache"].budgets() == ((18, 18), (18, 18))


def test_query_agnostic_compression_then_the_question(spread_decoder):
  """Compress the context alone (its own last tokens as the window), then prefill the question
  onto the compressed cache: with a budget that keeps everything, the logits equal prefilling
  context + question in one piece; a batch of 2 compresses in one call."""
  import jax.numpy as jnp
  from flax import nnx

  from colm.config import ModelConfig
  from kvcache import init_cache, prefill
  from kvcache.decode import apply_policy
  cfg = ModelConfig.tiny(max_seq_len=128, n_kv_heads=2, n_heads=4, n_layers=2)
  model = spread_decoder(cfg, 6)
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(63)
  print("seed=63")
  ctx = rng.integers(0, cfg.vocab_size, (2, 32)).astype(np.int32)
  question = rng.integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
  lengths = jnp.asarray([32, 32], jnp.int32)
  _, cache, scores = prefill(graphdef, params, jnp.asarray(ctx), lengths,
                             init_cache(cfg, 2, 32), score_window=8)
  cache = apply_policy(SnapKV(32, window=8, room=8), cache, scores)
  logits, _ = prefill(graphdef, params, jnp.asarray(question), jnp.asarray([8, 8]), cache)
  whole, _ = prefill(graphdef, params, jnp.asarray(np.concatenate([ctx, question], 1)),
                     jnp.asarray([40, 40]), init_cache(cfg, 2, 40))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(whole)[:, 32:], atol=2e-4)


def test_budgets_of_one_bucket_share_the_decode_loop(spread_decoder):
  from colm.config import ModelConfig
  from kvcache import generate
  from kvcache.decode import decode_loop
  cfg = ModelConfig.tiny(max_seq_len=128, n_kv_heads=2, n_heads=4, n_layers=2)
  model = spread_decoder(cfg, 7)
  prompts = [list(range(3, 33)), list(range(40, 62))]
  sizes = []
  for budget in (12, 14, 16):
    press = SnapKV(budget, window=8, room=6, bucket=8)
    _, info = generate(model, prompts, max_new_tokens=4, pad_to=32,
                       compression=press.compression(), return_info=True)
    assert info["cache"].budgets() == ((24, 24), (24, 24))
    sizes.append(decode_loop._cache_size())
  assert sizes[1] == sizes[0] and sizes[2] == sizes[0]


def test_h2o_decoding_accumulates_and_evicts_like_a_loop_reference(press_inputs):
  """H2O(decode=True): after prefill each kept slot carries its window attention; each decode
  step adds the step's attention, and a full head evicts its lightest slot outside the recent
  window: checked step by step against a per-(sequence, head) loop on random probabilities."""
  import dataclasses

  import jax.numpy as jnp

  seed = 64
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  cache, scores, lengths = press_inputs(seed, n_layers=2)
  press = H2O(14, window=8, room=2, decode=True)
  out = press(cache, scores)
  n = out.layers[0].groups[0].budget  # 16 slots: 14 kept + 2 free
  ref = {}  # (layer, b, h) -> [pos, acc] over the n slots
  for li in range(2):
    pos0 = np.asarray(cache.layers[li].groups[0].pos)
    acc0 = np.asarray(scores[li][0]).sum(axis=(2, 3))
    g = out.layers[li].groups[0]
    for b in range(2):
      for h in range(2):
        p, a = np.asarray(g.pos[b, h]), np.asarray(g.acc[b, h])
        for slot in np.flatnonzero(p >= 0):  # the carried score is the slot's window attention
          src = int(np.flatnonzero(pos0[b, h] == p[slot])[0])
          assert a[slot] == pytest.approx(acc0[b, h, src], rel=1e-6)
        ref[li, b, h] = [p.copy(), a.copy()]
  recent = int(n * press.recent_ratio)
  for step in range(5):  # 2 steps fill the room, then one eviction per step
    layers, step_scores = [], []
    for li, layer in enumerate(out.layers):
      k, v = (jnp.asarray(rng.standard_normal((2, 1, 2, 8)), jnp.float32) for _ in range(2))
      layer = layer.update(k, v, out.lengths[:, None])
      g = layer.groups[0]
      logits = np.where(np.asarray(g.pos) >= 0, rng.standard_normal((2, 2, n)) * 2, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p = np.broadcast_to((p / p.sum(-1, keepdims=True))[:, :, None, None], (2, 2, 3, 1, n))
      layers.append(layer)
      step_scores.append((jnp.asarray(p, jnp.float32),))
      for b in range(2):
        for h in range(2):
          rp, ra = ref[li, b, h]
          free = np.flatnonzero(rp < 0)
          rp[free[0]], ra[free[0]] = int(out.lengths[b]), 0.0  # the write: first free slot
          ra += p[b, h, :, 0].sum(0)
    length = np.asarray(out.lengths) + 1
    out = press.step(dataclasses.replace(out, layers=tuple(layers),
                                         lengths=jnp.asarray(length)), tuple(step_scores))
    for li in range(2):
      g = out.layers[li].groups[0]
      for b in range(2):
        for h in range(2):
          rp, ra = ref[li, b, h]
          if (rp >= 0).all():
            old = np.flatnonzero(rp < length[b] - recent)
            victim = old[np.argmin(ra[old])]
            rp[victim], ra[victim] = -1, 0.0
          np.testing.assert_array_equal(np.asarray(g.pos[b, h]), rp, err_msg=f"{step} {li}")
          np.testing.assert_allclose(np.asarray(g.acc[b, h]), ra, rtol=1e-5, atol=1e-7)
          assert (rp >= 0).sum() == n - 1  # one slot free for the next write, every step


def test_generate_with_h2o_decoding(spread_decoder):
  """A budget that keeps the prompt with room for every new token evicts nothing: the same
  greedy tokens as no compression; a small one keeps its budget + room slots per head and
  holds the newest tokens."""
  from colm.config import ModelConfig
  from kvcache import generate
  cfg = ModelConfig.tiny(max_seq_len=128, n_kv_heads=2, n_heads=4, n_layers=2)
  model = spread_decoder(cfg, 8)
  rng = np.random.default_rng(65)
  print("seed=65")
  prompts = [rng.integers(0, cfg.vocab_size, 30).tolist(), rng.integers(0, cfg.vocab_size,
                                                                        22).tolist()]
  plain = generate(model, prompts, max_new_tokens=8, pad_to=32)
  whole = H2O(32, window=8, room=8, decode=True)
  assert generate(model, prompts, max_new_tokens=8, pad_to=32,
                  compression=whole.compression()) == plain
  small = H2O(12, window=8, room=2, decode=True)
  out, info = generate(model, prompts, max_new_tokens=8, pad_to=32,
                       compression=small.compression(), return_info=True)
  c = info["cache"]
  assert [len(o) for o in out] == [8, 8] and c.budgets() == ((14, 14), (14, 14))
  held = c.held_tokens()  # [L, B, K]: full but one free slot after the last eviction
  assert (held == 13).all(), held
  for layer in c.layers:
    pos = np.asarray(layer.groups[0].pos)
    last = np.asarray(c.lengths) - 1
    assert (pos == last[:, None, None]).any(-1).all()  # the newest token is held
