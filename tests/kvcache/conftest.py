"""Builders the cache tests share: a page pool with a host copy of what every page holds."""

import numpy as np
import pytest

from kvcache.pool import PagePool


class PoolSim:
  """A pool plus a host copy of what each page holds, to check copy-on-write end to end."""

  def __init__(self, num_pages, page_size):
    self.pool = PagePool(num_pages, page_size)
    self.content = np.full((num_pages, page_size), -1, np.int64)
    self.tokens: dict[int, list[int]] = {}

  def apply(self, copies):
    for src, dst in copies:
      self.content[dst] = self.content[src]

  def write(self, seq, new):
    start = len(self.tokens[seq])
    self.apply(self.pool.extend(seq, len(new)))
    for (page, off), tok in zip(self.pool.slots(seq, start, len(new)), new):
      self.content[page, off] = tok
    self.tokens[seq] += list(new)

  def check(self, exact_refs: bool = True):
    """Every sequence reads back what it wrote; refcounts = holders (>= with a tree holding)."""
    held = {}
    for s, toks in self.tokens.items():
      table = self.pool.table(s)
      assert len(table) == -(-len(toks) // self.pool.page_size)
      got = [self.content[table[t // self.pool.page_size], t % self.pool.page_size]
             for t in range(len(toks))]
      assert got == toks, f"sequence {s} reads {got}, wrote {toks}"
      for p in table:
        held[p] = held.get(p, 0) + 1
    for p in range(self.pool.num_pages):
      r = self.pool.refcount(p)
      assert r >= 0 and (r == held.get(p, 0) if exact_refs else r >= held.get(p, 0))
    assert self.pool.pages_in_use <= self.pool.peak_pages
    if exact_refs:
      assert self.pool.pages_in_use == len(held)



@pytest.fixture
def pool_sim():
  """PoolSim(num_pages, page_size): a PagePool plus a host model of page contents."""
  return PoolSim


def _press_inputs(seed, *, b=2, n_layers=4, kv=2, g=3, n=40, w=8, lengths=(40, 29)):
  """(cache, scores, lengths): a prefill-like cache (slot n holds position n while n < length,
  else empty; random K / V) and random window probabilities [B, K, G, W, N] per layer."""
  import dataclasses

  import jax.numpy as jnp

  from colm.config import ModelConfig
  from kvcache.cache import HeadGroup, init_cache
  rng = np.random.default_rng(seed)
  cfg = ModelConfig.tiny(n_layers=n_layers, n_kv_heads=kv, n_heads=kv * g, head_dim=8)
  cache = init_cache(cfg, b, n)
  lengths = np.asarray(lengths[:b], np.int32)
  pos = np.where(np.arange(n)[None] < lengths[:, None], np.arange(n)[None], -1)
  pos = np.broadcast_to(pos[:, None], (b, kv, n)).astype(np.int32)
  layers, scores = [], []
  for layer in cache.layers:
    k, v = (jnp.asarray(rng.standard_normal((b, kv, n, 8)), jnp.float32) for _ in range(2))
    layers.append(dataclasses.replace(layer, groups=(HeadGroup(k, v, jnp.asarray(pos)),)))
    logits = rng.standard_normal((b, kv, g, w, n)) * 2
    logits = np.where(pos[:, :, None, None] >= 0, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    scores.append((jnp.asarray(p / p.sum(-1, keepdims=True), jnp.float32),))
  return dataclasses.replace(cache, layers=tuple(layers), lengths=jnp.asarray(lengths)), \
      tuple(scores), lengths


def _kept_positions(cache, layer, b, h):
  """The positions a compressed cache holds for (layer, sequence, KV head), as a set."""
  g = cache.layers[layer].groups
  heads = [(grp, h0) for grp, (h0, h1) in zip(g, cache.layers[layer].head_ranges())
           if h0 <= h < h1]
  grp, h0 = heads[0]
  p = np.asarray(grp.pos[b, h - h0])
  return set(p[p >= 0].tolist())


@pytest.fixture
def press_inputs():
  """press_inputs(seed, **shape) -> (cache, scores, lengths); see _press_inputs."""
  return _press_inputs


@pytest.fixture
def kept_positions():
  """kept_positions(cache, layer, b, h) -> set of positions held."""
  return _kept_positions
