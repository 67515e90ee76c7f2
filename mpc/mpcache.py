"""MPCache (Zeng et al., arXiv 2501.06807), the plaintext (accuracy) path on the decoder.

Symbols of the paper:
  alpha_w  the observation window: the last 20% of the prompt's queries;
  tau      look-once static eviction at prefill: token j stays when some window query gives it a
           mean-over-heads probability >= tau (here also capped at a token budget, since the
           cache's shapes are fixed: the highest-scoring ones up to `budget`);
  S, S_2   cluster sizes: level 1 clusters of S = 32 consecutive kept tokens, level 2 children
           of S_2 = 16;
  r_max, r_min  each cluster's per-channel max and min of its keys, kept incrementally as
           decoding appends tokens (`append_bounds`);
  alpha    the MPC-friendly similarity q . (alpha r_max + (1 - alpha) r_min), alpha = 0.6: one
           product per cluster instead of a cosine or a gather;
  k_1, k_2 query-aware dynamic selection at every decode step: the top 50% of level-1
           clusters, then the top 20% of children (two-level), or one level with k_1 alone;
           the attention sink's cluster and the newest token's cluster always attended;
  share    cross-layer index sharing: layers in groups of `share` reuse the group's first
           layer's static selection.

`MPCache(budget, tau=...)` is a press (kvcache.press): after prefill it evicts statically and
really frees memory; with `dynamic` set it also installs the dynamic selection as the cache's
decode attention (registered in kvcache.attention under a name per configuration), which
attends, per KV head, only the selected clusters' tokens. The same step under MPC is
mpc.secure.mpcache_step (one level); the tests check both select the same clusters.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from kvcache.attention import reference_decode_attention, register_decode_attention
from kvcache.press import BIG, Press, topk_keep

# Clusters and their bounds ---------------------------------------------------------------------

def cluster_bounds(k: jax.Array, valid: jax.Array, size: int):
  """Per-channel max / min of each cluster's valid keys.

  k [..., N, E], valid bool [..., N]; N padded up to a multiple of `size`.
  Returns (r_max, r_min [..., C, E], filled bool [..., C]); an empty cluster's bounds are 0.
  """
  n = k.shape[-2]
  c = -(-n // size)
  pad = c * size - n
  if pad:
    k = jnp.pad(k, [(0, 0)] * (k.ndim - 2) + [(0, pad), (0, 0)])
    valid = jnp.pad(valid, [(0, 0)] * (valid.ndim - 1) + [(0, pad)])
  kb = k.reshape(k.shape[:-2] + (c, size, k.shape[-1])).astype(jnp.float32)
  vb = valid.reshape(valid.shape[:-1] + (c, size))[..., None]
  filled = jnp.any(vb[..., 0], axis=-1)
  r_max = jnp.where(filled[..., None], jnp.max(jnp.where(vb, kb, -jnp.inf), axis=-2), 0.0)
  r_min = jnp.where(filled[..., None], jnp.min(jnp.where(vb, kb, jnp.inf), axis=-2), 0.0)
  return r_max, r_min, filled


def append_bounds(r_max, r_min, filled, k_new, slot, size: int):
  """The bounds after writing k_new [..., E] into `slot` [...] (int): only its cluster changes
  (a fresh cluster takes the token itself). Equal to cluster_bounds of the grown cache."""
  c = slot // size
  onehot = jax.nn.one_hot(c, r_max.shape[-2], dtype=bool)  # [..., C]
  fresh = onehot & ~filled
  kn = k_new.astype(jnp.float32)[..., None, :]
  r_max = jnp.where(onehot[..., None], jnp.where(fresh[..., None], kn, jnp.maximum(r_max, kn)),
                    r_max)
  r_min = jnp.where(onehot[..., None], jnp.where(fresh[..., None], kn, jnp.minimum(r_min, kn)),
                    r_min)
  return r_max, r_min, filled | onehot


def cluster_score(q: jax.Array, r_max: jax.Array, r_min: jax.Array, alpha: float) -> jax.Array:
  """[B, K, C]: sum over the G query heads of q . (alpha r_max + (1 - alpha) r_min);
  q [B, K, G, E], r_max / r_min [B, K, C, E]."""
  r = alpha * r_max + (1.0 - alpha) * r_min
  return jnp.einsum("bkge,bkce->bkc", q.astype(jnp.float32), r)


def top_mask(score: jax.Array, allowed: jax.Array, count: int) -> jax.Array:
  """bool [..., C]: the `count` highest scores among `allowed` (ties to the lower index)."""
  s = jnp.where(allowed, score, -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-s, axis=-1, stable=True), axis=-1, stable=True)
  return (rank < count) & allowed


@dataclasses.dataclass(frozen=True)
class Dynamic:
  """The per-step selection (hashable: it names a registered decode attention).

  Attributes:
    size: S, level-1 cluster size; keep1: share of the middle clusters kept at level 1.
    child: S_2, level-2 child size (0 = one level); keep2: share of all children kept.
    alpha: the similarity's mix of r_max and r_min.
    recent: the last `recent` tokens are always attended besides the newest cluster (0: the
      paper's rule; public positions, so free under MPC). Right after a cluster boundary the
      newest cluster holds one token and the question's last words would otherwise compete.
    score: "bounds" (the paper's q . (alpha r_max + (1 - alpha) r_min)), "upper" (Quest's
      bound sum_e max(q_e r_max_e, q_e r_min_e): a per-channel choice by q's sign, so a
      comparison per channel and cluster under MPC) or "exact" (a plaintext oracle for
      ablations: each cluster's largest q . k over its tokens); the G query heads summed.
  """

  size: int = 32
  keep1: float = 0.5
  child: int = 16
  keep2: float = 0.2
  alpha: float = 0.6
  recent: int = 0
  score: str = "bounds"

  def __post_init__(self):
    for name in ("keep1", "keep2", "alpha"):
      x = getattr(self, name)
      if not 0.0 <= x <= 1.0 or (name != "alpha" and x == 0.0):
        raise ValueError(f"Dynamic.{name} must be in (0, 1], got {x}")
    if self.score not in ("bounds", "upper", "exact"):
      raise ValueError(f'Dynamic.score must be "bounds", "upper" or "exact", got {self.score!r}')
    if self.recent < 0:
      raise ValueError(f"Dynamic.recent must be >= 0, got {self.recent}")
    if self.size < 1 or (self.child and self.size % self.child):
      raise ValueError(f"cluster size {self.size} must be >= 1 and a multiple of the child "
                       f"size {self.child}")

  def counts(self, n: int) -> tuple[int, int]:
    """(k_1, k_2): clusters kept among the middle ones of n slots, children kept (0: none)."""
    c = -(-n // self.size)
    k1 = max(1, math.ceil(self.keep1 * max(c - 2, 1)))
    k2 = max(1, math.ceil(self.keep2 * max(c - 2, 1) * (self.size // self.child))) \
        if self.child else 0
    return k1, k2

  def select(self, q: jax.Array, k: jax.Array, pos: jax.Array, q_pos: jax.Array) -> jax.Array:
    """bool [B, K, N]: the slots a decode query attends (q [B, K, G, E], k [B, K, N, E], pos
    [B, K, N], q_pos [B]). Slots are in position order (prefill then decode writes)."""
    n = k.shape[2]
    valid = (pos >= 0) & (pos <= q_pos[:, None, None])
    r_max, r_min, filled = cluster_bounds(k, valid, self.size)
    c = r_max.shape[-2]
    last = (jnp.sum(valid, axis=-1) - 1) // self.size  # [B, K]: the newest token's cluster
    idx = jnp.arange(c)
    always = (idx == 0) | (idx == last[..., None])
    middle = filled & ~always
    k1, k2 = self.counts(n)
    picked = top_mask(self._score(q, k, valid, r_max, r_min, self.size), middle, k1)
    token = jnp.repeat(picked | always, self.size, axis=-1)[..., :n]
    if self.child:
      ch_max, ch_min, ch_filled = cluster_bounds(k, valid, self.child)
      parent = jnp.repeat(picked, self.size // self.child, axis=-1)[..., :ch_max.shape[-2]]
      kids = top_mask(self._score(q, k, valid, ch_max, ch_min, self.child), parent & ch_filled,
                      k2)
      token = jnp.repeat(kids, self.child, axis=-1)[..., :n] | jnp.repeat(
          always, self.size, axis=-1)[..., :n]
    if self.recent:
      token = token | (pos > (q_pos - self.recent)[:, None, None])
    return token & valid

  def _score(self, q, k, valid, r_max, r_min, size: int) -> jax.Array:
    """[B, K, C] cluster scores of clusters of `size` slots (see `score`)."""
    if self.score == "bounds":
      return cluster_score(q, r_max, r_min, self.alpha)
    if self.score == "upper":
      qs = jnp.sum(q.astype(jnp.float32), axis=2)[:, :, None, :]  # [B, K, 1, E]
      return jnp.sum(jnp.maximum(qs * r_max, qs * r_min), axis=-1)
    s = jnp.einsum("bkge,bkne->bkn", q.astype(jnp.float32), k.astype(jnp.float32))
    s = jnp.where(valid, s, -jnp.inf)
    c = r_max.shape[-2]
    s = jnp.pad(s, ((0, 0), (0, 0), (0, c * size - s.shape[-1])), constant_values=-jnp.inf)
    return jnp.max(s.reshape(s.shape[:2] + (c, size)), axis=-1)

  @functools.cached_property
  def name(self) -> str:
    """The registered decode attention that attends only the selection."""
    name = f"mpcache-{self.size}-{self.keep1}-{self.child}-{self.keep2}-{self.alpha}"
    name += (f"-r{self.recent}" if self.recent else "") + (
        "" if self.score == "bounds" else f"-{self.score}")
    sel = self.select

    def attend(q, k, v, pos, q_pos, mask=None, *, scale=None, return_probs=False):
      keep = sel(q, k, pos, q_pos)[:, :, None, :]  # [B, K, 1, N]
      keep = jnp.broadcast_to(keep, q.shape[:3] + (k.shape[2],))
      return reference_decode_attention(q, k, v, pos, q_pos, keep if mask is None else
                                        mask & keep, scale=scale, return_probs=return_probs)

    register_decode_attention(name, attend)
    return name


@dataclasses.dataclass(frozen=True)
class MPCache(Press):
  """Static eviction at prefill (and the dynamic selection for decoding when `dynamic`).

  Attributes:
    budget: tokens kept at most per head (int or ratio), the static cache's size.
    tau: a token stays when a window query's mean-over-heads probability reaches tau.
    window_ratio: the observation window's share of the prompt (the last 20% of queries);
      `window` is the most window queries scored (the hook's static shape).
    sink, recent: the first `sink` and last `recent` prompt tokens always stay.
    share: cross-layer index sharing of the static selection in groups of `share` layers.
    dynamic: the per-step selection, or None for static eviction alone.
    heads: "all" (the paper's: one mean over every head of the layer, the same tokens kept for
      all KV heads) or "group" (an ablation: each KV head's mean over its own query heads).
  """

  window: int = 512
  tau: float = 1e-3
  window_ratio: float = 0.2
  sink: int = 1
  recent: int = 32
  share: int = 1
  dynamic: Dynamic | None = None
  heads: str = "all"

  def __post_init__(self):
    super().__post_init__()
    if self.heads not in ("all", "group"):
      raise ValueError(f'heads must be "all" or "group", got {self.heads!r}')
    if not 0.0 <= self.tau < 1.0:
      raise ValueError(f"tau must be in [0, 1), got {self.tau}")
    if not 0.0 < self.window_ratio <= 1.0:
      raise ValueError(f"window_ratio must be in (0, 1], got {self.window_ratio}")
    if self.share < 1:
      raise ValueError(f"share must be >= 1, got {self.share}")

  def floor(self):
    return self.sink + self.recent, f"sink + recent = {self.sink + self.recent}"

  def importance(self, layer, probs, pos, lengths):
    """[B, K, N]: max over the sequence's window queries of the mean over the layer's heads
    (heads="group": over each KV head's query heads)."""
    w = probs.shape[3]
    win = jnp.ceil(self.window_ratio * lengths).astype(jnp.int32)  # [B] queries in the window
    use = jnp.arange(w)[None, :] >= (w - jnp.minimum(win, w))[:, None]  # [B, W]
    p = probs.astype(jnp.float32)
    mean = jnp.mean(p, axis=2) if self.heads == "group" else jnp.mean(p, axis=(1, 2))[:, None]
    imp = jnp.max(jnp.where(use[:, None, :, None], mean, 0.0), axis=2)  # [B, K or 1, N]
    return jnp.broadcast_to(imp, pos.shape)

  def select(self, layer, importance, pos, lengths, budgets):
    forced = (pos >= 0) & ((pos < self.sink) | (pos >= (lengths - self.recent)[:, None, None]))
    imp = jnp.where(forced, BIG, importance)
    return topk_keep(imp, pos, budgets) & (forced | (importance >= self.tau))

  def source(self, layer: int) -> int:
    return layer - layer % self.share

  def __call__(self, cache, scores=None):
    out = super().__call__(cache, scores)
    if self.dynamic is None:
      return out
    name = self.dynamic.name
    return dataclasses.replace(out, layers=tuple(
        dataclasses.replace(layer, decode_attn=name) for layer in out.layers))
