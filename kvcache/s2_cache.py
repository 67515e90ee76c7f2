"""S2-Attention's per-head compressed KV cache: each KV head keeps only what its heads can read.

An S2 head reads key block k from query block q when k is in the local window (q - k <
local_blocks) or on its vertical stride ((k + o_h) % vert_stride == 0). Queries only move
forward, so a token outside every vertical shard of a KV head's query group is never read again
once its block leaves the window: it is evicted. What a KV head holds is then its vertical
blocks (about seq / vert_stride tokens per residue it serves) plus a ring of local_blocks
blocks, instead of the whole sequence (S2-Attention, https://arxiv.org/abs/2407.17678, sec. 3.3).

Slots of one KV head k (budget N = (V + W) * block_size, static):
  vertical region [0, V * bs): kept block kb goes to ordinal(kb) * bs + p % bs, where
    ordinal(kb) = (kb // stride) * |R_k| + #{r in R_k: r < kb % stride} and R_k is the set of
    residues the group reads (one per sparse head; all of them for a dense head);
  local ring [V * bs, N): any other token p goes to V * bs + p % (W * bs), W = local_blocks;
    the token it overwrites sits W blocks back and has left the window.
A slot's original position is stored beside it (-1 = empty); keys are stored after RoPE, so
positions stay exact. Dense layers of a hybrid stack (and layers whose sparse budget would not
be smaller) keep slot = position. With plans built `full=True` every layer keeps every token and
only masks: the mask-based reference the compressed cache must match.

Axes: B batch, H query heads, K KV heads, N slots, E head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from colm.config import ModelConfig, resolve_dtype
from kvcache.cache import KVCache

if TYPE_CHECKING:
  from s2attn.pattern import S2Pattern


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Static slot plan of one layer (hashable: a jit static argument).

  Attributes:
    num_heads: H query heads.
    num_kv_heads: K KV heads.
    max_len: longest sequence the cache serves.
    pattern: the layer's S2 pattern, or None for a dense layer.
    per_kv_head: patterns per KV head instead of per query head.
    full: keep every token (the masked full-cache reference); no eviction.
  """

  num_heads: int
  num_kv_heads: int
  max_len: int
  pattern: S2Pattern | None = None
  per_kv_head: bool = False
  full: bool = False

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
  def vertical_blocks(self) -> int:
    """V: the most kept blocks any KV head holds in the vertical region at max_len."""
    n = self.pattern.num_blocks(self.max_len)
    kb = np.arange(n)
    return int(self.kv_residues[:, kb % self.pattern.vert_stride].sum(1).max())

  @functools.cached_property
  def ring_blocks(self) -> int:
    """W: blocks of the local ring (0 when every KV head keeps every residue)."""
    return 0 if self.kv_residues.all() else self.pattern.local_blocks

  @property
  def identity(self) -> bool:
    """Slot = position: dense layers, the full reference, or no saving from slots."""
    if self.pattern is None or self.full:
      return True
    return (self.vertical_blocks + self.ring_blocks) * self.pattern.block_size >= self.max_len

  @property
  def budget(self) -> int:
    """N, slots per KV head."""
    if self.identity:
      return self.max_len
    return (self.vertical_blocks + self.ring_blocks) * self.pattern.block_size

  # Per-slot arithmetic (jnp) ----------------------------------------------------------------------

  def _kept(self, blocks):
    """bool [B, K, *]: block is on a vertical shard of the KV head. blocks [B, K, *] int."""
    s = self.pattern.vert_stride
    table = jnp.asarray(self.kv_residues)  # [K, s]
    kidx = jnp.arange(self.num_kv_heads).reshape((1, -1) + (1,) * (blocks.ndim - 2))
    return table[kidx, blocks % s]

  def slots(self, positions):
    """int [B, K, T]: the slot of each position [B, T] in each KV head."""
    positions = jnp.broadcast_to(positions[:, None, :], (positions.shape[0], self.num_kv_heads,
                                                         positions.shape[1]))
    if self.identity:
      return positions
    p = self.pattern
    bs, s = p.block_size, p.vert_stride
    kb = positions // bs
    res = jnp.asarray(self.kv_residues)
    count = res.sum(1)[None, :, None]  # |R_k|
    rank = jnp.cumsum(res, 1) - res  # [K, s]: kept residues below r
    kidx = jnp.arange(self.num_kv_heads)[None, :, None]
    ordinal = (kb // s) * count + rank[kidx, kb % s]
    vertical = ordinal * bs + positions % bs
    ring = self.vertical_blocks * bs + positions % max(1, self.ring_blocks * bs)
    return jnp.where(self._kept(kb), vertical, ring)

  def alive(self, pos, t):
    """bool [B, K, N]: slot holds a token (pos >= 0, pos <= t) some head of the KV head's group
    can still read from query position t [B] on."""
    t = t[:, None, None]
    valid = (pos >= 0) & (pos <= t)
    if self.pattern is None or self.full:
      return valid
    bs = self.pattern.block_size
    kb = jnp.maximum(pos, 0) // bs
    local = t // bs - kb < self.pattern.local_blocks
    return valid & (local | self._kept(kb))

  def head_mask(self, pos, t):
    """bool [B, H, N]: query head h at position t [B] reads the slot (its own pattern)."""
    g = self.num_heads // self.num_kv_heads
    pos_h = jnp.repeat(pos, g, axis=1)  # [B, H, N]
    t = t[:, None, None]
    valid = (pos_h >= 0) & (pos_h <= t)
    if self.pattern is None:
      return valid
    p = self.pattern
    nkv = self.num_kv_heads if self.per_kv_head else None
    off = jnp.asarray(p.head_offsets(self.num_heads, nkv))[None, :, None]
    dense = jnp.asarray(p.dense_heads(self.num_heads, nkv))[None, :, None]
    kb, qb = jnp.maximum(pos_h, 0) // p.block_size, t // p.block_size
    local = qb - kb < p.local_blocks
    vertical = (kb + off) % p.vert_stride == 0
    return valid & (local | vertical | dense)


def plan_layers(cfg: ModelConfig, max_len: int | None = None, *, full: bool = False
                ) -> tuple[LayerPlan, ...]:
  """Per-layer plans from the model's attention specs (cfg.layer_attn, else cfg.attn_impl).

  Args:
    cfg: the model config; 's2:...' layers get S2 plans, every other layer is dense.
    max_len: cache length (default cfg.max_seq_len).
    full: the masked full-cache reference (same patterns, nothing evicted).
  """
  from s2attn.attention import s2_options_from_spec
  max_len = cfg.max_seq_len if max_len is None else int(max_len)
  specs = cfg.layer_attn or (cfg.attn_impl,) * cfg.n_layers
  plans = []
  for spec in specs:
    o = s2_options_from_spec(spec)
    plans.append(LayerPlan(cfg.n_heads, cfg.n_kv_heads, max_len,
                           None if o is None else o.pattern,
                           False if o is None else o.per_kv_head, full))
  return tuple(plans)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class S2Cache:
  """Per-layer compressed keys and values with each slot's original position.

  Attributes:
    k: per layer [B, K, N_l, E] keys after RoPE.
    v: per layer [B, K, N_l, E] values.
    pos: per layer [B, K, N_l] int32 position of the token in each slot, -1 when empty.
    lengths: [B] int32 tokens seen so far per sequence (the next token's position).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  pos: tuple[jax.Array, ...]
  lengths: jax.Array

  def nbytes(self, include_positions: bool = True) -> int:
    """Bytes held by K and V (plus the position index)."""
    arrs = self.k + self.v + (self.pos if include_positions else ())
    return sum(x.size * x.dtype.itemsize for x in arrs)

  def held_tokens(self) -> np.ndarray:
    """int [L, B, K]: occupied slots per layer, sequence and KV head."""
    return np.stack([np.asarray((p >= 0).sum(-1)) for p in self.pos])


def init_s2_cache(plans: tuple[LayerPlan, ...], batch_size: int, head_dim: int,
                  dtype="float32") -> S2Cache:
  """An empty cache: every slot's position -1."""
  dt = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
  shapes = [(batch_size, p.num_kv_heads, p.budget) for p in plans]
  return S2Cache(k=tuple(jnp.zeros(s + (head_dim,), dt) for s in shapes),
                 v=tuple(jnp.zeros(s + (head_dim,), dt) for s in shapes),
                 pos=tuple(jnp.full(s, -1, jnp.int32) for s in shapes),
                 lengths=jnp.zeros((batch_size,), jnp.int32))


def cache_bytes(plans: tuple[LayerPlan, ...], batch_size: int, head_dim: int, itemsize: int,
                include_positions: bool = True) -> int:
  """Analytic bytes of init_s2_cache (K, V and int32 positions)."""
  slots = sum(batch_size * p.num_kv_heads * p.budget for p in plans)
  return slots * (2 * head_dim * itemsize + (4 if include_positions else 0))


def _scatter(buf, slots, new, drop):
  """buf [B, K, N, ...] <- new [B, K, T, ...] at slots [B, K, T]; entries with drop skipped."""
  b, kh, t = slots.shape
  n = buf.shape[2]
  bi = jnp.arange(b)[:, None, None]
  ki = jnp.arange(kh)[None, :, None]
  return buf.at[bi, ki, jnp.where(drop, n, slots)].set(new, mode="drop")


def evict(plan: LayerPlan, pos: jax.Array, t: jax.Array) -> jax.Array:
  """pos [B, K, N] with the slots no head can read from position t [B] on marked empty."""
  return jnp.where(plan.alive(pos, t), pos, -1)


def write_token(plan: LayerPlan, k: jax.Array, v: jax.Array, pos: jax.Array, new_k: jax.Array,
                new_v: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Writes one token per sequence at position t [B] and evicts what became unreachable.

  Args:
    k, v: [B, K, N, E]; pos: [B, K, N]; new_k, new_v: [B, K, E]; t: [B] int.
  Returns:
    the updated (k, v, pos).
  """
  slots = plan.slots(t[:, None])  # [B, K, 1]
  no = jnp.zeros(slots.shape, bool)
  k = _scatter(k, slots, new_k[:, :, None].astype(k.dtype), no)
  v = _scatter(v, slots, new_v[:, :, None].astype(v.dtype), no)
  pos = _scatter(pos, slots, jnp.broadcast_to(t[:, None, None], slots.shape), no)
  return k, v, evict(plan, pos, t)


def compress(kv: KVCache, plans: tuple[LayerPlan, ...], *, cache: S2Cache | None = None
             ) -> S2Cache:
  """A dense (prefilled) KVCache -> S2Cache keeping only the tokens the heads can still read.

  The pure `cache -> cache` form of S2's eviction: token p of sequence b is kept when some head
  of its KV head's group reads it from position lengths[b] - 1 on.

  Args:
    kv: a KVCache with per layer [B, K, S, E] and lengths [B] (S may be below plan.max_len).
    plans: per-layer plans.
    cache: an empty S2Cache to fill (donate it); default a fresh one.
  """
  b, kh, s, e = kv.k[0].shape
  cache = cache or init_s2_cache(plans, b, e, kv.k[0].dtype)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  last = kv.lengths - 1
  ks, vs, ps = [], [], []
  for plan, k_full, v_full, k0, v0, p0 in zip(plans, kv.k, kv.v, cache.k, cache.v, cache.pos):
    pos = jnp.broadcast_to(positions[:, None], (b, plan.num_kv_heads, s))
    pos = jnp.where(pos < kv.lengths[:, None, None], pos, -1)
    drop = ~plan.alive(pos, last)
    slots = plan.slots(positions)
    ks.append(_scatter(k0, slots, k_full[:, : plan.num_kv_heads].astype(k0.dtype), drop))
    vs.append(_scatter(v0, slots, v_full[:, : plan.num_kv_heads].astype(v0.dtype), drop))
    ps.append(_scatter(p0, slots, pos, drop))
  return S2Cache(tuple(ks), tuple(vs), tuple(ps), kv.lengths.astype(jnp.int32))


def attend(plan: LayerPlan, q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array,
           t: jax.Array, *, scale: float | None = None) -> jax.Array:
  """One query per sequence over the kept slots, each head under its own pattern.

  Args:
    q: [B, H, E] at position t [B]; k, v: [B, K, N, E]; pos: [B, K, N].
  Returns:
    [B, H, E] in q.dtype (float32 softmax).
  """
  b, h, e = q.shape
  kh = k.shape[1]
  scale = e ** -0.5 if scale is None else scale
  qg = q.reshape(b, kh, h // kh, e)
  logits = jnp.einsum("bkge,bkne->bkgn", qg.astype(k.dtype), k,
                      preferred_element_type=jnp.float32) * scale
  mask = plan.head_mask(pos, t).reshape(b, kh, h // kh, -1)
  logits = jnp.where(mask, logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgn,bkne->bkge", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, h, e).astype(q.dtype)
