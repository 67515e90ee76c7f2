"""The attention seam: named attention functions the decoder picks per layer by configuration.

An attention function maps q [B, T, H, E], k and v [B, S, K, E] (K divides H, grouped-query) to
[B, T, H, E]. With causal=True query t sits at absolute position S - T + t. Later systems (the
Pallas block-sparse kernel, S2-Attention) register their own with `register_attention` (or a
factory for 'name:options' specs); a sparse method also registers the token mask its heads apply
to cached entries when decoding. Packages outside colm are found through the entry-point group
`effllm.attention` (setup.cfg), so colm names none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
# token_mask(q_pos [B, T], k_pos [B, Kc, N], kv_heads=(first, stop), num_heads, num_kv_heads)
#   -> bool [B, Kc, G, T, N]: which cached entries each query head may read beyond causality
#   (entries with 0 <= k_pos <= q_pos); Kc = stop - first KV heads of the cache's head group.
TokenMaskFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
  """A registered attention implementation.

  Attributes:
    fn: training / prefill attention `fn(q, k, v, *, causal=True, scale=None)`.
    token_mask: the pattern a sparse method imposes on cached entries at decode time (None =
      every causal entry); the KV cache applies it through its decode-attention seam.
  """

  fn: AttentionFn
  token_mask: TokenMaskFn | None = None


_REGISTRY: dict[str, AttentionImpl] = {}
_FACTORIES: dict[str, Callable[..., AttentionImpl | AttentionFn]] = {}
# Packages outside colm add implementations through this entry-point group (setup.cfg), so the
# model package names none of them.
ENTRY_POINT_GROUP = "effllm.attention"


def register_attention(name: str, fn: AttentionFn, token_mask: TokenMaskFn | None = None
                       ) -> AttentionFn:
  """Makes `fn(q, k, v, *, causal=True)` selectable as attn_impl=name."""
  _REGISTRY[name] = AttentionImpl(fn, token_mask)
  get_attention_impl.cache_clear()
  return fn


def register_attention_factory(name: str,
                               factory: Callable[..., AttentionImpl | AttentionFn]) -> None:
  """Makes `factory(**options)` selectable as attn_impl='name:key=value,key=value' (e.g. a
  sparse pattern's parameters); the options are ints, floats, booleans or strings. The factory
  returns an AttentionImpl (function and decode-time token mask) or a bare function."""
  _REGISTRY.pop(name, None)
  _FACTORIES[name] = factory
  get_attention_impl.cache_clear()


def parse_attention_spec(spec: str) -> tuple[str, dict[str, object]]:
  """'s2:vert_stride=8,local_blocks=4' -> ('s2', {'vert_stride': 8, 'local_blocks': 4})."""
  name, _, rest = spec.partition(":")
  opts: dict[str, object] = {}
  for item in filter(None, rest.split(",")):
    key, eq, val = item.partition("=")
    if not eq or not key.strip():
      raise ValueError(f"attention spec {spec!r}: option {item!r} is not key=value")
    val = val.strip()
    for conv in (int, float):
      try:
        opts[key.strip()] = conv(val)
        break
      except ValueError:
        continue
    else:
      opts[key.strip()] = {"true": True, "false": False}.get(val.lower(), val)
  return name.strip(), opts


@functools.cache
def _plugins() -> dict[str, object]:
  """Entry points of ENTRY_POINT_GROUP by name (installed packages that register attention)."""
  try:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
  except Exception:  # noqa: BLE001 - broken metadata must not break the built-in names
    return {}


def known_attention() -> list[str]:
  """Names an attention spec may start with."""
  return sorted(set(_REGISTRY) | set(_FACTORIES) | set(_plugins()))


@functools.cache
def get_attention_impl(spec: str) -> AttentionImpl:
  """Looks up an implementation by name or 'name:options'; 'auto' is cuDNN on GPU (XLA for
  float32) and the jnp reference elsewhere. An unknown name is a ValueError listing the known
  ones."""
  name, opts = parse_attention_spec(spec)
  if name not in _FACTORIES and name not in _REGISTRY and name in _plugins():
    _plugins()[name].load()  # importing the module registers it
  if name in _FACTORIES:
    made = _FACTORIES[name](**opts)
    return made if isinstance(made, AttentionImpl) else AttentionImpl(made)
  if name not in _REGISTRY:
    raise ValueError(f"unknown attention implementation {spec!r}; known: "
                     f"{known_attention()}")
  if opts:
    raise ValueError(f"attention implementation {name!r} takes no options, got {spec!r}")
  return _REGISTRY[name]


def get_attention(spec: str) -> AttentionFn:
  """The training / prefill attention function of a spec (see get_attention_impl)."""
  return get_attention_impl(spec).fn


def _group(q: jax.Array, num_kv: int) -> jax.Array:
  """[B, T, H, E] -> [B, T, K, G, E]."""
  b, t, h, e = q.shape
  return q.reshape(b, t, num_kv, h // num_kv, e)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                        mask: jax.Array | None = None, scale: float | None = None) -> jax.Array:
  """Plain softmax attention in float32.

  Args:
    q: [B, T, H, E]; k, v: [B, S, K, E].
    causal: query t attends keys s <= S - T + t.
    mask: optional boolean [B or 1, H or 1, T, S]; True = attend.
  Returns:
    [B, T, H, E] in q.dtype. A row that attends nothing is zero.
  """
  b, t, h, e = q.shape
  s, kh = k.shape[1], k.shape[2]
  scale = e ** -0.5 if scale is None else scale
  qg = _group(q, kh).astype(jnp.float32)
  logits = jnp.einsum("btkge,bske->bkgts", qg, k.astype(jnp.float32)) * scale
  allowed = jnp.ones((1, 1, 1, t, s), bool)
  if causal:
    allowed = allowed & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))
  if mask is not None:
    m = jnp.broadcast_to(mask, (mask.shape[0], h, t, s)).reshape(mask.shape[0], kh, h // kh, t, s)
    allowed = allowed & m
  logits = jnp.where(allowed, logits, -jnp.inf)
  mx = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(mx), mx, 0.0))
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  out = jnp.einsum("bkgts,bske->btkge", p, v.astype(jnp.float32))
  return out.reshape(b, t, h, e).astype(q.dtype)


def _dpa(implementation: str | None) -> AttentionFn:
  def fn(q, k, v, *, causal: bool = True, scale: float | None = None):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                        implementation=implementation)
  fn.__name__ = f"dot_product_attention_{implementation}"
  return fn


def auto_attention(q, k, v, *, causal: bool = True, scale: float | None = None) -> jax.Array:
  """cuDNN flash attention on GPU for 16-bit inputs of even lengths, XLA's attention on GPU for
  others (cuDNN takes only fp16/bf16/fp8, and its causal training path rejects an odd query or
  key length), the jnp reference on CPU. Chosen at trace time."""
  if jax.default_backend() != "gpu":
    return reference_attention(q, k, v, causal=causal, scale=scale)
  even = q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0
  impl = "cudnn" if q.dtype in (jnp.bfloat16, jnp.float16) and even else "xla"
  return _REGISTRY[impl].fn(q, k, v, causal=causal, scale=scale)


register_attention("reference", reference_attention)
register_attention("xla", _dpa("xla"))
register_attention("cudnn", _dpa("cudnn"))
register_attention("auto", auto_attention)
