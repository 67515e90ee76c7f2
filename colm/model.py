"""The chain-aware LLaMA-style decoder (Flax NNX). chains=(1,) is the standard Transformer.

Axis letters: B batch, T query length, S cache length, D hidden, H query heads, K KV heads,
E head dim, F FFN width, V vocab. A k-chain forward uses the first k chains of every layer:
hidden width sum(D_1..D_k), the heads and KV heads those chains own, and the head rows of that
scale. Chain i never reads chains > i, so the k-chain logits are those of the nested sub-model.
CoLM-Air (cfg.air): the K/V projections of every chain read chain 1 only, so with a cache every
chain's KV heads are written at any scale (LM switching); cfg.separate_heads gives each scale its
own LM head. The method's losses and transformations are in colm/colm.py.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from colm.attention import get_attention, get_attention_impl
from colm.config import ModelConfig, resolve_dtype
from colm.layers import ChainLinear, ChainRMSNorm, cumsum, fused_chain_linear, rope
from colm.mesh import constrain

# A layer's KV cache: any object with the methods kvcache.cache.LayerCache has (update, attend);
# the model only calls them, so colm imports no cache package.
LayerKV = Any


class Attention(nnx.Module):
  """Grouped-query attention where chain i owns its share of the query and KV heads."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, attn_impl: str | None = None):
    pd = resolve_dtype(cfg.param_dtype)
    e = cfg.head_dim
    self.cfg = cfg
    self.attn_impl = attn_impl or cfg.attn_impl
    q_dims = tuple(h * e for h in cfg.chain_heads)
    kv_dims = tuple(h * e for h in cfg.chain_kv_heads)
    kw = dict(rngs=rngs, init_std=cfg.init_std, param_dtype=pd)
    # CoLM-Air: the K/V kernels of every chain read chain 1 only (input chains (D_1, 0, 0, ...)),
    # so kernels[i] is [D_1, K_i * E] and chain 1's states determine the whole KV cache.
    kv_in = (cfg.chain_dims[0],) + (0,) * (cfg.num_chains - 1) if cfg.air else cfg.chain_dims
    self.q = ChainLinear(cfg.chain_dims, q_dims, **kw)
    self.k = ChainLinear(kv_in, kv_dims, **kw)
    self.v = ChainLinear(kv_in, kv_dims, **kw)
    self.o = ChainLinear(q_dims, cfg.chain_dims, **kw)
    # Qwen2: biases on q, k, v ([H*E], [K*E], [K*E]); a k-chain forward adds their first
    # entries, the chains' heads being a prefix of the outputs. None without cfg.qkv_bias.
    bias = (lambda n: nnx.Param(jnp.zeros((n,), pd))) if cfg.qkv_bias else (lambda n: None)
    self.q_bias, self.k_bias, self.v_bias = bias(sum(q_dims)), bias(sum(kv_dims)), \
        bias(sum(kv_dims))

  def _air_kv(self, x, m):
    """Air: K|V of the first m chains' KV heads as one dense matmul of x[..., :D_1]."""
    dt = x.dtype
    w = jnp.concatenate([l.kernels[i][...].astype(dt) for l in (self.k, self.v)
                         for i in range(m)], axis=1)  # [D_1, 2 * sum(K_<=m) * E]
    kk, vv = jnp.split(jnp.dot(x[..., : self.cfg.chain_dims[0]], w), 2, axis=-1)
    return kk, vv

  def _qkv(self, x, positions, k, kv_chains):
    cfg, dt = self.cfg, x.dtype
    b, t = x.shape[:2]
    h, kh = sum(cfg.chain_heads[:k]), sum(cfg.chain_kv_heads[:kv_chains])
    if cfg.air:
      q = self.q(x, k, dt)
      kk, vv = self._air_kv(x, kv_chains)
    else:
      q, kk, vv = fused_chain_linear([self.q, self.k, self.v], x, k, dt)
    if cfg.qkv_bias:
      q, kk, vv = (y + b[...][: y.shape[-1]].astype(dt)
                   for y, b in ((q, self.q_bias), (kk, self.k_bias), (vv, self.v_bias)))
    q = q.reshape(b, t, h, cfg.head_dim)
    kk, vv = kk.reshape(b, t, kh, cfg.head_dim), vv.reshape(b, t, kh, cfg.head_dim)
    # Tensor parallel: each device holds its heads (q, k, v are column-parallel).
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    kk, vv = (constrain(x, ("batch", "seq", "kv_heads", "head_dim")) for x in (kk, vv))
    return rope(q, positions, **cfg.rope_args), rope(kk, positions, **cfg.rope_args), vv

  def __call__(self, x: jax.Array, positions: jax.Array, num_chains: int,
               kv: LayerKV | None = None, *, fresh: bool = False, valid: jax.Array | None = None,
               score_window: int = 0, window_index: jax.Array | None = None,
               return_probs: bool = False) -> tuple[jax.Array, LayerKV | None, Any]:
    """Causal self-attention over the block x [B, T, D_k] at positions [B, T].

    Without a cache, the configured attention function runs over the block. With one, the new
    K/V (of the valid tokens) are written through kv.update and the queries attend through
    kv.attend: over the stored slots by their stored positions (decode and prefill onto a filled
    cache), or, with fresh=True (the cache holds nothing else), over the block itself with the
    configured attention function. Returns (out, the updated cache, scores asked for or None).
    """
    b, t = x.shape[:2]
    # Air fills every chain's KV heads from chain 1 even at scale k < n (LM switching: any scale
    # then decodes from the same cache); plain CoLM computes the k chains' heads only.
    kv_chains = self.cfg.num_chains if (self.cfg.air and kv is not None) else num_chains
    q, kk, vv = self._qkv(x, positions, num_chains, kv_chains)
    kh = sum(self.cfg.chain_kv_heads[:num_chains])  # the KV heads scale k attends
    impl = get_attention_impl(self.attn_impl)
    scores = None
    if kv is None:
      out = impl.fn(q, kk[:, :, :kh], vv[:, :, :kh], causal=True)
    else:
      kv = kv.update(kk, vv, positions, valid)
      # A sparse attention function says which cached keys its heads may read (S2: the head's
      # blocks); the cache's decode-attention seam applies it.
      mask = None if impl.token_mask is None else functools.partial(
          impl.token_mask, num_heads=self.cfg.n_heads, num_kv_heads=self.cfg.n_kv_heads)
      out, scores = kv.attend(
          q, positions, token_mask=mask,
          fresh=(kk[:, :, :kh], vv[:, :, :kh], impl.fn) if fresh else None,
          score_window=score_window, window_index=window_index, return_probs=return_probs)
    return self.o(out.reshape(b, t, -1), num_chains), kv, scores


class FeedForward(nnx.Module):
  """Chained SwiGLU: down(silu(gate(x)) * up(x)) with every projection a ChainLinear."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, init_std=cfg.init_std, param_dtype=resolve_dtype(cfg.param_dtype))
    self.gate = ChainLinear(cfg.chain_dims, cfg.chain_ffn, **kw)
    self.up = ChainLinear(cfg.chain_dims, cfg.chain_ffn, **kw)
    self.down = ChainLinear(cfg.chain_ffn, cfg.chain_dims, **kw)

  def __call__(self, x: jax.Array, num_chains: int) -> jax.Array:
    """x: [B, T, D_k] -> [B, T, D_k]."""
    gate, up = fused_chain_linear([self.gate, self.up], x, num_chains)
    h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "ffn"))  # column-parallel halves
    return self.down(h, num_chains)


class Block(nnx.Module):
  """Pre-norm decoder block with per-chain RMSNorms."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, attn_impl: str | None = None):
    pd = resolve_dtype(cfg.param_dtype)
    self.attn_norm = ChainRMSNorm(cfg.chain_dims, eps=cfg.norm_eps, param_dtype=pd)
    self.attn = Attention(cfg, rngs=rngs, attn_impl=attn_impl)
    self.ffn_norm = ChainRMSNorm(cfg.chain_dims, eps=cfg.norm_eps, param_dtype=pd)
    self.ffn = FeedForward(cfg, rngs=rngs)

  def __call__(self, x, positions, num_chains, kv=None, **cache_kw):
    """x [B, T, D_k] -> (x, the layer's updated cache, scores); cache_kw as Attention's."""
    a, kv, scores = self.attn(self.attn_norm(x, num_chains), positions, num_chains, kv, **cache_kw)
    x = constrain(x + a, ("batch", "seq", "hidden"))  # the row-parallel o's all-reduce
    x = x + self.ffn(self.ffn_norm(x, num_chains), num_chains)
    return constrain(x, ("batch", "seq", "hidden")), kv, scores


class Decoder(nnx.Module):
  """Decoder-only LM. `model(tokens, num_chains=k)` runs the k-chain sub-model.

  Args:
    cfg: the model configuration.
    rngs: parameter initialisation keys.
    attn_impls: optional attention implementation per layer (hybrid stacks); default
      cfg.layer_attn, else cfg.attn_impl everywhere.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               attn_impls: tuple[str, ...] | None = None):
    attn_impls = attn_impls or cfg.layer_attn or None
    if attn_impls is not None and len(attn_impls) != cfg.n_layers:
      raise ValueError(f"attn_impls has {len(attn_impls)} entries for {cfg.n_layers} layers")
    for spec in attn_impls or (cfg.attn_impl,):
      get_attention(spec)  # an unknown implementation fails here, not at the first call
    pd = resolve_dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed = nnx.Param(
        nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.vocab_size, cfg.d_model), pd))
    self.layers = nnx.List([
        Block(cfg, rngs=rngs, attn_impl=None if attn_impls is None else attn_impls[i])
        for i in range(cfg.n_layers)
    ])
    self.final_norm = ChainRMSNorm(cfg.chain_dims, eps=cfg.norm_eps, param_dtype=pd)
    init = nnx.initializers.normal(cfg.init_std)
    self.head = None if cfg.tie_embeddings or cfg.separate_heads else nnx.Param(
        init(rngs.params(), (cfg.d_model, cfg.vocab_size), pd))
    # separate_heads: head j maps the first j chains, [D_<=j, V]; otherwise scale j slices rows.
    self.heads = nnx.List([nnx.Param(init(rngs.params(), (w, cfg.vocab_size), pd))
                           for w in cumsum(cfg.chain_dims)]) if cfg.separate_heads else None

  def _chains(self, num_chains: int | None) -> int:
    n = self.cfg.num_chains
    k = n if num_chains is None else int(num_chains)
    if not 1 <= k <= n:
      raise ValueError(f"num_chains={num_chains} must be in 1..{n}")
    return k

  def embed_tokens(self, tokens: jax.Array, num_chains: int) -> jax.Array:
    """[B, T] int -> [B, T, D_k] in the compute dtype (scale k uses the first sum D_i columns)."""
    width = cumsum(self.cfg.chain_dims)[num_chains - 1]
    x = self.embed[...][:, :width].astype(resolve_dtype(self.cfg.dtype))[tokens]
    return constrain(x, ("batch", "seq", "hidden"))

  def logits(self, h: jax.Array, num_chains: int, dtype=jnp.float32) -> jax.Array:
    """Final per-chain norm and the LM head of scale k. h: [..., D_k] -> [..., V] in dtype.

    Training asks for the compute dtype (bf16 logits halve the largest activation's traffic;
    the loss upcasts inside its reduction); decoding gets float32.
    """
    width = h.shape[-1]
    h = self.final_norm(h, num_chains)
    if self.heads is not None:
      w = self.heads[num_chains - 1][...]
    else:
      w = self.embed[...][:, :width].T if self.head is None else self.head[...][:width]
    if jnp.dtype(dtype) == h.dtype:
      # Same-dtype dot: its gradient GEMMs stay in h.dtype. With a float32 result type the
      # cotangent is float32 and both gradient GEMMs of this [tokens x vocab] product ran as
      # tf32 (profiled on H100: ~10 ms of a 94 ms step, plus ~8 ms of converts).
      out = jnp.dot(h, w.astype(h.dtype))
    else:
      out = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32).astype(dtype)
    return constrain(out, ("batch", "seq", "vocab")) if out.ndim == 3 else out

  def hidden(self, tokens: jax.Array, *, num_chains: int | None = None,
             positions: jax.Array | None = None) -> jax.Array:
    """Final hidden states before the norm: [B, T] -> [B, T, D_k]."""
    k = self._chains(num_chains)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embed_tokens(tokens, k)
    for layer in self.layers:
      x, _, _ = layer(x, positions, k)
    return x

  def __call__(self, tokens: jax.Array, *, num_chains: int | None = None,
               positions: jax.Array | None = None, logits_dtype=jnp.float32) -> jax.Array:
    """Full causal forward. tokens [B, T] int -> logits [B, T, V] (float32 by default)."""
    k = self._chains(num_chains)
    return self.logits(self.hidden(tokens, num_chains=k, positions=positions), k, logits_dtype)

  def forward_cached(self, tokens: jax.Array, positions: jax.Array, kv: tuple[LayerKV, ...],
                     num_chains: int | None = None, **cache_kw
                     ) -> tuple[jax.Array, tuple[LayerKV, ...], tuple]:
    """The forward against per-layer caches: prefill, prefill onto a filled cache, or decode.

    Args:
      tokens: [B, T] int.
      positions: [B, T] int absolute positions of the tokens.
      kv: one layer cache per layer (kvcache.cache.LayerCache).
      cache_kw: fresh, valid, score_window, window_index, return_probs (see Attention).
    Returns:
      logits [B, T, V] float32, the updated layer caches, and per layer the scores asked for.
    """
    k = self._chains(num_chains)
    x, new, scores = self.hidden_cached(tokens, positions, kv, k, **cache_kw)
    return self.logits(x, k), new, scores

  def hidden_cached(self, tokens: jax.Array, positions: jax.Array, kv: tuple[LayerKV, ...],
                    num_chains: int | None = None, **cache_kw
                    ) -> tuple[jax.Array, tuple[LayerKV, ...], tuple]:
    """forward_cached without the LM head: final hidden states [B, T, D_k], caches, scores."""
    k = self._chains(num_chains)
    x = self.embed_tokens(tokens, k)
    new, scores = [], []
    for layer, layer_kv in zip(self.layers, kv):
      x, layer_kv, sc = layer(x, positions, k, layer_kv, **cache_kw)
      new.append(layer_kv)
      scores.append(sc)
    return x, tuple(new), tuple(scores)
