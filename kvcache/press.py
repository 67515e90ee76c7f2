"""KV-cache compression as one small abstraction: score -> select -> keep.

Axes: B batch, L layers, K KV heads, G query heads per KV head, W observation-window queries,
N cache slots.

A `Press` is a compression policy for the decode loop's hook (kvcache.compression.Compression):
after prefill it gets the probabilities of the last W prompt queries over the cache slots (per
layer, [B, K, G, W, N]) and returns a cache that really holds fewer slots: per layer and KV head
`budget` prompt tokens plus `room` free slots for decoding (kvcache.cache.repack). A method fills
in at most three things:

    importance(layer, probs, pos, lengths) -> [B, K, N]   how much each slot matters (score)
    select(layer, importance, pos, lengths, budgets) -> bool [B, K, N]   which slots stay
    layer_budgets(n_layers, n_kv_heads, prompt) -> per layer, per KV head budgets
    source(layer) -> the layer whose selection this layer reuses (index sharing)

The default select keeps the `budget` most important slots of each head (top-k, ties to the
later position) with the observation window always kept; budgets are absolute tokens (int) or a
ratio of the prompt (float in (0, 1]; of the prompt's padded length, the static shape). Batch > 1
works throughout: budgets are per layer and head, the selection per sequence. Query-aware and
query-agnostic compression differ only in what the prompt holds when it runs (question inside
the observation window, or the context alone with the question prefilled afterwards onto the
compressed cache: kvcache.prefill(..., start=)).

    press = SnapKV(budget=0.12, room=64)
    generate(model, prompts, max_new_tokens=64, compression=press.compression())
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvcache.cache import KVCache, repack
from kvcache.compression import Compression

BIG = 1e30  # the importance of slots a press must keep (observation window, sinks)


def topk_keep(importance: jax.Array, pos: jax.Array, budgets: tuple[int, ...]) -> jax.Array:
  """bool [B, K, N]: the budgets[k] most important occupied slots of each head k (importance
  [B, K, N], ties broken towards later positions; empty slots pos < 0 never)."""
  imp = jnp.where(pos >= 0, importance.astype(jnp.float32), -jnp.inf)
  # Rank by importance, then by position (a stable order without a second sort key).
  order = jnp.lexsort((-pos, -imp), axis=-1)
  rank = jnp.argsort(order, axis=-1)
  limit = jnp.asarray(budgets, jnp.int32)[None, :, None]
  return (rank < limit) & (pos >= 0)


def window_mask(pos: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
  """bool [B, K, N]: the slots of each sequence's last `window` tokens (positions >= length - W)."""
  return (pos >= 0) & (pos >= (lengths - window)[:, None, None])


def pooled(x: jax.Array, kernel: int) -> jax.Array:
  """Max pooling along the last axis, window `kernel` (odd), same length (SnapKV's clustering)."""
  if kernel <= 1:
    return x
  pad = kernel // 2
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) * (x.ndim - 1) + (kernel,),
                               (1,) * x.ndim, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])


def arithmetic_budgets(total: int, n: int, ratio: float, minimum: int) -> list[int]:
  """n budgets of an arithmetic sequence with mean total / n, the last 1 / ratio of the mean:
  b_0 = 2 * mean - b_last, b_i = b_0 - i * (b_0 - b_last) / (n - 1) (PyramidKV's beta,
  WindowKV's lambda), each at least `minimum`."""
  mean = total / n
  last = mean / ratio
  first = 2 * mean - last
  if n == 1:
    return [max(minimum, round(mean))]
  return [max(minimum, round(first - i * (first - last) / (n - 1))) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Press:
  """score -> select -> keep (see the module doc). Hashable: a jit static of the decode loop.

  Attributes:
    budget: prompt tokens kept per KV head: an int, or a float ratio in (0, 1] of the prompt.
    window: W, the observation window: the scores of the last W prompt queries, always kept.
    room: free slots per head after compression, for the tokens decoding writes.
    bucket: slots per head rounded up to a multiple of this (the kept tokens stay exactly the
      budget): budgets of one bucket give one cache shape, so decoding does not recompile.
  """

  budget: int | float
  window: int = 32
  room: int = 0
  bucket: int = 1

  def __post_init__(self):
    b = self.budget
    if isinstance(b, bool) or not isinstance(b, int | float):
      raise ValueError(f"budget must be an int (tokens) or a float ratio, got {b!r}")
    if (isinstance(b, float) and not 0.0 < b <= 1.0) or (isinstance(b, int) and b < 1):
      raise ValueError(f"budget {b!r} must be >= 1 tokens or a ratio in (0, 1]")
    if self.window < 0 or self.room < 0 or self.bucket < 1:
      raise ValueError(f"window and room must be >= 0 and bucket >= 1, got {self.window}, "
                       f"{self.room}, {self.bucket}")

  # What a method fills in ----------------------------------------------------------------------

  def floor(self) -> tuple[int, str]:
    """(the fewest tokens a budget may keep, what they are): the observation window."""
    return self.window, f"the observation window {self.window}"

  def tokens(self, prompt: int) -> int:
    """The budget in tokens for a prompt of `prompt` slots."""
    n = self.budget if isinstance(self.budget, int) else math.ceil(self.budget * prompt)
    if n > prompt:
      raise ValueError(f"budget {self.budget!r} ({n} tokens) is above the prompt length {prompt}")
    least, what = self.floor()
    if n < least:
      raise ValueError(f"budget {n} tokens is below {what}")
    return n

  def layer_budgets(self, n_layers: int, n_kv_heads: int, prompt: int
                    ) -> tuple[tuple[int, ...], ...]:
    return ((self.tokens(prompt),) * n_kv_heads,) * n_layers

  def importance(self, layer: int, probs, pos: jax.Array, lengths: jax.Array) -> jax.Array:
    """[B, K, N] from probs [B, K, G, W, N] (None when the press asks for no scores)."""
    raise NotImplementedError

  def select(self, layer: int, importance: jax.Array, pos: jax.Array, lengths: jax.Array,
             budgets: tuple[int, ...]) -> jax.Array:
    imp = jnp.where(window_mask(pos, lengths, self.window), BIG, importance)
    return topk_keep(imp, pos, budgets)

  def source(self, layer: int) -> int:
    return layer

  # The plumbing every method shares ------------------------------------------------------------

  def compression(self) -> Compression:
    """The decode loop's hook: after prefill (prompt-sized prefill cache), W scores."""
    return Compression(self, window=self.window, prefill_room=True)

  def __call__(self, cache: KVCache, scores=None) -> KVCache:
    for li, layer in enumerate(cache.layers):
      if len(layer.groups) != 1:
        raise ValueError(f"a press compresses a cache of one head group per layer (the prefill "
                         f"cache); layer {li} has {len(layer.groups)}")
    n_layers, prompt = len(cache.layers), cache.max_len
    n_kv = cache.layers[0].num_kv_heads
    budgets = self.layer_budgets(n_layers, n_kv, prompt)
    keeps = []
    for li, layer in enumerate(cache.layers):
      src = self.source(li)
      if src != li:  # index sharing: the group's first layer selected for it
        keeps.append(keeps[src])
        continue
      pos = layer.groups[0].pos
      probs = None if scores is None else scores[li][0]
      imp = self.importance(li, probs, pos, cache.lengths)
      keeps.append(self.select(li, imp, pos, cache.lengths, budgets[li]))
    new = tuple(tuple(-(-(n + self.room) // self.bucket) * self.bucket for n in bl)
                for bl in budgets)
    return repack(cache, new, lambda li, h0, pos: keeps[li][:, h0:h0 + pos.shape[1]],
                  max_len=max(max(bl) for bl in new))


def attention_sum(probs: jax.Array) -> jax.Array:
  """[B, K, N]: probs [B, K, G, W, N] summed over the G query heads and W window queries."""
  return jnp.sum(probs.astype(jnp.float32), axis=(2, 3))
