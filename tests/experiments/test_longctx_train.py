"""The long-context model's training pieces: token rows, teacher-forced exact match, save/load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colm.config import ModelConfig
from colm.model import Decoder
from colm.params import ParamCodec
from experiments import longctx
from experiments.data import _train_tokenizer
from experiments.longctx_train import (
  TARGET_TOKENS,
  encode_example,
  exact_match,
  load_model,
  rows,
  save_model,
)


@pytest.fixture(scope="module")
def tok(corpus):
  return _train_tokenizer([p.read_text() for p in sorted(corpus.glob("*.py"))], 300)


def test_target_scores_one(corpus):
  for name in longctx.FAMILIES:  # the aggregation families need the stdlib's many words
    src = str(corpus) if name in longctx.LOCALIZATION else "stdlib"
    e = longctx.generate(name, 1, 1500, seed=3, source=src)[0]
    assert longctx.score(e, e.target) == 1.0, name
    assert longctx.score(e, e.target.replace(e.answers[0], e.answers[0] + "9")) < 1.0, name


def test_rows_weight_exactly_the_target(corpus, tok):
  seed = 11
  print("seed", seed)
  exs = longctx.needle(2, 400, seed=seed, tokenizer=tok, source=str(corpus), split="train")
  enc = [encode_example(tok, e) for e in exs]
  toks, w = rows(enc, 400, pad_id=1)
  assert toks.shape == (2, 400 + TARGET_TOKENS + 1) and w.shape == (2, 400 + TARGET_TOKENS)
  for i, (p, t) in enumerate(enc):
    assert toks[i, :len(p)].tolist() == p.tolist()
    picked = toks[i, 1:][w[i] > 0].tolist()  # the tokens the weighted positions predict
    assert picked == t.tolist() and t[-1] == 0  # the target, then end of text (id 0)
    assert tok.decode(t[:-1].tolist()) == exs[i].target


def test_exact_match_is_every_target_token():
  rng = np.random.default_rng(5)
  print("seed", 5)
  enc = [(rng.integers(2, 50, 20).astype(np.int32), rng.integers(2, 50, 4).astype(np.int32))
         for _ in range(3)]
  toks, _ = rows(enc, 20, pad_id=1)
  truth = toks[:, 1:]

  def oracle(pred):  # the row's given next tokens, looked up by the row's inputs
    table = {toks[i, :-1].tobytes(): pred[i] for i in range(len(toks))}
    return lambda x: np.stack([table[r.tobytes()] for r in np.asarray(x)])

  assert exact_match(oracle(truth), enc, 20, 1, batch=2).tolist() == [True] * 3
  bad = truth.copy()
  bad[1, len(enc[1][0]) + 1] += 1  # the second target token of example 1
  bad[2, -1] += 1  # past the target: not scored
  assert exact_match(oracle(bad), enc, 20, 1, batch=4).tolist() == [True, False, True]


def test_save_and_load_round_trip(tmp_path, tok):
  cfg = ModelConfig.tiny(vocab_size=300, max_seq_len=64)
  model = Decoder(cfg, rngs=nnx.Rngs(2))
  params = ParamCodec(model).params(model)
  save_model(tmp_path, cfg, params, tok, {"steps": 7})
  back, tok2, info = load_model(tmp_path, max_seq_len=128)
  assert info == {"steps": 7} and back.cfg.max_seq_len == 128
  assert tok2.get_vocab_size() == tok.get_vocab_size()
  x = jnp.asarray(np.arange(12)[None] % 300, jnp.int32)
  want = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params)
  ref = ParamCodec(model).merge(want)(x)
  np.testing.assert_allclose(np.asarray(back(x)), np.asarray(ref), rtol=1e-5, atol=1e-5)
  with pytest.raises(FileNotFoundError, match="longctx_train"):
    load_model(tmp_path / "nothing")
