"""H2O (Zhang et al., arXiv 2306.14048): heavy hitters plus recent tokens.

A token's importance is the attention it has accumulated from the queries so far,
A_j = sum_i a_ij summed over the group's query heads: after prefill from the W observation-window
queries of the prompt; the cache keeps the heaviest hitters and a recent window, half the budget
each by default. With `decode=True` the score keeps accumulating while decoding (the paper's
greedy eviction): every step adds the new query's attention to each slot's A_j (kept in the
cache, HeadGroup.acc), and a head whose slots are all full evicts its lightest token outside
the recent window, so the next token has a slot; the cache's size stays budget + room.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvcache.cache import KVCache
from kvcache.compression import Compression
from kvcache.press import BIG, Press, attention_sum, topk_keep


@dataclasses.dataclass(frozen=True)
class H2O(Press):
  """budget per head = recent_ratio of it for the latest tokens, the rest heavy hitters;
  decode: keep accumulating and evicting while decoding (one slot per full head per step)."""

  window: int = 64
  recent_ratio: float = 0.5
  decode: bool = False

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.recent_ratio <= 1.0:
      raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio}")

  def importance(self, layer, probs, pos, lengths):
    return attention_sum(probs)  # accumulated attention A_j = sum_i a_ij

  def select(self, layer, importance, pos, lengths, budgets):
    recent = int(min(budgets) * self.recent_ratio)
    imp = jnp.where((pos >= 0) & (pos >= (lengths - recent)[:, None, None]), BIG, importance)
    return topk_keep(imp, pos, budgets)

  def compression(self) -> Compression:
    if not self.decode:
      return super().compression()
    return Compression(self, window=self.window, prefill_room=True, every=1, decode_scores=True,
                       decode_policy=self.step)

  def __call__(self, cache: KVCache, scores=None) -> KVCache:
    return super().__call__(_with_acc(cache, scores) if self.decode else cache, scores)

  def step(self, cache: KVCache, scores) -> KVCache:
    """One decode step: A_j += the step query's attention (scores: per layer and head group
    [B, Kg, G, 1, N]); then each full head evicts its lightest slot outside the recent window
    (the last recent_ratio of its slots by position)."""
    layers = []
    for layer, layer_scores in zip(cache.layers, scores):
      groups = []
      for g, p in zip(layer.groups, layer_scores):
        acc = (jnp.zeros(g.pos.shape, jnp.float32) if g.acc is None else g.acc) + \
            attention_sum(p)
        recent = int(g.budget * self.recent_ratio)
        full = jnp.all(g.pos >= 0, axis=-1, keepdims=True)  # [B, Kg, 1]
        old = (g.pos >= 0) & (g.pos < (cache.lengths - recent)[:, None, None])
        victim = jnp.argmin(jnp.where(old, acc, jnp.inf), axis=-1)[..., None]  # [B, Kg, 1]
        drop = full & jnp.any(old, axis=-1, keepdims=True) & (
            jnp.arange(g.budget) == victim)
        groups.append(dataclasses.replace(g, pos=jnp.where(drop, -1, g.pos),
                                          acc=jnp.where(drop, 0.0, acc)))
      layers.append(dataclasses.replace(layer, groups=tuple(groups)))
    return KVCache(tuple(layers), cache.lengths)


def _with_acc(cache: KVCache, scores) -> KVCache:
  """The prefill cache with each slot's accumulated window attention in HeadGroup.acc (repack
  carries it into the compressed cache)."""
  layers = []
  for layer, layer_scores in zip(cache.layers, scores):
    groups = tuple(dataclasses.replace(g, acc=attention_sum(p))
                   for g, p in zip(layer.groups, layer_scores))
    layers.append(dataclasses.replace(layer, groups=groups))
  return KVCache(tuple(layers), cache.lengths)
