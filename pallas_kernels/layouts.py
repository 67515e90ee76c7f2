"""Block layouts (dense causal, S2 strided + local) and the index lists the sparse kernels walk.

Axes: L = layout heads, R = row blocks (query blocks, or key blocks for the transpose),
C = column blocks, W = width of the padded index lists.

A layout is a boolean [L, nblocks, nblocks] array: layout[l, i, j] says query block i of the
heads mapped to l attends key block j. Kernels never look at the layout itself; they walk the
compressed lists built here once per call: for each (layout head, row block) the attended
column blocks, sorted so that blocks needing an element mask (the causal diagonal, a padded last
key block) come last. A kernel then runs an unmasked loop over the first `nfull` entries and a
masked loop over the rest, and skipped blocks cost nothing: no load, no arithmetic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def is_power_of_two(n: int) -> bool:
  return isinstance(n, int | np.integer) and n > 0 and (n & (n - 1)) == 0


def check_block_size(block_size, name: str = "block_size") -> int:
  """ValueError unless block_size is a Python int, a power of two and >= 16."""
  if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
    raise ValueError(f"{name} must be an int, got {block_size!r}")
  if block_size < 16 or not is_power_of_two(int(block_size)):
    raise ValueError(f"{name} must be a power of two >= 16, got {block_size}")
  return int(block_size)


def is_concrete(x) -> bool:
  """True when x holds values at trace time (numpy, or a jax array outside any trace)."""
  return not isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class BlockLists:
  """Compressed sparse rows of a block layout, padded to a common width.

  Attributes:
    cols: int32 [L, R, W]; entries [0, count) of each row are the attended column blocks,
      unmasked ones first (ascending), then those that need an element mask (ascending).
    count: int32 [L, R]; number of attended column blocks per row.
    nfull: int32 [L, R]; how many of them need no element mask.
  """
  cols: jax.Array | np.ndarray
  count: jax.Array | np.ndarray
  nfull: jax.Array | np.ndarray

  def arrays(self) -> tuple:
    return self.cols, self.count, self.nfull


def compress_rows(mask, needs_mask) -> BlockLists:
  """Builds BlockLists from [L, R, C] boolean `mask` (attended) and `needs_mask` (partial).

  Works on numpy arrays (at trace time, width trimmed to the longest row) and on traced jax
  arrays (width C). Linear time: positions come from cumulative sums, not from a sort.
  """
  xp = np if isinstance(mask, np.ndarray) else jnp
  L, R, C = mask.shape
  full = mask & ~needs_mask
  part = mask & needs_mask
  nfull = full.sum(-1).astype(np.int32)
  count = (nfull + part.sum(-1)).astype(np.int32)
  width = max(1, int(count.max())) if xp is np else C
  pos = xp.where(full, xp.cumsum(full, -1) - 1,
                 xp.where(part, nfull[..., None] + xp.cumsum(part, -1) - 1, width))
  col = xp.broadcast_to(xp.arange(C, dtype=np.int32), (L, R, C))
  if xp is np:
    cols = np.zeros((L, R, width + 1), np.int32)
    np.put_along_axis(cols, pos, col, axis=-1)
    cols = cols[..., :width]
  else:
    li = jnp.arange(L)[:, None, None]
    ri = jnp.arange(R)[None, :, None]
    cols = jnp.zeros((L, R, width), jnp.int32).at[li, ri, pos].set(col, mode="drop")
  return BlockLists(cols, count, nfull)


def layout_block_lists(layout, *, causal: bool, num_blocks: int, padded: bool
                       ) -> tuple[BlockLists, BlockLists]:
  """Row lists (forward, dQ) and column lists (dK/dV) of a [L, nb, nb] layout.

  Args:
    layout: bool [L, nb, nb], numpy or jax.
    causal: keep only key blocks <= query block; the diagonal block gets an element mask.
    num_blocks: nb.
    padded: the sequence does not fill the last block: the last key block gets a mask.
  Returns:
    (by query block: [L, nq, W] lists of key blocks, by key block: [L, nk, W'] lists of query
    blocks).
  """
  xp = np if isinstance(layout, np.ndarray) else jnp
  layout = layout.astype(bool)
  qi = xp.arange(num_blocks)[:, None]
  ki = xp.arange(num_blocks)[None, :]
  needs = xp.zeros((num_blocks, num_blocks), bool)
  if causal:
    layout = layout & (ki <= qi)[None]
    needs = needs | (qi == ki)
  if padded:
    needs = needs | (ki == num_blocks - 1)
  needs = xp.broadcast_to(needs[None], layout.shape)
  by_q = compress_rows(layout, needs)
  by_k = compress_rows(xp.swapaxes(layout, 1, 2), xp.swapaxes(needs, 1, 2))
  return by_q, by_k


def head_to_layout_head(layout_heads: int, num_heads: int, num_kv_heads: int):
  """The map h -> layout head for layout_heads in {num_heads, num_kv_heads, 1}."""
  if layout_heads == num_heads:
    return lambda h: h
  if layout_heads == num_kv_heads:
    group = num_heads // num_kv_heads
    return lambda h: h // group
  return lambda h: h * 0


def expand_layout(layout, num_heads: int, num_kv_heads: int):
  """[L, nb, nb] -> [num_heads, nb, nb] by the same head map the kernels use."""
  lmap = head_to_layout_head(layout.shape[0], num_heads, num_kv_heads)
  return jnp.asarray(layout)[np.array([lmap(h) for h in range(num_heads)])]


def token_mask(layout, *, block_size: int, seq_len: int, causal: bool):
  """Expands a [L, nb, nb] block layout to a [L, seq_len, seq_len] token mask."""
  m = jnp.repeat(jnp.repeat(jnp.asarray(layout, bool), block_size, 1), block_size, 2)
  m = m[:, :seq_len, :seq_len]
  if causal:
    m = m & jnp.tril(jnp.ones((seq_len, seq_len), bool))[None]
  return m


def causal_layout(num_blocks: int, layout_heads: int = 1) -> np.ndarray:
  """bool [layout_heads, nb, nb]: every key block at or before the query block."""
  tril = np.tril(np.ones((num_blocks, num_blocks), bool))
  return np.broadcast_to(tril, (layout_heads, num_blocks, num_blocks)).copy()


def s2_layout(num_heads: int, num_blocks: int, *, local_blocks: int, vert_stride: int
              ) -> np.ndarray:
  """S2-Attention layout, bool [num_heads, nb, nb].

  Head h attends key block k from query block q when k <= q and either k is in the local window
  (0 <= q - k < local_blocks) or k is on the head's vertical stride: (k + h * max(1, stride //
  heads)) % stride == 0, a different offset per head so that the heads together cover all
  blocks.
  """
  q = np.arange(num_blocks)[None, :, None]
  k = np.arange(num_blocks)[None, None, :]
  h = np.arange(num_heads)[:, None, None]
  local = (q - k >= 0) & (q - k < local_blocks)
  offset = h * max(1, vert_stride // num_heads)
  strided = (k + offset) % vert_stride == 0
  return (local | strided) & (k <= q)
