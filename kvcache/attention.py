"""The decode-attention seam: attention of new queries over cache slots, by stored position.

Axes: B batch, K KV heads of one head group, G query heads per KV head, T queries, N slots,
E head dim.

A slot is valid for a query at position p when it holds a token (pos >= 0) at or before p
(pos <= p), and the optional per-head mask allows it. Registered decode-attention functions
serve one new query per sequence:

    fn(q [B, K, G, E], k [B, K, N, E], v, pos [B, K, N], q_pos [B], mask [B, K, G, N] | None,
       *, scale, return_probs) -> (out [B, K, G, E], lse [B, K, G] float32, probs | None)

'reference' is plain jnp (the CPU default, and the only one that returns probabilities, what
SnapKV-style scorers read); 'pallas' is pallas_kernels' cache decode kernel (each program serves
all G query heads of a KV head, validity from stored positions); 'auto' picks the kernel on GPU
when it applies. `slot_attention` is the same contract for T queries at once (prefill onto a
filled cache, observation windows), computed in key blocks so a long cache never materialises a
[T, N] score matrix per head.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

DecodeAttentionFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array | None]]
_DECODE: dict[str, DecodeAttentionFn] = {}
_BLOCK_ELEMENTS = 1 << 27  # score elements per key block of slot_attention (512 MB in float32)


def register_decode_attention(name: str, fn: DecodeAttentionFn) -> DecodeAttentionFn:
  """Makes `fn` selectable as a cache's decode attention (`init_cache(..., decode_attn=name)`)."""
  _DECODE[name] = fn
  return fn


def get_decode_attention(name: str) -> DecodeAttentionFn:
  if name not in _DECODE:
    raise ValueError(f"unknown decode attention {name!r}; known: {sorted(_DECODE)}")
  return _DECODE[name]


def allowed_slots(pos: jax.Array, q_pos: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """bool [B, K, G or 1, T, N]: slot n holds a token at or before query t (and mask allows it).

  pos [B, K, N]; q_pos [B, T]; mask bool [B, K, G, T, N] or None.
  """
  ok = (pos[:, :, None, None, :] >= 0) & (pos[:, :, None, None, :] <= q_pos[:, None, None, :,
                                                                            None])
  return ok if mask is None else ok & mask


def _block(n: int, rows: int) -> int:
  """Key block of slot_attention: all N slots when small, else a divisor of N near the budget."""
  if n * rows <= _BLOCK_ELEMENTS:
    return n
  for nb in (8192, 4096, 2048, 1024, 512, 256, 128, 64, 32, 16):
    if n % nb == 0 and nb * rows <= _BLOCK_ELEMENTS:
      return nb
  return n


def slot_attention(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, q_pos: jax.Array,
                   mask: jax.Array | None = None, *, scale: float | None = None,
                   return_probs: bool = False):
  """Softmax attention of T queries over a head group's cache slots (float32 accumulation).

  Args:
    q: [B, K, G, T, E] queries (after RoPE).
    k, v: [B, K, N, E] slots; pos: [B, K, N] int32 stored positions (-1 = empty).
    q_pos: [B, T] int query positions.
    mask: optional bool [B, K, G, T, N] per-head permission.
    return_probs: also return the probabilities [B, K, G, T, N] float32 (zero where not
      allowed; each row with an allowed slot sums to one). Computed in one block.
  Returns:
    (out [B, K, G, T, E] in q.dtype, lse [B, K, G, T] float32 natural log-sum-exp of the scaled
    logits, -inf where nothing is allowed (out = 0 there), probs or None).
  """
  b, kh, g, t, e = q.shape
  n = k.shape[2]
  scale = e ** -0.5 if scale is None else scale
  qs = q.astype(k.dtype)
  nb = n if return_probs else _block(n, b * kh * g * t)

  def part(k_blk, v_blk, pos_blk, mask_blk):
    # Scores in the cache dtype with float32 accumulation: the cache is read once, not upcast.
    s = jnp.einsum("bkgte,bkne->bkgtn", qs, k_blk, preferred_element_type=jnp.float32) * scale
    ok = allowed_slots(pos_blk, q_pos, mask_blk)
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(ok, jnp.exp(s - m_safe[..., None]), 0.0)
    o = jnp.einsum("bkgtn,bkne->bkgte", p.astype(v_blk.dtype), v_blk,
                   preferred_element_type=jnp.float32)
    return o, m, jnp.sum(p, axis=-1), p

  if nb == n:
    o, m, l, p = part(k, v, pos, mask)
  else:  # online softmax over key blocks (flash attention written in jnp)
    def body(carry, i):
      o_acc, m_acc, l_acc = carry
      sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, i * nb, nb, axis)
      ob, mb, lb, _ = part(sl(k, 2), sl(v, 2), sl(pos, 2), None if mask is None else sl(mask, 4))
      m_new = jnp.maximum(m_acc, mb)
      m_new_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      a = jnp.exp(jnp.where(jnp.isfinite(m_acc), m_acc, -jnp.inf) - m_new_safe)
      c = jnp.exp(jnp.where(jnp.isfinite(mb), mb, -jnp.inf) - m_new_safe)
      return (o_acc * a[..., None] + ob * c[..., None], m_new, l_acc * a + lb * c), None

    init = (jnp.zeros((b, kh, g, t, e), jnp.float32), jnp.full((b, kh, g, t), -jnp.inf),
            jnp.zeros((b, kh, g, t), jnp.float32))
    (o, m, l), _ = jax.lax.scan(body, init, jnp.arange(n // nb))
    p = None
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  out = (o / l_safe[..., None]).astype(q.dtype)
  lse = jnp.where(empty, -jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l_safe))
  probs = p / l_safe[..., None] if return_probs else None
  return out, lse, probs


def cache_attention(q, k, v, pos, q_pos, mask=None, *, scale=None):
  """slot_attention's (out, lse) for T queries (prefill onto a filled cache): pallas_kernels'
  prefill kernel on GPU when it applies (no mask, slots a multiple of 64, head dim a power of
  two >= 16), slot_attention otherwise. Chosen at trace time."""
  if jax.default_backend() == "gpu" and mask is None:
    from pallas_kernels.prefill import cache_prefill_attention, supports
    n = k.shape[2]
    # Slot blocks of 128 when they divide N (measured on an H200: 2.0 vs 2.35 ms for 4K queries
    # over 32K slots, E = 64).
    block_k = 128 if n % 128 == 0 else 64
    if supports(q.shape[3], n, k.shape[3], block_k=block_k):
      return cache_prefill_attention(q, k, v, pos, q_pos, sm_scale=scale, block_k=block_k)
  return slot_attention(q, k, v, pos, q_pos, mask, scale=scale)[:2]


def reference_decode_attention(q, k, v, pos, q_pos, mask=None, *, scale=None,
                               return_probs=False):
  """The jnp decode attention: slot_attention with one query per sequence."""
  out, lse, probs = slot_attention(q[:, :, :, None], k, v, pos, q_pos[:, None],
                                   None if mask is None else mask[:, :, :, None],
                                   scale=scale, return_probs=return_probs)
  return out[:, :, :, 0], lse[..., 0], None if probs is None else probs[:, :, :, 0]


def pallas_decode_attention(q, k, v, pos, q_pos, mask=None, *, scale=None, return_probs=False):
  """pallas_kernels' cache decode kernel (compiled on GPU, interpret mode elsewhere)."""
  if return_probs:
    raise ValueError("the Pallas decode kernel returns output and log-sum-exp, not "
                     "probabilities; use decode_attn='reference' for scores")
  from pallas_kernels.decode import cache_decode_attention
  out, lse = cache_decode_attention(q, k, v, pos, q_pos, mask, sm_scale=scale)
  return out, lse, None


def auto_decode_attention(q, k, v, pos, q_pos, mask=None, *, scale=None, return_probs=False):
  """The kernel on GPU when it applies (slots a multiple of 16, head dim a power of two >= 16,
  no probabilities asked), the jnp reference otherwise. Chosen at trace time."""
  if jax.default_backend() == "gpu" and not return_probs:
    from pallas_kernels.decode import supports
    if supports(k.shape[2], k.shape[3]):
      return pallas_decode_attention(q, k, v, pos, q_pos, mask, scale=scale)
  return reference_decode_attention(q, k, v, pos, q_pos, mask, scale=scale,
                                    return_probs=return_probs)


register_decode_attention("reference", reference_decode_attention)
register_decode_attention("pallas", pallas_decode_attention)
register_decode_attention("auto", auto_decode_attention)
