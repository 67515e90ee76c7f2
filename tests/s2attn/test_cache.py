"""S2's eviction as a cache policy: every step keeps exactly the tokens some head can still read,
per-KV-head budgets are held exactly, and decoding with it equals decoding with the full masked
cache and the full forward of the same S2 model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colm.config import ModelConfig
from kvcache import KVCache, LayerCache, generate, init_cache
from kvcache.cache import _groups
from s2attn import LayerPlan, S2Eviction, S2Pattern, cache_bytes, plan_layers, s2_compression

PLANS = {
    "per_head_gqa": LayerPlan(4, 2, 200, S2Pattern(16, 2, 4)),
    "per_kv_head": LayerPlan(6, 3, 200, S2Pattern(16, 3, 6), per_kv_head=True),
    "homo_offset": LayerPlan(2, 2, 200, S2Pattern(16, 1, 5, homo_head=True,
                                                  head_sliding_offset=2)),
    "dense_head": LayerPlan(4, 2, 200, S2Pattern(16, 2, 8, num_dense_heads=2)),
    "sliding_step": LayerPlan(8, 4, 200, S2Pattern(32, 2, 8, head_sliding_step=3)),
    "dense_layer": LayerPlan(4, 2, 200, None),
}


@functools.cache
def _kv_token_mask(plan: LayerPlan) -> np.ndarray:
  """bool [K, T, T]: some query head of KV head k at position t reads position s (brute force
  from the pattern's token mask)."""
  n = plan.max_len
  if plan.pattern is None:
    return np.broadcast_to(np.tri(n, dtype=bool), (plan.num_kv_heads, n, n))
  nkv = plan.num_kv_heads if plan.per_kv_head else None
  m = plan.pattern.token_mask(plan.num_heads, np.arange(n), np.arange(n), nkv)  # [H, T, T]
  return m.reshape(plan.num_kv_heads, -1, n, n).any(1)


def readable_from(plan: LayerPlan, t: int) -> list[set[int]]:
  """Per KV head, positions < t some head of its group reads at query t or later."""
  m = _kv_token_mask(plan)[:, t:].any(1)  # [K, T]
  return [set(np.flatnonzero(row[:t]).tolist()) for row in m]


def _one_layer(plan: LayerPlan, batch: int, budgets, e: int = 3) -> KVCache:
  layer = LayerCache(_groups(batch, budgets, e, jnp.float32), plan.num_heads // plan.num_kv_heads,
                     "reference")
  return KVCache((layer,), jnp.zeros((batch,), jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _write(policy, cache, t):
  """Writes position t [B] (key = position in every dim), then applies the policy."""
  layer = cache.layers[0]
  b, e = t.shape[0], layer.groups[0].k.shape[-1]
  new = jnp.broadcast_to(t[:, None, None, None].astype(jnp.float32),
                         (b, 1, layer.num_kv_heads, e))
  layer = layer.update(new, new, t[:, None])
  return policy(KVCache((layer,), t + 1), None)


@pytest.mark.parametrize("name", list(PLANS))
def test_eviction_keeps_exactly_the_readable_tokens(name):
  plan = PLANS[name]
  policy = S2Eviction((plan,))
  # A dense head makes its KV head keep everything; other KV heads still get their own budget.
  assert (max(plan.kv_budgets) < plan.max_len) == (name not in ("dense_layer", "dense_head"))
  if name == "dense_head":
    assert plan.kv_budgets[0] < plan.max_len == plan.kv_budgets[1]
  # Two sequences: one from scratch, one from a full cache of 37 prompt tokens repacked.
  b, starts = 2, np.array([0, 37])
  full = _one_layer(plan, b, (plan.max_len,) * plan.num_kv_heads)
  layer = full.layers[0]
  keys = jnp.broadcast_to(jnp.arange(40, dtype=jnp.float32)[None, :, None, None],
                          (b, 40, plan.num_kv_heads, 3))
  pos = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (b, 40))
  layer = layer.update(keys, keys, pos, pos < jnp.asarray(starts)[:, None])
  cache = policy(KVCache((layer,), jnp.asarray(starts, jnp.int32)))
  assert cache.budgets() == (plan.kv_budgets,)
  for i in range(plan.max_len - 37):
    t = starts + i
    cache = _write(policy, cache, jnp.asarray(t, jnp.int32))
    for bi in range(b):
      want = readable_from(plan, int(t[bi]) + 1) if t[bi] + 1 < plan.max_len else None
      layer = cache.layers[0]
      heads = [(g, h0) for g, (h0, h1) in zip(layer.groups, layer.head_ranges())
               for _ in range(h1 - h0)]
      for k, (g, first) in enumerate(heads):
        held = np.asarray(g.pos[bi, k - first])
        got = held[held >= 0]
        assert len(set(got.tolist())) == len(got), "a position held twice"
        if want is not None:
          assert set(got.tolist()) == want[k], (name, t[bi], k)
        key = np.asarray(g.k[bi, k - first, :, 0])
        np.testing.assert_array_equal(key[held >= 0], got)  # no slot clobbered


def test_memory_per_s2_head_is_about_seq_over_stride_plus_window():
  p = S2Pattern(64, 8, 8)
  plan = LayerPlan(8, 8, 32768, p, per_kv_head=True)
  assert plan.kv_budgets == (32768 // 8 + 8 * 64,) * 8
  gqa = LayerPlan(8, 2, 32768, p)  # per-query-head patterns: a KV head keeps its group's union
  assert gqa.kv_budgets == (4 * 32768 // 8 + 8 * 64,) * 2
  assert LayerPlan(8, 8, 256, p, per_kv_head=True).kv_budgets == (256,) * 8  # no saving
  cfg = ModelConfig.tiny(n_layers=4, layer_attn=("s2:vert_stride=8,per_kv_head=true",) * 3 +
                         ("reference",), max_seq_len=512)
  plans = plan_layers(cfg, 32768)
  c = init_cache(cfg, 2, 32768, budgets=[p.kv_budgets for p in plans])
  assert c.nbytes() == cache_bytes(plans, 2, cfg.head_dim, 4)
  assert [layer.groups[0].budget for layer in c.layers] == [4608, 4608, 4608, 32768]


# ------------------------------------------------------------------------------------------------
# Decoding.

LAYERS = ("s2:block_size=16,local_blocks=2,vert_stride=4,impl=reference",
          "reference",
          "s2:block_size=16,local_blocks=1,vert_stride=4,per_kv_head=true",
          "s2:block_size=16,local_blocks=2,vert_stride=8,num_dense_heads=2,head_sliding_offset=1")
CFG = ModelConfig.tiny(n_layers=4, n_heads=4, n_kv_heads=2, d_model=40, head_dim=10, ffn_dim=56,
                       max_seq_len=192, layer_attn=LAYERS)


def test_compressed_decoding_equals_full_cache_and_full_forward(spread_decoder, full_forward):
  seed = 1
  print(f"seed={seed}")
  model = spread_decoder(CFG, 0)
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (45, 70, 9)]
  new = 100
  plans = plan_layers(CFG, 192)
  assert [max(p.kv_budgets) < 192 for p in plans] == [True, False, True, False]
  assert plans[3].kv_budgets[0] < 192  # the KV head without the dense heads is compressed
  comp = s2_compression(CFG, 192)
  toks, info = generate(model, prompts, max_new_tokens=new, max_len=192, compression=comp,
                        return_info=True, pad_to=16)
  toks_f, info_f = generate(model, prompts, max_new_tokens=new, max_len=192, return_info=True,
                            pad_to=16)
  assert toks == toks_f
  np.testing.assert_allclose(info["logits"], info_f["logits"], atol=2e-4, rtol=2e-4)
  cache, cache_f = info["cache"], info_f["cache"]
  assert cache.nbytes() < cache_f.nbytes()
  # The same tokens through the training-time forward (S2 attention functions, no cache).
  seqs = np.zeros((len(prompts), 70 + new), np.int32)
  for i, p in enumerate(prompts):
    seqs[i, :len(p) + new] = p + toks[i]
  full = full_forward(model, seqs)
  for i, p in enumerate(prompts):
    np.testing.assert_allclose(info["logits"][i], full[i, len(p) - 1:len(p) - 1 + new],
                               atol=2e-4, rtol=2e-4)
  # Held tokens per S2 KV head: what the pattern can read from the next position on.
  held = cache.held_tokens()  # [L, B, K]
  for li in (0, 2, 3):
    for bi in range(len(prompts)):
      # The last position written (the loop runs whole chunks of 16 steps, so a few extra).
      t = int(np.asarray(cache.lengths)[bi]) - 1
      want = [len(s) for s in readable_from(plans[li], t + 1)]
      assert held[li, bi].tolist() == want, (li, bi)
