"""Training loop: exact resume, NaN stop, sharded step = one-device step, run-folder errors, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from experiments.checkpoint import CheckpointError
from experiments.cli import main as cli_main
from experiments.config import ConfigError, load_config
from experiments.train import load_run, train

REPO = Path(__file__).resolve().parents[2]


def _losses(run_dir: Path) -> dict[int, float]:
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_is_exact(tmp_path, corpus, tiny_config):
  full = train(tiny_config(tmp_path, corpus, "full"), progress=False)
  cfg = tiny_config(tmp_path, corpus, "killed")
  first = train(cfg, stop_after=3, progress=False)
  assert first["step"] == 3
  resumed = train(cfg, progress=False)
  assert resumed["step"] == 6
  a, b = _losses(Path(full["run_dir"])), _losses(Path(resumed["run_dir"]))
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_array_equal([a[s] for s in a], [b[s] for s in a])
  assert resumed["val_loss"] == full["val_loss"]
  for name in ("config.yaml", "tokenizer.json", "loss.png", "metrics.jsonl"):
    assert (Path(resumed["run_dir"]) / name).is_file()
  assert list((Path(resumed["run_dir"]) / "tb").iterdir())  # TensorBoard events


def test_run_folder_errors(tmp_path, corpus, tiny_config):
  cfg = tiny_config(tmp_path, corpus, "errs", "steps=3")
  train(cfg, progress=False)
  run_dir = tmp_path / "runs" / "errs"
  # A finished run run again trains nothing and reports its real last validation loss.
  again = train(cfg, progress=False)
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert again["val_loss"] == [r["val_loss"] for r in rows if "val_loss" in r][-1]
  # A different model under the same name is refused before anything is written.
  before = (run_dir / "config.yaml").read_text()
  with pytest.raises(CheckpointError, match="different model.*model.d_model: stored 48, "
                     "requested 24"):
    train(tiny_config(tmp_path, corpus, "errs", "model.d_model=24", "model.head_dim=6"),
          progress=False)
  assert (run_dir / "config.yaml").read_text() == before
  # Missing folder, missing checkpoint, corrupt checkpoint.
  with pytest.raises(CheckpointError, match="not a run folder"):
    load_run(tmp_path / "nowhere")
  for f in (run_dir / "checkpoints" / "3").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match="steps 3 all failed verification"):
    load_run(run_dir)


def test_too_short_split_is_rejected_before_the_run_folder(tmp_path, tiny_config):
  text = tmp_path / "one.py"
  text.write_text("def f(x):\n    return x\n" * 40)
  cfg = tiny_config(tmp_path, text, "short")
  with pytest.raises(ConfigError, match="the val split .* fewer than seq_len \\+ 1 = 33"):
    train(cfg, progress=False)
  assert not (tmp_path / "runs" / "short").exists()


def test_cli_train_eval_generate_and_errors(tmp_path, corpus, capsys):
  args = [f"out_dir={tmp_path / 'runs'}", "model.preset=tiny", "model.vocab_size=320",
          "model.max_seq_len=32", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'c'}",
          "steps=2", "batch_size=2", "seq_len=16", "warmup_steps=1", "eval_every=2",
          "eval_batches=1", "save_every=2", "sample_tokens=4", "name=cli"]
  cfg_file = tmp_path / "c.yaml"
  cfg_file.write_text("name: cli\n")
  assert cli_main(["train", str(cfg_file), *args, "--no-progress"]) == 0
  assert "validation loss" in capsys.readouterr().out
  run_dir = tmp_path / "runs" / "cli"
  assert cli_main(["eval", str(run_dir), "--batches", "1"]) == 0
  assert "perplexity" in capsys.readouterr().out
  assert cli_main(["generate", str(run_dir), "--prompt", "def", "--max-new-tokens", "3"]) == 0
  assert cli_main(["generate", str(run_dir), "--prompt", "x " * 40]) == 2
  assert "exceeds the cache length" in capsys.readouterr().err
  assert cli_main(["train", str(cfg_file), *args, "stepz=3"]) == 2
  assert "stepz" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # argparse: --prompt is required
    cli_main(["generate", str(run_dir)])
  assert cli_main(["eval", str(tmp_path / "missing_run")]) == 2
  assert cli_main(["list", "--out-dir", str(tmp_path / "runs")]) == 0
  assert "cli" in capsys.readouterr().out


@pytest.mark.parametrize("override,key", [
    ("model.foo=1", "model.foo"), ("steps=abc", "steps"), ("seq_len=4096", "seq_len"),
    ("model.dtype=fp8", "dtype"), ("model.chains=[1,2]", "n_kv_heads"),
    ("warmup_steps=5000", "warmup_steps"), ("data.val_fraction=0.9", "data.val_fraction"),
    ("batch_size=-1", "batch_size"),
])
def test_config_errors_name_the_key(override, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    load_config("quickstart", [override])


def test_every_shipped_config_loads():
  from experiments.config import list_configs
  for name in list_configs():
    load_config(name)


SHARDED = textwrap.dedent("""
    import os, sys
    import jax, numpy as np
    from experiments.config import load_config
    from experiments.train import Trainer, make_mesh
    assert jax.device_count() == 8, jax.devices()
    cfg = load_config(None, ["model.preset=tiny", "model.vocab_size=320", "batch_size=8",
                             "seq_len=16", "steps=10", "warmup_steps=2", "model.d_model=48",
                             "model.max_seq_len=16"])
    batch = np.random.default_rng(0).integers(0, 320, (8, 17)).astype(np.int32)
    out = []
    for data, fsdp, devs in ((1, 1, jax.devices()[:1]), (4, 2, jax.devices())):
      t = Trainer(cfg, mesh=make_mesh(data, fsdp, devs))
      s = t.init_state()
      s, m = t.step(s, batch)
      s, m = t.step(s, batch)
      out.append((float(m["loss"]), {k: np.asarray(v) for k, v in s.params.items()}))
    (l1, p1), (l8, p8) = out
    print("losses", l1, l8)
    assert abs(l1 - l8) < 1e-5 * max(1, abs(l1)), (l1, l8)
    for k in p1:
      # Adam divides by sqrt(v): where a gradient is ~0, rounding moves an entry by up to ~lr.
      np.testing.assert_allclose(p1[k], p8[k], rtol=1e-4, atol=5e-4, err_msg=k)
    print("OK")
""")


def test_sharded_step_matches_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  r = subprocess.run([sys.executable, "-c", SHARDED], env=env, cwd=REPO, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "OK" in r.stdout
