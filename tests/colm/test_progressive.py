"""Progressive CoLM runs end to end: a two-stage schedule stopped at the stage boundary and
resumed by the same command, old chains frozen bit-exact, `extract` back to the stage-0 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from colm.params import split_params
from experiments.cli import main as cli_main
from experiments.config import ConfigError, load_config
from experiments.train import load_run, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "value", "for", "in", "range", "if", "else", "x", "(", ")"]
  for i in range(8):
    (root / f"f{i}.py").write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(200)))
  return root


def progressive_config(tmp_path: Path, corpus: Path, *extra: str):
  return load_config(None, [
      "name=prog", f"out_dir={tmp_path / 'runs'}", "model.preset=tiny", "model.vocab_size=320",
      "model.n_layers=1", "model.d_model=24", "model.n_heads=2", "model.n_kv_heads=1",
      "model.head_dim=8", "model.ffn_dim=30", "model.max_seq_len=16", "model.air=true",
      f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "steps=6",
      "batch_size=4", "seq_len=16", "warmup_steps=1", "log_every=1", "eval_every=3",
      "eval_batches=1", "save_every=3", "sample_tokens=4",
      "stages=[{steps: 3}, {add_chain: 24, steps: 3}]", *extra])


def test_progressive_run_resumes_across_the_stage_boundary_and_extracts(tmp_path, corpus):
  cfg = progressive_config(tmp_path, corpus)
  first = train(cfg, stop_after=3, progress=False)  # killed right after stage 0
  assert first["step"] == 3 and [s["stage"] for s in first["stages"]] == [0]
  done = train(cfg, progress=False)  # the same command enters stage 1 from stage 0's checkpoint
  assert done["step"] == 6 and [s["chains"] for s in done["stages"]] == [[1], [1, 1]]
  run = Path(done["run_dir"])
  _, m0, _, s0 = load_run(run / "stage0")
  _, m1, _, s1 = load_run(run)  # a progressive run loads its last stage
  assert (s0, s1, m1.cfg.chains, m1.cfg.air) == (3, 3, (1, 1), True)
  p0, p1 = split_params(m0)[1], split_params(m1)[1]
  # Stage 1 trained only chain 2: extracting chain 1 gives back the stage-0 model bit for bit.
  assert cli_main(["extract", str(run), "--chains", "1", "--out", str(tmp_path / "c1")]) == 0
  _, mx, _, sx = load_run(tmp_path / "c1")
  px = split_params(mx)[1]
  assert sx == 3 and mx.cfg == m0.cfg and set(px) == set(p0)
  for name in p0:
    np.testing.assert_array_equal(np.asarray(px[name]), np.asarray(p0[name]), err_msg=name)
  assert any(np.any(np.asarray(p1[n])[..., 24:] != 0) for n in ("embed", "final_norm.scale"))
  assert cli_main(["extract", str(run), "--chains", "1", "--out", str(tmp_path / "c1")]) == 2
  assert cli_main(["eval", str(run), "--batches", "1"]) == 0  # the last stage, every scale


@pytest.mark.parametrize(
    "override, key",
    [
        ("stages=[{steps: 3}, {add_chain: 7, steps: 3}]", "stages.1.add_chain"),
        ("stages=[{steps: 3}, {add_chain: 24, steps: 2}]", "steps"),
        ("stages=[{add_chain: 24, steps: 6}]", "stages.0.add_chain"),
        ("scale_weights=[1.0, 2.0]", "scale_weights"),
        ("freeze_chains=1", "freeze_chains"),
    ],
)
def test_bad_colm_run_configs_name_the_key(tmp_path, corpus, override, key):
  extra = [override] if override.startswith("stages") else ["stages=[]", override]
  with pytest.raises(ConfigError, match=rf"^{key}:"):
    progressive_config(tmp_path, corpus, *extra)
