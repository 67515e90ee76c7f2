"""The KV cache pytree: per layer K and V [B, K, S, E] and per-sequence lengths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from colm.config import ModelConfig, resolve_dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer, one tuple entry a layer (so per-layer sizes may differ).

  Attributes:
    k: per layer [B, K, S, E] keys after RoPE.
    v: per layer [B, K, S, E] values.
    lengths: [B] int32, valid entries of each sequence (positions 0 .. lengths-1).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[2]

  def nbytes(self) -> int:
    """Bytes held by the K and V buffers (what the cache really costs in memory)."""
    return sum(x.size * x.dtype.itemsize for x in self.k + self.v)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int | None = None,
               dtype: str | None = None) -> KVCache:
  """An empty cache for `batch_size` sequences of up to `max_len` (default cfg.max_seq_len)."""
  max_len = cfg.max_seq_len if max_len is None else max_len
  dt = resolve_dtype(dtype or cfg.dtype)
  shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
  return KVCache(
      k=tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)),
      v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)),
      lengths=jnp.zeros((batch_size,), jnp.int32),
  )
