"""Model configuration: one frozen dataclass with presets, chain splits derived from it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str) -> Any:
  """Maps a dtype name ('float32', 'bfloat16', 'float16') to the jnp dtype; ValueError otherwise."""
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def split_by_chains(total: int, chains: tuple[int, ...], what: str) -> tuple[int, ...]:
  """Splits `total` units over chains in proportion to their widths c_i.

  Chain i gets total * c_i / sum(c); a ValueError names `what` when that is not an integer.
  """
  s = sum(chains)
  parts = []
  for c in chains:
    if (total * c) % s:
      raise ValueError(
          f"{what}={total} cannot be split over chains={chains}: {total}*{c}/{s} is not an integer"
      )
    parts.append(total * c // s)
  return tuple(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
  """A LLaMA-style decoder built from chain-aware layers. chains=(1,) is the plain Transformer."""

  vocab_size: int = 4096  # tokens in the embedding and LM head
  d_model: int = 256  # hidden size D = sum_i D_i
  n_layers: int = 4  # decoder blocks
  n_heads: int = 8  # query heads (split over chains)
  n_kv_heads: int = 4  # key/value heads, grouped-query attention (split over chains)
  head_dim: int = 32  # per-head width
  ffn_dim: int = 704  # SwiGLU hidden width (split over chains)
  chains: tuple[int, ...] = (1,)  # relative chain widths c_i; (16, 16) or (8, 8, 8, 8) is CoLM
  tie_embeddings: bool = True  # LM head = embedding transposed
  rope_theta: float = 10000.0  # RoPE base
  rope_scaling: str = ""  # '' (none) or 'llama3' (Llama 3.1 frequency scaling, fields below)
  rope_factor: float = 8.0  # llama3: long wavelengths are divided by this
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_len / this are scaled
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_len / this are kept
  rope_original_len: int = 8192  # llama3: the context length the model was pre-trained with
  qkv_bias: bool = False  # a bias on the q, k, v projections (Qwen2); off = LLaMA, no parameter
  norm_eps: float = 1e-6  # RMSNorm epsilon
  max_seq_len: int = 256  # longest context the model is trained / decoded with
  attn_impl: str = "auto"  # 'reference' (jnp), 'xla', 'cudnn', 'auto' (GPU: cudnn, else reference)
  layer_attn: tuple[str, ...] = ()  # per-layer attention specs (hybrid stacks); () = attn_impl
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"  # parameter storage dtype
  init_std: float = 0.02  # normal init of all weights
  air: bool = False  # CoLM-Air: every layer's K and V come from chain 1's states only
  separate_heads: bool = False  # one LM head per scale (needs untied embeddings), not row slices

  def __post_init__(self):
    object.__setattr__(self, "chains", tuple(int(c) for c in self.chains))
    if not self.chains or any(c <= 0 for c in self.chains):
      raise ValueError(f"chains must be a non-empty tuple of positive integers, got {self.chains}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "ffn_dim", "max_seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.rope_scaling not in ("", "llama3"):
      raise ValueError(f"rope_scaling must be '' or 'llama3', got {self.rope_scaling!r}")
    if self.rope_scaling and not (self.rope_factor > 0 and
                                  0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
      raise ValueError(f"rope_scaling=llama3 needs rope_factor > 0 and 0 < rope_low_freq_factor "
                       f"< rope_high_freq_factor, got {self.rope_factor}, "
                       f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}")
    object.__setattr__(self, "layer_attn", tuple(str(a) for a in self.layer_attn))
    if self.layer_attn and len(self.layer_attn) != self.n_layers:
      raise ValueError(f"layer_attn has {len(self.layer_attn)} entries for n_layers="
                       f"{self.n_layers}")
    from colm.attention import known_attention, parse_attention_spec
    specs = [("attn_impl", self.attn_impl)] + [("layer_attn", a) for a in self.layer_attn]
    for field, spec in specs:
      if parse_attention_spec(spec)[0] not in known_attention():
        raise ValueError(f"{field}: unknown attention implementation {spec!r}; known: "
                         f"{known_attention()}")
    for name in ("dtype", "param_dtype"):
      try:
        resolve_dtype(getattr(self, name))
      except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if self.separate_heads and self.tie_embeddings:
      raise ValueError("separate_heads=True needs tie_embeddings=False: a tied head is the "
                       "embedding, shared by every scale")
    # Derived splits raise a ValueError naming the field when a chain split is not integral.
    self.chain_dims, self.chain_heads, self.chain_kv_heads, self.chain_ffn  # noqa: B018
    for i, (h, kv) in enumerate(zip(self.chain_heads, self.chain_kv_heads)):
      if h // kv != self.n_heads // self.n_kv_heads or h % kv:
        raise ValueError(f"chain {i}: {h} query heads and {kv} KV heads break the GQA grouping")

  @property
  def rope_args(self) -> dict[str, Any]:
    """Keyword arguments of colm.layers.rope for this model."""
    if not self.rope_scaling:
      return {"theta": self.rope_theta}
    return {"theta": self.rope_theta, "scaling": (self.rope_factor, self.rope_low_freq_factor,
                                                  self.rope_high_freq_factor,
                                                  self.rope_original_len)}

  @property
  def num_chains(self) -> int:
    return len(self.chains)

  @property
  def chain_dims(self) -> tuple[int, ...]:
    """D_i, the hidden width of each chain."""
    return split_by_chains(self.d_model, self.chains, "d_model")

  @property
  def chain_heads(self) -> tuple[int, ...]:
    return split_by_chains(self.n_heads, self.chains, "n_heads")

  @property
  def chain_kv_heads(self) -> tuple[int, ...]:
    return split_by_chains(self.n_kv_heads, self.chains, "n_kv_heads")

  @property
  def chain_ffn(self) -> tuple[int, ...]:
    return split_by_chains(self.ffn_dim, self.chains, "ffn_dim")

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  def _layer_matmul_params(self, k: int, kv_chains: int | None = None) -> int:
    """Weights of one layer's matmuls in the k-chain sub-model (norms left out); kv_chains: the
    chains whose K / V projections run (default k; a CoLM-Air chain-1 prefill writes every
    chain's K / V from chain 1's states)."""
    def chain_linear(ins, outs):
      return sum(sum(ins[: i + 1]) * outs[i] for i in range(k))

    d = self.chain_dims
    q = tuple(h * self.head_dim for h in self.chain_heads)
    kv = tuple(h * self.head_dim for h in self.chain_kv_heads)
    f = self.chain_ffn
    kc = k if kv_chains is None else kv_chains
    # Air: K and V of every chain are dense projections of chain 1 (D_1 inputs each).
    kv_params = (2 * d[0] * sum(kv[:kc]) if self.air else
                 2 * sum(sum(d[: i + 1]) * kv[i] for i in range(kc)))
    return (chain_linear(d, q) + kv_params + chain_linear(q, d) + 2 * chain_linear(d, f)
            + chain_linear(f, d))

  def num_params(self, num_chains: int | None = None) -> int:
    """Parameter count of the k-chain sub-model (all chains by default), embedding included once."""
    k = self.num_chains if num_chains is None else num_chains
    d = self.chain_dims
    per_layer = self._layer_matmul_params(k) + 2 * sum(d[:k])
    n = self.n_layers * per_layer + sum(d[:k]) + self.vocab_size * sum(d[:k])
    if self.separate_heads:  # head j maps the first j chains: D_<=j x V
      n += self.vocab_size * sum(sum(d[: j + 1]) for j in range(k))
    elif not self.tie_embeddings:
      n += self.vocab_size * sum(d[:k])
    return n

  def flops_per_token(self, seq_len: int, num_chains: int | None = None) -> float:
    """Training FLOPs per token: 6N (the tied head counts as a matmul, lookups don't) plus causal
    attention 6 * layers * heads * head_dim * seq_len (PaLM's MFU count, halved for causality)."""
    k = self.num_chains if num_chains is None else num_chains
    attn = 6 * self.n_layers * sum(self.chain_heads[:k]) * self.head_dim * seq_len
    return 6 * self.num_params(k) + attn

  def prefill_flops(self, seq_len: int, num_chains: int | None = None,
                    kv_chains: int | None = None) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of a forward pass of the k-chain sub-model over a causal
    prompt of seq_len tokens, the LM head left out (a prefill applies it to one token).

    Matmuls: 2 FLOPs per weight per token; kv_chains as in _layer_matmul_params (a CoLM-Air
    chain-1 prefill: num_chains=1, kv_chains=all). Attention: Q K^T and P V of each of the k
    chains' query heads over the seq_len^2 / 2 causal pairs, 2 * 2 * head_dim FLOPs a pair.
    """
    k = self.num_chains if num_chains is None else num_chains
    matmul = 2.0 * self.n_layers * self._layer_matmul_params(k, kv_chains) * seq_len
    attn = 2.0 * self.n_layers * sum(self.chain_heads[:k]) * self.head_dim * seq_len ** 2
    return matmul, attn

  # Presets --------------------------------------------------------------------------------------

  @classmethod
  def tiny(cls, **kw) -> ModelConfig:
    """For tests: small odd dims so wrong axes show up in shapes."""
    base = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                ffn_dim=80, max_seq_len=64, attn_impl="reference")
    return cls(**{**base, **kw})

  @classmethod
  def small(cls, **kw) -> ModelConfig:
    """A few million parameters: the CPU quick start."""
    base = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
                ffn_dim=704, max_seq_len=256)
    return cls(**{**base, **kw})

  @classmethod
  def base(cls, **kw) -> ModelConfig:
    """About 125M parameters, for the GPU."""
    base = dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64,
                ffn_dim=3072, max_seq_len=1024, dtype="bfloat16")
    return cls(**{**base, **kw})

  @classmethod
  def large(cls, **kw) -> ModelConfig:
    """About 1B parameters: the decode-roofline configuration."""
    base = dict(vocab_size=32768, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                head_dim=64, ffn_dim=5632, max_seq_len=2048, dtype="bfloat16")
    return cls(**{**base, **kw})

  @classmethod
  def preset(cls, name: str, **kw) -> ModelConfig:
    presets = {"tiny": cls.tiny, "small": cls.small, "base": cls.base, "large": cls.large}
    if name not in presets:
      raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
    return presets[name](**kw)
