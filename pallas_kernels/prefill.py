"""Prefill attention onto a filled KV cache (forward only) in Pallas, with a float32 reference.

Axes: B = batch, K = KV heads, G = query heads per KV head (H = K * G), T = new queries (the
chunk), N = cache slots, E = head dim, R = G * T stacked query rows (Rp padded to block_q),
nq = Rp // block_q row blocks, nk = N // block_k slot blocks.

A chunk of T queries attends the cache slots, which already hold the chunk's own keys, by their
STORED positions: slot n of (sequence b, KV head k) is valid for query t iff
0 <= pos[b, k, n] <= q_pos[b, t]. Slot order is not position order (eviction, compression,
paging), so causality is a mask over stored positions, not over slot indices. This is
kvcache.attention.slot_attention's contract (without its optional mask), as a flash-attention
kernel (https://arxiv.org/abs/2307.08691) that never materialises a [T, N] score matrix.

The G query heads of one KV head are stacked as rows (row r = g * T + t, at position
q_pos[b, t]), so each program reads every K / V / pos block once for the whole group (GQA).
Before launch, jnp summarises each slot block by the min and max stored position of its
non-empty slots and whether it has an empty slot, and lists per (sequence, KV head, row block)
the slot blocks that can contribute (some slot at or before the block's last row position),
those needing no element mask first (no empty slot, all at or before the block's first row
position), as block_sparse.py walks its layout lists: skipped blocks are never loaded. The grid
runs row blocks fastest (latest first), so the programs resident together read one K / V. Empty
slots may hold anything (NaN included): their values are zeroed before they meet a probability.
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
from pallas_kernels.block_sparse import (
    LN2,
    LOG2E,
    MASK_VALUE,
    _dot,
    _pltriton,
    default_interpret,
)
from pallas_kernels.decode import check_cache_slots
from pallas_kernels.merge import masked_softmax

_INT32_MAX = int(np.iinfo(np.int32).max)


def _prefill_kernel(cols_ref, count_ref, nfull_ref, rpos_ref, pos_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, block_k: int, num_row_blocks: int, qk_scale: float):
  """One (row block, sequence, KV head): o = softmax(q k^T * scale) v over the listed slot blocks.

  cols_ref [nq, nk] int32 slot blocks to visit (unmasked first), count_ref / nfull_ref [nq],
  rpos_ref [bq] int32 row positions, pos_ref [N] int32, q_ref [bq, E] (cache dtype),
  k_ref / v_ref [N, E], o_ref [bq, E] (q's dtype), lse_ref [bq] float32 (natural log).
  """
  i = num_row_blocks - 1 - pl.program_id(0)  # reversed: late rows of each head (heavy) first
  q = q_ref[...]
  rpos = rpos_ref[...]  # [bq]
  bq = q.shape[0]

  def body(j, carry, masked):
    acc, m_prev, l_prev = carry  # [bq, E], [bq], [bq]
    start = pl.multiple_of(cols_ref[i, j] * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = _dot(q, k, trans_b=True) * qk_scale  # [bq, bk], base 2
    if masked:
      kpos = pos_ref[pl.ds(start, block_k)]  # [bk]
      valid = (kpos[None, :] >= 0) & (kpos[None, :] <= rpos[:, None])  # [bq, bk]
      s = jnp.where(valid, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    if masked:  # a row with no valid slot keeps l == 0; empty slots' values may be garbage
      p = jnp.where(valid, p, 0.0)
      v = jnp.where((kpos >= 0)[:, None], v, jnp.zeros((), v.dtype))
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_next, alpha * l_prev + jnp.sum(p, axis=1)

  carry = (jnp.zeros(o_ref.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  nfull, count = nfull_ref[i], count_ref[i]
  carry = lax.fori_loop(0, nfull, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(nfull, count, functools.partial(body, masked=True), carry)
  empty = l == 0.0  # rows with no valid slot: output 0, LSE -inf
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * LN2)


def _visit_lists(pos, rpos, rows: int, block_q: int, block_k: int) -> layouts.BlockLists:
  """Slot blocks each row block visits: BlockLists with cols [B * K, nq, nk], count / nfull
  [B * K, nq].

  pos [B, K, N] int32; rpos [B, Rp] int32 row positions (rows >= `rows` are padding and ignored
  here: their results are dropped). Slot block j is visited by row block i iff its smallest
  stored position is <= the largest row position of i; it needs no element mask iff it has no
  empty slot and its largest stored position is <= the smallest row position of i.
  """
  B, K, N = pos.shape
  nq, nk = rpos.shape[1] // block_q, N // block_k
  p = pos.reshape(B, K, nk, block_k)
  live = p >= 0
  kmin = jnp.min(jnp.where(live, p, _INT32_MAX), axis=-1)[:, :, None, :]  # [B, K, 1, nk]
  kmax = jnp.max(jnp.where(live, p, -1), axis=-1)[:, :, None, :]  # -1: empty block
  dense = jnp.all(live, axis=-1)[:, :, None, :]
  real = (jnp.arange(rpos.shape[1]) < rows).reshape(nq, block_q)
  r = rpos.reshape(B, nq, block_q)
  qmax = jnp.max(jnp.where(real, r, -1), axis=-1)[:, None, :, None]  # [B, 1, nq, 1]
  qmin = jnp.min(jnp.where(real, r, _INT32_MAX), axis=-1)[:, None, :, None]
  visit = (kmax >= 0) & (kmin <= qmax)  # [B, K, nq, nk]
  needs = visit & ~(dense & (kmax <= qmin))
  return layouts.compress_rows(visit.reshape(B * K, nq, nk), needs.reshape(B * K, nq, nk))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret", "debug"))
def _prefill(q, k, v, pos, q_pos, *, sm_scale, block_q, block_k, num_warps, num_stages,
             interpret, debug):
  """Stacks and pads the query rows, builds the visit lists, runs the kernel, unstacks."""
  B, K, G, T, E = q.shape
  N = k.shape[2]
  R = G * T
  nq = -(-R // block_q)
  Rp = nq * block_q
  qr = jnp.pad(q.astype(k.dtype).reshape(B, K, R, E), ((0, 0), (0, 0), (0, Rp - R), (0, 0)))
  rpos = jnp.pad(jnp.tile(q_pos.astype(jnp.int32), (1, G)), ((0, 0), (0, Rp - R)),
                 constant_values=-1)  # [B, Rp]: row g * T + t sits at q_pos[b, t]
  pos = pos.astype(jnp.int32)
  cols, count, nfull = (x.reshape(B, K, *x.shape[1:])
                        for x in _visit_lists(pos, rpos, R, block_q, block_k).arrays())
  params = None
  if _pltriton is not None:
    params = _pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  qmap = lambda i, b, h: (b, h, nq - 1 - i, 0)
  o, lse = pl.pallas_call(
      functools.partial(_prefill_kernel, block_k=block_k, num_row_blocks=nq,
                        qk_scale=sm_scale * LOG2E),
      grid=(nq, B, K),  # row blocks fastest: programs running together share one K/V (L2)
      in_specs=[
          pl.BlockSpec((None, None, nq, cols.shape[-1]), lambda i, b, h: (b, h, 0, 0)),
          pl.BlockSpec((None, None, nq), lambda i, b, h: (b, h, 0)),
          pl.BlockSpec((None, None, nq), lambda i, b, h: (b, h, 0)),
          pl.BlockSpec((None, block_q), lambda i, b, h: (b, nq - 1 - i)),
          pl.BlockSpec((None, None, N), lambda i, b, h: (b, h, 0)),
          pl.BlockSpec((None, None, block_q, E), qmap),
          pl.BlockSpec((None, None, N, E), lambda i, b, h: (b, h, 0, 0)),
          pl.BlockSpec((None, None, N, E), lambda i, b, h: (b, h, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, block_q, E), qmap),
          pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, nq - 1 - i)),
      ],
      out_shape=[jax.ShapeDtypeStruct((B, K, Rp, E), q.dtype),
                 jax.ShapeDtypeStruct((B, K, Rp), jnp.float32)],
      compiler_params=params,
      interpret=interpret,
      debug=debug,
      name="cache_prefill_attention",
  )(cols, count, nfull, rpos, pos, qr, k, v)
  return o[:, :, :R].reshape(B, K, G, T, E), lse[:, :, :R].reshape(B, K, G, T)


def _check_inputs(q, k, v, pos, q_pos):
  """ValueError on any disagreement of shapes or dtypes; returns (B, K, G, T, N, E)."""
  if getattr(q, "ndim", None) != 5:
    raise ValueError(f"q must be 5-D [B, K, G, T, E], got shape {getattr(q, 'shape', None)}")
  for name, x in (("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D [B, K, N, E], got shape {getattr(x, 'shape', None)}")
  N = check_cache_slots(q, k, v, pos)
  B, K, G, T, E = q.shape
  if getattr(q_pos, "shape", None) != (B, T) or not jnp.issubdtype(q_pos.dtype, jnp.integer):
    raise ValueError(f"q_pos must be an int [B={B}, T={T}] array, got "
                     f"{getattr(q_pos, 'shape', None)} {getattr(q_pos, 'dtype', None)}")
  return B, K, G, T, N, E


def supports(T: int, N: int, E: int, *, block_k: int = 64) -> bool:
  """Whether the kernel takes T queries over N slots of head dim E (with slot blocks of block_k);
  else use the reference (or kvcache.attention.slot_attention)."""
  return (T >= 1 and N > 0 and N % block_k == 0 and E >= 16
          and layouts.is_power_of_two(int(E)))


def cache_prefill_attention(q, k, v, pos, q_pos, *, sm_scale: float | None = None,
                            block_q: int = 64, block_k: int = 64, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool | None = None,
                            debug: bool = False):
  """Attention of a chunk of T new queries over the position-tagged slots of a KV cache.

  Args:
    q: [B, K, G, T, E] queries of H = K * G heads grouped by KV head (after RoPE); any float
      dtype (cast to the cache dtype for the dots, as slot_attention does).
    k: [B, K, N, E] cache slots (bf16 or float32), already holding the chunk's keys; N a
      multiple of block_k, E a power of two >= 16.
    v: [B, K, N, E] values, k's dtype.
    pos: int [B, K, N] stored position of each slot, -1 = empty (empty slots may hold anything).
    q_pos: int [B, T] positions of the queries. Slot n is valid for query t of sequence b iff
      0 <= pos[b, k, n] <= q_pos[b, t].
    sm_scale: logit scale, default 1 / sqrt(E).
    block_q: stacked query rows per program, a power of two >= 16 (clipped to G * T rounded up
      to a power of two >= 16).
    block_k: slots per block, a power of two >= 16 dividing N.
    num_warps, num_stages: Triton launch settings.
    interpret: Pallas interpret mode (default: unless the backend is a GPU).
  Returns:
    (o [B, K, G, T, E] in q's dtype, lse [B, K, G, T] float32): the output and the natural
    log-sum-exp of the scaled logits over the valid slots; o = 0 and lse = -inf where no slot is
    valid.
  Raises:
    ValueError: on disagreeing shapes or dtypes, bad block sizes, an N that block_k does not
      divide, a head dim that is not a power of two >= 16 or T = 0 (supports() says which
      shapes the kernel takes).
  """
  B, K, G, T, N, E = _check_inputs(q, k, v, pos, q_pos)
  block_q = layouts.check_block_size(block_q, "block_q")
  block_k = layouts.check_block_size(block_k, "block_k")
  if T < 1 or G < 1:
    raise ValueError(f"cache_prefill_attention needs queries, got G={G}, T={T}")
  if N < 1 or N % block_k:
    raise ValueError(f"block_k {block_k} must divide the slot count N={N}")
  if E < 16 or not layouts.is_power_of_two(E):
    raise ValueError(f"head_dim E={E} must be a power of two >= 16 for the kernel; use "
                     "cache_prefill_attention_reference")
  block_q = min(block_q, max(16, pl.next_power_of_2(G * T)))
  return _prefill(q, k, v, pos, q_pos, block_q=block_q, block_k=block_k,
                  sm_scale=float(1.0 / math.sqrt(E) if sm_scale is None else sm_scale),
                  num_warps=int(num_warps), num_stages=int(num_stages),
                  interpret=default_interpret() if interpret is None else bool(interpret),
                  debug=debug)


def cache_prefill_attention_reference(q, k, v, pos, q_pos, *, sm_scale: float | None = None):
  """Dense float32 (Precision.HIGHEST) prefill attention, same contract as
  cache_prefill_attention for any N and E: (o [B, K, G, T, E] in q's dtype, lse [B, K, G, T]
  float32). Materialises the [B, K, G, T, N] scores: for tests and small shapes."""
  B, K, G, T, N, E = _check_inputs(q, k, v, pos, q_pos)
  sm_scale = 1.0 / math.sqrt(E) if sm_scale is None else sm_scale
  valid = (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= q_pos[:, None, :, None])  # [B,K,T,N]
  live = (pos >= 0)[..., None]
  # Empty slots may hold anything: zero them so no NaN leaks in through a zero probability.
  kf, vf = (jnp.where(live, x.astype(jnp.float32), 0.0) for x in (k, v))
  hi = lax.Precision.HIGHEST
  s = jnp.einsum("bkgte,bkne->bkgtn", q.astype(jnp.float32), kf, precision=hi) * sm_scale
  p, lse = masked_softmax(s, valid[:, :, None])  # valid [B, K, 1, T, N]
  o = jnp.einsum("bkgtn,bkne->bkgte", p, vf, precision=hi)
  return o.astype(q.dtype), lse
