"""A shared prefix's attention through cuDNN's paged flash attention (GPU only).

Axes: R prefix groups, K KV heads, M query rows per (group, KV head) (a group's members times
the query heads of a KV head), E head dim, P pool pages, S page size, W page-table width.

The pool keeps each KV head's pages contiguous ([K, P, S, E]), while cuDNN's paged attention
wants blocks that hold every head. Seen as [K * P, 1, S, E] (a reshape, no copy) every KV head
is a one-head "block pool": (group r, head h) becomes batch entry r * K + h whose page table is
h * P + tables[r]. cuDNN reads that table for the first lengths[r] tokens only; the rest of each
table is padding, because JAX's wrapper wants B x W entries to cover the K * P blocks exactly
(so `supports` asks that R divide P). All M rows of a group attend the whole prefix (no causal
mask: in decode every member's query comes after its group's prefix), so the prefix's K / V
are read once per (group, KV head) and the rows are the M of one matrix product, as Hydragen
computes a shared prefix. The log-sum-exp comes back beside the output (cuDNN's softmax
statistics), which is what the merge with each member's own pages needs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def available() -> bool:
  """Whether cuDNN's fused attention can run here (a GPU backend with cuDNN found)."""
  if jax.default_backend() != "gpu":
    return False
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
    fa.check_cudnn_version()
  except Exception:  # noqa: BLE001 - no cuDNN, or a JAX without this module
    return False
  return True


def supports(groups: int, num_pages: int, width: int, head_dim: int, dtype) -> bool:
  """Whether cudnn_prefix_attention takes R = groups over a pool of num_pages pages with tables
  of `width` entries, head dim E and this dtype (besides available())."""
  return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % 8 == 0 and head_dim <= 256 and groups > 0 and num_pages % groups == 0
          and num_pages // groups >= width)


def cudnn_prefix_attention(rows: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           tables: jax.Array, lengths: jax.Array, *,
                           sm_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of every row of a group over its prefix's pages, through cuDNN.

  Args:
    rows: [R, K, M, E] queries (bf16 or fp16, the pages' dtype), grouped by KV head.
    k_pages, v_pages: [K, P, S, E] the pool.
    tables: int [R, W] each group's prefix pages in order; lengths: int [R] its tokens
      (0: a padding group).
    sm_scale: logit scale, default 1 / sqrt(E).
  Returns:
    (o [R, K, M, E] in rows' dtype, lse [R, K, M] float32 natural log-sum-exp; o = 0 and
    lse = -inf for a group of no tokens).
  Raises:
    ValueError: if the shapes disagree or `supports` says no.
  """
  from jax._src.cudnn import fused_attention_stablehlo as fa
  r, kh, m, e = rows.shape
  kh2, p, s, e2 = k_pages.shape
  w = tables.shape[1]
  if (kh2, e2) != (kh, e) or v_pages.shape != k_pages.shape or tables.shape[0] != r:
    raise ValueError(f"rows {rows.shape}, pages {k_pages.shape} / {v_pages.shape} and tables "
                     f"{tables.shape} disagree")
  if not supports(r, p, w, e, k_pages.dtype) or rows.dtype != k_pages.dtype:
    raise ValueError(f"cudnn_prefix_attention does not take {r} groups over {p} pages (tables "
                     f"of {w}), head dim {e}, {rows.dtype} rows over {k_pages.dtype} pages")
  wide = p // r  # table entries per batch entry: B' x W' = K * P blocks exactly
  table = (tables.astype(jnp.int32)[:, None, :] + (jnp.arange(kh, dtype=jnp.int32) * p)[None, :,
                                                                                      None])
  table = jnp.pad(table, ((0, 0), (0, 0), (0, wide - w))).reshape(r * kh, 1, wide, 1)
  n = lengths.astype(jnp.int32)
  kv_len = jnp.repeat(jnp.maximum(n, 1), kh)  # cuDNN is not asked for an empty softmax
  o, lse = fa.paged_attention(
      rows.reshape(r * kh, 1, m, e), k_pages.reshape(kh * p, 1, s, e),
      v_pages.reshape(kh * p, 1, s, e), jnp.full((r * kh,), m, jnp.int32), kv_len, table, table,
      scale=float(1.0 / math.sqrt(e) if sm_scale is None else sm_scale),
      mask_type=fa.MaskType.PADDING, qkv_layout="BNTH", return_residual=True)
  o = o.reshape(r, kh, m, e)
  lse = lse.astype(jnp.float32).reshape(r, kh, m)
  empty = (n == 0)[:, None, None]
  return jnp.where(empty[..., None], 0, o).astype(rows.dtype), jnp.where(empty, -jnp.inf, lse)
