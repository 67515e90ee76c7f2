"""The attention seam: named attention functions the decoder picks per layer by configuration.

An attention function maps q [B, T, H, E], k and v [B, S, K, E] (K divides H, grouped-query) to
[B, T, H, E]. With causal=True query t sits at absolute position S - T + t. Later systems (the
Pallas block-sparse kernel, S2-Attention) register their own with `register_attention`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}
_FACTORIES: dict[str, Callable[..., AttentionFn]] = {}
# Implementations living in other packages, imported on first use (they register themselves).
PLUGINS: dict[str, str] = {"s2": "s2attn.attention"}


def register_attention(name: str, fn: AttentionFn) -> AttentionFn:
  """Makes `fn(q, k, v, *, causal=True)` selectable as attn_impl=name."""
  _REGISTRY[name] = fn
  return fn


def register_attention_factory(name: str, factory: Callable[..., AttentionFn]) -> None:
  """Makes `factory(**options)` selectable as attn_impl='name:key=value,key=value' (e.g. a
  sparse pattern's parameters); the options are ints, floats, booleans or strings."""
  _REGISTRY.pop(name, None)
  _FACTORIES[name] = factory


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


def known_attention() -> list[str]:
  """Names an attention spec may start with."""
  return sorted(set(_REGISTRY) | set(_FACTORIES) | set(PLUGINS))


@functools.cache
def get_attention(spec: str) -> AttentionFn:
  """Looks up an attention function by name or 'name:options'; 'auto' is cuDNN on GPU (XLA for
  float32) and the jnp reference elsewhere. An unknown name is a ValueError listing the known
  ones."""
  name, opts = parse_attention_spec(spec)
  if name in PLUGINS and name not in _FACTORIES and name not in _REGISTRY:
    importlib.import_module(PLUGINS[name])
  if name in _FACTORIES:
    return _FACTORIES[name](**opts)
  if name not in _REGISTRY:
    raise ValueError(f"unknown attention implementation {spec!r}; known: "
                     f"{known_attention()}")
  if opts:
    raise ValueError(f"attention implementation {name!r} takes no options, got {spec!r}")
  return _REGISTRY[name]


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
  """cuDNN flash attention on GPU for 16-bit inputs, XLA's attention on GPU for others (cuDNN
  takes only fp16/bf16/fp8), the jnp reference on CPU. Chosen at trace time."""
  if jax.default_backend() != "gpu":
    return reference_attention(q, k, v, causal=causal, scale=scale)
  impl = "cudnn" if q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
  return _REGISTRY[impl](q, k, v, causal=causal, scale=scale)


register_attention("reference", reference_attention)
register_attention("xla", _dpa("xla"))
register_attention("cudnn", _dpa("cudnn"))
register_attention("auto", auto_attention)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                     *, scale: float | None = None, mask: jax.Array | None = None) -> jax.Array:
  """One new query per sequence against a cache, reading keys s < lengths[b].

  Args:
    q: [B, H, E] the new token's queries.
    k_cache, v_cache: [B, K, S, E].
    lengths: [B] int, number of valid cache entries (the new token's already written).
    mask: optional bool [B, H, S]; True = head may read the entry (sparse patterns).
  Returns:
    [B, H, E] in q.dtype.
  """
  b, h, e = q.shape
  kh, s = k_cache.shape[1], k_cache.shape[2]
  scale = e ** -0.5 if scale is None else scale
  qg = q.reshape(b, kh, h // kh, e)
  # Scores in the cache dtype with float32 accumulation: the cache is read once, not upcast.
  logits = jnp.einsum("bkge,bkse->bkgs", qg.astype(k_cache.dtype), k_cache,
                      preferred_element_type=jnp.float32) * scale
  valid = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
  allowed = valid[:, None, None, :]
  if mask is not None:
    allowed = allowed & mask.reshape(b, kh, h // kh, s)
  logits = jnp.where(allowed, logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  p = jnp.where(allowed, p, 0.0)  # a row with nothing allowed gives zeros, not NaN
  out = jnp.einsum("bkgs,bkse->bkge", p.astype(v_cache.dtype), v_cache,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, h, e).astype(q.dtype)
