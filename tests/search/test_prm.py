"""The process reward model: prm_loss falls on a fixed batch and reads only the step ends, score
and embed read the last real token / last step whatever the padding, the trunk starts as the
policy, and the search's PRMScorer agrees with the module."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from colm.config import ModelConfig
from colm.model import Decoder
from colm.params import ParamCodec
from search.prm import PRM, PRMScorer, prm_loss

STEP = 7  # the fake vocabulary's step token
CFG = ModelConfig.tiny(vocab_size=53, d_model=40, n_heads=4, n_kv_heads=2, head_dim=10,
                       ffn_dim=66, max_seq_len=48)


def _prm(seed: int) -> PRM:
  policy = Decoder(CFG, rngs=nnx.Rngs(seed))
  return PRM.from_policy(policy, step_token=STEP, rngs=nnx.Rngs(seed + 1))


def _jit(prm: PRM, method: str):
  """prm.<method>(*args) compiled (eager NNX calls compile every op on its own: slow)."""
  graphdef, state = nnx.split(prm)
  fn = jax.jit(lambda st, *a: getattr(nnx.merge(graphdef, st), method)(*a))
  return lambda *a: fn(state, *a)


def _batch(seed: int, b: int = 3, t: int = 19):
  """Random tokens with STEP every 4th position, labels at those positions."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(8, CFG.vocab_size, (b, t)).astype(np.int32)
  tokens[:, 3::4] = STEP
  mask = tokens == STEP
  labels = (rng.random((b, t)) < 0.5).astype(np.float32) * mask
  return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(labels)


def test_prm_loss_decreases_on_a_fixed_batch():
  seed = 3
  print("seed", seed)
  prm = _prm(seed)
  codec = ParamCodec(prm)
  tokens, mask, labels = _batch(seed)
  tx = optax.adam(3e-3)
  params = codec.params(prm)
  opt = tx.init(params)
  loss_fn = jax.jit(jax.value_and_grad(lambda p: prm_loss(codec.merge(p), tokens, mask, labels)))
  losses = []
  for _ in range(15):
    loss, grads = loss_fn(params)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  print("losses", losses)
  assert losses[0] == pytest.approx(np.log(2), abs=0.05)  # values start near 0.5
  assert losses[-1] < 0.6 * losses[0]
  assert all(b < a for a, b in zip(losses[:4], losses[1:5]))  # falls from the first steps


def test_prm_loss_reads_only_the_step_ends():
  seed = 4
  print("seed", seed)
  prm = _prm(seed)
  tokens, mask, labels = _batch(seed)
  graphdef, state = nnx.split(prm)
  loss = jax.jit(lambda st, *a: prm_loss(nnx.merge(graphdef, st), *a))
  base = float(loss(state, tokens, mask, labels))
  junk = jnp.where(mask, labels, 1.0 - labels + 0.5)  # change every unlabelled target
  assert float(loss(state, tokens, mask, junk)) == pytest.approx(base, rel=1e-6)
  assert float(loss(state, tokens, jnp.zeros_like(mask), labels)) == 0.0
  v = _jit(prm, "values")(tokens)
  want = optax.sigmoid_binary_cross_entropy(v, labels)[np.asarray(mask)].mean()
  assert base == pytest.approx(float(want), rel=1e-5)


def test_values_shape_and_dtype():
  prm = _prm(0)
  tokens, _, _ = _batch(0, b=2, t=11)
  v = _jit(prm, "values")(tokens)
  assert v.shape == (2, 11) and v.dtype == jnp.float32
  assert _jit(prm, "embed")(tokens, jnp.asarray([11, 5])).shape == (2, CFG.d_model)


def test_score_reads_the_last_real_token_whatever_the_padding():
  seed = 5
  print("seed", seed)
  prm = _prm(seed)
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(8, CFG.vocab_size, n).tolist() for n in (13, 6, 9)]
  score, values = _jit(prm, "score"), _jit(prm, "values")
  alone = [float(jax.nn.sigmoid(values(jnp.asarray([s]))[0, -1])) for s in seqs]
  for t, pad in ((13, 0), (24, 0), (24, 51)):  # other widths and pad ids
    tokens = np.full((3, t), pad, np.int32)
    for i, s in enumerate(seqs):
      tokens[i, :len(s)] = s
    got = score(jnp.asarray(tokens), jnp.asarray([len(s) for s in seqs]))
    np.testing.assert_allclose(np.asarray(got), alone, atol=1e-5)


def test_embed_is_the_mean_over_the_last_step():
  seed = 6
  print("seed", seed)
  prm = _prm(seed)
  rng = np.random.default_rng(seed)
  # prompt, step 1, step 2 (each closed by STEP), then padding
  seq = [*rng.integers(8, 53, 5), STEP, *rng.integers(8, 53, 3), STEP, *rng.integers(8, 53, 4),
         STEP]
  tokens = np.zeros((2, 24), np.int32)
  tokens[0, :len(seq)] = seq
  tokens[1, :len(seq) - 5] = seq[:-5]  # ends with step 1
  lengths = jnp.asarray([len(seq), len(seq) - 5])
  embed = _jit(prm, "embed")
  e = np.asarray(embed(jnp.asarray(tokens), lengths))
  f = np.asarray(_jit(prm, "features")(jnp.asarray(tokens)))
  np.testing.assert_allclose(e[0], f[0, len(seq) - 5:len(seq)].mean(0), atol=1e-5)
  np.testing.assert_allclose(e[1], f[1, 6:len(seq) - 5].mean(0), atol=1e-5)
  by_len = embed(jnp.asarray(tokens), lengths, jnp.asarray([5, 4]))
  np.testing.assert_allclose(np.asarray(by_len), e, atol=1e-6)


def test_from_policy_copies_the_trunk():
  policy = Decoder(CFG, rngs=nnx.Rngs(8))
  prm = PRM.from_policy(policy, step_token=STEP, rngs=nnx.Rngs(9))
  tokens, _, _ = _batch(8)
  np.testing.assert_array_equal(np.asarray(_jit(prm.trunk, "hidden")(tokens)),
                                np.asarray(_jit(policy, "hidden")(tokens)))
  prm.trunk.embed[...] = prm.trunk.embed[...] * 0  # a copy: the policy keeps its weights
  assert float(jnp.abs(policy.embed[...]).sum()) > 0


def test_scorer_matches_the_module():
  seed = 10
  print("seed", seed)
  prm = _prm(seed)
  rng = np.random.default_rng(seed)
  paths = [[*rng.integers(8, 53, n), STEP] for n in (4, 11, 7)]
  scorer = PRMScorer(prm, pad_to=8)
  got = scorer.score(paths)
  values = _jit(prm, "values")
  want = [float(jax.nn.sigmoid(values(jnp.asarray([p]))[0, -1])) for p in paths]
  np.testing.assert_allclose(got, want, atol=1e-5)
  emb = scorer.embed(paths, [2, 3, 1])
  assert emb.shape == (3, CFG.d_model)
  f = np.asarray(_jit(prm, "features")(jnp.asarray([paths[1]])))[0]
  np.testing.assert_allclose(emb[1], f[-3:].mean(0), atol=1e-5)
  both_scores, both_emb = scorer.score_embed(paths, [2, 3, 1])  # one pass, the same numbers
  np.testing.assert_allclose(both_scores, got, atol=1e-6)
  np.testing.assert_allclose(both_emb, emb, atol=1e-6)
  with pytest.raises(ValueError, match="at least one token"):
    scorer.score([[1, 2], []])
