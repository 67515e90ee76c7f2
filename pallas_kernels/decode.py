"""Block-sparse split-K decode attention: one new query per sequence against a K/V cache.

Axes: B = batch, H = query heads, K = K/V heads (G = H // K), E = head dim, S = cache length,
n = key blocks (ceil(S / block_size)), L = layout heads (H, K or 1), W = list width, P = splits.

Flash decoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html): the attended key
blocks of each (sequence, head) are split into P contiguous chunks of the block list, one program
each, so a long cache still fills the GPU; each program reads only its listed blocks and keeps a
running max / sum in float32; the P partial (output, log-sum-exp) pairs are merged exactly in jnp
(merge.merge_partials). A single query row cannot feed the tensor cores, and decoding is bound
by reading the cache anyway, so the scores are elementwise products and row sums.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import layouts
from pallas_kernels.block_sparse import LN2, LOG2E, MASK_VALUE, _pltriton, default_interpret
from pallas_kernels.merge import merge_partials


def _decode_kernel(lengths_ref, ids_ref, count_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                   block_size: int, per_split: int, sm_scale: float, lmap):
  """One (sequence, head, split): partial attention over entries [p*per_split, ...) of the list.

  lengths_ref [B], ids_ref [L, W], count_ref [L], q_ref [E], k_ref / v_ref [S, E] (this K/V
  head), o_ref [E] float32, lse_ref [2] (the natural LSE, twice: tensors are powers of two).
  """
  b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bs = block_size
  length = lengths_ref[b]
  lh = lmap(h)
  first = split * per_split
  last = jnp.minimum(first + per_split, count_ref[lh])
  q = q_ref[...].astype(jnp.float32)
  qk_scale = sm_scale * LOG2E

  def body(j, carry):
    acc, m_prev, l_prev = carry
    start = pl.multiple_of(ids_ref[lh, j] * bs, bs)
    k = k_ref[pl.ds(start, bs), :].astype(jnp.float32)
    s = jnp.sum(k * q[None, :], axis=1) * qk_scale  # [bs]
    valid = start + lax.broadcasted_iota(jnp.int32, (bs,), 0) < length
    s = jnp.where(valid, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.where(valid, jnp.exp2(s - m_next), 0.0)
    v = v_ref[pl.ds(start, bs), :].astype(jnp.float32)
    acc = alpha * acc + jnp.sum(p[:, None] * v, axis=0)
    return acc, m_next, alpha * l_prev + jnp.sum(p)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.float32(MASK_VALUE), jnp.float32(0.0))
  acc, m, l = lax.fori_loop(first, last, body, init)
  empty = l == 0.0
  o_ref[...] = acc / jnp.where(empty, 1.0, l)
  lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * LN2)
  lse_ref[...] = jnp.full((2,), lse, jnp.float32)


@functools.partial(jax.jit, static_argnames=("block_size", "num_splits", "sm_scale",
                                             "num_warps", "num_stages", "interpret", "debug"))
def _decode(q, k_cache, v_cache, lengths, ids, count, *, block_size, num_splits, sm_scale,
            num_warps, num_stages, interpret, debug):
  """Runs the kernel on padded inputs and merges the splits: (o [B, H, E], lse [B, H])."""
  B, H, E = q.shape
  S, K = k_cache.shape[1], k_cache.shape[2]
  G = H // K
  L, W = ids.shape[1], ids.shape[2]
  per_split = -(-W // num_splits)
  lmap = layouts.head_to_layout_head(L, H, K)
  params = None
  if _pltriton is not None:
    params = _pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  o, lse = pl.pallas_call(
      functools.partial(_decode_kernel, block_size=block_size, per_split=per_split,
                        sm_scale=sm_scale, lmap=lmap),
      grid=(B, H, num_splits),
      in_specs=[
          pl.BlockSpec((B,), lambda b, h, p: (0,)),
          pl.BlockSpec((None, L, W), lambda b, h, p: (b, 0, 0)),
          pl.BlockSpec((None, L), lambda b, h, p: (b, 0)),
          pl.BlockSpec((None, None, E), lambda b, h, p: (b, h, 0)),
          pl.BlockSpec((None, S, None, E), lambda b, h, p: (b, 0, h // G, 0)),
          pl.BlockSpec((None, S, None, E), lambda b, h, p: (b, 0, h // G, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, E), lambda b, h, p: (b, h, p, 0)),
          pl.BlockSpec((None, None, None, 2), lambda b, h, p: (b, h, p, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((B, H, num_splits, E), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, num_splits, 2), jnp.float32)],
      compiler_params=params,
      interpret=interpret,
      debug=debug,
      name="block_sparse_decode_attention",
  )(lengths, ids, count, q, k_cache, v_cache)
  o, lse = merge_partials(o, lse[..., 0], axis=2)
  return o.astype(q.dtype), lse


def _check_decode_inputs(q, k_cache, v_cache, lengths):
  if getattr(q, "ndim", None) != 3:
    raise ValueError(f"q must be [batch, heads, head_dim], got shape {getattr(q, 'shape', None)}")
  for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be [batch, cache_len, kv_heads, head_dim], got shape "
                       f"{getattr(x, 'shape', None)}")
  if k_cache.shape != v_cache.shape:
    raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must have the same "
                     "shape")
  B, H, E = q.shape
  if k_cache.shape[0] != B or k_cache.shape[3] != E:
    raise ValueError(f"k_cache shape {k_cache.shape} does not match q shape {q.shape} in batch or "
                     "head_dim")
  K = k_cache.shape[2]
  if K == 0 or H % K != 0:
    raise ValueError(f"kv_heads ({K}, from k_cache) must divide heads ({H}, from q)")
  if getattr(lengths, "shape", None) != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be an integer [batch={B}] array, got "
                     f"{getattr(lengths, 'shape', None)}")
  return B, H, K, E, k_cache.shape[1]


def _block_lists(layout_or_block_lists, lengths, *, B, H, K, n, block_size):
  """Normalises the layout / block lists to (ids [B, L, W], count [B, L]) int32."""
  arg = layout_or_block_lists
  name = "layout_or_block_lists"
  if isinstance(arg, tuple | list):
    if len(arg) != 2:
      raise ValueError(f"{name} as block lists must be a pair (block_ids, counts)")
    ids, count = (jnp.asarray(a) for a in arg)
    if ids.ndim == 2:
      ids, count = ids[None], count[None]
    if ids.ndim != 3 or count.shape != ids.shape[:2] or ids.shape[0] not in (1, B):
      raise ValueError(f"{name}: block_ids must be [batch?, layout_heads, width] and counts "
                       f"[batch?, layout_heads], got {ids.shape} and {count.shape}")
    if not (jnp.issubdtype(ids.dtype, jnp.integer) and jnp.issubdtype(count.dtype, jnp.integer)):
      raise ValueError(f"{name}: block_ids and counts must be integer arrays")
    L = ids.shape[1]
  else:
    layout = arg
    shape = getattr(layout, "shape", None)
    if shape is None or len(shape) not in (2, 3) or shape[-1] != n or (
        len(shape) == 3 and shape[0] not in (1, B)):
      raise ValueError(f"{name} as a layout must be a boolean [batch?, layout_heads, {n}] array, "
                       f"got shape {shape}")
    layout = jnp.asarray(layout, bool)
    if layout.ndim == 2:
      layout = layout[None]
    L = layout.shape[1]
    # Blocks wholly past a sequence's length are dropped from its list: never read.
    live = jnp.arange(n)[None, None, :] * block_size < lengths[:, None, None]
    mask = layout & live
    lists = layouts.compress_rows(mask, jnp.zeros_like(mask))
    ids, count = lists.cols, lists.count
  if L not in (H, K, 1):
    raise ValueError(f"{name} has {L} layout heads; expected heads={H}, kv_heads={K} or 1")
  ids = jnp.broadcast_to(ids, (B,) + ids.shape[1:]).astype(jnp.int32)
  count = jnp.broadcast_to(count, (B,) + count.shape[1:]).astype(jnp.int32)
  return ids, count, L


def block_sparse_decode_attention(q, k_cache, v_cache, lengths, layout_or_block_lists, *,
                                  block_size: int, sm_scale: float | None = None,
                                  num_splits: int | None = None, return_lse: bool = False,
                                  num_warps: int = 4, num_stages: int = 2,
                                  interpret: bool | None = None, debug: bool = False):
  """Attention of one new query per sequence over the attended blocks of a K/V cache.

  Args:
    q: [B, H, E] the new queries.
    k_cache: [B, S, K, E] keys, K dividing H.
    v_cache: [B, S, K, E] values.
    lengths: int [B]: keys [0, lengths[b]) are valid (the query sits at lengths[b] - 1).
    layout_or_block_lists: either a bool [L, n] or [B, L, n] block layout (n = ceil(S /
      block_size), L in {H, K, 1}; blocks at or past the length are dropped), or a pair
      (block_ids int [B?, L, W], counts int [B?, L]): the first counts entries of each row are the
      key blocks read (any order; keys past the length are masked).
    block_size: key block in tokens, a power of two >= 16.
    sm_scale: logit scale, default 1 / sqrt(E).
    num_splits: P, list chunks run in parallel (default: up to 16, >= 4 blocks each).
    return_lse: also return the natural log-sum-exp [B, H].
  Returns:
    o [B, H, E] in q's dtype (zeros for a head with no valid key), and optionally lse [B, H].
  """
  B, H, K, E, S = _check_decode_inputs(q, k_cache, v_cache, lengths)
  block_size = layouts.check_block_size(block_size)
  n = -(-S // block_size)
  ids, count, L = _block_lists(layout_or_block_lists, lengths, B=B, H=H, K=K, n=n,
                               block_size=block_size)
  W = ids.shape[-1]
  if num_splits is None:
    num_splits = max(1, min(16, W // 4))
  if not isinstance(num_splits, int) or num_splits < 1:
    raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
  pad_s = n * block_size - S
  pad_e = pl.next_power_of_2(E) - E
  if pad_s or pad_e:
    k_cache, v_cache = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, pad_e)))
                        for x in (k_cache, v_cache))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pad_e)))
  o, lse = _decode(q, k_cache, v_cache, lengths.astype(jnp.int32), ids, count,
                   block_size=block_size, num_splits=num_splits,
                   sm_scale=float(1.0 / math.sqrt(E) if sm_scale is None else sm_scale),
                   num_warps=num_warps, num_stages=num_stages,
                   interpret=default_interpret() if interpret is None else bool(interpret),
                   debug=debug)
  o = o[..., :E]
  return (o, lse) if return_lse else o


def block_sparse_decode_attention_reference(q, k_cache, v_cache, lengths, layout_or_block_lists,
                                            *, block_size: int, sm_scale: float | None = None,
                                            return_lse: bool = False):
  """Dense float32 decode attention with the blocks expanded to a token mask (same args)."""
  B, H, K, E, S = _check_decode_inputs(q, k_cache, v_cache, lengths)
  n = -(-S // block_size)
  ids, count, L = _block_lists(layout_or_block_lists, lengths, B=B, H=H, K=K, n=n,
                               block_size=block_size)
  used = jnp.arange(ids.shape[-1])[None, None, :] < count[..., None]  # [B, L, W]
  bi = jnp.arange(B)[:, None, None]
  li = jnp.arange(L)[None, :, None]
  blocks = jnp.zeros((B, L, n + 1), bool).at[bi, li, jnp.where(used, ids, n)].set(True)[..., :n]
  lmap = layouts.head_to_layout_head(L, H, K)
  blocks = blocks[:, np.array([lmap(h) for h in range(H)])]  # [B, H, n]
  mask = jnp.repeat(blocks, block_size, axis=2)[..., :S]
  mask = mask & (jnp.arange(S)[None, None, :] < lengths[:, None, None])
  sm_scale = 1.0 / math.sqrt(E) if sm_scale is None else sm_scale
  k = jnp.repeat(k_cache.astype(jnp.float32), H // K, axis=2)
  v = jnp.repeat(v_cache.astype(jnp.float32), H // K, axis=2)
  s = jnp.einsum("bhe,bshe->bhs", q.astype(jnp.float32), k,
                 precision=lax.Precision.HIGHEST) * sm_scale
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bhs,bshe->bhe", p / jnp.where(l == 0, 1.0, l), v,
                 precision=lax.Precision.HIGHEST)
  if not return_lse:
    return o
  lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))[..., 0]
  return o, lse
