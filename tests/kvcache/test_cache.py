"""The cache owns its reads and writes: per-layer / per-head budgets hold exactly that memory,
a random eviction then decoding equals a masked full-cache reference, chunked prefill equals
one-shot prefill, rewinding works, and bad requests are one-line errors that leave the cache
usable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colm.attention import reference_attention, register_attention
from colm.config import ModelConfig
from kvcache import decode_step, init_cache, prefill, prefill_chunked, repack

# GQA 3:1, distinct prime-ish sizes so a wrong axis shows in a shape.
CFG = ModelConfig.tiny(d_model=45, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=53,
                       max_seq_len=48, n_layers=2)


def test_budgets_per_layer_and_head_hold_exactly_their_memory():
  budgets = [(7, 19), 13]
  c = init_cache(CFG, 3, 40, budgets=budgets)
  assert c.budgets() == ((7, 19), (13, 13))
  assert [len(layer.groups) for layer in c.layers] == [2, 1]  # equal budgets share a group
  per_slot = 2 * CFG.head_dim * 4 + 4  # K and V in float32, the int32 position
  assert c.nbytes() == 3 * (7 + 19 + 13 + 13) * per_slot
  assert c.nbytes(include_positions=False) == 3 * (7 + 19 + 26) * 2 * CFG.head_dim * 4
  assert c.held_tokens().sum() == 0


@pytest.mark.parametrize("budgets, match", [
    (0, "budget 0 of layer 0, KV head 0 must be positive"),
    (-3, "budget -3"),
    (41, "budget 41 of layer 0, KV head 0 exceeds the cache length max_len=40"),
    ([(5, 50), 5], "budget 50 of layer 0, KV head 1 exceeds"),
    ([5], "budgets has 1 entries for n_layers=2"),
    ([(5, 5, 5), 5], "layer 0 has 3 entries for 2 KV heads"),
])
def test_bad_budgets(budgets, match):
  with pytest.raises(ValueError, match=match):
    init_cache(CFG, 1, 40, budgets=budgets)


def _prompts(seed, lengths, total):
  rng = np.random.default_rng(seed)
  return rng.integers(0, CFG.vocab_size, (len(lengths), total)).astype(np.int32)


def test_chunked_prefill_equals_one_shot(spread_decoder, full_forward):
  seed = 11
  print(f"seed={seed}")
  model = spread_decoder(CFG, seed)
  graphdef, params = nnx.split(model)
  lengths = np.array([29, 7, 16])
  toks = _prompts(seed, lengths, 32)
  one_logits, one = prefill(graphdef, params, toks, lengths, init_cache(CFG, 3, 40))
  ch_logits, ch = prefill_chunked(graphdef, params, toks, lengths, init_cache(CFG, 3, 40), 8)
  full = full_forward(model, toks)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(ch_logits[b, :n]), np.asarray(one_logits[b, :n]),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ch_logits[b, :n]), full[b, :n], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(ch.lengths), lengths)
  for lo, lc in zip(one.layers, ch.layers):
    for go, gc in zip(lo.groups, lc.groups):
      np.testing.assert_array_equal(np.asarray(go.pos), np.asarray(gc.pos))
      np.testing.assert_allclose(np.asarray(go.k), np.asarray(gc.k), atol=1e-5, rtol=1e-5)
  # Both caches decode the same next token logits.
  nxt = jnp.asarray(toks[np.arange(3), np.minimum(lengths, 31)])
  a, _ = decode_step(graphdef, params, nxt, one)
  b, _ = decode_step(graphdef, params, nxt, ch)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_rewind_then_prefill_equals_fresh_prefill(spread_decoder):
  """start < tokens seen empties the slots from start on (a search backtracking)."""
  model = spread_decoder(CFG, 12)
  graphdef, params = nnx.split(model)
  toks = _prompts(12, [20], 20)
  other = _prompts(13, [8], 8)
  _, c = prefill(graphdef, params, toks, [20], init_cache(CFG, 1, 40))
  logits, c = prefill(graphdef, params, other, [8], c, start=[12])
  fresh_in = np.concatenate([toks[:, :12], other], axis=1)
  want, w = prefill(graphdef, params, fresh_in, [20], init_cache(CFG, 1, 40))
  np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(want[0, 12:]), atol=1e-5)
  assert c.held_tokens().tolist() == w.held_tokens().tolist() == [[[20, 20]]] * 2


# A full-sequence reference: attention under a fixed boolean mask [B, H, T, S], set per test.
_MASK = {}


def _masked_attention(q, k, v, *, causal=True, scale=None):
  m = _MASK["mask"][:, :, : q.shape[1], : k.shape[1]]
  return reference_attention(q, k, v, causal=causal, mask=jnp.asarray(m), scale=scale)


register_attention("test_masked", _masked_attention)


def test_random_eviction_then_decode_equals_masked_full_reference(spread_decoder, full_forward):
  """Keep a random subset of the prompt per sequence and KV head, repacked into per-head budgets
  that are smaller than the prompt; decoding then equals the full forward in which every later
  query of that KV head's group is masked off the evicted positions."""
  seed = int(np.random.randint(1 << 30))
  print(f"seed={seed}")
  rng = np.random.default_rng(seed)
  b, p, new = 2, 24, 6
  g = CFG.n_heads // CFG.n_kv_heads
  model = spread_decoder(CFG, 5)
  graphdef, params = nnx.split(model)
  toks = rng.integers(0, CFG.vocab_size, (b, p + new)).astype(np.int32)
  keep = rng.random((b, CFG.n_kv_heads, p)) < 0.5
  keep[:, :, :new + 1] = False  # budgets (kept + new) stay below the prompt for every seed
  keep[:, :, p - 1] = True  # never empty
  _, cache = prefill(graphdef, params, toks[:, :p], [p] * b, init_cache(CFG, b, p + new))
  budgets = tuple(int(keep[:, h].sum(-1).max()) + new for h in range(CFG.n_kv_heads))
  keep_j = jnp.asarray(keep)

  def keep_fn(li, h0, pos):
    kc = pos.shape[1]
    return jnp.take_along_axis(keep_j[:, h0:h0 + kc], jnp.clip(pos, 0, p - 1), axis=2) & (pos < p)

  small = jax.jit(repack, static_argnums=(1, 2), static_argnames="max_len")(
      cache, (budgets,) * CFG.n_layers, keep_fn, max_len=p + new)
  assert small.budgets() == (budgets,) * CFG.n_layers and max(budgets) < p
  assert small.held_tokens()[0].tolist() == keep.sum(-1).tolist()
  # The reference: query t >= p of head h does not read evicted prompt positions of h // g.
  mask = np.ones((b, CFG.n_heads, p + new, p + new), bool)
  gone = np.repeat(~keep, g, axis=1)  # [B, H, P]
  mask[:, :, p:, :p] &= ~gone[:, :, None, :]
  _MASK["mask"] = mask
  ref = full_forward(spread_decoder(CFG.replace(attn_impl="test_masked"), 5), toks)
  sizes = set()
  for t in range(p, p + new):
    logits, small = decode_step(graphdef, params, jnp.asarray(toks[:, t]), small)
    sizes.add(decode_step._cache_size())
    np.testing.assert_allclose(np.asarray(logits), ref[:, t], atol=1e-5, rtol=1e-5,
                               err_msg=f"position {t}")
  assert len(sizes) == 1, f"decode_step recompiled across steps: {sizes}"


def test_bad_prefill_requests_leave_the_cache_usable(spread_decoder):
  model = spread_decoder(CFG, 7)
  graphdef, params = nnx.split(model)
  toks = _prompts(7, [10], 10)
  cache = init_cache(CFG, 1, 16, budgets=[(12, 16), 16])
  _, cache = prefill(graphdef, params, toks, [10], cache)
  with pytest.raises(ValueError, match="start position 11 of sequence 0 is outside the cache"):
    prefill(graphdef, params, toks, [1], cache, start=[11])
  with pytest.raises(ValueError, match="start position -1"):
    prefill(graphdef, params, toks, [1], cache, start=[-1])
  with pytest.raises(ValueError, match="a prompt of 3 tokens does not fit the 2 free slots"):
    prefill(graphdef, params, toks, [3], cache)
  with pytest.raises(ValueError, match="lengths must be"):
    prefill(graphdef, params, toks, [11], cache)
  # Nothing was donated or truncated by the rejected calls.
  assert cache.held_tokens()[:, 0].tolist() == [[10, 10], [10, 10]]
  _, cache = prefill(graphdef, params, toks, [2], cache)
  assert cache.held_tokens()[:, 0].tolist() == [[12, 12], [12, 12]]
  np.testing.assert_array_equal(np.asarray(cache.lengths), [12])
