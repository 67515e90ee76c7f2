"""CoLM-Air inference: chain-1 prefill and LM switching on one shared KV cache.

In CoLM-Air (ModelConfig.air) the keys and values of every layer are projections of chain 1's
states x_1 (for the KV heads of every chain), and x_1 never reads chains > 1. So

  * the chain-1 sub-model run over a prompt fills the cache of every chain: `air_prefill` runs
    chain 1 over the prompt (no LM head) and then only the last prompt token through the k-chain
    model, which is all the first generated token needs (prefill acceleration, paper Sec. 4);
  * the cache does not depend on the scale that wrote it: any scale k can decode the next token
    from it (LM switching), with `kvcache.decode_step(..., num_chains=k)`.

`prefill_last` is the same contract computed by the k-chain model over the whole prompt: the
baseline of the prefill speed-up, and the identity the tests check (equal caches and logits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from kvcache.cache import KVCache
from kvcache.decode import _step


def _positions(tokens):
  b, t = tokens.shape
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_chains"), donate_argnames=("cache",))
def air_prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array,
                cache: KVCache, num_chains: int | None = None) -> tuple[jax.Array, KVCache]:
  """Chain-1 prefill of a CoLM-Air model.

  Args:
    tokens: [B, T] int prompts, right-padded.
    lengths: [B] int prompt lengths, 1 <= lengths[b] <= T.
    cache: an empty cache with room for T tokens (donated).
    num_chains: the scale k whose logits the first new token is drawn from (all by default).
  Returns:
    logits [B, V] float32 of the next token at scale k, and the cache of every chain holding
    lengths[b] entries: equal to what the full model's prefill writes.
  """
  model = nnx.merge(graphdef, params)
  if not model.cfg.air:
    raise ValueError("air_prefill needs a CoLM-Air model (ModelConfig.air=True): without shared "
                     "K/V the higher chains' caches need their own states")
  lengths = lengths.astype(jnp.int32)
  # Chain 1 over positions 0..lengths-2 only: the KV heads of all chains come from x_1 (the
  # hidden output is unused, so XLA drops the last layer's attention output and FFN).
  valid = jnp.arange(tokens.shape[1])[None] < (lengths - 1)[:, None]
  _, layers, _ = model.hidden_cached(tokens, _positions(tokens), cache.layers, num_chains=1,
                                     fresh=True, valid=valid)
  # Then the k-chain model on the last prompt token, a decode step at position lengths-1.
  last = tokens[jnp.arange(tokens.shape[0]), lengths - 1]
  logits, cache, _ = _step(model, last, KVCache(layers, lengths - 1), num_chains)
  return logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "num_chains"), donate_argnames=("cache",))
def prefill_last(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array,
                 cache: KVCache, num_chains: int | None = None) -> tuple[jax.Array, KVCache]:
  """The full-model prefill with air_prefill's contract: the k-chain model over the whole prompt,
  the LM head at the last prompt token only. Returns logits [B, V] float32 and the cache."""
  model = nnx.merge(graphdef, params)
  b, t = tokens.shape
  lengths = lengths.astype(jnp.int32)
  valid = jnp.arange(t)[None] < lengths[:, None]
  h, layers, _ = model.hidden_cached(tokens, _positions(tokens), cache.layers, num_chains,
                                     fresh=True, valid=valid)
  scale = model.cfg.num_chains if num_chains is None else num_chains
  logits = model.logits(h[jnp.arange(b), lengths - 1], scale)
  return logits, KVCache(layers, lengths)
