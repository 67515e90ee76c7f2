"""Chain-aware primitives: ChainLinear, per-chain RMSNorm, rotary position embedding.

Axis letters used in shape comments: B batch, T query length, S key length, D hidden,
H query heads, K KV heads, G query heads per KV head, E head dim, V vocab.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FUSE_MAX_ROWS = 256  # fused_chain_linear concatenates weights only up to this many rows


def cumsum(dims: tuple[int, ...]) -> tuple[int, ...]:
  """(D_1, D_2, ...) -> (D_1, D_1 + D_2, ...)."""
  return tuple(itertools.accumulate(dims))


class ChainLinear(nnx.Module):
  """y = concat_i(W_i x_{<=i}): output chain i reads only input chains 1..i (CoLM, Eq. 2).

  One matmul per chain, no dense weight under a mask: W_i has shape [sum_{j<=i} in_j, out_i].
  With one chain this is a plain dense layer.
  """

  def __init__(self, in_dims: tuple[int, ...], out_dims: tuple[int, ...], *, rngs: nnx.Rngs,
               init_std: float = 0.02, param_dtype=jnp.float32):
    if len(in_dims) != len(out_dims):
      raise ValueError(f"in_dims={in_dims} and out_dims={out_dims} have different chain counts")
    self.in_dims, self.out_dims = tuple(in_dims), tuple(out_dims)
    init = nnx.initializers.normal(init_std)
    self.kernels = nnx.List([
        nnx.Param(init(rngs.params(), (cin, dout), param_dtype))
        for cin, dout in zip(cumsum(self.in_dims), self.out_dims)
    ])

  def __call__(self, x: jax.Array, num_chains: int | None = None, dtype=None) -> jax.Array:
    """x: [..., sum(in_dims[:k])] -> [..., sum(out_dims[:k])] with k = num_chains (all if None)."""
    k = len(self.kernels) if num_chains is None else num_chains
    cin = cumsum(self.in_dims)
    if x.shape[-1] != cin[k - 1]:
      raise ValueError(f"ChainLinear with {k} chains expects last dim {cin[k - 1]}, got {x.shape}")
    dtype = dtype or x.dtype
    outs = [jnp.dot(x[..., : cin[i]].astype(dtype), self.kernels[i][...].astype(dtype))
            for i in range(k)]
    return outs[0] if k == 1 else jnp.concatenate(outs, axis=-1)


def fused_chain_linear(layers: list[ChainLinear], x: jax.Array, num_chains: int | None = None,
                       dtype=None) -> list[jax.Array]:
  """Applies several ChainLinears with the same input chains as one matmul per chain.

  Equal to [l(x, num_chains, dtype) for l in layers]. For a few rows (decoding) the kernels of
  chain i are concatenated at call time so one matmul replaces several launches (q|k|v,
  gate|up). For many rows (training, prefill) the layers run separately: there the backward
  pass would have to concatenate the outputs' gradients into one activation-sized buffer, which
  cost more (measured on H100: 6 ms of an 94 ms step) than reading x once per layer saves.
  """
  k = len(layers[0].kernels) if num_chains is None else num_chains
  if math.prod(x.shape[:-1]) > FUSE_MAX_ROWS:
    return [l(x, k, dtype) for l in layers]
  cin = cumsum(layers[0].in_dims)
  if any(l.in_dims != layers[0].in_dims for l in layers):
    raise ValueError("fused_chain_linear needs layers with the same input chains")
  dtype = dtype or x.dtype
  pieces: list[list[jax.Array]] = [[] for _ in layers]
  for i in range(k):
    w = jnp.concatenate([l.kernels[i][...].astype(dtype) for l in layers], axis=1)
    y = jnp.dot(x[..., : cin[i]].astype(dtype), w)
    splits = list(itertools.accumulate(l.out_dims[i] for l in layers))[:-1]
    for j, part in enumerate(jnp.split(y, splits, axis=-1)):
      pieces[j].append(part)
  return [p[0] if k == 1 else jnp.concatenate(p, axis=-1) for p in pieces]


class ChainRMSNorm(nnx.Module):
  """RMSNorm applied to each chain's slice on its own, so chain i never sees chains > i."""

  def __init__(self, dims: tuple[int, ...], *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.dims, self.eps = tuple(dims), eps
    self.scale = nnx.Param(jnp.ones((sum(dims),), param_dtype))

  def __call__(self, x: jax.Array, num_chains: int | None = None) -> jax.Array:
    """x: [..., sum(dims[:k])] -> same shape; statistics in float32, output in x.dtype."""
    k = len(self.dims) if num_chains is None else num_chains
    bounds = (0,) + cumsum(self.dims[:k])
    xf = x.astype(jnp.float32)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
      xi = xf[..., a:b]
      parts.append(xi * jax.lax.rsqrt(jnp.mean(xi * xi, axis=-1, keepdims=True) + self.eps))
    y = parts[0] if k == 1 else jnp.concatenate(parts, axis=-1)
    return (y * self.scale[...][: bounds[-1]].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float = 10000.0,
                     scaling: tuple[float, float, float, int] | None = None) -> np.ndarray:
  """The [E/2] inverse frequencies theta^(-2i/E), float32.

  scaling = (factor, low_freq_factor, high_freq_factor, original_len) applies Llama 3.1's
  rule: wavelengths longer than original_len / low_freq_factor are divided by factor, shorter
  than original_len / high_freq_factor kept, and those between interpolated smoothly.
  """
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling is not None:
    factor, low, high, orig = scaling
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    inv = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  return inv.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
         scaling: tuple[float, float, float, int] | None = None) -> jax.Array:
  """Rotary embedding, rotate-half form (LLaMA).

  Args:
    x: [B, T, N, E] queries or keys.
    positions: [B, T] int absolute positions.
    theta, scaling: see rope_frequencies.
  Returns:
    [B, T, N, E] in x.dtype.
  """
  e = x.shape[-1]
  if scaling is None:
    freq = theta ** (-jnp.arange(0, e, 2, dtype=jnp.float32) / e)  # [E/2]
  else:
    freq = jnp.asarray(rope_frequencies(e, theta, scaling))
  ang = positions.astype(jnp.float32)[..., None] * freq  # [B, T, E/2]
  sin, cos = jnp.sin(ang)[:, :, None, :], jnp.cos(ang)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
