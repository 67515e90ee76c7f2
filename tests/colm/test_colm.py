"""CoLM method (colm/colm.py): causality incl. Air, multi-scale loss, expansion, freezing,
extraction, unequal chains, errors.

Models are built abstractly with NumPy weights (eager init compiles a kernel per shape) and run
through one jitted forward per (config, scale), which is what the run time is made of.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from colm.colm import (
  abstract_params,
  build_model,
  check_scale_weights,
  cross_entropy,
  expand,
  expanded_config,
  extract,
  multiscale_loss,
  multiscale_losses,
  sub_config,
  trainable_mask,
)
from colm.config import ModelConfig
from colm.layers import cumsum

# chains (1, 2, 1): D (11, 22, 11), heads (2, 4, 2), KV heads (1, 2, 1), FFN (13, 26, 13).
CFG_121 = dict(chains=(1, 2, 1), d_model=44, n_heads=8, n_kv_heads=4, head_dim=10, ffn_dim=52)
# (8, 24) scaled down: D (12, 36), heads (2, 6), KV heads (1, 3), FFN (20, 60).
CFG_13 = dict(chains=(8, 24), d_model=48, n_heads=8, n_kv_heads=4, head_dim=6, ffn_dim=80)
# (8, 8, 16) scaled down: D (12, 12, 24), heads (2, 2, 4), KV heads (1, 1, 2), FFN (20, 20, 40).
CFG_112 = dict(chains=(8, 8, 16), d_model=48, n_heads=8, n_kv_heads=4, head_dim=6, ffn_dim=80)
# One chain that can grow by a chain of width 24: heads 2, KV heads 1, FFN 30 per 24 dims.
CFG_1 = dict(chains=(1,), d_model=24, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=30)

VARIANTS = {  # name -> config overrides; every model option the method must handle
    "colm121": CFG_121,
    "air121": dict(CFG_121, air=True),
    "sep13": dict(CFG_13, tie_embeddings=False, separate_heads=True),
    "air112_untied": dict(CFG_112, air=True, tie_embeddings=False),
    "air_sep112": dict(CFG_112, air=True, tie_embeddings=False, separate_heads=True),
}


def make_cfg(**kw) -> ModelConfig:
  return ModelConfig.tiny(**kw)


def random_params(cfg: ModelConfig, seed: int) -> dict:
  """Weights scaled by fan-in so logits spread out; norm scales around 1."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, spec in abstract_params(cfg).items():
    if len(spec.shape) == 1:
      x = 1.0 + 0.5 * rng.standard_normal(spec.shape)
    else:
      x = rng.standard_normal(spec.shape) * (1.5 / np.sqrt(spec.shape[0]))
    out[name] = x.astype(spec.dtype)
  return out


@functools.cache
def _scales_fn(cfg: ModelConfig):
  def f(params, tokens):
    model = build_model(cfg, params)
    h = model.hidden(tokens)
    return h, [model.logits(h[..., :b], k + 1) for k, b in enumerate(cumsum(cfg.chain_dims))]
  return jax.jit(f)


def scales(cfg, params, tokens):
  """One forward: (hidden [B, T, D], [logits [B, T, V] of scale k for k = 1..n]) as NumPy."""
  h, logits = _scales_fn(cfg)(params, tokens)
  return np.asarray(h), [np.asarray(x) for x in logits]


def tokens_for(cfg, seed, shape=(2, 9)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


# --- whole-model chain causality, plain and Air ---------------------------------------------------


@pytest.mark.parametrize("variant", ["colm121", "air121", "air_sep112"])
def test_later_chains_never_reach_earlier_ones(variant):
  """Redraw everything chains >= j own (kernels, embedding columns = their inputs, norm scales,
  head rows, separate heads): the states and logits of chains < j do not move by one bit."""
  cfg = make_cfg(**VARIANTS[variant])
  params = random_params(cfg, 0)
  tokens = tokens_for(cfg, 1)
  bounds = cumsum(cfg.chain_dims)
  base_h, base_logits = scales(cfg, params, tokens)
  rng = np.random.default_rng(2)
  for j in range(1, cfg.num_chains):
    owned = trainable_mask(cfg, j)  # True on what chains j+1.. (0-based j..) own
    moved = {n: np.where(owned[n], x + rng.standard_normal(x.shape).astype(np.float32), x)
             for n, x in params.items()}
    h, logits = scales(cfg, moved, tokens)
    np.testing.assert_array_equal(h[..., : bounds[j - 1]], base_h[..., : bounds[j - 1]])
    assert np.all(h[..., bounds[j - 1]:] != base_h[..., bounds[j - 1]:])  # the change bites
    for k in range(1, j + 1):
      np.testing.assert_array_equal(logits[k - 1], base_logits[k - 1])


def test_air_keys_and_values_read_chain_one_only():
  cfg = make_cfg(**VARIANTS["air121"])
  shapes = abstract_params(cfg)
  d1 = cfg.chain_dims[0]
  for i, kv in enumerate(cfg.chain_kv_heads):
    assert shapes[f"layers.0.attn.k.kernels.{i}"].shape == (d1, kv * cfg.head_dim)
    assert shapes[f"layers.0.attn.v.kernels.{i}"].shape == (d1, kv * cfg.head_dim)
  assert shapes["layers.0.attn.q.kernels.2"].shape == (cfg.d_model, 2 * cfg.head_dim)
  n = sum(int(np.prod(s.shape)) for s in shapes.values())
  assert cfg.num_params() == n
  for k in (1, 2):
    assert sub_config(cfg, k).num_params() == cfg.num_params(k)


def test_prefill_flops_count_the_weights_and_causal_pairs():
  cfg = make_cfg(**VARIANTS["air121"])
  t, d = 12, cfg.chain_dims
  norms = lambda k: (2 * cfg.n_layers + 1) * sum(d[:k])  # noqa: E731
  for k in range(1, cfg.num_chains + 1):
    matmul, attn = cfg.prefill_flops(t, k)
    weights = cfg.num_params(k) - cfg.vocab_size * sum(d[:k]) - norms(k)  # tied head: no matmul
    assert matmul == 2 * t * weights
    assert attn == 2 * cfg.n_layers * sum(cfg.chain_heads[:k]) * cfg.head_dim * t * t
  # A CoLM-Air chain-1 prefill also projects every chain's K and V from chain 1.
  extra = cfg.prefill_flops(t, 1, cfg.num_chains)[0] - cfg.prefill_flops(t, 1)[0]
  assert extra == 2 * t * cfg.n_layers * 2 * d[0] * sum(cfg.chain_kv_heads[1:]) * cfg.head_dim


# --- multi-scale loss --------------------------------------------------------------------------


@pytest.mark.parametrize("variant, weights", [("sep13", (0.25, 1.0)),
                                              ("air112_untied", (0.5, 0.0, 2.0))])
def test_multiscale_loss_equals_separate_sub_model_forwards(variant, weights):
  """One forward's per-scale losses == CE of n separate k-chain forwards (each of which equals
  a standalone extracted model: test_extracted_sub_model_equals_full_model_at_k_chains)."""
  cfg = make_cfg(**VARIANTS[variant])
  params = random_params(cfg, 3)
  batch = tokens_for(cfg, 4, (2, 10))

  def f(p, b):
    model = build_model(cfg, p)
    separate = [cross_entropy(model(b[:, :-1], num_chains=k), b[:, 1:])
                for k in range(1, cfg.num_chains + 1)]
    return (multiscale_losses(model, b, logits_dtype=jnp.float32),
            multiscale_loss(model, b, weights), jnp.stack(separate))

  losses, total, want = (np.asarray(x) for x in jax.jit(f)(params, batch))
  np.testing.assert_allclose(losses, want, rtol=1e-6)
  np.testing.assert_allclose(total, np.dot(weights, want), rtol=1e-6)
  assert len(set(np.round(want, 3))) == cfg.num_chains  # the scales really differ


# --- elastic inference: extraction -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["air_sep112", "sep13"])
def test_extracted_sub_model_equals_full_model_at_k_chains(variant):
  cfg = make_cfg(**VARIANTS[variant])
  params = random_params(cfg, 5)
  tokens = tokens_for(cfg, 6)
  full = scales(cfg, params, tokens)[1]  # == model(tokens, num_chains=k): tests/colm/test_model
  for k in range(1, cfg.num_chains + 1):
    sub_cfg, sub_params = extract(cfg, params, k)
    assert sub_cfg.num_chains == k and sub_cfg.d_model == sum(cfg.chain_dims[:k])
    assert sub_cfg.chain_heads == cfg.chain_heads[:k]
    assert sub_cfg.num_params() == cfg.num_params(k)
    assert sum(x.size for x in sub_params.values()) == cfg.num_params(k)
    # Float32 rounding differs between the two graphs (XLA fuses them differently): ~6e-6 seen.
    np.testing.assert_allclose(scales(sub_cfg, sub_params, tokens)[1][-1], full[k - 1],
                               rtol=1e-5, atol=2e-5)
  with pytest.raises(ValueError, match="chains=0"):
    extract(cfg, params, 0)


# --- progressive scaling: expansion ------------------------------------------------------------


@pytest.mark.parametrize("base, width", [("one", 24), ("air_sep112", 12), ("colm121", 11)])
def test_expansion_keeps_the_logits(base, width):
  cfg = make_cfg(**(CFG_1 if base == "one" else VARIANTS[base]))
  params = random_params(cfg, 7)
  new_cfg, new_params = expand(cfg, params, width, jax.random.key(0))
  assert new_cfg.chain_dims == cfg.chain_dims + (width,)
  assert new_cfg.chain_heads[:-1] == cfg.chain_heads and new_cfg.air == cfg.air
  assert set(new_params) == set(abstract_params(new_cfg))
  tokens = tokens_for(cfg, 8)
  h_old, old = scales(cfg, params, tokens)
  h_new, new = scales(new_cfg, new_params, tokens)
  np.testing.assert_allclose(new[-1], old[-1], rtol=1e-6, atol=1e-6)  # step 0: the same model
  np.testing.assert_array_equal(h_new[..., : cfg.d_model], h_old)
  assert np.std(h_new[..., cfg.d_model:]) > 0  # the new chain computes something ...
  for k in range(cfg.num_chains):  # ... and every old sub-model is untouched
    np.testing.assert_array_equal(new[k], old[k])


def test_expanded_config_arithmetic_and_errors():
  cfg = make_cfg(**CFG_1)
  two = expanded_config(cfg, 24)
  assert (two.chains, two.d_model, two.n_heads, two.n_kv_heads, two.ffn_dim) == (
      (1, 1), 48, 4, 2, 60)
  three = expanded_config(two, 24)
  assert three.chains == (1, 1, 1) and three.chain_dims == (24, 24, 24)
  four = expanded_config(make_cfg(**CFG_112), 12)
  assert four.chains == (1, 1, 2, 1) and four.chain_kv_heads == (1, 1, 2, 1)
  with pytest.raises(ValueError, match="n_heads"):
    expanded_config(cfg, 6)  # 2 * 6 / 24 query heads
  with pytest.raises(ValueError, match="positive"):
    expanded_config(cfg, 0)


# --- freezing: old chains bit-exact over optimizer steps ---------------------------------------


@pytest.mark.parametrize("variant", ["sep13"])
def test_frozen_chains_do_not_move_and_new_ones_do(variant):
  from flax import nnx

  from colm.model import Decoder
  from colm.params import ParamCodec
  from experiments.config import TrainConfig, model_spec
  from experiments.train import make_loss_fn, make_optimizer, make_train_step

  old_cfg = make_cfg(**VARIANTS[variant])
  width = {"air_sep112": 12, "sep13": 12}[variant]
  cfg, params = expand(old_cfg, random_params(old_cfg, 9), width, jax.random.key(1))
  frozen = old_cfg.num_chains
  tcfg = TrainConfig(model=model_spec(cfg), lr=1e-2, warmup_steps=0, steps=10,
                     weight_decay=0.1, freeze_chains=frozen, scale_weights=[1.0] * cfg.num_chains)
  codec = ParamCodec(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  tx = make_optimizer(tcfg, cfg)
  step = jax.jit(make_train_step(make_loss_fn(codec, scale_weights=tcfg.scale_weights), tx))
  p, opt = dict(params), tx.init(params)
  for i in range(3):
    p, opt, metrics = step(p, opt, tokens_for(cfg, 10 + i, (2, 10)))
    assert np.isfinite(float(metrics["loss"]))
  mask = trainable_mask(cfg, frozen)
  for name, x0 in params.items():
    x0, x1 = np.asarray(x0), np.asarray(p[name])
    m = np.broadcast_to(mask[name], x0.shape)
    np.testing.assert_array_equal(x1[~m], x0[~m], err_msg=name)  # frozen: bit-exact
    if m.any():
      assert np.any(x1[m] != x0[m]), name  # trainable: moved (decay moves even 0-grad kernels)
  assert not np.asarray(mask["embed"])[: sum(old_cfg.chain_dims)].any()


def test_plain_training_mask_is_all_true_and_freezing_everything_is_refused():
  cfg = make_cfg(**CFG_121)
  assert all(np.all(m) for m in trainable_mask(cfg, 0).values())
  with pytest.raises(ValueError, match="freeze_chains=3"):
    trainable_mask(cfg, 3)


def test_freeze_mask_keeps_nan_updates_out():
  """jnp.where, not a multiply: a NaN in a frozen entry's update cannot leak into the params."""
  from colm.colm import zero_frozen
  mask = {"w": np.array([True, False])}
  tx = zero_frozen(mask)
  u, _ = tx.update({"w": jnp.array([1.0, jnp.nan])}, tx.init(None))
  np.testing.assert_array_equal(np.asarray(optax.apply_updates({"w": jnp.zeros(2)}, u)["w"]),
                                [1.0, 0.0])


# --- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(chains=(8, 24), d_model=48, n_heads=6, n_kv_heads=2), "n_heads"),  # 6*8/32
        (dict(chains=(8, 8, 16), d_model=42, n_heads=8, n_kv_heads=4), "d_model"),  # 42*8/32
        (dict(chains=(8, 8, 16), d_model=48, n_heads=8, n_kv_heads=4, ffn_dim=82), "ffn_dim"),
        (dict(chains=(1, 1), d_model=46, n_heads=6, n_kv_heads=2, ffn_dim=62,
              separate_heads=True), "separate_heads"),
        (dict(chains=(1, 1, 1), d_model=48, n_heads=6, n_kv_heads=3, ffn_dim=80), "ffn_dim"),
    ],
)
def test_bad_chain_configs_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    make_cfg(**kw)


def test_bad_scale_weights_and_sub_configs():
  cfg = make_cfg(**CFG_121)
  with pytest.raises(ValueError, match="3 scales"):
    check_scale_weights(cfg, [1.0, 1.0])
  with pytest.raises(ValueError, match="not all zero"):
    check_scale_weights(cfg, [0.0, 0.0, 0.0])
  with pytest.raises(ValueError, match=">= 0"):
    check_scale_weights(cfg, [1.0, -1.0, 1.0])
  with pytest.raises(ValueError, match="1..3"):
    sub_config(cfg, 4)
