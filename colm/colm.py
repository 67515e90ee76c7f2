"""CoLM and CoLM-Air (Chain-of-Model learning, Song et al. 2025, arXiv:2505.11820): the method.

Symbols (paper): the hidden state of every layer is a chain of n sub-representations
x = [x_1, ..., x_n] of widths D_1..D_n; D_<=k = D_1 + ... + D_k. Output chain i of every layer
reads input chains 1..i only (Chain-of-Representation), so the first k chains form a standalone
sub-model M_k ("scale k") nested in M_n. This file holds what the paper adds on top of the
chain-aware decoder (colm/model.py):

  multi-scale loss   L = sum_k w_k CE(M_k), all scales from ONE forward: the states of M_k are
                     the first D_<=k dims of M_n's states; scale k applies the final norm of
                     chains 1..k and its LM head (rows :D_<=k of the shared head, or head k).
  expand             progressive scaling: M_n -> M_{n+1} with one chain of width D_{n+1} whose
                     logits at step 0 are M_n's (the new chain's final-norm scale is 0).
  trainable_mask     which parameter entries a progressive stage trains (the old chains' are
                     frozen); `freeze` masks gradients and optimizer updates with it.
  extract            elastic inference: M_k as a standalone model whose logits equal M_n's run
                     with num_chains=k.

CoLM-Air (ModelConfig.air) shares keys and values: K, V of every layer are dense projections of
x_1 alone, so chain 1's forward fills the whole KV cache (kvcache/air.py: chain-1 prefill and
LM switching).

Parameters here are the flat named dicts of colm.params ("layers.0.attn.q.kernels.1").
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from colm.config import ModelConfig, resolve_dtype
from colm.layers import cumsum
from colm.model import Decoder
from colm.params import ParamCodec, Params, split_params

_KERNEL = re.compile(r"\.kernels\.(\d+)$")  # ChainLinear kernel of output chain i
_HEAD = re.compile(r"^heads\.(\d+)$")  # separate LM head of scale j


# --- models from flat parameters ------------------------------------------------------------------


def abstract_params(cfg: ModelConfig) -> Params:
  """Names, shapes and dtypes of a model's parameters (ShapeDtypeStructs; nothing allocated)."""
  return split_params(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))[1]


def build_model(cfg: ModelConfig, params: Params) -> Decoder:
  """The Decoder of `cfg` holding the flat `params`."""
  return ParamCodec(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))).merge(params)


# --- multi-scale loss -----------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean token cross-entropy. logits [B, T, V] (any float dtype), targets [B, T] int."""
  logits = logits.astype(jnp.float32)  # fused into the reductions: bf16 logits stay bf16 in HBM
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(logz - gold)


def check_scale_weights(cfg: ModelConfig, weights: Sequence[float]) -> tuple[float, ...]:
  """w_1..w_n: one non-negative weight per chain scale, not all zero; ValueError otherwise."""
  w = tuple(float(x) for x in weights)
  if len(w) != cfg.num_chains:
    raise ValueError(f"scale_weights has {len(w)} entries for chains={cfg.chains} "
                     f"({cfg.num_chains} scales)")
  if any(x < 0 or not math.isfinite(x) for x in w) or not any(w):
    raise ValueError(f"scale_weights={list(w)} must be finite, >= 0 and not all zero")
  return w


def multiscale_losses(model: Decoder, batch: jax.Array, scales: Sequence[int] | None = None,
                      logits_dtype=None) -> jax.Array:
  """CE(M_k) for each scale k in `scales` (default 1..n), from one forward of the full model.

  Args:
    model: a Decoder with n chains.
    batch: [B, T+1] int tokens; predicts tokens 1..T from 0..T-1.
    scales: the scales k to score (1-based chain counts).
    logits_dtype: dtype of the logits before the loss (default the compute dtype).
  Returns:
    [len(scales)] float32 cross-entropies.
  """
  cfg = model.cfg
  scales = tuple(range(1, cfg.num_chains + 1)) if scales is None else tuple(scales)
  h = model.hidden(batch[:, :-1])  # [B, T, D]: chain i never reads chains > i ...
  bounds = cumsum(cfg.chain_dims)
  dt = logits_dtype or resolve_dtype(cfg.dtype)
  # ... so M_k's final states are exactly the first D_<=k dims of M_n's.
  return jnp.stack([cross_entropy(model.logits(h[..., : bounds[k - 1]], k, dt), batch[:, 1:])
                    for k in scales])


def multiscale_loss(model: Decoder, batch: jax.Array, weights: Sequence[float]) -> jax.Array:
  """L = sum_k w_k CE(M_k) from one forward (scales with w_k = 0 cost nothing). batch [B, T+1]."""
  w = check_scale_weights(model.cfg, weights)
  scales = [k + 1 for k, wk in enumerate(w) if wk]
  losses = multiscale_losses(model, batch, scales)
  return jnp.sum(jnp.asarray([w[k - 1] for k in scales], jnp.float32) * losses)


# --- elastic inference: extraction ----------------------------------------------------------------


def sub_config(cfg: ModelConfig, k: int) -> ModelConfig:
  """The configuration of M_k: the first k chains, with their widths, heads and FFN units."""
  if not 1 <= k <= cfg.num_chains:
    raise ValueError(f"chains={k} must be in 1..{cfg.num_chains} (the model has chains="
                     f"{cfg.chains})")
  return cfg.replace(chains=cfg.chains[:k], d_model=sum(cfg.chain_dims[:k]),
                     n_heads=sum(cfg.chain_heads[:k]), n_kv_heads=sum(cfg.chain_kv_heads[:k]),
                     ffn_dim=sum(cfg.chain_ffn[:k]))


def extract(cfg: ModelConfig, params: Params, k: int) -> tuple[ModelConfig, Params]:
  """Cuts M_k out of M_n: a standalone k-chain model whose logits equal M_n's at num_chains=k.

  Kept: the kernels of output chains 1..k, the first D_<=k embedding columns, norm scales and
  shared-head rows, and separate heads 1..k. Returns (sub config, sub params).
  """
  sub = sub_config(cfg, k)
  width = sum(cfg.chain_dims[:k])
  out = {}
  for name, spec in abstract_params(sub).items():
    x = params[name]
    if name == "embed" or name.endswith(".scale"):
      x = x[..., :width]
    elif name == "head":
      x = x[:width]
    elif name.endswith("_bias"):  # q/k/v bias: the first k chains' heads
      x = x[: spec.shape[0]]
    if x.shape != spec.shape:
      raise ValueError(f"extract: {name} has shape {x.shape}, the {k}-chain model needs "
                       f"{spec.shape}")
    out[name] = x
  return sub, out


# --- progressive scaling: expansion and freezing --------------------------------------------------


def expanded_config(cfg: ModelConfig, width: int) -> ModelConfig:
  """M_n's configuration plus one chain of hidden width D_{n+1} = width.

  Heads, KV heads and FFN units of the new chain follow the model's per-dim ratios (the config
  splits every size in proportion to the chain widths), so they must come out integral.
  """
  if width <= 0:
    raise ValueError(f"the new chain's width must be positive, got {width}")
  d = cfg.d_model
  extra = {}
  for field in ("n_heads", "n_kv_heads", "ffn_dim"):
    total = getattr(cfg, field)
    if (total * width) % d:
      raise ValueError(f"a chain of width {width} would get {field}*{width}/d_model = "
                       f"{total}*{width}/{d}, not an integer; choose a width that keeps "
                       f"{field}/d_model")
    extra[field] = total + total * width // d
  dims = cfg.chain_dims + (width,)
  g = math.gcd(*dims)
  return cfg.replace(chains=tuple(x // g for x in dims), d_model=d + width, **extra)


def expand(cfg: ModelConfig, params: Params, width: int, rng: jax.Array
           ) -> tuple[ModelConfig, Params]:
  """Progressive scaling: adds chain n+1 of hidden width `width` to M_n.

  Old entries are copied; the new chain's kernels (reading chains 1..n+1, never read by them),
  embedding columns and shared-head rows are drawn N(0, init_std^2); its block norms start at 1
  and its final-norm scale at 0, so the new chain adds nothing to the logits at step 0:
  M_{n+1}(x) == M_n(x) up to float rounding. With separate heads, head n+1 starts as head n
  with random rows for the new chain. Returns (new config, new params).
  """
  new_cfg = expanded_config(cfg, width)
  n = cfg.num_chains
  # Host-side NumPy: eager jax ops would compile a kernel per new shape.
  gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  out = {}
  for name, spec in sorted(abstract_params(new_cfg).items()):
    dt = spec.dtype

    def rand(shape, dt=dt):
      return (cfg.init_std * gen.standard_normal(shape, np.float32)).astype(dt)

    old = None if name not in params else np.asarray(params[name])
    if name == "embed":  # [V, D]: new columns
      x = np.concatenate([old, rand((old.shape[0], width))], axis=1)
    elif name == "head":  # [D, V]: new rows
      x = np.concatenate([old, rand((width, old.shape[1]))], axis=0)
    elif name.endswith("_bias"):  # q/k/v bias: the new chain's heads start at 0
      x = np.concatenate([old, np.zeros((spec.shape[0] - old.shape[0],), old.dtype)])
    elif name.endswith(".scale"):  # final norm: 0 for the new chain (the step-0 identity)
      fill = np.zeros if name == "final_norm.scale" else np.ones
      x = np.concatenate([old, fill((width,), old.dtype)])
    elif _HEAD.search(name) and old is None:  # separate head n+1 = [head n; random rows]
      prev = np.asarray(params[f"heads.{n - 1}"])
      x = np.concatenate([prev, rand((width, prev.shape[1]))], axis=0)
    elif _KERNEL.search(name) and old is None:  # the new chain's kernels
      x = rand(spec.shape)
    else:
      x = old
    if x is None or x.shape != spec.shape:
      raise ValueError(f"expand: cannot build {name} {spec.shape} from the {n}-chain params")
    out[name] = jnp.asarray(x, dt)
  return new_cfg, out


def trainable_mask(cfg: ModelConfig, frozen_chains: int) -> dict[str, np.ndarray]:
  """True where a parameter entry is trained when chains 1..frozen_chains are frozen.

  Kernels of output chain i and separate head j are owned whole (a scalar mask); the embedding
  columns, norm scales and shared-head rows are owned per chain (a mask that broadcasts).
  """
  if not 0 <= frozen_chains < cfg.num_chains:
    raise ValueError(f"freeze_chains={frozen_chains} must be in 0..{cfg.num_chains - 1} for "
                     f"chains={cfg.chains} (at least one chain must train)")
  cut = sum(cfg.chain_dims[:frozen_chains])
  cols = np.arange(cfg.d_model) >= cut  # [D]: True for the new chains' dims
  mask = {}
  for name, spec in abstract_params(cfg).items():
    if m := _KERNEL.search(name) or _HEAD.search(name):
      mask[name] = np.asarray(int(m.group(1)) >= frozen_chains)
    elif name == "embed" or name.endswith(".scale"):
      mask[name] = cols  # broadcasts over [V, D] and [D]
    elif name.endswith("_bias"):  # [H*E] or [K*E]: the frozen chains' heads come first
      heads = cfg.chain_heads if name.endswith("q_bias") else cfg.chain_kv_heads
      mask[name] = np.arange(spec.shape[0]) >= sum(heads[:frozen_chains]) * cfg.head_dim
    elif name == "head":
      mask[name] = cols[:, None]  # [D, 1] over [D, V]
    else:
      raise ValueError(f"trainable_mask: no chain owner known for parameter {name} "
                       f"{spec.shape}")
  return mask


def zero_frozen(mask: dict[str, np.ndarray]) -> optax.GradientTransformation:
  """Sets the frozen entries (mask False) of the updates to exactly 0."""
  def update(updates, state, params=None):
    del params
    return {k: jnp.where(mask[k], u, jnp.zeros((), u.dtype)) for k, u in updates.items()}, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def freeze(tx: optax.GradientTransformation, mask: dict[str, np.ndarray]
           ) -> optax.GradientTransformation:
  """tx training only the mask's True entries: gradients are zeroed before tx (no moments, no
  share of the clipping norm) and updates after it (AdamW's decoupled weight decay is part of the
  update), so frozen parameters stay bit-exact."""
  return optax.chain(zero_frozen(mask), tx, zero_frozen(mask))
