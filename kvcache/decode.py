"""Jit prefill, decode step and batched generation over the KV cache pytree.

The model enters as (graphdef, params) from `nnx.split`, so each function is pure and compiled
once per static shape; the cache is donated and comes back updated.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvcache.cache import KVCache, init_cache
from kvcache.sampling import SamplingConfig, sample


def _layers(cache: KVCache):
  return tuple(zip(cache.k, cache.v))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_chains"), donate_argnames=("cache",))
def prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array,
            cache: KVCache, num_chains: int | None = None) -> tuple[jax.Array, KVCache]:
  """Runs the prompts and fills the cache from position 0.

  Args:
    tokens: [B, T] int prompts, right-padded (entries past lengths[b] are ignored).
    lengths: [B] int prompt lengths, 1 <= lengths[b] <= T.
    cache: an empty cache with max_len >= T (donated).
  Returns:
    logits [B, T, V] float32 and the cache holding lengths[b] entries per sequence.
  """
  model = nnx.merge(graphdef, params)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, kv = model.forward_cached(tokens, positions, _layers(cache), num_chains)
  k, v = zip(*kv)
  return logits, KVCache(k=tuple(k), v=tuple(v), lengths=lengths.astype(jnp.int32))


def _step(model, token, cache, num_chains):
  positions = cache.lengths[:, None]
  logits, kv = model.forward_cached(token[:, None], positions, _layers(cache), num_chains)
  k, v = zip(*kv)
  return logits[:, 0], KVCache(k=tuple(k), v=tuple(v), lengths=cache.lengths + 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_chains"), donate_argnames=("cache",))
def decode_step(graphdef: nnx.GraphDef, params: nnx.State, token: jax.Array, cache: KVCache,
                num_chains: int | None = None) -> tuple[jax.Array, KVCache]:
  """Appends one token per sequence. token: [B] int -> logits [B, V] float32, cache (+1 each)."""
  return _step(nnx.merge(graphdef, params), token, cache, num_chains)


@functools.partial(jax.jit, donate_argnames=("cache",), static_argnames=(
    "graphdef", "num_chains", "max_new_tokens", "sampling", "sync_every"))
def decode_loop(graphdef: nnx.GraphDef, params: nnx.State, first: jax.Array, cache: KVCache,
                key: jax.Array, stop_tokens: jax.Array, *, max_new_tokens: int,
                sampling: SamplingConfig, num_chains: int | None = None, sync_every: int = 16):
  """Decodes up to max_new_tokens in one compiled loop, stopping when every row is done.

  The stop test runs once per `sync_every` steps: an XLA while loop copies its predicate to
  the host each iteration, which stalls the GPU until the host has launched the next step, so
  the body runs a fixed-trip-count chunk of steps instead. Steps past max_new_tokens (at most
  sync_every - 1) write nothing to the output; their cache writes land past every live entry.

  Args:
    first: [B] the first generated token (sampled from the prefill logits).
    stop_tokens: [N] int token ids that end a sequence (N may be 0).
  Returns:
    tokens [B, max_new_tokens] int32 (first included; -1 after a row stopped), the number of
    decode steps run plus one, and the cache.
  """
  model = nnx.merge(graphdef, params)
  b = first.shape[0]
  out = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stop_tokens)
  chunk = max(1, min(sync_every, max_new_tokens - 1))

  def cond(s):
    i, _, _, done, _, _ = s
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(_, s):
    i, tok, cache, done, out, key = s
    key, sub = jax.random.split(key)
    logits, cache = _step(model, tok, cache, num_chains)
    nxt = sample(logits, sub, sampling)
    nxt = jnp.where(done, -1, nxt)
    out = out.at[:, i].set(nxt, mode="drop")  # i >= max_new_tokens: dropped
    done = done | jnp.isin(nxt, stop_tokens)
    return i + 1, nxt, cache, done, out, key

  i, _, cache, _, out, _ = jax.lax.while_loop(
      cond, lambda s: jax.lax.fori_loop(0, chunk, step, s),
      (jnp.int32(1), first, cache, done, out, key))
  return out, i, cache


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: SamplingConfig | None = None, seed: int = 0,
             stop_tokens: Sequence[int] = (), num_chains: int | None = None,
             max_len: int | None = None, pad_to: int = 64) -> list[list[int]]:
  """Generates continuations for a batch of prompts of different lengths.

  Args:
    model: a Decoder.
    prompts: token id lists (each non-empty).
    max_new_tokens: at most this many new tokens per prompt (stop tokens included in the output).
    sampling: greedy by default.
    seed: the sampling key.
    stop_tokens: a sequence ends after producing one of these.
    num_chains: run the k-chain sub-model (all chains by default).
    max_len: cache length; default model.cfg.max_seq_len.
    pad_to: prompts are right-padded to a multiple of this, so few shapes compile.
  Returns:
    the new tokens of each prompt, cut after the first stop token.
  """
  sampling = sampling or SamplingConfig()
  cfg = model.cfg
  max_len = cfg.max_seq_len if max_len is None else max_len
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt, and every prompt needs >= 1 token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > max_len:
    raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                     f"cache length {max_len}")
  t = min(max_len, -(-longest // pad_to) * pad_to)
  tokens = np.zeros((len(prompts), t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  graphdef, params = nnx.split(model)
  cache = init_cache(cfg, len(prompts), max_len)
  logits, cache = prefill(graphdef, params, jnp.asarray(tokens), lengths, cache, num_chains)
  key0, key = jax.random.split(jax.random.key(seed))
  last = logits[jnp.arange(len(prompts)), lengths - 1]
  first = sample(last, key0, sampling)
  out, _, _ = decode_loop(graphdef, params, first, cache, key,
                          jnp.asarray(list(stop_tokens), jnp.int32),
                          max_new_tokens=max_new_tokens, sampling=sampling, num_chains=num_chains)
  result = []
  stops = set(stop_tokens)
  for row in np.asarray(out).tolist():
    seq = []
    for tok in row:
      if tok < 0:
        break
      seq.append(tok)
      if tok in stops:
        break
    result.append(seq)
  return result
