"""S2 attention as a decoder attention function, registered as attn_impl='s2:key=value,...'.

    ModelConfig(attn_impl="s2:vert_stride=8,local_blocks=8,block_size=64")
    ModelConfig(layer_attn=("s2:vert_stride=16,local_blocks=4", "auto", ...))   # hybrid stack

Options are S2Pattern's fields plus `per_kv_head` (one pattern per KV head, shared by its query
group: the decode cache then keeps 1 / vert_stride per KV head) and `impl`:
'kernel' (Pallas block-sparse flash attention, compiled on GPU), 'interpret' (the same kernel in
Pallas interpret mode: exact but slow on CPU), 'reference' (dense jnp attention under the
token mask) or 'auto' (kernel on GPU, reference elsewhere: the fast CPU path for tests).

Axes: B batch, T queries, S keys, H query heads, K KV heads, E head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from colm.attention import AttentionImpl, reference_attention, register_attention_factory
from s2attn.pattern import S2Pattern

IMPLS = ("auto", "kernel", "interpret", "reference")
DEFAULTS = dict(block_size=64, local_blocks=8, vert_stride=8)


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "kernel" if jax.default_backend() == "gpu" else "reference"
  return impl


def s2_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, pattern: S2Pattern,
                 per_kv_head: bool = False, impl: str = "auto", causal: bool = True,
                 scale: float | None = None) -> jax.Array:
  """Causal attention in which head h reads only its S2 blocks.

  Args:
    q: [B, T, H, E]; k, v: [B, S, K, E], K dividing H. Query t sits at position S - T + t.
    pattern: the S2 pattern; any length works (the kernels pad the last block).
    per_kv_head: patterns per KV head (repeated over each query group) instead of per head.
    impl: 'auto', 'kernel', 'interpret' or 'reference' (see the module docstring).
    causal: must be True (the pattern is causal by construction).
    scale: logit scale, default 1 / sqrt(E).
  Returns:
    [B, T, H, E] in q.dtype.
  """
  if not causal:
    raise ValueError("S2 attention is causal by construction; got causal=False")
  h, kh = q.shape[2], k.shape[2]
  t, s = q.shape[1], k.shape[1]
  nkv = kh if per_kv_head else None
  impl = resolve_impl(impl)
  if impl != "reference" and t == s:
    from pallas_kernels import block_sparse_attention
    layout = pattern.layout(h, s, nkv)
    if per_kv_head:  # one layout row per KV head: the kernels map h -> h // G themselves
      layout = np.ascontiguousarray(layout[:: h // kh])
    return block_sparse_attention(q, k, v, layout, block_size=pattern.block_size, causal=True,
                                  sm_scale=scale, interpret=impl == "interpret")
  if pattern.require_coverage:
    pattern.check_coverage(h, nkv)
  mask = pattern.token_mask(h, np.arange(s - t, s), np.arange(s), nkv)  # [H, T, S] numpy
  return reference_attention(q, k, v, causal=True, mask=jnp.asarray(mask)[None], scale=scale)


@dataclasses.dataclass(frozen=True)
class S2Options:
  """A parsed 's2:...' spec: the pattern plus how it is run."""

  pattern: S2Pattern
  per_kv_head: bool = False
  impl: str = "auto"


def parse_options(**options) -> S2Options:
  """Keyword options of an 's2:' spec -> S2Options; unknown keys are a ValueError naming them."""
  fields = {f.name for f in dataclasses.fields(S2Pattern)}
  unknown = sorted(set(options) - fields - {"per_kv_head", "impl"})
  if unknown:
    raise ValueError(f"s2 attention: unknown option(s) {unknown}; known: "
                     f"{sorted(fields | {'per_kv_head', 'impl'})}")
  pat = {**DEFAULTS, **{k: v for k, v in options.items() if k in fields}}
  impl = str(options.get("impl", "auto"))
  resolve_impl(impl)
  return S2Options(S2Pattern(**pat), bool(options.get("per_kv_head", False)), impl)


def s2_options_from_spec(spec: str) -> S2Options | None:
  """The S2Options of an attention spec, or None when the spec is not 's2:...'."""
  from colm.attention import parse_attention_spec
  name, opts = parse_attention_spec(spec)
  return parse_options(**opts) if name == "s2" else None


def s2_token_mask(q_pos: jax.Array, k_pos: jax.Array, *, pattern: S2Pattern, per_kv_head: bool,
                  kv_heads: tuple[int, int], num_heads: int, num_kv_heads: int) -> jax.Array:
  """bool [B, Kc, G, T, N]: query head h (of KV heads kv_heads = (first, stop)) at position
  q_pos [B, T] may read the cached token at k_pos [B, Kc, N] under its S2 pattern (the cache
  adds causality and emptiness). The decode-attention seam applies it."""
  g = num_heads // num_kv_heads
  h0, h1 = kv_heads
  nkv = num_kv_heads if per_kv_head else None
  off = pattern.head_offsets(num_heads, nkv)[h0 * g:h1 * g].reshape(1, h1 - h0, g, 1, 1)
  dense = pattern.dense_heads(num_heads, nkv)[h0 * g:h1 * g].reshape(1, h1 - h0, g, 1, 1)
  kb = (jnp.maximum(k_pos, 0) // pattern.block_size)[:, :, None, None, :]
  qb = (q_pos // pattern.block_size)[:, None, None, :, None]
  local = qb - kb < pattern.local_blocks
  vertical = (kb + jnp.asarray(off)) % pattern.vert_stride == 0
  return local | vertical | jnp.asarray(dense)


def make_s2_attention(**options) -> AttentionImpl:
  """The factory behind attn_impl='s2:...': options as in the module docstring. Returns the
  attention function and its decode-time token mask."""
  o = parse_options(**options)
  fn = functools.partial(s2_attention, pattern=o.pattern, per_kv_head=o.per_kv_head, impl=o.impl)
  fn.__name__ = "s2_attention"  # type: ignore[attr-defined]
  mask = functools.partial(s2_token_mask, pattern=o.pattern, per_kv_head=o.per_kv_head)
  return AttentionImpl(fn, mask)


register_attention_factory("s2", make_s2_attention)
