"""The KV cache pytree: per layer and head group, K, V and the original position of every slot.

Axes: B batch, T new tokens, K KV heads (Kg of one head group), G query heads per KV head,
H query heads, N slots (a head group's budget), E head dim, W observation window.

A slot is not a position. `pos` holds the position of the token in each slot (-1 = empty) and
keys are stored after RoPE, so attention reads stored positions, never slot indices. Writes go
into each head's free slots in slot order; eviction (any policy) marks slots empty or `repack`s
the kept ones into a cache of other budgets. Budgets are real: KV heads of a layer with
different budgets live in different head groups, each [B, Kg, N_g, E], so the memory held is the
sum of the budgets, and each layer may have its own. The model's attention calls the layer's
`update` and `attend`; it never indexes these arrays itself.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from colm.config import ModelConfig, resolve_dtype
from kvcache.attention import cache_attention, get_decode_attention, slot_attention

# Scores a caller asked for: per layer, per head group, probabilities [B, Kg, G, W, N_g].
Scores = tuple[tuple[jax.Array, ...], ...]
Budgets = int | Sequence[int | Sequence[int]] | None


def _dataclass_pytree(cls, meta=()):
  data = [f.name for f in dataclasses.fields(cls) if f.name not in meta]
  return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(meta))


@dataclasses.dataclass
class HeadGroup:
  """Consecutive KV heads of one layer sharing a budget of N slots.

  Attributes:
    k: [B, Kg, N, E] keys after RoPE.
    v: [B, Kg, N, E] values.
    pos: [B, Kg, N] int32 position of the token in each slot, -1 = empty.
    acc: [B, Kg, N] float32 attention each slot's token has accumulated, for policies that
      update it while decoding (H2O); None when no policy keeps it. A write zeroes its slots;
      repack carries it.
  """

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  acc: jax.Array | None = None

  @property
  def num_heads(self) -> int:
    return self.k.shape[1]

  @property
  def budget(self) -> int:
    return self.k.shape[2]

  def write(self, k_new: jax.Array, v_new: jax.Array, positions: jax.Array, valid: jax.Array,
            heads: int) -> HeadGroup:
    """Writes the valid new tokens of the first `heads` heads into their free slots.

    k_new, v_new: [B, T, heads, E]; positions, valid: [B, T]. The r-th valid token of a sequence
    goes to the r-th free slot of each head (slot order); a token with no free slot left is
    dropped (callers check room first: prefill does, and decode policies keep a slot free).
    """
    b, t = positions.shape
    n = self.budget
    free = self.pos[:, :heads] < 0  # [B, h, N]
    if t == 1:
      first = jnp.argmax(free, axis=-1)
      # Materialised once: fused into the three scatters below, XLA recomputed the argmax for
      # every updated element (profiled on an H200: ~10 us per scatter at 2K slots).
      slots = jax.lax.optimization_barrier(
          jnp.where(jnp.any(free, axis=-1), first, n)[..., None])  # [B, h, 1]
    else:
      rank = jnp.where(free, jnp.cumsum(free, axis=-1) - 1, t)  # free slot -> its order
      bi, hi = np.ogrid[:b, :heads, :1][:2]
      slots = jnp.full((b, heads, t + 1), n, jnp.int32).at[bi, hi, rank].set(
          jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), rank.shape), mode="drop")[..., :t]
    order = jnp.cumsum(valid, axis=1) - 1  # [B, T]: the token's rank among valid ones
    slot = jnp.take_along_axis(slots, jnp.broadcast_to(order[:, None], (b, heads, t)), axis=2)
    slot = jnp.where(valid[:, None], slot, n)  # [B, h, T]; n = dropped
    bi, hi = np.ogrid[:b, :heads, :1][:2]
    k = self.k.at[bi, hi, slot].set(k_new.transpose(0, 2, 1, 3).astype(self.k.dtype), mode="drop")
    v = self.v.at[bi, hi, slot].set(v_new.transpose(0, 2, 1, 3).astype(self.v.dtype), mode="drop")
    pos = self.pos.at[bi, hi, slot].set(
        jnp.broadcast_to(positions[:, None].astype(jnp.int32), slot.shape), mode="drop")
    acc = None if self.acc is None else self.acc.at[bi, hi, slot].set(0.0, mode="drop")
    return HeadGroup(k, v, pos, acc)


_dataclass_pytree(HeadGroup)


@dataclasses.dataclass
class LayerCache:
  """One layer's cache: its KV heads in head groups (in head order).

  Attributes:
    groups: head groups; group i holds KV heads [sum of earlier sizes, + Kg_i).
    group_size: G, query heads per KV head (static).
    decode_attn: the registered decode attention (kvcache.attention) it attends with (static).
    token_mask: apply the attention function's decode-time token mask (static); a policy that
      keeps only what every head of a group may read turns it off (a no-op mask costs time).
  """

  groups: tuple[HeadGroup, ...]
  group_size: int = 1
  decode_attn: str = "auto"
  token_mask: bool = True

  @property
  def num_kv_heads(self) -> int:
    return sum(g.num_heads for g in self.groups)

  def head_ranges(self) -> list[tuple[int, int]]:
    """[(first, stop)] KV heads of each group."""
    ends = list(itertools.accumulate(g.num_heads for g in self.groups))
    return list(zip([0] + ends[:-1], ends))

  def budgets(self) -> tuple[int, ...]:
    """Slots per KV head."""
    return tuple(g.budget for g in self.groups for _ in range(g.num_heads))

  def update(self, k_new: jax.Array, v_new: jax.Array, positions: jax.Array,
             valid: jax.Array | None = None) -> LayerCache:
    """Writes new tokens. k_new, v_new: [B, T, k, E] for the first k <= K KV heads (a CoLM
    sub-model computes only its chains' heads); positions [B, T]; valid bool [B, T]."""
    if valid is None:
      valid = jnp.ones(positions.shape, bool)
    kh = k_new.shape[2]
    groups = []
    for g, (h0, h1) in zip(self.groups, self.head_ranges()):
      m = min(h1, kh) - h0
      groups.append(g if m <= 0 else g.write(k_new[:, :, h0:h0 + m], v_new[:, :, h0:h0 + m],
                                             positions, valid, m))
    return dataclasses.replace(self, groups=tuple(groups))

  def attend(self, q: jax.Array, positions: jax.Array, *, token_mask: Callable | None = None,
             fresh: tuple[jax.Array, jax.Array, Callable] | None = None, score_window: int = 0,
             window_index: jax.Array | None = None, return_probs: bool = False
             ) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
    """Attention of the new queries over the cache (which already holds the new tokens).

    Args:
      q: [B, T, H, E] queries after RoPE; H = G * k for the first k KV heads.
      positions: [B, T] the queries' positions.
      token_mask: the attention implementation's decode-time pattern (colm.attention), called as
        token_mask(q_pos, k_pos, kv_heads=(first, stop)) -> bool [B, Kg, G, T, N].
      fresh: (k, v, fn) for a prefill onto an empty cache: the new tokens' K/V [B, T, k, E] and
        the training attention function, run causally over them (the cache holds nothing else).
      score_window: with T > 1, also return the probabilities of W observation queries.
      window_index: int [B, W] which queries form the window (default the last W).
      return_probs: with T == 1, also return the query's probabilities over the slots.
    Returns:
      out [B, T, H, E] and, when asked, per head group probabilities [B, Kg, G, W, N].
    """
    b, t, h, e = q.shape
    g = self.group_size
    kh = h // g
    if not self.token_mask:
      token_mask = None
    if fresh is not None:
      out = fresh[2](q, fresh[0], fresh[1], causal=True)
    outs, scores = [], []
    for grp, (h0, h1) in zip(self.groups, self.head_ranges()):
      m = min(h1, kh) - h0
      if m <= 0:
        continue
      kv = [x[:, :m] for x in (grp.k, grp.v, grp.pos)] if m < grp.num_heads else \
          [grp.k, grp.v, grp.pos]
      qg = q[:, :, h0 * g:(h0 + m) * g].reshape(b, t, m, g, e).transpose(0, 2, 3, 1, 4)
      mask_fn = None if token_mask is None else (
          lambda qp, kp, h0=h0, m=m: token_mask(qp, kp, kv_heads=(h0, h0 + m)))
      if t == 1 and fresh is None:  # decode: one query per sequence through the seam
        mask = None if mask_fn is None else mask_fn(positions, kv[2])[:, :, :, 0]
        o, _, p = get_decode_attention(self.decode_attn)(
            qg[:, :, :, 0], *kv, positions[:, 0], mask, return_probs=return_probs)
        outs.append(o[:, :, :, None])
        scores.append(p[:, :, :, None] if return_probs else None)
        continue
      if fresh is None:  # prefill onto a filled cache: the slots (new tokens included)
        mask = None if mask_fn is None else mask_fn(positions, kv[2])
        outs.append(cache_attention(qg, *kv, positions, mask)[0])
      if score_window:
        idx = (jnp.broadcast_to(jnp.arange(t - score_window, t), (b, score_window))
               if window_index is None else window_index)
        qw = jnp.take_along_axis(qg, idx[:, None, None, :, None], axis=3)
        pw = jnp.take_along_axis(positions, idx, axis=1)
        mask = None if mask_fn is None else mask_fn(pw, kv[2])
        scores.append(slot_attention(qw, *kv, pw, mask, return_probs=True)[2])
    if fresh is None:
      out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]  # [B, k, G, T, E]
      out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)
    want = return_probs if t == 1 and fresh is None else bool(score_window)
    return out, (tuple(scores) if want else None)


_dataclass_pytree(LayerCache, meta=("group_size", "decode_attn", "token_mask"))


@dataclasses.dataclass
class KVCache:
  """The cache of every layer and the tokens each sequence has seen.

  Attributes:
    layers: one LayerCache per layer (budgets may differ per layer and per KV head).
    lengths: [B] int32 tokens seen per sequence: the position of the next token.
  """

  layers: tuple[LayerCache, ...]
  lengths: jax.Array

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_len(self) -> int:
    """The largest budget of any head (a cache without eviction holds this many tokens)."""
    return max(max(layer.budgets()) for layer in self.layers)

  def budgets(self) -> tuple[tuple[int, ...], ...]:
    """Slots per layer and KV head."""
    return tuple(layer.budgets() for layer in self.layers)

  def nbytes(self, include_positions: bool = True) -> int:
    """Bytes held by the K and V buffers (and the position index and accumulated scores):
    what the cache costs."""
    total = 0
    for layer in self.layers:
      for g in layer.groups:
        total += g.k.nbytes + g.v.nbytes
        if include_positions:
          total += g.pos.nbytes + (0 if g.acc is None else g.acc.nbytes)
    return total

  def held_tokens(self) -> np.ndarray:
    """int [L, B, K]: occupied slots per layer, sequence and KV head."""
    return np.stack([np.concatenate([np.asarray((g.pos >= 0).sum(-1)) for g in layer.groups],
                                    axis=1) for layer in self.layers])

  def positions(self, layer: int) -> jax.Array:
    """int [B, K, max budget] stored positions of one layer (-1 padded), for inspection."""
    groups = self.layers[layer].groups
    n = max(g.budget for g in groups)
    return jnp.concatenate([jnp.pad(g.pos, ((0, 0), (0, 0), (0, n - g.budget)),
                                    constant_values=-1) for g in groups], axis=1)


_dataclass_pytree(KVCache)


def _layer_budgets(budgets: Budgets, n_layers: int, n_kv: int, max_len: int
                   ) -> list[tuple[int, ...]]:
  """budgets (int, per layer, or per layer and KV head) -> per layer a tuple per KV head."""
  if budgets is None:
    per_layer = [max_len] * n_layers
  elif isinstance(budgets, int | np.integer):
    per_layer = [int(budgets)] * n_layers
  else:
    per_layer = list(budgets)
    if len(per_layer) != n_layers:
      raise ValueError(f"budgets has {len(per_layer)} entries for n_layers={n_layers}")
  out = []
  for li, bl in enumerate(per_layer):
    heads = (int(bl),) * n_kv if isinstance(bl, int | np.integer) else tuple(int(x) for x in bl)
    if len(heads) != n_kv:
      raise ValueError(f"budgets of layer {li} has {len(heads)} entries for {n_kv} KV heads")
    for hi, n in enumerate(heads):
      if n <= 0:
        raise ValueError(f"budget {n} of layer {li}, KV head {hi} must be positive")
      if n > max_len:
        raise ValueError(f"budget {n} of layer {li}, KV head {hi} exceeds the cache length "
                         f"max_len={max_len}")
    out.append(heads)
  return out


def empty_group(batch_size: int, num_heads: int, budget: int, head_dim: int, dtype) -> HeadGroup:
  shape = (batch_size, num_heads, budget)
  return HeadGroup(jnp.zeros(shape + (head_dim,), dtype), jnp.zeros(shape + (head_dim,), dtype),
                   jnp.full(shape, -1, jnp.int32))


def _groups(batch_size, heads: tuple[int, ...], head_dim, dtype) -> tuple[HeadGroup, ...]:
  """Consecutive KV heads with equal budgets share one group."""
  return tuple(empty_group(batch_size, len(list(run)), n, head_dim, dtype)
               for n, run in itertools.groupby(heads))


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int | None = None,
               dtype: str | None = None, *, budgets: Budgets = None,
               decode_attn: str = "auto") -> KVCache:
  """An empty cache: every slot's position -1.

  Args:
    cfg: the model config (layers, KV heads, head dim).
    batch_size: sequences.
    max_len: the longest budget allowed (default cfg.max_seq_len); the default budget.
    dtype: K/V dtype (default cfg.dtype).
    budgets: slots per KV head: one int for all, one per layer, or one tuple per layer with an
      entry per KV head. Memory held is exactly the sum of the budgets.
    decode_attn: the decode attention ('auto', 'reference', 'pallas' or a registered name).
  """
  max_len = cfg.max_seq_len if max_len is None else int(max_len)
  if max_len <= 0:
    raise ValueError(f"max_len must be positive, got {max_len}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  get_decode_attention(decode_attn)
  dt = resolve_dtype(dtype or cfg.dtype)
  g = cfg.n_heads // cfg.n_kv_heads
  per = _layer_budgets(budgets, cfg.n_layers, cfg.n_kv_heads, max_len)
  return KVCache(
      layers=tuple(LayerCache(_groups(batch_size, hb, cfg.head_dim, dt), g, decode_attn)
                   for hb in per),
      lengths=jnp.zeros((batch_size,), jnp.int32))


def truncate(cache: KVCache, start: jax.Array) -> KVCache:
  """Empties the slots holding positions >= start [B] (rewind a sequence to start)."""
  def cut(g: HeadGroup) -> HeadGroup:
    return dataclasses.replace(g, pos=jnp.where(g.pos >= start[:, None, None], -1, g.pos))
  layers = tuple(dataclasses.replace(layer, groups=tuple(cut(g) for g in layer.groups))
                 for layer in cache.layers)
  return KVCache(layers, jnp.minimum(cache.lengths, start).astype(jnp.int32))


def free_slots(cache: KVCache) -> jax.Array:
  """int [B]: the fewest free slots of any head of any layer."""
  counts = [jnp.min(jnp.sum(g.pos < 0, axis=-1), axis=-1) for layer in cache.layers
            for g in layer.groups]
  return jnp.min(jnp.stack(counts), axis=0)


def map_positions(cache: KVCache, fn: Callable[[int, int, jax.Array], jax.Array]) -> KVCache:
  """A cache whose head groups' positions are fn(layer, first_kv_head, pos [B, Kg, N]): the form
  of an eviction that only marks slots empty (return -1 there)."""
  layers = []
  for li, layer in enumerate(cache.layers):
    groups = tuple(dataclasses.replace(g, pos=fn(li, h0, g.pos))
                   for g, (h0, _) in zip(layer.groups, layer.head_ranges()))
    layers.append(dataclasses.replace(layer, groups=groups))
  return KVCache(tuple(layers), cache.lengths)


def repack(cache: KVCache, budgets: Budgets, keep: Callable[[int, int, jax.Array], jax.Array]
           | None = None, *, max_len: int | None = None) -> KVCache:
  """Copies the kept tokens into a new cache of other budgets (the form of every eviction that
  frees memory: SnapKV, S2, ...).

  Args:
    cache: the source cache.
    budgets: the new budgets (as in init_cache).
    keep: keep(layer, first_kv_head, pos [B, Kg, N]) -> bool [B, Kg, N] over a source head
      group's slots; default every occupied slot. Kept slots go to the first slots of their
      head in the new cache, in source slot order; a head that keeps more than its new budget
      keeps the first ones (size budgets so that this does not happen).
    max_len: the largest budget allowed (default: the source's largest budget or budgets' max).
  """
  first = cache.layers[0]
  b = cache.batch_size
  e = first.groups[0].k.shape[-1]
  dt = first.groups[0].k.dtype
  n_kv = first.num_kv_heads
  flat = [] if budgets is None or isinstance(budgets, int | np.integer) else [
      x for bl in budgets for x in (bl if isinstance(bl, Sequence) else [bl])]
  max_len = max_len or max([cache.max_len] + flat + (
      [int(budgets)] if isinstance(budgets, int | np.integer) else []))
  per = _layer_budgets(budgets, len(cache.layers), n_kv, max_len)
  layers = []
  for li, (layer, heads) in enumerate(zip(cache.layers, per)):
    # Source slots per KV head, as [B, K, N_max] (heads of different budgets padded empty).
    src = []
    for g, (h0, _) in zip(layer.groups, layer.head_ranges()):
      ok = (g.pos >= 0) if keep is None else keep(li, h0, g.pos) & (g.pos >= 0)
      src.append((g, ok))
    n_src = max(g.budget for g in layer.groups)
    pad = lambda x, n, v=0, n_src=n_src: jnp.pad(
        x, [(0, 0), (0, 0), (0, n_src - n)] + [(0, 0)] * (x.ndim - 3), constant_values=v)
    k_all = jnp.concatenate([pad(g.k, g.budget) for g, _ in src], axis=1)
    v_all = jnp.concatenate([pad(g.v, g.budget) for g, _ in src], axis=1)
    p_all = jnp.concatenate([pad(g.pos, g.budget, -1) for g, _ in src], axis=1)
    ok_all = jnp.concatenate([pad(ok, g.budget, False) for g, ok in src], axis=1)
    with_acc = any(g.acc is not None for g, _ in src)
    if with_acc:
      acc_all = jnp.concatenate([pad(jnp.zeros(g.pos.shape, jnp.float32) if g.acc is None
                                     else g.acc, g.budget) for g, _ in src], axis=1)
    rank = jnp.cumsum(ok_all, axis=-1) - 1  # [B, K, N_src]
    groups, h0 = [], 0
    for n, run in itertools.groupby(heads):
      m = len(list(run))
      sl = slice(h0, h0 + m)
      dest = jnp.where(ok_all[:, sl] & (rank[:, sl] < n), rank[:, sl], n)
      bi, hi = np.ogrid[:b, :m, :1][:2]
      tgt = empty_group(b, m, n, e, dt)
      acc = (jnp.zeros(tgt.pos.shape, jnp.float32).at[bi, hi, dest].set(acc_all[:, sl],
                                                                          mode="drop")
             if with_acc else None)
      groups.append(HeadGroup(tgt.k.at[bi, hi, dest].set(k_all[:, sl], mode="drop"),
                              tgt.v.at[bi, hi, dest].set(v_all[:, sl], mode="drop"),
                              tgt.pos.at[bi, hi, dest].set(p_all[:, sl], mode="drop"), acc))
      h0 += m
    layers.append(dataclasses.replace(layer, groups=tuple(groups)))
  return KVCache(tuple(layers), cache.lengths)
