"""Jit prefill (onto an empty or a filled cache), decode step, the one decode loop, generate.

The model enters as (graphdef, params) from `nnx.split`, so each function is pure and compiled
once per static shape; the cache is donated and comes back updated. Every cache (dense, with
per-layer / per-head budgets, S2's, a compressed one) goes through these functions; compression
methods plug in through a `Compression` hook (kvcache.compression).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from colm.config import resolve_dtype
from kvcache.cache import KVCache, free_slots, init_cache, truncate
from kvcache.compression import Compression
from kvcache.sampling import SamplingConfig, sample


def compute_weights(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.State:
  """params with every float matrix (>= 2-D: kernels, embeddings, heads) in the model's compute
  dtype; vectors (norm scales, biases) as they are.

  The model casts each matrix to the compute dtype where it uses it, so the result is the same;
  but inside a compiled decode loop XLA repeats those casts at every step (on an H200, a quarter
  of a small model's decode step). Generation casts once, before its loop.
  """
  dt = jnp.dtype(resolve_dtype(nnx.merge(graphdef, params).cfg.dtype))
  return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating)
                      and x.ndim >= 2 and x.dtype != dt else x, params)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_chains", "fresh", "score_window"),
                   donate_argnames=("cache",))
def _prefill(graphdef, params, tokens, lengths, start, cache, num_chains, fresh, score_window):
  model = nnx.merge(graphdef, params)
  b, t = tokens.shape
  cache = truncate(cache, start)
  positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  valid = jnp.arange(t)[None] < lengths[:, None]
  window = None
  if score_window:  # the last score_window prompt tokens of each sequence
    window = jnp.maximum(lengths[:, None] - score_window + jnp.arange(score_window)[None], 0)
  logits, layers, scores = model.forward_cached(
      tokens, positions, cache.layers, num_chains, fresh=fresh, valid=valid,
      score_window=score_window, window_index=window)
  return logits, KVCache(layers, (start + lengths).astype(jnp.int32)), scores


@jax.jit
def _room(cache: KVCache, start: jax.Array) -> jax.Array:
  return free_slots(truncate(cache, start))


def prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array,
            cache: KVCache, num_chains: int | None = None, *, start=None,
            score_window: int = 0):
  """Runs prompt chunks onto the cache: token t of sequence b goes to position start[b] + t.

  Prefill onto an empty cache (start 0 everywhere) runs each layer's attention function over the
  chunk; onto a filled cache, the chunk's queries attend the stored slots and the chunk itself
  (causal by stored positions), so a long prompt in chunks equals the prompt in one piece.

  Args:
    tokens: [B, T] int chunks, right-padded (entries past lengths[b] are ignored).
    lengths: [B] int valid tokens per chunk, 0 <= lengths[b] <= T.
    cache: the cache (donated).
    start: [B] int first position of each chunk (default the cache's lengths: append). Slots at
      or past start are emptied first (rewind); start beyond the tokens seen is an error.
    score_window: also return, per layer and head group, the probabilities [B, Kg, G, W, N] of
      the last W prompt tokens over the cache (what SnapKV-style policies score with).
  Returns:
    logits [B, T, V] float32 and the cache (lengths = start + lengths), plus the scores when
    score_window > 0.
  """
  tokens, lens, start, fresh = _check_prefill(tokens, lengths, cache, start)
  if score_window < 0 or score_window > tokens.shape[1]:
    raise ValueError(f"score_window must be in 0..{tokens.shape[1]}, got {score_window}")
  logits, cache, scores = _prefill(graphdef, params, tokens, jnp.asarray(lens, jnp.int32),
                                   jnp.asarray(start, jnp.int32), cache, num_chains, fresh,
                                   int(score_window))
  return (logits, cache, scores) if score_window else (logits, cache)


def _check_prefill(tokens, lengths, cache: KVCache, start):
  """Validates a prefill on the host (one device read of the lengths and the free slots):
  returns (tokens, lengths, start as numpy, whether the cache is empty from start on)."""
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an int [batch, length] array, got {tokens.dtype} "
                     f"{tokens.shape}")
  b, t = tokens.shape
  lens = np.asarray(lengths)
  if lens.shape != (b,) or lens.min() < 0 or lens.max() > t:
    raise ValueError(f"lengths must be [{b}] ints in 0..{t}, got {lens.tolist()}")
  seen = np.asarray(cache.lengths)
  st = seen if start is None else np.broadcast_to(np.asarray(start), (b,))
  for i in range(b):
    if st[i] < 0 or st[i] > seen[i]:
      raise ValueError(f"start position {int(st[i])} of sequence {i} is outside the cache, "
                       f"which holds positions 0..{int(seen[i]) - 1}")
  room = np.asarray(_room(cache, jnp.asarray(st, jnp.int32)))
  for i in range(b):
    if lens[i] > room[i]:
      raise ValueError(f"a prompt of {int(lens[i])} tokens does not fit the {int(room[i])} free "
                       f"slots of sequence {i} (budgets {min(min(x) for x in cache.budgets())}"
                       f"..{cache.max_len})")
  return tokens, lens, st, bool((st == 0).all())


def prefill_chunked(graphdef: nnx.GraphDef, params: nnx.State, tokens, lengths, cache: KVCache,
                    chunk: int, num_chains: int | None = None):
  """Prefill of right-padded prompts [B, T] in chunks of `chunk` tokens (the first onto the
  given cache's end, each next onto the last). The whole prompt is checked once, so the chunks
  run back to back with no host sync between them. Returns the logits [B, T, V] and the cache."""
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  tokens, lens, start, fresh = _check_prefill(tokens, lengths, cache, None)
  out = []
  for c0 in range(0, tokens.shape[1], chunk):
    n = np.clip(lens - c0, 0, chunk)
    at = start + np.minimum(c0, lens)  # a finished sequence stays where it ended
    logits, cache, _ = _prefill(graphdef, params, tokens[:, c0:c0 + chunk],
                                jnp.asarray(n, jnp.int32), jnp.asarray(at, jnp.int32),
                                cache, num_chains, fresh and c0 == 0, 0)
    out.append(logits)
  return jnp.concatenate(out, axis=1), cache


def _step(model, token, cache: KVCache, num_chains, return_probs: bool = False):
  positions = cache.lengths[:, None]
  logits, layers, scores = model.forward_cached(token[:, None], positions, cache.layers,
                                                num_chains, return_probs=return_probs)
  return logits[:, 0], KVCache(layers, cache.lengths + 1), scores


@functools.partial(jax.jit, static_argnames=("graphdef", "num_chains"), donate_argnames=("cache",))
def decode_step(graphdef: nnx.GraphDef, params: nnx.State, token: jax.Array, cache: KVCache,
                num_chains: int | None = None) -> tuple[jax.Array, KVCache]:
  """Appends one token per sequence. token: [B] int -> logits [B, V] float32, cache (+1 each)."""
  logits, cache, _ = _step(nnx.merge(graphdef, params), token, cache, num_chains)
  return logits, cache


@functools.partial(jax.jit, static_argnames=("policy",))
def apply_policy(policy, cache: KVCache, scores=None) -> KVCache:
  """policy(cache, scores) compiled (not donated: a policy after prefill usually returns other
  shapes, so the buffers could not be reused; drop the input cache after the call)."""
  return policy(cache, scores)


@functools.partial(jax.jit, donate_argnames=("cache",), static_argnames=(
    "graphdef", "num_chains", "max_new_tokens", "sampling", "sync_every", "compression",
    "return_logits"))
def decode_loop(graphdef: nnx.GraphDef, params: nnx.State, first: jax.Array, cache: KVCache,
                key: jax.Array, stop_tokens: jax.Array, *, max_new_tokens: int,
                sampling: SamplingConfig, num_chains: int | None = None, sync_every: int = 16,
                compression: Compression | None = None, return_logits: bool = False):
  """Decodes up to max_new_tokens in one compiled loop, stopping when every row is done.

  The stop test runs once per `sync_every` steps: an XLA while loop copies its predicate to
  the host each iteration, which stalls the GPU until the host has launched the next step, so
  the body runs a fixed-trip-count chunk of steps instead. Steps past max_new_tokens (at most
  sync_every - 1) write nothing to the output; their cache writes land past every live entry.

  Args:
    first: [B] the first generated token (sampled from the prefill logits).
    stop_tokens: [N] int token ids that end a sequence (N may be 0).
    compression: its policy runs after every `compression.every` steps (when every > 0), with
      the step's probabilities when it asks for them.
    return_logits: also return the logits [B, max_new_tokens - 1, V] of each step.
  Returns:
    tokens [B, max_new_tokens] int32 (first included; -1 after a row stopped), the number of
    decode steps run plus one, the cache, and with return_logits the logits.
  """
  model = nnx.merge(graphdef, compute_weights(graphdef, params))  # cast once, not every step
  b = first.shape[0]
  out = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
  logits_out = jnp.zeros((b, max(0, max_new_tokens - 1), model.cfg.vocab_size)
                         if return_logits else (0,), jnp.float32)
  done = jnp.isin(first, stop_tokens)
  chunk = max(1, min(sync_every, max_new_tokens - 1))
  every = compression.every if compression is not None else 0
  want_probs = bool(every and compression.decode_scores)
  policy = None if not every else (compression.decode_policy or compression.policy)

  def cond(s):
    i, _, _, done, _, _, _ = s
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(_, s):
    i, tok, cache, done, out, logits_out, key = s
    key, sub = jax.random.split(key)
    logits, cache, scores = _step(model, tok, cache, num_chains, want_probs)
    if every == 1:
      cache = policy(cache, scores if want_probs else None)
    elif every:
      cache = jax.lax.cond(i % every == 0, lambda c: policy(c, scores if want_probs else None),
                           lambda c: c, cache)
    nxt = sample(logits, sub, sampling)
    nxt = jnp.where(done, -1, nxt)
    out = out.at[:, i].set(nxt, mode="drop")  # i >= max_new_tokens: dropped
    if return_logits:
      logits_out = logits_out.at[:, i - 1].set(logits, mode="drop")
    done = done | jnp.isin(nxt, stop_tokens)
    return i + 1, nxt, cache, done, out, logits_out, key

  i, _, cache, _, out, logits_out, _ = jax.lax.while_loop(
      cond, lambda s: jax.lax.fori_loop(0, chunk, step, s),
      (jnp.int32(1), first, cache, done, out, logits_out, key))
  return (out, i, cache, logits_out) if return_logits else (out, i, cache)


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: SamplingConfig | None = None, seed: int = 0,
             stop_tokens: Sequence[int] = (), num_chains: int | None = None,
             max_len: int | None = None, pad_to: int = 64, budgets=None,
             compression: Compression | None = None, decode_attn: str = "auto",
             suffixes: Sequence[Sequence[int]] | None = None, return_info: bool = False):
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
    budgets: per-layer / per-KV-head slot budgets of the cache (see init_cache).
    compression: a policy applied after prefill (and every `compression.every` steps).
    decode_attn: the cache's decode attention ('auto', 'reference', 'pallas').
    suffixes: query-agnostic compression: per prompt, tokens (each list non-empty) prefilled onto
      the cache after the compression policy ran on the prompt alone (the question asked after
      the context was compressed); generation continues from their last token. The compressed
      cache needs room for them (a press's `room`).
    return_info: also return {'cache': the final cache, 'logits': float32 [B, n, V] the logits
      each generated token was drawn from}.
  Returns:
    the new tokens of each prompt, cut after the first stop token (and the info dict).
  """
  sampling = sampling or SamplingConfig()
  cfg = model.cfg
  max_len = cfg.max_seq_len if max_len is None else max_len
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt, and every prompt needs >= 1 token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  longest = max(len(p) for p in prompts)
  if suffixes is not None and (len(suffixes) != len(prompts) or any(len(x) == 0 for x in suffixes)):
    raise ValueError(f"suffixes must hold one non-empty token list per prompt ({len(prompts)}), "
                     f"got {len(suffixes)} lists")
  extra = 0 if suffixes is None else max(len(x) for x in suffixes)
  prompt_only = compression is not None and compression.prefill_room
  if longest + extra + (0 if prompt_only else max_new_tokens) > max_len:
    raise ValueError(f"prompt of {longest} tokens (+ {extra} suffix tokens) + max_new_tokens="
                     f"{max_new_tokens} exceeds the cache length {max_len}")
  t = min(max_len, -(-longest // pad_to) * pad_to)
  tokens = np.zeros((len(prompts), t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  graphdef, params = nnx.split(model)
  if prompt_only:
    cache = init_cache(cfg, len(prompts), t, decode_attn=decode_attn)
  else:
    cache = init_cache(cfg, len(prompts), max_len, budgets=budgets, decode_attn=decode_attn)
    smallest = min(min(x) for x in cache.budgets())
    if compression is None and longest + extra + max_new_tokens > smallest:
      raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                       f"the smallest budget {smallest} (pass a compression policy to evict)")
  # A window longer than the (padded) prompt scores every prompt query.
  window = min(compression.window, t) if compression is not None else 0
  res = prefill(graphdef, params, tokens, lengths, cache, num_chains, score_window=window)
  logits, cache = res[:2]
  if compression is not None:
    cache = apply_policy(compression.policy, cache, res[2] if window else None)
  if suffixes is not None:  # the question, prefilled onto the compressed cache
    ts = -(-extra // 16) * 16
    tokens = np.zeros((len(prompts), ts), np.int32)
    for i, x in enumerate(suffixes):
      tokens[i, : len(x)] = x
    lengths = np.asarray([len(x) for x in suffixes], np.int32)
    logits, cache = prefill(graphdef, params, tokens, lengths, cache, num_chains)
  key0, key = jax.random.split(jax.random.key(seed))
  last = logits[jnp.arange(len(prompts)), lengths - 1]
  first = sample(last, key0, sampling)
  loop_comp = compression if compression is not None and compression.every else None
  res = decode_loop(graphdef, params, first, cache, key, jnp.asarray(list(stop_tokens), jnp.int32),
                    max_new_tokens=max_new_tokens, sampling=sampling, num_chains=num_chains,
                    compression=loop_comp, return_logits=return_info)
  out = res[0]
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
  if not return_info:
    return result
  step_logits = np.concatenate([np.asarray(last)[:, None], np.asarray(res[3])], axis=1)
  return result, {"cache": res[2], "logits": step_logits}
