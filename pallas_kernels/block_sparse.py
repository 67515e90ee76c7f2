"""Block-sparse flash attention (forward and backward) in Pallas, with a dense jnp reference.

Axes: B = batch, T = sequence (padded: Tp), H = query heads, K = key/value heads, G = H // K,
E = head dim, L = layout heads (H, K or 1), n = blocks per sequence (Tp // block_size).

The kernels follow FlashAttention-2 (https://arxiv.org/abs/2307.08691): one program per (query
block, batch, head) walks only the key blocks listed for it (layouts.BlockLists, built once from
the layout), keeping a running max m, sum l and output accumulator in float32. The backward
recomputes P from the saved log-sum-exp: a dQ kernel walks the same row lists, a dK/dV kernel
walks the transposed lists (by key block, over the G query heads sharing the K/V head), so no
program ever writes another's output and no atomics are needed.

Exponentials are base 2 (exp2(x * log2 e) == exp(x)); the saved residual is the base-2 LSE.

Sequences whose length is not a multiple of block_size are padded with zeros and the padded keys
masked in the last key block; there is no per-batch length: causal attention over right-padded
batches needs none (a real query never sees a later pad), and non-causal callers must pad.
On GPU the kernels go through Pallas' Triton lowering; elsewhere they run in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import layouts

try:  # Triton-lowering compiler params (deprecated in JAX 0.11, still the GPU path here).
  from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover
  _pltriton = None

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSparseTiles:
  """Launch parameters of the three kernels (tile sizes are the layout's block size).

  Attributes:
    num_warps_fwd: warps per forward program (None: 4 for blocks <= 64, else 8).
    num_stages_fwd: software-pipelining depth of the forward key loop.
    num_warps_bwd: warps per dQ and dK/dV program (None: as forward).
    num_stages_bwd: pipelining depth of the backward loops.
  """
  num_warps_fwd: int | None = None
  num_stages_fwd: int = 3
  num_warps_bwd: int | None = None
  num_stages_bwd: int = 2

  def __post_init__(self):
    for name in ("num_warps_fwd", "num_warps_bwd"):
      w = getattr(self, name)
      if w is not None and not layouts.is_power_of_two(w):
        raise ValueError(f"{name} must be a power of two, got {w}")
    for name in ("num_stages_fwd", "num_stages_bwd"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  def warps(self, block_size: int, backward: bool) -> int:
    w = self.num_warps_bwd if backward else self.num_warps_fwd
    if w is None:
      w = self.num_warps_fwd
    return w if w is not None else (4 if block_size <= 64 else 8)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) settings of one call; the custom_vjp's non-differentiable argument."""
  block_size: int
  causal: bool
  sm_scale: float
  seq_len: int  # real T (<= Tp)
  num_heads: int
  num_kv_heads: int
  layout_heads: int
  tiles: BlockSparseTiles
  interpret: bool
  debug: bool

  @property
  def group(self) -> int:
    return self.num_heads // self.num_kv_heads

  def lmap(self, h):
    return layouts.head_to_layout_head(self.layout_heads, self.num_heads, self.num_kv_heads)(h)

  def params(self, backward: bool):
    if _pltriton is None:
      return None
    return _pltriton.CompilerParams(
        num_warps=self.tiles.warps(self.block_size, backward),
        num_stages=self.tiles.num_stages_bwd if backward else self.tiles.num_stages_fwd)


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """a @ b (optionally transposed operands) accumulated in float32.

  float32 operands get full precision: the Triton lowering maps DEFAULT to tf32 (seen on an
  H200 with JAX 0.11.2: 4e-4 relative error instead of 1e-7).
  """
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _element_mask(q_block, k_block, *, block_size: int, causal: bool, seq_len: int, padded: bool):
  """bool [bs, bs] of the (query block, key block) pair: causal and key-length masks."""
  rows = q_block * block_size + lax.broadcasted_iota(jnp.int32, (block_size, block_size), 0)
  cols = k_block * block_size + lax.broadcasted_iota(jnp.int32, (block_size, block_size), 1)
  mask = jnp.ones((block_size, block_size), jnp.bool_)
  if causal:
    mask = mask & (rows >= cols)
  if padded:
    mask = mask & (cols < seq_len)
  return mask


# ----------------------------------------------------------------------------------- forward


def _fwd_kernel(cols_ref, count_ref, nfull_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                cfg: _Config, num_blocks: int):
  """One (query block, batch, head): o = softmax(q k^T * scale) v over the listed key blocks.

  cols_ref [n, W] (this head's lists), count_ref / nfull_ref [n], q_ref [bs, E],
  k_ref / v_ref [Tp, E] (this K/V head), o_ref [bs, E], lse_ref [bs] (base 2).
  """
  bs = cfg.block_size
  qb = num_blocks - 1 - pl.program_id(0)  # heavy (late) query blocks launch first
  padded = cfg.seq_len % bs != 0
  q = q_ref[...]
  qk_scale = cfg.sm_scale * LOG2E

  def body(j, carry, masked):
    acc, m_prev, l_prev = carry
    kb = cols_ref[qb, j]
    start = pl.multiple_of(kb * bs, bs)
    k = k_ref[pl.ds(start, bs), :]
    s = _dot(q, k, trans_b=True) * qk_scale  # [bs, bs]
    if masked:
      mask = _element_mask(qb, kb, block_size=bs, causal=cfg.causal, seq_len=cfg.seq_len,
                           padded=padded)
      s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    if masked:  # a fully masked row keeps l == 0 instead of averaging masked keys
      p = jnp.where(mask, p, 0.0)
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    v = v_ref[pl.ds(start, bs), :]
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bs,), MASK_VALUE, jnp.float32),
           jnp.zeros((bs,), jnp.float32))
  nfull, count = nfull_ref[qb], count_ref[qb]
  carry = lax.fori_loop(0, nfull, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(nfull, count, functools.partial(body, masked=True), carry)
  empty = l == 0.0  # rows that attend no key: output 0, LSE -inf
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _row_index_specs(n: int, W: int, lmap):
  """BlockSpecs of the per-row block lists (cols [L, n, W], count [L, n], nfull [L, n]) that
  the forward and dQ kernels walk: each program reads its head's lists whole."""
  return (pl.BlockSpec((None, n, W), lambda i, b, h: (lmap(h), 0, 0)),
          pl.BlockSpec((None, n), lambda i, b, h: (lmap(h), 0)),
          pl.BlockSpec((None, n), lambda i, b, h: (lmap(h), 0)))


def _forward(cfg: _Config, q, k, v, index):
  """q [B, Tp, H, E], k/v [B, Tp, K, E] -> (o [B, Tp, H, E], lse2 [B, H, Tp] f32)."""
  B, Tp, H, E = q.shape
  bs, n, G = cfg.block_size, q.shape[1] // cfg.block_size, cfg.group
  cols, count, nfull = index[:3]
  W = cols.shape[-1]
  qmap = lambda i, b, h: (b, n - 1 - i, h, 0)
  lmap = cfg.lmap
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, num_blocks=n),
      grid=(n, B, H),
      in_specs=[
          *_row_index_specs(n, W, lmap),
          pl.BlockSpec((None, bs, None, E), qmap),
          pl.BlockSpec((None, Tp, None, E), lambda i, b, h: (b, 0, h // G, 0)),
          pl.BlockSpec((None, Tp, None, E), lambda i, b, h: (b, 0, h // G, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bs, None, E), qmap),
          pl.BlockSpec((None, None, bs), lambda i, b, h: (b, h, n - 1 - i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
      compiler_params=cfg.params(backward=False),
      interpret=cfg.interpret,
      debug=cfg.debug,
      name="block_sparse_attention_fwd",
  )(cols, count, nfull, q, k, v)


# ---------------------------------------------------------------------------------- backward


def _dq_kernel(cols_ref, count_ref, nfull_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, cfg: _Config, num_blocks: int):
  """One (query block, batch, head): dq = scale * sum_j dS_j k_j over the listed key blocks.

  As the forward, plus do_ref [bs, E], lse_ref / delta_ref [bs]; dq_ref [bs, E].
  """
  bs = cfg.block_size
  qb = num_blocks - 1 - pl.program_id(0)
  padded = cfg.seq_len % bs != 0
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  qk_scale = cfg.sm_scale * LOG2E

  def body(j, dq, masked):
    kb = cols_ref[qb, j]
    start = pl.multiple_of(kb * bs, bs)
    k = k_ref[pl.ds(start, bs), :]
    v = v_ref[pl.ds(start, bs), :]
    p = jnp.exp2(_dot(q, k, trans_b=True) * qk_scale - lse[:, None])  # [bs, bs]
    if masked:
      mask = _element_mask(qb, kb, block_size=bs, causal=cfg.causal, seq_len=cfg.seq_len,
                           padded=padded)
      p = jnp.where(mask, p, 0.0)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, jnp.float32)
  nfull, count = nfull_ref[qb], count_ref[qb]
  dq = lax.fori_loop(0, nfull, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(nfull, count, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(rows_ref, count_ref, nfull_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, cfg: _Config):
  """One (key block, batch, K/V head): dk, dv over the G query heads and their listed q blocks.

  rows_ref [L, n, W'] (all transposed lists), count_ref / nfull_ref [L, n], q_ref / do_ref
  [Tp, H, E], k_ref / v_ref [bs, E], lse_ref / delta_ref [H, Tp]; dk_ref / dv_ref [bs, E].
  """
  bs, G = cfg.block_size, cfg.group
  kb = pl.program_id(0)
  kh = pl.program_id(2)
  padded = cfg.seq_len % bs != 0
  k, v = k_ref[...], v_ref[...]
  qk_scale = cfg.sm_scale * LOG2E

  def body(j, carry, h, lh, masked):
    dk, dv = carry
    qb = rows_ref[lh, kb, j]
    start = pl.multiple_of(qb * bs, bs)
    q = q_ref[pl.ds(start, bs), h, :]
    do = do_ref[pl.ds(start, bs), h, :]
    lse = lse_ref[h, pl.ds(start, bs)]
    delta = delta_ref[h, pl.ds(start, bs)]
    p = jnp.exp2(_dot(q, k, trans_b=True) * qk_scale - lse[:, None])  # [bs_q, bs_k]
    if masked:
      mask = _element_mask(qb, kb, block_size=bs, causal=cfg.causal, seq_len=cfg.seq_len,
                           padded=padded)
      p = jnp.where(mask, p, 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  def head(g, carry):
    h = kh * G + g
    lh = cfg.lmap(h)
    nfull, count = nfull_ref[lh, kb], count_ref[lh, kb]
    carry = lax.fori_loop(0, nfull, functools.partial(body, h=h, lh=lh, masked=False), carry)
    return lax.fori_loop(nfull, count, functools.partial(body, h=h, lh=lh, masked=True), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_kernels(cfg: _Config, q, k, v, index, do, lse, delta):
  """Launches the dQ and dK/dV kernels; returns dq, dk, dv in the input dtypes."""
  B, Tp, H, E = q.shape
  K = k.shape[2]
  bs, n, G = cfg.block_size, Tp // cfg.block_size, cfg.group
  cols, count, nfull, rows, rcount, rnfull = index
  W, Wt, L = cols.shape[-1], rows.shape[-1], rows.shape[0]
  lmap = cfg.lmap
  qmap = lambda i, b, h: (b, n - 1 - i, h, 0)
  kv_full = pl.BlockSpec((None, Tp, None, E), lambda i, b, h: (b, 0, h // G, 0))
  row_spec = pl.BlockSpec((None, None, bs), lambda i, b, h: (b, h, n - 1 - i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, num_blocks=n),
      grid=(n, B, H),
      in_specs=[
          *_row_index_specs(n, W, lmap),
          pl.BlockSpec((None, bs, None, E), qmap),
          kv_full, kv_full,
          pl.BlockSpec((None, bs, None, E), qmap),
          row_spec, row_spec,
      ],
      out_specs=pl.BlockSpec((None, bs, None, E), qmap),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=cfg.params(backward=True),
      interpret=cfg.interpret,
      debug=cfg.debug,
      name="block_sparse_attention_dq",
  )(cols, count, nfull, q, k, v, do, lse, delta)

  kmap = lambda i, b, kh: (b, i, kh, 0)
  q_full = pl.BlockSpec((None, Tp, H, E), lambda i, b, kh: (b, 0, 0, 0))
  bh_full = pl.BlockSpec((None, H, Tp), lambda i, b, kh: (b, 0, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg),
      grid=(n, B, K),
      in_specs=[
          pl.BlockSpec((L, n, Wt), lambda i, b, kh: (0, 0, 0)),
          pl.BlockSpec((L, n), lambda i, b, kh: (0, 0)),
          pl.BlockSpec((L, n), lambda i, b, kh: (0, 0)),
          q_full,
          pl.BlockSpec((None, bs, None, E), kmap),
          pl.BlockSpec((None, bs, None, E), kmap),
          q_full, bh_full, bh_full,
      ],
      out_specs=[pl.BlockSpec((None, bs, None, E), kmap),
                 pl.BlockSpec((None, bs, None, E), kmap)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=cfg.params(backward=True),
      interpret=cfg.interpret,
      debug=cfg.debug,
      name="block_sparse_attention_dkdv",
  )(rows, rcount, rnfull, q, k, v, do, lse, delta)
  return dq, dk, dv


# ---------------------------------------------------------------------------- custom_vjp core


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, index):
  """(o [B, Tp, H, E], lse2 [B, H, Tp]) on padded inputs; index = row and column lists."""
  return _forward(cfg, q, k, v, index)


def _attention_fwd(cfg, q, k, v, index):
  o, lse = _forward(cfg, q, k, v, index)
  return (o, lse), (q, k, v, index, o, lse)


def _attention_bwd(cfg, res, cts):
  q, k, v, index, o, lse = res
  do, dlse = cts
  # delta_i = sum_e o_ie do_ie (FlashAttention-2, eq. for dS); an LSE cotangent g adds
  # g * dlse/dS = g * P / ln 2 to dS, i.e. subtracts g / ln 2 from delta.
  delta = jnp.einsum("bthe,bthe->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  delta = delta - dlse.astype(jnp.float32) / LN2
  dq, dk, dv = _backward_kernels(cfg, q, k, v, index, do.astype(q.dtype), lse, delta)
  return dq, dk, dv, tuple(None for _ in index)


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnums=0)
def _attention_padded(cfg: _Config, q, k, v, index):
  """Pads T to whole blocks (and E to a power of two), runs the kernel, slices back."""
  T, E = q.shape[1], q.shape[-1]
  pad_t = -T % cfg.block_size
  pad_e = pl.next_power_of_2(E) - E
  if pad_t or pad_e:
    widths = ((0, 0), (0, pad_t), (0, 0), (0, pad_e))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  o, lse2 = _attention(cfg, q, k, v, index)
  o = o[:, :T, :, :E]
  lse = jnp.swapaxes(lse2[:, :, :T], 1, 2) * LN2  # [B, T, H], natural log
  return o, lse


# --------------------------------------------------------------------------------- public API


def check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
  """Validates q [B, T, H, E], k / v [B, T, K, E]; returns (B, T, H, K, E)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape "
                       f"{getattr(x, 'shape', None)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  B, T, H, E = q.shape
  if k.shape[0] != B or k.shape[1] != T or k.shape[3] != E:
    raise ValueError(f"k / v shape {k.shape} does not match q shape {q.shape} in batch, seq or "
                     "head_dim")
  K = k.shape[2]
  if K == 0 or H % K != 0:
    raise ValueError(f"kv_heads ({K}, from k) must divide heads ({H}, from q)")
  return B, T, H, K, E


def check_layout(layout, *, num_heads: int, num_kv_heads: int, num_blocks: int,
                 name: str = "layout"):
  """ValueError unless layout is a boolean [L, nb, nb] array with L in {H, K, 1}."""
  shape = getattr(layout, "shape", None)
  if shape is None or len(shape) != 3:
    raise ValueError(f"{name} must be a [layout_heads, {num_blocks}, {num_blocks}] boolean "
                     f"array, got shape {shape}")
  if shape[0] not in (num_heads, num_kv_heads, 1) or shape[1:] != (num_blocks, num_blocks):
    raise ValueError(f"{name} has shape {tuple(shape)}; expected (L, {num_blocks}, {num_blocks}) "
                     f"with L in heads={num_heads}, kv_heads={num_kv_heads} or 1")
  if not (layout.dtype == np.bool_ or jnp.issubdtype(layout.dtype, jnp.integer)):
    raise ValueError(f"{name} must be boolean, got dtype {layout.dtype}")


def default_interpret() -> bool:
  """Interpret mode unless the default backend is a GPU."""
  return jax.default_backend() != "gpu"


def block_sparse_attention(q, k, v, layout, *, block_size: int, causal: bool = True,
                           sm_scale: float | None = None, return_lse: bool = False,
                           tiles: BlockSparseTiles | None = None, interpret: bool | None = None,
                           debug: bool = False):
  """Block-sparse multi-head attention with grouped K/V heads.

  Args:
    q: [B, T, H, E] queries.
    k: [B, T, K, E] keys, K dividing H (head h reads K/V head h // (H // K)).
    v: [B, T, K, E] values.
    layout: bool [L, n, n], n = ceil(T / block_size), L in {H, K, 1}: query block i of the heads
      mapped to l attends key block j iff layout[l, i, j]. Numpy (or an unjitted jax array) is
      compressed once at trace time; a traced layout is compressed on device.
    block_size: block edge in tokens, a power of two >= 16.
    causal: also mask keys after the query (the diagonal block is masked inside).
    sm_scale: logit scale, default 1 / sqrt(E).
    return_lse: also return the natural-log log-sum-exp per row (differentiable).
    tiles: launch parameters (warps, stages).
    interpret: Pallas interpret mode; default: on unless the backend is a GPU.
  Returns:
    o [B, T, H, E] in q's dtype (zeros on rows that attend no key), and with return_lse also
    lse [B, T, H] float32 (-inf on such rows).
  Raises:
    ValueError: on bad shapes, dtypes, block size or layout, before any tracing.
  """
  B, T, H, K, E = check_qkv(q, k, v)
  block_size = layouts.check_block_size(block_size)
  n = -(-T // block_size)
  check_layout(layout, num_heads=H, num_kv_heads=K, num_blocks=n)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(E)
  if layouts.is_concrete(layout):
    layout = np.asarray(layout)
  by_q, by_k = layouts.layout_block_lists(layout, causal=causal, num_blocks=n,
                                          padded=T % block_size != 0)
  cfg = _Config(block_size=block_size, causal=bool(causal), sm_scale=float(sm_scale), seq_len=T,
                num_heads=H, num_kv_heads=K, layout_heads=int(layout.shape[0]),
                tiles=tiles or BlockSparseTiles(),
                interpret=default_interpret() if interpret is None else bool(interpret),
                debug=debug)
  index = tuple(jnp.asarray(a, jnp.int32) for a in by_q.arrays() + by_k.arrays())
  o, lse = _attention_padded(cfg, q, k, v, index)
  return (o, lse) if return_lse else o


# -------------------------------------------------------------------------------- reference


def block_sparse_attention_reference(q, k, v, layout, *, block_size: int, causal: bool = True,
                                     sm_scale: float | None = None, return_lse: bool = False):
  """Dense float32 attention with the layout expanded to a token mask (same args as above).

  Returns o [B, T, H, E] float32 (and lse [B, T, H]); empty rows give 0 and -inf.
  """
  B, T, H, K, E = check_qkv(q, k, v)
  n = -(-T // block_size)
  check_layout(layout, num_heads=H, num_kv_heads=K, num_blocks=n)
  sm_scale = 1.0 / math.sqrt(E) if sm_scale is None else sm_scale
  layout = layouts.expand_layout(layout, H, K)
  mask = layouts.token_mask(layout, block_size=block_size, seq_len=T, causal=causal)  # [H,T,T]
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  k = jnp.repeat(k, H // K, axis=2)
  v = jnp.repeat(v, H // K, axis=2)
  s = jnp.einsum("bqhe,bkhe->bhqk", q, k, precision=lax.Precision.HIGHEST) * sm_scale
  s = jnp.where(mask[None], s, -jnp.inf)
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask[None], jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bhqk,bkhe->bqhe", p / jnp.where(l == 0, 1.0, l), v,
                 precision=lax.Precision.HIGHEST)
  if not return_lse:
    return o
  lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))[..., 0]
  return o, jnp.swapaxes(lse, 1, 2)
