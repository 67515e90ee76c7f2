"""bench press at toy size: scores, memory held, the speed rows, bad names."""

import pytest
from flax import nnx

from colm.config import ModelConfig
from colm.model import Decoder
from experiments import longctx
from experiments.bench_press import decode_speed, make_press, run_examples
from experiments.data import _train_tokenizer


@pytest.fixture(scope="module")
def setup(corpus):
  tok = _train_tokenizer([p.read_text() for p in sorted(corpus.glob("*.py"))], 300)
  model = Decoder(ModelConfig.tiny(vocab_size=300, max_seq_len=1024, n_kv_heads=2),
                  rngs=nnx.Rngs(0))
  exs = (longctx.needle(2, 400, seed=4, tokenizer=tok, source=str(corpus))
         + longctx.passkey(2, 400, seed=4, tokenizer=tok, source=str(corpus)))
  return tok, model, exs


@pytest.mark.parametrize("method", ["snapkv", "windowkv", "streamingllm", "mpcache-dyn",
                                    "h2o-decode"])
@pytest.mark.parametrize("aware", [True, False])
def test_compressed_runs_score_and_hold_less(setup, method, aware):
  tok, model, exs = setup
  kw = dict(query_aware=aware, task_of=lambda e: "localization", max_new=8, stop=0)
  full = run_examples(model, tok, exs, None, None, **kw)
  r = run_examples(model, tok, exs, method, 0.25, **kw)
  for x in (full, r):
    assert len(x["scores"]) == len(exs) and all(0.0 <= s <= 1.0 for s in x["scores"])
    assert set(x["by_family"]) >= {"needle", "passkey", "all"}
  assert r["kv_bytes_per_seq"] < 0.6 * full["kv_bytes_per_seq"]
  assert r["held_slots_per_head"] < full["held_slots_per_head"]


def test_speed_rows_and_bad_names(setup):
  _, model, _ = setup
  cfg = model.cfg.replace(max_seq_len=512)
  rows = decode_speed(cfg, 2, 256, 4, {"snapkv": make_press("snapkv", 0.25, room=8)},
                      repeats=1)
  assert [r["method"] for r in rows] == ["full", "snapkv"]
  assert rows[1]["kv_fraction"] < 0.5 and rows[0]["speedup_vs_full"] == 1.0
  with pytest.raises(ValueError, match="unknown method 'bogus'"):
    make_press("bogus", 0.5)
  assert make_press("mpcache-group", 0.5).heads == "group" and make_press("mpcache", 0.5).heads \
      == "all"
  with pytest.raises(ValueError, match="budget"):
    make_press("snapkv", 0.0)


def test_speed_section_alone_needs_no_model(tmp_path):
  """--sections speed without --model times random weights of configs/longctx.yaml's shapes
  and writes press_speed_<backend>.json; any other section without a model is a one-line
  error."""
  import json

  from experiments.bench_press import main
  with pytest.raises(SystemExit, match="--model is required"):
    main(["--sections", "speed", "aware"])
  main(["--sections", "speed", "--speed-presets", "trained", "--methods", "snapkv",
        "--speed-budget", "0.25", "--speed-prompt", "256", "--speed-new", "4",
        "--speed-batch", "1", "--out", str(tmp_path)])
  (path,) = tmp_path.glob("press_speed_*.json")
  sp = json.loads(path.read_text())["speed"]["trained"]
  assert [r["method"] for r in sp["rows"]] == ["full", "snapkv"] and sp["prompt"] == 256
  assert sp["rows"][1]["kv_fraction"] < 0.5
