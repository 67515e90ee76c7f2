"""The S2-Attention sparsity pattern: per-head strided key blocks plus a local window.

S2-Attention ("Efficient LLM Training and Serving with Heterogeneous Context Sharding among
Attention Heads", https://arxiv.org/abs/2407.17678) and its kernel library DKernel define the
pattern on blocks of `block_size` tokens. For query block q, key block k and head h:

    local(q, k)       = 0 <= q - k < local_blocks
    vertical_h(k)     = (k + h * head_sliding_step + head_sliding_offset) % vert_stride == 0
    attend_h(q, k)    = (local(q, k) or vertical_h(k)) and k <= q

so each head reads a different 1 / vert_stride shard of the context (its "residue" r_h with
k = r_h mod vert_stride) plus the recent window; the union of heads covers every key block when
the residues r_h hit all of 0 .. vert_stride - 1. head_sliding_step defaults to
max(1, vert_stride // heads), spreading the heads' residues evenly.

Axes: H query heads, K key/value heads (G = H // K), n = blocks = ceil(seq_len / block_size).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


def _is_int(x) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class S2Pattern:
  """S2-Attention block pattern (DKernel's parameters).

  Attributes:
    block_size: tokens per block, a power of two >= 16 (the kernels' tile edge).
    local_blocks: key blocks of the local window, the query's own block included (>= 1).
    vert_stride: every vert_stride-th key block is read by a head (>= 1; 1 = dense).
    homo_head: one pattern for all heads (every head has the same residue; no coverage).
    head_sliding_step: residue shift between consecutive pattern heads; default
      max(1, vert_stride // pattern_heads).
    head_sliding_offset: residue shift common to all heads.
    num_dense_heads: the last this many query heads attend every causal block.
    require_coverage: make `layout` (and the attention built on it) a ValueError unless the union
      of the heads reads every key block at any length.
  """

  block_size: int
  local_blocks: int
  vert_stride: int
  homo_head: bool = False
  head_sliding_step: int | None = None
  head_sliding_offset: int = 0
  num_dense_heads: int = 0
  require_coverage: bool = False

  def __post_init__(self):
    bs = self.block_size
    if not _is_int(bs) or bs < 16 or bs & (bs - 1):
      raise ValueError(f"block_size must be a power of two >= 16, got {bs!r}")
    for name, low in (("local_blocks", 1), ("vert_stride", 1), ("head_sliding_offset", 0),
                      ("num_dense_heads", 0)):
      val = getattr(self, name)
      if not _is_int(val) or val < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")
    if self.head_sliding_step is not None and (
        not _is_int(self.head_sliding_step) or self.head_sliding_step < 1):
      raise ValueError(f"head_sliding_step must be None or an integer >= 1, got "
                       f"{self.head_sliding_step!r}")

  # Per-head parameters ---------------------------------------------------------------------------

  def _check_heads(self, num_heads: int, num_kv_heads: int | None) -> tuple[int, int]:
    """(pattern heads P, group size G): P = H, or K with patterns per KV head."""
    if not _is_int(num_heads) or num_heads < 1:
      raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if num_kv_heads is not None and (not _is_int(num_kv_heads) or num_kv_heads < 1
                                     or num_heads % num_kv_heads):
      raise ValueError(f"num_kv_heads={num_kv_heads!r} must be a positive divisor of "
                       f"num_heads={num_heads}")
    if self.num_dense_heads > num_heads:
      raise ValueError(f"num_dense_heads={self.num_dense_heads} exceeds num_heads={num_heads}")
    group = 1 if num_kv_heads is None else num_heads // num_kv_heads
    if self.num_dense_heads % group:
      raise ValueError(f"num_dense_heads={self.num_dense_heads} must be a multiple of the query "
                       f"group size {group} when patterns are per KV head")
    return num_heads // group, group

  def sliding_step(self, pattern_heads: int) -> int:
    return self.head_sliding_step or max(1, self.vert_stride // pattern_heads)

  def head_offsets(self, num_heads: int, num_kv_heads: int | None = None) -> np.ndarray:
    """int [H]: o_h = (p(h) * step + head_sliding_offset) mod vert_stride, where p(h) is the
    pattern head of query head h (h, h // G per KV head, 0 for homo_head); head h reads key
    block k when (k + o_h) % vert_stride == 0."""
    p_heads, group = self._check_heads(num_heads, num_kv_heads)
    p = np.zeros(num_heads, np.int64) if self.homo_head else np.arange(num_heads) // group
    return ((p * self.sliding_step(p_heads) + self.head_sliding_offset)
            % self.vert_stride).astype(np.int32)

  def dense_heads(self, num_heads: int, num_kv_heads: int | None = None) -> np.ndarray:
    """bool [H]: the last num_dense_heads query heads are dense."""
    self._check_heads(num_heads, num_kv_heads)
    return np.arange(num_heads) >= num_heads - self.num_dense_heads

  def residues(self, num_heads: int, num_kv_heads: int | None = None) -> list[set[int]]:
    """Per query head, the residues r (key block k = r mod vert_stride) it reads beyond the local
    window: one residue for a sparse head, all of them for a dense head."""
    off = self.head_offsets(num_heads, num_kv_heads)
    dense = self.dense_heads(num_heads, num_kv_heads)
    s = self.vert_stride
    return [set(range(s)) if d else {(-int(o)) % s} for o, d in zip(off, dense)]

  # Layout and coverage ---------------------------------------------------------------------------

  def num_blocks(self, seq_len: int) -> int:
    return -(-int(seq_len) // self.block_size)

  def block_mask(self, num_heads: int, q_blocks, k_blocks, num_kv_heads: int | None = None):
    """bool [H, Tq, Tk] from int block indices q_blocks [Tq] and k_blocks [Tk] (numpy or jnp;
    the result follows). Includes causality at block level (k <= q)."""
    xp = np if isinstance(q_blocks, np.ndarray) and isinstance(k_blocks, np.ndarray) else jnp
    off = xp.asarray(self.head_offsets(num_heads, num_kv_heads))[:, None, None]
    dense = xp.asarray(self.dense_heads(num_heads, num_kv_heads))[:, None, None]
    q = q_blocks[None, :, None]
    k = k_blocks[None, None, :]
    local = (q - k >= 0) & (q - k < self.local_blocks)
    vertical = (k + off) % self.vert_stride == 0
    return (local | vertical | dense) & (k <= q)

  def layout(self, num_heads: int, seq_len: int, num_kv_heads: int | None = None) -> np.ndarray:
    """The block layout for the kernels.

    Args:
      num_heads: H query heads.
      seq_len: tokens; blocks n = ceil(seq_len / block_size).
      num_kv_heads: K; given, patterns are per KV head, repeated over each query group.
    Returns:
      numpy bool [H, n, n]: layout[h, q, k] = query block q of head h attends key block k.
    Raises:
      ValueError: bad head counts, or require_coverage and the heads cannot cover.
    """
    if self.require_coverage and not self.covers(num_heads, num_kv_heads):
      raise ValueError(self._coverage_message(num_heads, num_kv_heads))
    n = self.num_blocks(seq_len)
    blocks = np.arange(n)
    return self.block_mask(num_heads, blocks, blocks, num_kv_heads)

  def token_mask(self, num_heads: int, q_positions, k_positions, num_kv_heads: int | None = None):
    """bool [H, Tq, Tk] at token level: the block mask of the positions' blocks and token
    causality k_pos <= q_pos. Positions are int arrays [Tq], [Tk] (numpy or jnp)."""
    m = self.block_mask(num_heads, q_positions // self.block_size,
                        k_positions // self.block_size, num_kv_heads)
    return m & (k_positions[None, None, :] <= q_positions[None, :, None])

  def covers(self, num_heads: int, num_kv_heads: int | None = None,
             seq_len: int | None = None) -> bool:
    """Does the union of the heads read every key block from every later query block?

    Without seq_len: at any length, i.e. the heads' residues hit every residue of vert_stride
    (or a head is dense). With seq_len: for that length (a short sequence may be covered by the
    local window alone).
    """
    if seq_len is not None:
      n = self.num_blocks(seq_len)
      union = self.block_mask(num_heads, np.arange(n), np.arange(n), num_kv_heads).any(0)
      return bool(np.array_equal(union, np.tri(n, dtype=bool)))
    return set().union(*self.residues(num_heads, num_kv_heads)) == set(range(self.vert_stride))

  def _coverage_message(self, num_heads, num_kv_heads) -> str:
    hit = sorted(set().union(*self.residues(num_heads, num_kv_heads)))
    per = "KV head" if num_kv_heads is not None else "query head"
    return (f"require_coverage: the heads of {self} with num_heads={num_heads}, num_kv_heads="
            f"{num_kv_heads} (patterns per {per}) read only residues {hit} of vert_stride="
            f"{self.vert_stride}; use more heads, head_sliding_step=1, homo_head=False or a "
            f"smaller vert_stride")

  def check_coverage(self, num_heads: int, num_kv_heads: int | None = None) -> None:
    """ValueError unless the heads cover every key block at any length."""
    if not self.covers(num_heads, num_kv_heads):
      raise ValueError(self._coverage_message(num_heads, num_kv_heads))

  def density(self, num_heads: int, seq_len: int, num_kv_heads: int | None = None) -> float:
    """Attended causal blocks over all causal blocks (1.0 = dense)."""
    n = self.num_blocks(seq_len)
    return float(self.layout(num_heads, seq_len, num_kv_heads).sum()
                 / (num_heads * n * (n + 1) / 2))
