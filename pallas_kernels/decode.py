"""Split-K decode attention over a KV cache of position-tagged slots, with a float32 reference.

Axes: B = batch, K = KV heads, G = query heads per KV head (H = K * G), Gp = G padded to a power
of two >= 16, E = head dim, N = cache slots, bs = slot block, n = N // bs, P = splits.

The cache is the project's: slot n of (sequence b, KV head k) holds a key stored after RoPE and
its original position pos[b, k, n] (-1 = empty), so slot order need not be position order and each
KV head may hold different tokens (eviction, compression). Slot n is valid for query head
(b, k, g) iff 0 <= pos <= q_pos[b] and, given a mask, mask[b, k, g, n].

Flash decoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html): the n slot blocks of
each (sequence, KV head) are cut into P contiguous chunks, one program each, so a short batch
still fills the GPU; each program serves all G query heads of its KV head (GQA: every K/V block
is read once per group, not G times), keeps a running max / sum per head in float32 and writes
a partial (output, log-sum-exp); the P partials are merged exactly in jnp (merge.merge_partials).
The G query rows are padded to Gp >= 16 so that the scores and the output are tensor-core dots
(Triton needs M >= 16). K/V rows of slots that no head may attend (empty, future, or masked for
the whole group) are not read: their loads are masked, so empty slots may hold anything.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
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
from pallas_kernels.merge import masked_softmax, merge_partials

BLOCK_SIZES = (64, 32, 16)  # slot blocks tried by pick_block_size, largest first
MIN_ROWS = 16  # Triton dots need M >= 16: the G query rows are padded up to this
MAX_TILE_BYTES = 64 * 128 * 2  # default blocks keep a K / V tile within 64 bf16 rows of E=128
TARGET_PROGRAMS = 4 * 132  # default splits aim at a few programs per SM of an H100 / H200


def pick_block_size(n: int) -> int:
  """The largest of BLOCK_SIZES dividing n (the number of cache slots); ValueError if none."""
  for bs in BLOCK_SIZES:
    if n > 0 and n % bs == 0:
      return bs
  raise ValueError(f"cache_decode_attention needs the slot count to be a positive multiple of "
                   f"{BLOCK_SIZES[-1]}, got N={n}")


def supports(n_slots: int, head_dim: int | None = None) -> bool:
  """Whether the kernel takes a cache of n_slots slots (and head_dim, if given); else use the
  reference."""
  if head_dim is not None and not (head_dim >= 16 and layouts.is_power_of_two(head_dim)):
    return False
  return n_slots > 0 and n_slots % BLOCK_SIZES[-1] == 0


def _load_rows(ref, start, bs: int, live):
  """ref[start:start + bs, :] with the rows where live [bs] is False not read (zeros)."""
  rows = ref.at[pl.ds(start, bs), :]
  if _pltriton is None:  # pragma: no cover - no Triton-lowering module: a plain select
    return jnp.where(live[:, None], rows[...], 0).astype(ref.dtype)
  mask = jnp.broadcast_to(live[:, None], (bs, ref.shape[-1]))
  return _pltriton.load(rows, mask=mask, other=jnp.zeros((), ref.dtype))


def _online_step(carry, q, k, v, valid, qk_scale: float):
  """One block of the running softmax: carry (acc [Gp, E], m [Gp], l [Gp]) float32, base 2;
  q [Gp, E], k / v [bs, E], valid [Gp, bs]."""
  acc, m_prev, l_prev = carry
  s = jnp.where(valid, _dot(q, k, trans_b=True) * qk_scale, MASK_VALUE)  # [Gp, bs]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
  alpha = jnp.exp2(m_prev - m_next)
  p = jnp.where(valid, jnp.exp2(s - m_next[:, None]), 0.0)
  acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
  return acc, m_next, alpha * l_prev + jnp.sum(p, axis=1)


def _store_rows(ref, start, live, val):
  """ref[start:start + n] = val [n, ...] where live [n], the other rows not written."""
  n = val.shape[0]
  rows = ref.at[pl.ds(start, n)]
  if _pltriton is None:  # pragma: no cover - no Triton-lowering module: a plain select
    rows[...] = jnp.where(live.reshape((n,) + (1,) * (val.ndim - 1)), val, rows[...])
    return
  _pltriton.store(rows, val, mask=jnp.broadcast_to(
      live.reshape((n,) + (1,) * (val.ndim - 1)), val.shape))


def _run_blocks(first, last, body, tiles: int, rows: int, width: int):
  """Runs body over blocks [first, last) from an empty state per row tile (the carry: a tuple
  of `tiles` states of `rows` rows); returns each tile's (normalised partial output [rows,
  width], natural log-sum-exp [rows], -inf where nothing was valid)."""
  init = tuple((jnp.zeros((rows, width), jnp.float32),
                jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32))
               for _ in range(tiles))
  states = lax.fori_loop(first, jnp.maximum(first, last), body, init)
  out = []
  for acc, m, l in states:
    empty = l == 0.0
    out.append((acc / jnp.where(empty, 1.0, l)[:, None],
                jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * LN2)))
  return out


def _decode_kernel(q_pos_ref, pos_ref, q_ref, k_ref, v_ref, *refs, block_size: int,
                   per_split: int, n_blocks: int, qk_scale: float, has_mask: bool):
  """One (sequence, KV head, split): partial attention of its Gp query rows over slot blocks
  [p * per_split, min((p + 1) * per_split, n)).

  q_pos_ref [1] int32, pos_ref [N] int32, q_ref [Gp, E] (cache dtype), k_ref / v_ref [N, E],
  mask_ref [Gp, N] int8 (if has_mask), o_ref [Gp, E] float32, lse_ref [Gp] float32 (natural).
  """
  mask_ref, o_ref, lse_ref = refs if has_mask else (None, *refs)
  bs = block_size
  q_pos = q_pos_ref[0]
  q = q_ref[...]  # [Gp, E]
  rows = q.shape[0]
  first = pl.program_id(2) * per_split
  last = jnp.minimum(first + per_split, n_blocks)

  def body(j, carry):
    start = pl.multiple_of(j * bs, bs)
    pos = pos_ref[pl.ds(start, bs)]  # [bs]
    live = (pos >= 0) & (pos <= q_pos)  # [bs]: slot holds a token at or before the query
    if mask_ref is None:
      valid = jnp.broadcast_to(live[None, :], (rows, bs))
    else:
      allowed = mask_ref[:, pl.ds(j * bs, bs)].astype(jnp.int32)  # [Gp, bs]
      valid = live[None, :] & (allowed != 0)
      live = live & (jnp.max(allowed, axis=0) != 0)  # some head of the group may attend it
    k = _load_rows(k_ref, start, bs, live)  # [bs, E]
    v = _load_rows(v_ref, start, bs, live)
    return (_online_step(carry[0], q, k, v, valid, qk_scale),)

  (o, lse), = _run_blocks(first, last, body, 1, *o_ref.shape)
  o_ref[...] = o
  lse_ref[...] = lse


def _gather_rows(ref, rows, live, interpret: bool):
  """ref[rows, :] for rows [bs] (any order), the rows where live is False not read (zeros)."""
  if interpret or _pltriton is None:  # the interpreter has no masked gather: clamped, selected
    return jnp.where(live[:, None], ref[jnp.where(live, rows, 0), :], 0).astype(ref.dtype)
  mask = jnp.broadcast_to(live[:, None], (rows.shape[0], ref.shape[-1]))
  return _pltriton.load(ref.at[rows, :], mask=mask, other=jnp.zeros((), ref.dtype))


def _paged_part(h, split, q_pos_ref, table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, seq,
                group: int, block_tokens: int, row_tile: int, num_splits: int, kv_heads: int,
                page_size: int, qk_scale: float, interpret: bool):
  """One (sequence, KV head h, split) of a part: partial attention of its G query rows over a
  page table.

  q_pos_ref [1] int32, table_ref [W] int32 (entry i: page table[i], positions i * S .. i * S +
  S - 1), q_ref [B * K * G, E] (every part's rows, unpadded: row (b * K + k) * G + g),
  k_ref / v_ref [num_pages * S, E], o_ref [B * K * P * G, E] float32 and lse_ref [B * K * P * G]
  (row ((b * K + k) * P + p) * G + g); tokens past q_pos are not read. Each iteration reads a
  tile of block_tokens tokens: gathered rows of several pages when it is larger than a page
  (the tile a small page size would otherwise cut short), contiguous rows of one page when not.
  The G rows run as tiles of row_tile rows (masked loads and stores past G) over each K / V
  tile read once: many rows (a prefix group's queries) make independent small dots, or one
  tall one with row_tile >= G.
  """
  s, bs, tr = page_size, block_tokens, row_tile
  n_entries = table_ref.shape[0]
  tiles = -(-group // tr)
  q_row = (seq * kv_heads + h) * group
  o_row = ((seq * kv_heads + h) * num_splits + split) * group
  rows = lax.broadcasted_iota(jnp.int32, (tr,), 0)
  qs = [_load_rows(q_ref, q_row + i * tr, tr, i * tr + rows < group) for i in range(tiles)]
  n_tok = jnp.minimum(q_pos_ref[0] + 1, n_entries * s)  # tokens up to the query's own
  n_iter = (n_tok + bs - 1) // bs
  per_split = (n_iter + num_splits - 1) // num_splits
  first = split * per_split
  last = jnp.minimum(first + per_split, n_iter)
  iota = lax.broadcasted_iota(jnp.int32, (bs,), 0)

  def body(j, carry):
    tok = j * bs + iota  # [bs] logical token of each row
    live = tok < n_tok
    if bs <= s:  # within one page: contiguous rows
      start = pl.multiple_of(table_ref[(j * bs) // s] * s + (j * bs) % s, bs)
      k, v = (_load_rows(r, start, bs, live) for r in (k_ref, v_ref))
    else:
      idx = table_ref[jnp.minimum(tok // s, n_entries - 1)] * s + tok % s  # gathered rows
      k, v = (_gather_rows(r, idx, live, interpret) for r in (k_ref, v_ref))
    valid = jnp.broadcast_to(live[None, :], (tr, bs))
    return tuple(_online_step(c, qi, k, v, valid, qk_scale) for c, qi in zip(carry, qs))

  outs = _run_blocks(first, last, body, tiles, tr, q_ref.shape[1])
  for i, (o, lse) in enumerate(outs):
    live = i * tr + rows < group
    _store_rows(o_ref, o_row + i * tr, live, o)
    _store_rows(lse_ref, o_row + i * tr, live, lse)


def _paged_kernel(*refs, parts: tuple[tuple[int, int, int, int, int, int], ...], **kw):
  """All parts' programs in one launch (grid (K, sum of B_i * P_i)): program i runs part j's
  (sequence, split) when i falls in part j's range [offset, offset + B_j * P_j).

  refs: per part (q_pos, table, q), then k, v, then per part (o, lse); parts: per part
  (offset, B, P, G, block tokens, row tile), static.
  """
  n = len(parts)
  ins, (k_ref, v_ref), outs = refs[:3 * n], refs[3 * n:3 * n + 2], refs[3 * n + 2:]
  h, i = pl.program_id(0), pl.program_id(1)  # (read here: not inside a pl.when)
  for j, (offset, b, p, g, bs, tr) in enumerate(parts):
    local = jnp.clip(i - offset, 0, b * p - 1)
    run = functools.partial(_paged_part, h, local // b, *ins[3 * j:3 * j + 3], k_ref, v_ref,
                            *outs[2 * j:2 * j + 2], seq=local % b, group=g, block_tokens=bs,
                            row_tile=tr, num_splits=p, **kw)
    if n == 1:
      run()
    else:
      pl.when((i >= offset) & (i < offset + b * p))(run)


def _pad_rows(q, dtype):
  """[B, K, G, E] -> [B, K, Gp, E] in dtype, G padded with zero rows to a power of two >= 16
  (Triton dots need M >= 16)."""
  g = q.shape[2]
  gp = max(MIN_ROWS, pl.next_power_of_2(g))
  return jnp.pad(q.astype(dtype), ((0, 0), (0, 0), (0, gp - g), (0, 0)))


def _merged(o, lse, g: int, dtype):
  """The num_splits partials [B, K, P, Gp, E] / [B, K, P, Gp] merged; the G real rows."""
  if o.shape[2] == 1:
    o, lse = o[:, :, 0], lse[:, :, 0]
  else:
    o, lse = merge_partials(o, lse, axis=2)  # [B, K, Gp, E], [B, K, Gp]
  return o[:, :, :g].astype(dtype), lse[:, :, :g]


def _params(num_warps: int, num_stages: int):
  if _pltriton is None:
    return None
  return _pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _out_specs(B: int, K: int, P: int, Gp: int, E: int):
  specs = [pl.BlockSpec((None, None, None, Gp, E), lambda b, h, p: (b, h, p, 0, 0)),
           pl.BlockSpec((None, None, None, Gp), lambda b, h, p: (b, h, p, 0))]
  shapes = [jax.ShapeDtypeStruct((B, K, P, Gp, E), jnp.float32),
            jax.ShapeDtypeStruct((B, K, P, Gp), jnp.float32)]
  return specs, shapes


@functools.partial(jax.jit, static_argnames=("block_size", "num_splits", "sm_scale",
                                             "num_warps", "num_stages", "interpret", "debug"))
def _decode(q, k, v, pos, q_pos, mask, *, block_size, num_splits, sm_scale, num_warps,
            num_stages, interpret, debug):
  """Pads the query rows (and mask) to Gp, runs the slot kernel and merges the splits."""
  B, K, G, E = q.shape
  N = k.shape[2]
  qp = _pad_rows(q, k.dtype)  # [B, K, Gp, E]
  Gp = qp.shape[2]
  n_blocks = N // block_size
  args = [q_pos.astype(jnp.int32)[:, None], pos.astype(jnp.int32), qp, k, v]
  kv_spec = pl.BlockSpec((None, None, N, E), lambda b, h, p: (b, h, 0, 0))
  in_specs = [pl.BlockSpec((None, 1), lambda b, h, p: (b, 0)),
              pl.BlockSpec((None, None, N), lambda b, h, p: (b, h, 0)),
              pl.BlockSpec((None, None, Gp, E), lambda b, h, p: (b, h, 0, 0)), kv_spec, kv_spec]
  if mask is not None:
    args.append(jnp.pad(mask.astype(jnp.int8), ((0, 0), (0, 0), (0, Gp - G), (0, 0))))
    in_specs.append(pl.BlockSpec((None, None, Gp, N), lambda b, h, p: (b, h, 0, 0)))
  out_specs, out_shape = _out_specs(B, K, num_splits, Gp, E)
  o, lse = pl.pallas_call(
      functools.partial(_decode_kernel, block_size=block_size,
                        per_split=-(-n_blocks // num_splits), n_blocks=n_blocks,
                        qk_scale=sm_scale * LOG2E, has_mask=mask is not None),
      grid=(B, K, num_splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(num_warps, num_stages), interpret=interpret, debug=debug,
      name="cache_decode_attention",
  )(*args)
  return _merged(o, lse, G, q.dtype)


def _seq_specs(offset: int, B: int, P: int, W: int):
  """BlockSpecs of a part's q_pos and table in the (K, programs) grid: program i -> the part's
  sequence, clamped into it (programs of other parts point at a block they never read)."""
  def seq(h, i):
    return jnp.clip(i - offset, 0, B * P - 1) % B, 0

  return [pl.BlockSpec((None, 1), seq), pl.BlockSpec((None, W), seq)]


@functools.partial(jax.jit, static_argnames=("block_tokens", "row_tiles", "num_splits", "sm_scale",
                                             "out_dtype", "merge_splits", "num_warps",
                                             "num_stages", "interpret", "debug"))
def _paged(qs, k_pages, v_pages, tables, q_pos, *, block_tokens, row_tiles, num_splits, sm_scale,
           out_dtype, merge_splits, num_warps, num_stages, interpret, debug):
  """The paged kernel over parts (qs / tables / q_pos: tuples, part j [B_j, K, G_j, E] /
  [B_j, W_j] / [B_j]) in one launch; pages [K, P, S, E] read in place, queries and outputs as
  flat unpadded rows (the interpreter gets a row tile of slack: its slices clamp), each
  part's num_splits[j] splits merged (merge_splits) or returned as float32 partials."""
  kh, p, s, E = k_pages.shape
  k, v = k_pages.reshape(kh, p * s, E), v_pages.reshape(kh, p * s, E)
  slack = max(row_tiles) if interpret else 0
  args, in_specs, out_specs, out_shape, parts = [], [], [], [], []
  offset = 0
  for q, t, qp_, n_split, bs, tr in zip(qs, tables, q_pos, num_splits, block_tokens, row_tiles):
    B, W = t.shape
    G = q.shape[2]
    qf = q.astype(k_pages.dtype).reshape(B * kh * G, E)
    if slack:
      qf = jnp.pad(qf, ((0, slack), (0, 0)))
    args += [qp_.astype(jnp.int32)[:, None], t.astype(jnp.int32), qf]
    in_specs += _seq_specs(offset, B, n_split, W) + [
        pl.BlockSpec(qf.shape, lambda h, i: (0, 0))]
    n_out = B * kh * n_split * G + slack
    out_specs += [pl.BlockSpec((n_out, E), lambda h, i: (0, 0)),
                  pl.BlockSpec((n_out,), lambda h, i: (0,))]
    out_shape += [jax.ShapeDtypeStruct((n_out, E), jnp.float32),
                  jax.ShapeDtypeStruct((n_out,), jnp.float32)]
    parts.append((offset, B, n_split, G, bs, tr))
    offset += B * n_split
  kv_spec = pl.BlockSpec((None, p * s, E), lambda h, i: (h, 0, 0))
  res = pl.pallas_call(
      functools.partial(_paged_kernel, parts=tuple(parts), kv_heads=kh, page_size=s,
                        qk_scale=sm_scale * LOG2E, interpret=interpret),
      grid=(kh, offset), in_specs=in_specs + [kv_spec, kv_spec], out_specs=out_specs,
      out_shape=out_shape, compiler_params=_params(num_warps, num_stages), interpret=interpret,
      debug=debug, name="paged_decode_attention",
  )(*args, k, v)
  outs = []
  for j, (q, (_, B, n_split, G, _, _)) in enumerate(zip(qs, parts)):
    n = B * kh * n_split * G
    o = res[2 * j][:n].reshape(B, kh, n_split, G, E)
    lse = res[2 * j + 1][:n].reshape(B, kh, n_split, G)
    outs.append(_merged(o, lse, G, out_dtype or q.dtype) if merge_splits else (o, lse))
  return tuple(outs)


def check_cache_slots(q, k, v, pos) -> int:
  """The checks every kernel over the cache layout shares (q already of the right rank, its
  batch, KV heads and head dim first, second and last): float q / k / v, k and v alike [B, K,
  N, E] and agreeing with q, pos int [B, K, N]. Returns N; a ValueError names what disagrees."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
  if k.shape != v.shape or k.dtype != v.dtype:
    raise ValueError(f"k {k.shape} {k.dtype} and v {v.shape} {v.dtype} must agree in shape and "
                     "dtype")
  B, K, E = q.shape[0], q.shape[1], q.shape[-1]
  N = k.shape[2]
  if (k.shape[0], k.shape[1], k.shape[3]) != (B, K, E):
    raise ValueError(f"k shape {k.shape} does not match q shape {q.shape} in batch, kv_heads or "
                     "head_dim")
  if getattr(pos, "shape", None) != (B, K, N) or not jnp.issubdtype(pos.dtype, jnp.integer):
    raise ValueError(f"pos must be an int [B={B}, K={K}, N={N}] array, got "
                     f"{getattr(pos, 'shape', None)} {getattr(pos, 'dtype', None)}")
  return N


def _check_inputs(q, k, v, pos, q_pos, mask):
  """ValueError on any disagreement of shapes or dtypes; returns (B, K, G, E, N)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D ({'[B, K, G, E]' if name == 'q' else '[B, K, N, E]'}),"
                       f" got shape {getattr(x, 'shape', None)}")
  N = check_cache_slots(q, k, v, pos)
  B, K, G, E = q.shape
  if getattr(q_pos, "shape", None) != (B,) or not jnp.issubdtype(q_pos.dtype, jnp.integer):
    raise ValueError(f"q_pos must be an int [B={B}] array, got {getattr(q_pos, 'shape', None)} "
                     f"{getattr(q_pos, 'dtype', None)}")
  if mask is not None and (getattr(mask, "shape", None) != (B, K, G, N) or mask.dtype != bool):
    raise ValueError(f"mask must be a bool [B={B}, K={K}, G={G}, N={N}] array, got "
                     f"{getattr(mask, 'shape', None)} {getattr(mask, 'dtype', None)}")
  return B, K, G, E, N


def _default_splits(B: int, K: int, n_blocks: int) -> int:
  """Enough programs to fill the GPU, each chunk keeping >= 4 slot blocks, at most 32 splits."""
  return max(1, min(32, n_blocks // 4, -(-TARGET_PROGRAMS // (B * K))))


def cache_decode_attention(q, k, v, pos, q_pos, mask=None, *, sm_scale: float | None = None,
                           block_size: int | None = None, num_splits: int | None = None,
                           num_warps: int = 4, num_stages: int = 2, interpret: bool | None = None,
                           debug: bool = False):
  """Attention of one new query per sequence over the position-tagged slots of a KV cache.

  Args:
    q: [B, K, G, E] the new query of each sequence, its H = K * G heads grouped by KV head.
    k: [B, K, N, E] cached keys (any float dtype; bf16 typical), N a multiple of 16.
    v: [B, K, N, E] cached values, k's dtype.
    pos: int [B, K, N] original position of the token in each slot, -1 = empty slot.
    q_pos: int [B] position of the query. Slot n is valid for (b, k, g) iff
      0 <= pos[b, k, n] <= q_pos[b] and (mask is None or mask[b, k, g, n]).
    mask: optional bool [B, K, G, N] per-query-head permission (sparse patterns).
    sm_scale: logit scale, default 1 / sqrt(E).
    block_size: slots per block, a power of two >= 16 dividing N (default pick_block_size(N),
      halved while a K / V tile would exceed 16 KiB).
    num_splits: P, slot chunks run in parallel per (sequence, KV head) (default: enough programs
      to fill a GPU, >= 4 blocks each, at most 32).
    num_warps, num_stages: Triton launch settings.
    interpret: Pallas interpret mode (default: unless the backend is a GPU).
  Returns:
    (o [B, K, G, E] in q's dtype, lse [B, K, G] float32): the output and the natural log-sum-exp
    of the scaled logits over the valid slots; o = 0 and lse = -inf where no slot is valid.
  Raises:
    ValueError: on disagreeing shapes or dtypes, an N no block size divides, or a head dim that is
      not a power of two >= 16 (supports() says which caches the kernel takes).
  """
  B, K, G, E, N = _check_inputs(q, k, v, pos, q_pos, mask)
  if block_size is None:
    block_size = pick_block_size(N)
    # A K or V tile past 16 KiB (float32 at E >= 128) spills registers: halve it while it divides.
    while block_size > BLOCK_SIZES[-1] and block_size * E * k.dtype.itemsize > MAX_TILE_BYTES:
      block_size //= 2
  block_size = layouts.check_block_size(block_size)
  if N % block_size:
    raise ValueError(f"block_size {block_size} must divide the slot count N={N}")
  if E < 16 or not layouts.is_power_of_two(E):
    raise ValueError(f"head_dim E={E} must be a power of two >= 16 for the kernel; use "
                     "cache_decode_attention_reference")
  n_blocks = N // block_size
  if num_splits is None:
    num_splits = _default_splits(B, K, n_blocks)
  if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
    raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
  num_splits = min(num_splits, n_blocks)  # a split past the last block would only write -inf
  return _decode(q, k, v, pos, q_pos, mask, block_size=block_size, num_splits=num_splits,
                 sm_scale=float(1.0 / math.sqrt(E) if sm_scale is None else sm_scale),
                 num_warps=num_warps, num_stages=num_stages,
                 interpret=default_interpret() if interpret is None else bool(interpret),
                 debug=debug)


def cache_decode_attention_reference(q, k, v, pos, q_pos, mask=None, *,
                                     sm_scale: float | None = None):
  """Dense float32 (Precision.HIGHEST) decode attention, same contract as cache_decode_attention
  for any N and E: returns (o [B, K, G, E] in q's dtype, lse [B, K, G] float32)."""
  B, K, G, E, N = _check_inputs(q, k, v, pos, q_pos, mask)
  sm_scale = 1.0 / math.sqrt(E) if sm_scale is None else sm_scale
  live = (pos >= 0) & (pos <= q_pos[:, None, None])  # [B, K, N]
  valid = live[:, :, None, :] if mask is None else live[:, :, None, :] & mask  # [B, K, G?, N]
  # Empty slots may hold anything (the kernel never reads them): zero them so no NaN leaks in.
  kf, vf = (jnp.where(live[..., None], x.astype(jnp.float32), 0.0) for x in (k, v))
  hi = lax.Precision.HIGHEST
  s = jnp.einsum("bkge,bkne->bkgn", q.astype(jnp.float32), kf, precision=hi) * sm_scale
  p, lse = masked_softmax(s, valid)
  o = jnp.einsum("bkgn,bkne->bkge", p, vf, precision=hi)
  return o.astype(q.dtype), lse


def default_block_tokens(head_dim: int, itemsize: int = 2, rows: int = 1) -> int:
  """Tokens each paged-kernel iteration reads, whatever the page size (several small pages
  gathered, part of a large one): up to 128 (within MAX_TILE_BYTES) for a part of at most
  MIN_ROWS query rows, 64 for more (a prefix group's rows). On an H200, prefix rows over tiles
  of 32 or 128 tokens ran slower than over 64 (results/paged_speed_gpu.json)."""
  cap = 128 if rows <= MIN_ROWS else 64
  return max(16, min(cap, MAX_TILE_BYTES // (head_dim * itemsize)))


def _check_pages(q, k_pages, v_pages, tables):
  """ValueError unless q [B, K, G, E], pages [K, P, S, E] alike (S a power of two >= 16, E a
  power of two >= 16) and tables int [B, W]; returns (B, K, S, E, W)."""
  if getattr(k_pages, "ndim", None) != 4 or k_pages.shape != v_pages.shape:
    raise ValueError(f"k_pages and v_pages must be [K, P, S, E] alike, got "
                     f"{getattr(k_pages, 'shape', None)} and {getattr(v_pages, 'shape', None)}")
  K, P, S, E = k_pages.shape
  if getattr(q, "ndim", None) != 4 or q.shape[1] != K or q.shape[3] != E:
    raise ValueError(f"q must be [B, K={K}, G, E={E}], got {getattr(q, 'shape', None)}")
  B = q.shape[0]
  if getattr(tables, "ndim", None) != 2 or tables.shape[0] != B or not jnp.issubdtype(
      tables.dtype, jnp.integer):
    raise ValueError(f"tables must be an int [B={B}, W] array, got "
                     f"{getattr(tables, 'shape', None)}")
  S = layouts.check_block_size(S, "page size")
  if E < 16 or not layouts.is_power_of_two(E):
    raise ValueError(f"head_dim E={E} must be a power of two >= 16 for the kernel")
  return B, K, S, E, tables.shape[1]


def _tile(value, what: str) -> int:
  """int(value), a power of two >= 16 (MIN_ROWS; tiles of tokens and of rows alike), else a
  ValueError that starts with `what`."""
  t = int(value)
  if t < MIN_ROWS or not layouts.is_power_of_two(t):
    raise ValueError(f"{what} >= {MIN_ROWS}, got {value!r}")
  return t


def paged_decode_attention(q, k_pages, v_pages, tables, q_pos, *, sm_scale: float | None = None,
                           block_tokens: int | None = None, num_splits: int | None = None,
                           out_dtype=None, num_warps: int = 4, num_stages: int = 2,
                           interpret: bool | None = None, debug: bool = False):
  """Decode attention read through page tables (logical block != physical page).

  Args:
    q: [B, K, G, E] one query per sequence, grouped by KV head.
    k_pages, v_pages: [K, P, S, E] the pool's pages (S tokens each, a power of two >= 16).
    tables: int [B, W] page of each logical block of each sequence; token t of sequence b is at
      (tables[b, t // S], t % S) and its position is t. Entries past a sequence's last block are
      never read.
    q_pos: int [B] the query's position: tokens 0 .. q_pos[b] are attended.
    block_tokens: tokens read per kernel iteration, a power of two >= 16 (default
      default_block_tokens): several pages' rows gathered when larger than S, part of a page
      when smaller. G may be large (a prefix group's rows): row tiles of 16 share each tile.
  Returns:
    (o [B, K, G, E] in out_dtype (default q's), lse [B, K, G] float32), as
    cache_decode_attention.
  """
  return paged_decode_attention_parts(
      [(q, tables, q_pos)], k_pages, v_pages, sm_scale=sm_scale,
      block_tokens=None if block_tokens is None else [block_tokens],
      num_splits=None if num_splits is None else [num_splits], out_dtype=out_dtype,
      num_warps=num_warps, num_stages=num_stages, interpret=interpret, debug=debug)[0]


def paged_decode_attention_parts(parts, k_pages, v_pages, *, sm_scale: float | None = None,
                                 block_tokens=None, row_tiles=None, num_splits=None,
                                 out_dtype=None, merge_splits: bool = True, num_warps: int = 4,
                                 num_stages: int = 2, interpret: bool | None = None,
                                 debug: bool = False):
  """paged_decode_attention of several parts over one pool in ONE kernel launch.

  Each part is (q [B_j, K, G_j, E], tables int [B_j, W_j], q_pos int [B_j]), as
  paged_decode_attention's arguments; its programs (B_j x K x splits) join one grid, so parts of
  different shapes (a shared prefix's group rows over long tables, each sequence's own rows over
  short ones) keep the GPU busy together rather than one launch after the other.

  block_tokens, row_tiles, num_splits: None or one int per part. Default tiles:
  default_block_tokens tokens and MIN_ROWS rows (row tiles: powers of two >= 16).
  Default splits: for one part, enough programs to fill the GPU, each keeping >= 4 tiles; for
  several parts, none while their programs together fill it (a split's partials cost a merge),
  else each part's own default.
  Returns a list of (o [B_j, K, G_j, E] in out_dtype (default q's), lse [B_j, K, G_j]
  float32), one per part; with merge_splits=False each part's unmerged split partials instead
  (o [B_j, K, P_j, G_j, E] float32, lse [B_j, K, P_j, G_j]), for a caller that merges them with
  partials of its own in one pass (merge.merge_partials over axis 2).
  """
  if not parts:
    raise ValueError("paged_decode_attention_parts needs at least one part")
  dims = [_check_pages(q, k_pages, v_pages, t) for q, t, _ in parts]
  for (B, *_), (_, _, q_pos) in zip(dims, parts):
    if getattr(q_pos, "shape", None) != (B,) or not jnp.issubdtype(q_pos.dtype, jnp.integer):
      raise ValueError(f"q_pos must be an int [B={B}] array, got "
                       f"{getattr(q_pos, 'shape', None)}")
  for name, val in (("block_tokens", block_tokens), ("row_tiles", row_tiles),
                    ("num_splits", num_splits)):
    if val is not None and len(val) != len(parts):
      raise ValueError(f"{name} needs one entry per part ({len(parts)}), got {val!r}")
  item = k_pages.dtype.itemsize
  tiles = [_tile(block_tokens[j], "block_tokens must be a power of two") if block_tokens is not None
           else default_block_tokens(d[3], item, q.shape[2])
           for j, (d, (q, _, _)) in enumerate(zip(dims, parts))]
  iters = [-(-d[4] * d[2] // bs) for d, bs in zip(dims, tiles)]  # tiles of a full table
  if num_splits is None:
    fill = len(parts) > 1 and sum(d[0] for d in dims) * dims[0][1] >= TARGET_PROGRAMS
    num_splits = [1 if fill else _default_splits(d[0], d[1], n) for d, n in zip(dims, iters)]
  splits = tuple(max(1, min(int(p), n)) for p, n in zip(num_splits, iters))
  E = dims[0][3]
  return list(_paged(tuple(p[0] for p in parts), k_pages, v_pages, tuple(p[1] for p in parts),
                     tuple(p[2] for p in parts), block_tokens=tuple(tiles),
                     row_tiles=tuple(_tile(r, "row_tiles must be powers of two")
                                     for r in row_tiles or [MIN_ROWS] * len(parts)),
                     num_splits=splits,
                     sm_scale=float(1.0 / math.sqrt(E) if sm_scale is None else sm_scale),
                     out_dtype=out_dtype, merge_splits=bool(merge_splits), num_warps=num_warps,
                     num_stages=num_stages,
                     interpret=default_interpret() if interpret is None else bool(interpret),
                     debug=debug))
