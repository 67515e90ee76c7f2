"""Decoding S2 models with the per-head compressed cache (kvcache.s2_cache).

Prefill runs the model's own cached forward (each layer's configured attention, so S2 layers use
the S2 pattern) into a dense cache the length of the prompt, then `compress` keeps what each KV
head can still read. Every decode step writes the token into its slot, evicts what left the
window, and attends the kept slots under each head's pattern. `full=True` plans give the
mask-based full-cache reference, which must decode the same tokens.

    plans = plan_layers(model.cfg, max_len=4096)
    tokens = s2_generate(model, prompts, max_new_tokens=32, plans=plans)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvcache.cache import init_cache
from kvcache.decode import prefill
from kvcache.s2_cache import (
  LayerPlan,
  S2Cache,
  attend,
  compress,
  init_s2_cache,
  plan_layers,
  write_token,
)
from kvcache.sampling import SamplingConfig, sample

Plans = tuple[LayerPlan, ...]


def _check(model, plans: Plans) -> None:
  cfg = model.cfg
  if len(plans) != cfg.n_layers:
    raise ValueError(f"{len(plans)} layer plans for n_layers={cfg.n_layers}")


def _qkv(attn, x: jax.Array, positions: jax.Array, num_chains: int):
  """q [B, T, H, E], k and v [B, T, K, E] (after RoPE) of a layer's attention.

  Reaches into colm's Attention._qkv (whose trailing arguments have changed: CoLM-Air added
  kv_chains); a public per-layer q/k/v hook in colm would make this one call.
  """
  nargs = len(inspect.signature(attn._qkv).parameters)
  return attn._qkv(x, positions, *([num_chains] * (nargs - 2)))


def _step(model, token: jax.Array, cache: S2Cache, plans: Plans):
  """One token per sequence through every layer against the compressed cache."""
  nc = model.cfg.num_chains  # S2 decoding runs the full model (all chains)
  t = cache.lengths
  b = token.shape[0]
  positions = t[:, None]
  x = model.embed_tokens(token[:, None], nc)
  ks, vs, ps = [], [], []
  for layer, plan, k, v, pos in zip(model.layers, plans, cache.k, cache.v, cache.pos):
    q, kk, vv = _qkv(layer.attn, layer.attn_norm(x, nc), positions, nc)  # [B, 1, H|K, E]
    k, v, pos = write_token(plan, k, v, pos, kk[:, 0], vv[:, 0], t)
    out = attend(plan, q[:, 0], k, v, pos, t)  # [B, H, E]
    x = x + layer.attn.o(out.reshape(b, 1, -1), nc)
    x = x + layer.ffn(layer.ffn_norm(x, nc), nc)
    ks.append(k)
    vs.append(v)
    ps.append(pos)
  return model.logits(x, nc)[:, 0], S2Cache(tuple(ks), tuple(vs), tuple(ps), t + 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "plans"), donate_argnames=("cache",))
def s2_decode_step(graphdef: nnx.GraphDef, params: nnx.State, token: jax.Array, cache: S2Cache,
                   plans: Plans) -> tuple[jax.Array, S2Cache]:
  """Appends one token per sequence. token [B] int -> logits [B, V] float32 and the cache."""
  return _step(nnx.merge(graphdef, params), token, cache, plans)


@functools.partial(jax.jit, static_argnames=("plans",), donate_argnames=("cache",))
def _compress(kv, plans, cache):
  return compress(kv, plans, cache=cache)


def s2_prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array,
               plans: Plans) -> tuple[jax.Array, S2Cache]:
  """Runs right-padded prompts [B, T] (lengths [B]) and returns logits [B, T, V] and the
  compressed cache. The dense cache of the prompt exists only during this call."""
  model = nnx.merge(graphdef, params)
  _check(model, plans)
  cfg = model.cfg
  b, t = tokens.shape
  if t > plans[0].max_len:
    raise ValueError(f"prompt length {t} exceeds the plans' max_len {plans[0].max_len}")
  dense = init_cache(cfg, b, t)
  logits, dense = prefill(graphdef, params, tokens, lengths, dense)
  cache = init_s2_cache(plans, b, cfg.head_dim, cfg.dtype)
  return logits, _compress(dense, plans, cache)


@functools.partial(jax.jit, donate_argnames=("cache",),
                   static_argnames=("graphdef", "plans", "max_new_tokens", "sampling"))
def s2_decode_loop(graphdef: nnx.GraphDef, params: nnx.State, first: jax.Array, cache: S2Cache,
                   key: jax.Array, *, plans: Plans, max_new_tokens: int,
                   sampling: SamplingConfig):
  """max_new_tokens tokens in one compiled loop (first included). Returns tokens [B, n] int32,
  the final cache and per-step logits [B, n - 1, V] of the tokens after `first`."""
  model = nnx.merge(graphdef, params)

  def body(i, s):
    tok, cache, out, logits_out, key = s
    key, sub = jax.random.split(key)
    logits, cache = _step(model, tok, cache, plans)
    nxt = sample(logits, sub, sampling)
    return nxt, cache, out.at[:, i].set(nxt), logits_out.at[:, i - 1].set(logits), key

  b = first.shape[0]
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  logits_out = jnp.zeros((b, max_new_tokens - 1, model.cfg.vocab_size), jnp.float32)
  _, cache, out, logits_out, _ = jax.lax.fori_loop(1, max_new_tokens, body,
                                                   (first, cache, out, logits_out, key))
  return out, cache, logits_out


def s2_generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                plans: Plans | None = None, max_len: int | None = None,
                sampling: SamplingConfig | None = None, seed: int = 0,
                return_all: bool = False):
  """Greedy (or sampled) continuation of prompts with the S2 compressed cache.

  Args:
    model: a Decoder whose layer specs hold the S2 patterns.
    prompts: non-empty token lists.
    max_new_tokens: new tokens per prompt (no stop tokens: every row runs to the end).
    plans: per-layer plans (default plan_layers(model.cfg, max_len)).
    max_len: cache length when plans is None (default cfg.max_seq_len).
    sampling: greedy by default.
    return_all: also return the final cache and the decode-step logits.
  Returns:
    int array [B, max_new_tokens] (and with return_all, (tokens, cache, logits)).
  """
  sampling = sampling or SamplingConfig()
  plans = plans or plan_layers(model.cfg, max_len)
  _check(model, plans)
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) < 1 or longest + max_new_tokens > plans[0].max_len:
    raise ValueError(f"prompts must be non-empty and fit max_len={plans[0].max_len} with "
                     f"max_new_tokens={max_new_tokens}")
  tokens = np.zeros((len(prompts), longest), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  graphdef, params = nnx.split(model)
  logits, cache = s2_prefill(graphdef, params, jnp.asarray(tokens), lengths, plans)
  key0, key = jax.random.split(jax.random.key(seed))
  first = sample(logits[jnp.arange(len(prompts)), lengths - 1], key0, sampling)
  out, cache, step_logits = s2_decode_loop(graphdef, params, first, cache, key, plans=plans,
                                           max_new_tokens=max_new_tokens, sampling=sampling)
  return (out, cache, step_logits) if return_all else out
