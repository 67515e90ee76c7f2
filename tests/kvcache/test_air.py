"""CoLM-Air inference: the chain-1 prefill's cache equals the full model's, and every scale decodes
from that one cache (LM switching) exactly as the full forward of that scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colm.colm import abstract_params, build_model
from colm.config import ModelConfig
from colm.layers import cumsum
from kvcache import decode_step, init_cache, prefill
from kvcache.air import air_prefill, prefill_last

# chains (1, 2, 1): D (11, 22, 11), heads (2, 4, 2), KV heads (1, 2, 1), all K/V from D_1 = 11.
AIR_121 = dict(chains=(1, 2, 1), d_model=44, n_heads=8, n_kv_heads=4, head_dim=10, ffn_dim=52,
               tie_embeddings=False, air=True, max_seq_len=24)
PROMPT_LENGTHS = (7, 4)  # ragged, right-padded to T = 8


def random_model(cfg: ModelConfig, seed: int):
  rng = np.random.default_rng(seed)
  params = {n: (1.0 + 0.5 * rng.standard_normal(s.shape) if len(s.shape) == 1
                else rng.standard_normal(s.shape) * (1.5 / np.sqrt(s.shape[0]))).astype(s.dtype)
            for n, s in abstract_params(cfg).items()}
  return build_model(cfg, params)


def all_scale_logits(model, tokens) -> list[np.ndarray]:
  """Full causal forward, logits of every scale k = 1..n: [B, L, V] each."""
  cfg = model.cfg

  @jax.jit
  def f(state, tokens):
    m = nnx.merge(graphdef, state)
    h = m.hidden(tokens)
    return [m.logits(h[..., :b], k + 1) for k, b in enumerate(cumsum(cfg.chain_dims))]

  graphdef, state = nnx.split(model)
  return [np.asarray(x) for x in f(state, tokens)]


@pytest.fixture(scope="module")
def setup():
  cfg = ModelConfig.tiny(**AIR_121)
  model = random_model(cfg, 0)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
  tokens = np.zeros((len(prompts), 8), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  return cfg, model, prompts, jnp.asarray(tokens), jnp.asarray(PROMPT_LENGTHS, jnp.int32)


def _assert_cache_equal(got, want):
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  for lg, lw in zip(got.layers, want.layers):
    for gg, gw in zip(lg.groups, lw.groups):
      np.testing.assert_array_equal(np.asarray(gg.pos), np.asarray(gw.pos))
      for a, b in ((gg.k, gw.k), (gg.v, gw.v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert np.any(np.asarray(lg.groups[-1].k)[:, -1, :4] != 0)  # the last chain's heads filled


def test_chain1_prefill_cache_equals_full_prefill_cache(setup):
  cfg, model, prompts, tokens, lengths = setup
  graphdef, params = nnx.split(model)
  b = len(prompts)
  full_logits, full = prefill(graphdef, params, tokens, lengths, init_cache(cfg, b))
  want_logits = np.asarray(full_logits)[np.arange(b), np.asarray(lengths) - 1]
  _, last = prefill_last(graphdef, params, tokens, lengths, init_cache(cfg, b))
  _assert_cache_equal(last, full)
  ref = all_scale_logits(model, tokens)
  for k in (1, cfg.num_chains):  # the first new token at the smallest and the full scale
    logits, cache = air_prefill(graphdef, params, tokens, lengths, init_cache(cfg, b),
                                num_chains=k)
    _assert_cache_equal(cache, full)
    np.testing.assert_allclose(np.asarray(logits),
                               ref[k - 1][np.arange(b), np.asarray(lengths) - 1],
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-5, atol=1e-5)


def test_every_scale_decodes_from_the_shared_cache(setup):
  """LM switching: decode steps at scales 2, 1, 3, 2, 1 from one chain-1-prefilled cache; each
  step's logits equal the full forward of that scale over the whole sequence."""
  cfg, model, prompts, tokens, lengths = setup
  graphdef, params = nnx.split(model)
  _, cache = air_prefill(graphdef, params, tokens, lengths, init_cache(cfg, len(prompts)),
                         num_chains=1)
  rng = np.random.default_rng(2)
  schedule = (2, 1, 3, 2, 1)
  new = rng.integers(0, cfg.vocab_size, (len(prompts), len(schedule)))
  seqs = np.zeros((len(prompts), max(PROMPT_LENGTHS) + len(schedule)), np.int32)
  for i, p in enumerate(prompts):
    seqs[i, : len(p) + len(schedule)] = p + new[i].tolist()
  ref = all_scale_logits(model, jnp.asarray(seqs))
  for step, k in enumerate(schedule):
    logits, cache = decode_step(graphdef, params, jnp.asarray(new[:, step], jnp.int32), cache,
                                num_chains=k)
    pos = np.asarray(PROMPT_LENGTHS) + step
    np.testing.assert_allclose(np.asarray(logits), ref[k - 1][np.arange(len(prompts)), pos],
                               rtol=1e-5, atol=1e-5, err_msg=f"step {step} at scale {k}")


def test_air_prefill_needs_an_air_model(setup):
  cfg, _, _, tokens, lengths = setup
  plain = nnx.eval_shape(lambda: build_model(
      cfg.replace(air=False), {n: jnp.zeros(s.shape, s.dtype)
                               for n, s in abstract_params(cfg.replace(air=False)).items()}))
  graphdef, params = nnx.split(plain)
  with pytest.raises(ValueError, match="air=True"):
    air_prefill(graphdef, params, tokens, lengths, init_cache(cfg, 2))
