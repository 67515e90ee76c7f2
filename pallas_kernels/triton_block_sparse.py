"""Block-sparse flash attention forward in hand-written Triton, called through jax-triton.

A second implementation of `block_sparse.block_sparse_attention`'s forward pass, to measure the
Pallas kernel against the same algorithm written directly in Triton. It walks the same lists
(layouts.layout_block_lists) and validates with the same helpers (block_sparse.check_qkv,
check_layout, layouts.check_block_size); only the kernel differs.

Forward only: no custom_vjp, so differentiating through it fails. The backward is the Pallas
kernel's (block_sparse.block_sparse_attention). Also narrower than the Pallas path: seq_len must be
a multiple of block_size (no padding) and head_dim a power of two >= 16.

triton and jax_triton are imported lazily, on the first call after the arguments are validated
(the @triton.jit kernel lives in _triton_block_sparse_kernel, imported then), so this module
imports, and rejects bad arguments, on machines without them.

Axes as in block_sparse: B = batch, T = sequence, H = query heads, K = key/value heads,
E = head dim, L = layout heads (H, K or 1), n = T // block_size, W = width of the key lists.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import layouts
from pallas_kernels.block_sparse import LOG2E, BlockSparseTiles, check_layout, check_qkv


@functools.cache
def _kernel():
  """The @triton.jit forward kernel (imports triton on first use)."""
  from pallas_kernels import _triton_block_sparse_kernel
  return _triton_block_sparse_kernel.block_sparse_fwd_kernel


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable launch settings of one call (jit static argument)."""
  block_size: int
  num_heads: int
  group: int
  layout_group: int
  qk_scale: float
  num_warps: int
  num_stages: int


@functools.partial(jax.jit, static_argnums=0)
def _forward(st: _Static, q, k, v, cols, count, nfull):
  """q [B, T, H, E], k / v [B, T, K, E] -> (o [B, T, H, E], lse [B, T, H] f32, natural log)."""
  import jax_triton as jt

  B, T, H, E = q.shape
  K = k.shape[2]
  n, W = cols.shape[1], cols.shape[2]
  bs = st.block_size
  o, lse = jt.triton_call(
      q, k, v, cols, count, nfull,
      T * H * E, H * E, E,  # q / o strides (batch, seq, head); head_dim stride 1
      T * K * E, K * E, E,  # k / v strides
      H * T, T,  # lse strides (batch, head)
      n * W, W, n,  # cols (layout head, row) and count / nfull (layout head) strides
      kernel=_kernel(),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
      grid=(T // bs, B * H),
      num_warps=st.num_warps,
      num_stages=st.num_stages,
      name="block_sparse_attention_fwd_triton",
      NUM_HEADS=st.num_heads, GROUP=st.group, LAYOUT_GROUP=st.layout_group,
      QK_SCALE=st.qk_scale, BLOCK=bs, HEAD_DIM=E, IEEE=q.dtype == jnp.float32,
  )
  return o, jnp.swapaxes(lse, 1, 2)


def block_sparse_attention_triton(q, k, v, layout, *, block_size: int, causal: bool = True,
                                  sm_scale: float | None = None, return_lse: bool = False,
                                  tiles: BlockSparseTiles | None = None):
  """Forward of block_sparse.block_sparse_attention as a jax-triton kernel (GPU only).

  Same arguments and results as block_sparse_attention (q [B, T, H, E], k / v [B, T, K, E],
  layout bool [L, n, n] with L in {H, K, 1}; o in q's dtype, zeros on rows that attend no key;
  with return_lse also lse [B, T, H] float32, natural log, -inf on such rows), except:
  T must be a multiple of block_size, E a power of two >= 16, and there is no gradient (use
  block_sparse_attention for training; its backward is the Pallas kernel's). `tiles` gives
  num_warps / num_stages as for the Pallas forward (num_warps_fwd, num_stages_fwd).

  Raises:
    ValueError: on bad shapes, dtypes, block size or layout, before triton is imported.
  """
  B, T, H, K, E = check_qkv(q, k, v)
  block_size = layouts.check_block_size(block_size)
  if T % block_size:
    raise ValueError(f"seq_len ({T}, from q) must be a multiple of block_size ({block_size}) "
                     "for the Triton path")
  if E < 16 or not layouts.is_power_of_two(E):
    raise ValueError(f"head_dim ({E}, from q) must be a power of two >= 16 for the Triton path")
  if T * max(H, K) * E >= 2**31:
    raise ValueError(f"seq_len * heads * head_dim ({T} * {max(H, K)} * {E}) must be < 2**31 "
                     "(int32 offsets within one batch element)")
  n = T // block_size
  check_layout(layout, num_heads=H, num_kv_heads=K, num_blocks=n)
  L = int(layout.shape[0])
  # h // (H // L) is layouts.head_to_layout_head for L in {H, K, 1}.
  lmap = layouts.head_to_layout_head(L, H, K)
  assert all(lmap(h) == h // (H // L) for h in range(H))
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(E)
  if layouts.is_concrete(layout):
    layout = np.asarray(layout)
  by_q, _ = layouts.layout_block_lists(layout, causal=causal, num_blocks=n, padded=False)
  cols, count, nfull = (jnp.asarray(a, jnp.int32) for a in by_q.arrays())
  tiles = tiles or BlockSparseTiles()
  st = _Static(block_size=block_size, num_heads=H, group=H // K, layout_group=H // L,
               qk_scale=float(sm_scale) * LOG2E,
               num_warps=tiles.warps(block_size, backward=False),
               num_stages=tiles.num_stages_fwd)
  o, lse = _forward(st, q, k, v, cols, count, nfull)
  return (o, lse) if return_lse else o

