"""Token sampling: greedy, temperature, top-k, top-p, and the config's validation.

Distribution checks draw N tokens at once from N copies of one logits row (one key, N rows).
`sample` runs eagerly: its ops compile once per shape and are reused by every config, where a
jit per SamplingConfig would compile the whole function each time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvcache.sampling import SamplingConfig, sample

N = 4000


def draw(logits, cfg: SamplingConfig, seed: int = 0) -> np.ndarray:
  return np.asarray(sample(jnp.asarray(logits, jnp.float32), jax.random.key(seed), cfg))


def draw_many(row, cfg: SamplingConfig, seed: int = 0) -> np.ndarray:
  """N independent samples from one logits row."""
  return draw(np.tile(np.asarray(row, np.float32), (N, 1)), cfg, seed)


def _random_logits(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 2.0


def test_greedy_is_argmax():
  logits = _random_logits(0, (6, 31))
  got = draw(logits, SamplingConfig())
  assert got.dtype == np.int32 and got.shape == (6,)
  np.testing.assert_array_equal(got, logits.argmax(-1))
  # At temperature 0, top-k and top-p do not matter.
  np.testing.assert_array_equal(draw(logits, SamplingConfig(top_k=5, top_p=0.3)), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_top_k_one_is_greedy(temperature):
  logits = _random_logits(1, (6, 31))
  cfg = SamplingConfig(temperature=temperature, top_k=1)
  for seed in range(3):
    np.testing.assert_array_equal(draw(logits, cfg, seed), logits.argmax(-1))


def test_temperature_one_samples_the_softmax():
  row = _random_logits(2, (7,))
  counts = np.bincount(draw_many(row, SamplingConfig(temperature=1.0), 3), minlength=7) / N
  p = np.exp(row - row.max())
  np.testing.assert_allclose(counts, p / p.sum(), atol=0.03)


@pytest.mark.parametrize("k", [3, 5])
def test_top_k_support(k):
  row = _random_logits(10 + k, (23,))
  samples = draw_many(row, SamplingConfig(temperature=2.0, top_k=k), seed=k)
  top = set(np.argsort(row)[-k:].tolist())
  assert set(samples.tolist()) == top  # only the k largest, and (with N draws) all of them
  # Within the kept set, frequencies follow the renormalised softmax.
  idx = np.array(sorted(top))
  p = np.exp((row[idx] - row[idx].max()) / 2.0)
  freq = np.array([np.mean(samples == i) for i in idx])
  np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)


def test_top_k_larger_than_vocab_keeps_all():
  row = np.zeros(5, np.float32)
  assert set(draw_many(row, SamplingConfig(temperature=1.0, top_k=50)).tolist()) == set(range(5))


@pytest.mark.parametrize("p, keep", [(0.3, 1), (0.6, 2), (0.7, 3), (0.85, 4), (1.0, 7)])
def test_top_p_keeps_the_smallest_nucleus(p, keep):
  """Probabilities 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02 (shuffled): the nucleus is the shortest
  prefix of the sorted list whose mass reaches p."""
  probs = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])
  perm = np.random.default_rng(keep).permutation(7)
  row = np.log(probs[perm]).astype(np.float32)
  samples = draw_many(row, SamplingConfig(temperature=1.0, top_p=p), seed=keep)
  expected = {int(np.where(perm == i)[0][0]) for i in range(keep)}  # positions of the top `keep`
  assert set(samples.tolist()) == expected
  kept = probs[:keep] / probs[:keep].sum()
  freq = np.array([np.mean(samples == np.where(perm == i)[0][0]) for i in range(keep)])
  np.testing.assert_allclose(freq, kept, atol=0.03)


def test_top_k_and_top_p_compose():
  probs = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])
  row = np.log(probs).astype(np.float32)
  # top_k=3 renormalises to 0.5, 0.3125, 0.1875; top_p=0.6 then keeps two of them.
  samples = draw_many(row, SamplingConfig(temperature=1.0, top_k=3, top_p=0.6), seed=5)
  assert set(samples.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=-0.5), "top_p"),
        (dict(top_p=1.01), "top_p"),
    ],
)
def test_invalid_config_raises(kw, field):
  with pytest.raises(ValueError, match=field):
    SamplingConfig(**kw)
