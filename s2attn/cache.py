"""S2-Attention's KV eviction as a cache policy: each KV head keeps only what its heads can read.

An S2 head reads key block k from query block q when k is in the local window (q - k <
local_blocks) or on its vertical stride ((k + o_h) % vert_stride == 0). Queries only move
forward, so a token outside every vertical shard of a KV head's query group is never read again
once its block leaves the window: it is evicted. What a KV head holds is then its vertical
blocks (about seq / vert_stride tokens per residue it serves) plus local_blocks blocks of the
window, instead of the whole sequence (S2-Attention, https://arxiv.org/abs/2407.17678, sec. 3.3).

Here that is a policy over kvcache's cache (`S2Eviction(plans)(cache, scores)`): after prefill
it repacks the prompt's cache into per-KV-head budgets (a head that keeps every residue, a dense
head's, keeps max_len); after every decode step it marks what left the window empty, so the
next token has a free slot. The heads' patterns at attention time come from the attention
function's token mask (s2attn.attention) through the cache's decode-attention seam.

    comp = s2_compression(model.cfg, max_len=4096)
    tokens = kvcache.generate(model, prompts, max_new_tokens=32, compression=comp)

Axes: B batch, H query heads, K KV heads (Kc of a head group), N slots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from colm.config import ModelConfig
from kvcache import Compression, KVCache, map_positions, repack
from s2attn.attention import s2_options_from_spec
from s2attn.pattern import S2Pattern


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What one layer's KV heads keep (hashable: a jit static argument).

  Attributes:
    num_heads: H query heads.
    num_kv_heads: K KV heads.
    max_len: longest sequence the cache serves.
    pattern: the layer's S2 pattern, or None for a dense layer.
    per_kv_head: patterns per KV head instead of per query head.
  """

  num_heads: int
  num_kv_heads: int
  max_len: int
  pattern: S2Pattern | None = None
  per_kv_head: bool = False

  @functools.cached_property
  def kv_residues(self) -> np.ndarray:
    """bool [K, stride]: residues the query heads of each KV head read (their union)."""
    p = self.pattern
    res = p.residues(self.num_heads, self.num_kv_heads if self.per_kv_head else None)
    g = self.num_heads // self.num_kv_heads
    out = np.zeros((self.num_kv_heads, p.vert_stride), bool)
    for h, rs in enumerate(res):
      out[h // g, sorted(rs)] = True
    return out

  @functools.cached_property
  def kv_budgets(self) -> tuple[int, ...]:
    """Slots per KV head: its vertical blocks at max_len plus the local window, at most
    max_len (dense layers and heads that keep every residue keep max_len)."""
    if self.pattern is None:
      return (self.max_len,) * self.num_kv_heads
    p = self.pattern
    kb = np.arange(p.num_blocks(self.max_len))
    out = []
    for res in self.kv_residues:
      ring = 0 if res.all() else p.local_blocks
      out.append(min(self.max_len, int(res[kb % p.vert_stride].sum() + ring) * p.block_size))
    return tuple(out)

  def alive(self, pos: jax.Array, t: jax.Array, first_head: int = 0) -> jax.Array:
    """bool [B, Kc, N]: the slot holds a token some head of its KV head's group can still read
    from query position t [B] on (KV heads first_head .. first_head + Kc)."""
    t = t[:, None, None]
    valid = (pos >= 0) & (pos <= t)
    if self.pattern is None:
      return valid
    p = self.pattern
    kc = pos.shape[1]
    kb = jnp.maximum(pos, 0) // p.block_size
    local = t // p.block_size - kb < p.local_blocks
    table = jnp.asarray(self.kv_residues[first_head:first_head + kc])  # [Kc, s]
    kept = table[jnp.arange(kc)[None, :, None], kb % p.vert_stride]
    return valid & (local | kept)


def plan_layers(cfg: ModelConfig, max_len: int | None = None) -> tuple[LayerPlan, ...]:
  """Per-layer plans from the model's attention specs (cfg.layer_attn, else cfg.attn_impl):
  's2:...' layers get S2 plans, every other layer is dense. max_len default cfg.max_seq_len."""
  max_len = cfg.max_seq_len if max_len is None else int(max_len)
  specs = cfg.layer_attn or (cfg.attn_impl,) * cfg.n_layers
  plans = []
  for spec in specs:
    o = s2_options_from_spec(spec)
    plans.append(LayerPlan(cfg.n_heads, cfg.n_kv_heads, max_len,
                           None if o is None else o.pattern,
                           False if o is None else o.per_kv_head))
  return tuple(plans)


def budgets(plans: tuple[LayerPlan, ...]) -> tuple[tuple[int, ...], ...]:
  """Per layer and KV head, the slots S2 needs (kvcache.init_cache's budgets)."""
  return tuple(p.kv_budgets for p in plans)


def cache_bytes(plans: tuple[LayerPlan, ...], batch_size: int, head_dim: int, itemsize: int,
                include_positions: bool = True) -> int:
  """Analytic bytes of a cache with S2's budgets (K, V and int32 positions)."""
  slots = sum(batch_size * sum(p.kv_budgets) for p in plans)
  return slots * (2 * head_dim * itemsize + (4 if include_positions else 0))


@dataclasses.dataclass(frozen=True)
class S2Eviction:
  """The S2 policy: cache -> cache keeping what some head can still read (see module doc)."""

  plans: tuple[LayerPlan, ...]

  def __call__(self, cache: KVCache, scores=None) -> KVCache:
    if len(self.plans) != len(cache.layers):
      raise ValueError(f"{len(self.plans)} layer plans for a cache of {len(cache.layers)} layers")
    t = cache.lengths

    def keep(li, h0, pos):
      return self.plans[li].alive(pos, t, h0)

    if cache.budgets() == budgets(self.plans):  # in the loop: mark what left the window empty
      return map_positions(cache, lambda li, h0, pos: jnp.where(keep(li, h0, pos), pos, -1))
    cache = repack(cache, budgets(self.plans), keep, max_len=self.plans[0].max_len)
    # With patterns per KV head every head of a group reads exactly what the group keeps, so
    # the token mask is a no-op on the evicted cache: skip it.
    return dataclasses.replace(cache, layers=tuple(
        dataclasses.replace(layer, token_mask=not (p.pattern is not None and p.per_kv_head))
        for layer, p in zip(cache.layers, self.plans)))


def s2_compression(cfg: ModelConfig, max_len: int | None = None) -> Compression:
  """The decode loop's hook for an S2 model: repack after prefill, evict after every step."""
  return Compression(S2Eviction(plan_layers(cfg, max_len)), every=1, prefill_room=True)
