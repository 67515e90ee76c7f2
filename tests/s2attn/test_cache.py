"""The S2 compressed cache: eviction keeps exactly the tokens some head can still read, slots
never collide, and decoding with it equals decoding with the full masked cache and the full
forward of the same S2 model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colm.config import ModelConfig
from colm.model import Decoder
from kvcache import KVCache
from kvcache.s2_cache import (
  LayerPlan,
  cache_bytes,
  compress,
  init_s2_cache,
  plan_layers,
  write_token,
)
from s2attn import S2Pattern, s2_generate

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


def attendable(plan: LayerPlan, t: int) -> list[set[int]]:
  """Per KV head, positions some head of its group reads at query t: the only ones any later
  query may read (windows move forward, shards stay)."""
  m = _kv_token_mask(plan)[:, t]
  return [set(np.flatnonzero(row).tolist()) for row in m]


_write = jax.jit(write_token, static_argnums=0)
_compress = jax.jit(compress, static_argnums=1)


def _run_writes(plan, k, pos, starts, steps):
  """Writes `steps` tokens from positions starts [B] on; key = position in every dim. Returns
  the first key dim and the positions after every step, [steps, B, K, N]."""
  keys, held = [], []
  for i in range(steps):
    t = starts + i
    new = jnp.broadcast_to(t[:, None, None].astype(jnp.float32), k.shape[:2] + (k.shape[-1],))
    k, _, pos = _write(plan, k, k, pos, new, new, t)
    keys.append(k[..., 0])
    held.append(pos)
  return np.stack(keys), np.stack(held)


@pytest.mark.parametrize("name", list(PLANS))
def test_eviction_keeps_exactly_the_attendable_tokens(name):
  plan = PLANS[name]
  # A dense head makes its KV head keep everything, and slots are as wide as the widest head.
  assert (plan.budget < plan.max_len) == (name not in ("dense_layer", "dense_head"))
  # Two sequences: one from scratch, one compressed from a dense prefill of 37 tokens.
  b, e = 2, 3
  starts = np.array([0, 37])
  dense_k = jnp.broadcast_to(jnp.arange(40, dtype=jnp.float32)[None, None, :, None],
                             (b, plan.num_kv_heads, 40, e))
  cache = _compress(KVCache((dense_k,), (dense_k,), jnp.asarray(starts)), (plan,),
                    cache=init_s2_cache((plan,), b, e))
  keys, pos = _run_writes(plan, cache.k[0], cache.pos[0], jnp.asarray(starts),
                         plan.max_len - 37)
  keys, pos = np.asarray(keys), np.asarray(pos)  # [steps, B, K, N]
  assert pos.shape[-1] == plan.budget
  for i in range(pos.shape[0]):
    for bi in range(b):
      t = starts[bi] + i
      want = attendable(plan, t)
      for k in range(plan.num_kv_heads):
        held = pos[i, bi, k]
        got = held[held >= 0]
        assert len(set(got.tolist())) == len(got), "a position held twice"
        assert set(got.tolist()) == want[k], (name, t, k)
        np.testing.assert_array_equal(keys[i, bi, k][held >= 0], got)  # no slot clobbered


def test_memory_per_s2_head_is_about_seq_over_stride_plus_window():
  p = S2Pattern(64, 8, 8)
  plan = LayerPlan(8, 8, 32768, p, per_kv_head=True)
  assert plan.budget == 32768 // 8 + 8 * 64
  gqa = LayerPlan(8, 2, 32768, p)  # per-query-head patterns: a KV head keeps its group's union
  assert gqa.budget == 4 * 32768 // 8 + 8 * 64
  assert LayerPlan(8, 8, 256, p, per_kv_head=True).identity  # no saving: slot = position
  cfg = ModelConfig.tiny(n_layers=4, layer_attn=("s2:vert_stride=8,per_kv_head=true",) * 3 +
                         ("reference",), max_seq_len=512)
  plans = plan_layers(cfg, 32768)
  c = init_s2_cache(plans, 2, cfg.head_dim)
  assert c.nbytes() == cache_bytes(plans, 2, cfg.head_dim, 4)
  assert [x.shape[2] for x in c.k] == [4608, 4608, 4608, 32768]


# ------------------------------------------------------------------------------------------------
# Decoding.

LAYERS = ("s2:block_size=16,local_blocks=2,vert_stride=4,impl=reference",
          "reference",
          "s2:block_size=16,local_blocks=1,vert_stride=4,per_kv_head=true",
          "s2:block_size=16,local_blocks=2,vert_stride=8,num_dense_heads=2,head_sliding_offset=1")


@functools.cache
def make_model(seed: int = 0) -> Decoder:
  """Weights scaled so logits spread out (greedy choices far from ties)."""
  cfg = ModelConfig.tiny(n_layers=4, n_heads=4, n_kv_heads=2, d_model=40, head_dim=10, ffn_dim=56,
                         max_seq_len=192, layer_attn=LAYERS)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  new = [1.0 + 0.5 * rng.standard_normal(x.shape) if x.ndim == 1
         else rng.standard_normal(x.shape) * (1.5 / np.sqrt(x.shape[0])) for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, [jnp.asarray(y, x.dtype)
                                                          for x, y in zip(leaves, new)]))


def test_compressed_decoding_equals_full_cache_and_full_forward():
  model = make_model()
  cfg = model.cfg
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (45, 70, 9)]
  new = 100
  plans = plan_layers(cfg, 180)
  assert [p.budget < 180 for p in plans] == [True, False, True, False]
  toks, cache, logits = s2_generate(model, prompts, max_new_tokens=new, plans=plans,
                                    return_all=True)
  toks_f, cache_f, logits_f = s2_generate(model, prompts, max_new_tokens=new,
                                          plans=plan_layers(cfg, 180, full=True), return_all=True)
  np.testing.assert_array_equal(np.asarray(toks), np.asarray(toks_f))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_f), atol=2e-4, rtol=2e-4)
  assert cache.nbytes() < cache_f.nbytes()
  # The same tokens through the training-time forward (S2 attention functions, no cache); the
  # rows are right-padded to one length, which causal attention never sees.
  seqs = np.zeros((len(prompts), 70 + new), np.int32)
  for i, p in enumerate(prompts):
    seqs[i, :len(p) + new] = p + np.asarray(toks[i]).tolist()
  graphdef, state = nnx.split(model)
  full = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, seqs))
  for i, p in enumerate(prompts):
    assert np.argmax(full[i, len(p) - 1]) == int(toks[i, 0])
    np.testing.assert_allclose(np.asarray(logits[i]), full[i, len(p):len(p) + new - 1],
                               atol=2e-4, rtol=2e-4)
  # Held tokens per S2 KV head: what the pattern can read at the last position, nothing more.
  held = cache.held_tokens()  # [L, B, K]
  for li in (0, 2):
    for bi, p in enumerate(prompts):
      t = len(p) + new - 2  # position of the last token written
      assert held[li, bi].tolist() == [len(s) for s in attendable(plans[li], t)]
