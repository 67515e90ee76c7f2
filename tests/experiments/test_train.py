"""Training loop: exact resume, NaN stop, sharded step = one-device step, run-folder errors, CLI."""

from __future__ import annotations

import fcntl
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from experiments.checkpoint import CheckpointError
from experiments.cli import main as cli_main
from experiments.config import ConfigError, load_config
from experiments.train import load_run, train


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


# The sharded step against one device, on 8 simulated CPU devices (data=4 x fsdp=2), plus the
# same sharded step with a planted factor-of-2 error in the gradient reduction, and a checkpoint
# of the sharded state restored onto other meshes. One subprocess (XLA fixes the device count at
# start) writes what the tests below compare.
SHARDED = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from experiments.checkpoint import Checkpoints
    from experiments.config import load_config
    from experiments.train import Trainer, make_guarded_step, make_mesh
    assert jax.device_count() == 8, jax.devices()
    out_dir, steps = sys.argv[1], 5
    # warmup_steps=0: full lr from step 1 (with warm-up from 0 the first update is 0). Adam's eps
    # 1e-5 keeps its update smooth in the gradient: with optax's 1e-8, an entry whose gradient
    # is as small as float32 rounding noise (~1e-8 here) moves by +-lr on the sign of that noise.
    cfg = load_config(None, ["model.preset=tiny", "model.vocab_size=320", "batch_size=8",
                             "seq_len=16", "steps=10", "warmup_steps=0", "lr=1e-2",
                             "adam_eps=1e-5", "model.max_seq_len=16", "model.n_layers=1"])
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 320, (8, 17)).astype(np.int32) for _ in range(steps)]
    tokens = rng.integers(0, 320, (8, 16)).astype(np.int32)

    def run(name, mesh, plant=False):
      t = Trainer(cfg, mesh=mesh)
      if plant:  # value L, gradient 2 dL: a reduction that sums two shards instead of averaging
        f = t.loss_fn
        t._step = jax.jit(make_guarded_step(
            lambda p, b: 2 * f(p, b) - jax.lax.stop_gradient(f(p, b)), t.tx,
            cfg.divergence_spike, cfg.divergence_window), donate_argnums=(0, 1, 2))
      s = t.init_state()
      if t.mesh.size > 1:  # FSDP shards every matrix and its Adam moments
        mats = [x for x in jax.tree.leaves((s.params, s.opt_state)) if x.ndim == 2]
        assert mats and all(x.addressable_shards[0].data.size < x.size for x in mats)
      rows = {"params": [np.concatenate([np.ravel(v) for v in s.params.values()])]}
      for b in batches:
        s, m = t.step(s, b)
        for k in ("loss", "grad_norm"):
          rows.setdefault(k, []).append(float(m[k]))
        rows["params"].append(np.concatenate([np.ravel(v) for v in s.params.values()]))
      np.savez(f"{out_dir}/{name}.npz", **{k: np.asarray(v) for k, v in rows.items()})
      return t, s

    def logits(t, params):
      with jax.set_mesh(t.mesh):
        return np.asarray(jax.jit(lambda p, x: t.codec.merge(p)(x))(params, tokens))

    run("one", make_mesh(1, 1, 1, jax.devices()[:1]))
    t8, s8 = run("sharded", make_mesh(4, 2, 1))
    run("planted", make_mesh(4, 2, 1), plant=True)
    ckpt = Checkpoints(f"{out_dir}/ckpt")
    ckpt.save(steps, {"params": s8.params, "opt_state": s8.opt_state}, {"step": steps})
    res = {"saved": logits(t8, s8.params)}
    for name, mesh in (("tensor2_data4", make_mesh(4, 1, 2)),
                       ("one_device", make_mesh(1, 1, 1, jax.devices()[:1]))):
      t = Trainer(cfg, mesh=mesh)
      step, state, _ = ckpt.restore(t.abstract_state())
      q = state["params"]["layers.0.attn.q.kernels.0"]
      assert q.sharding == t.param_shardings["layers.0.attn.q.kernels.0"], q.sharding
      print(name, "restored q kernel with", q.sharding.spec, "on", len(q.sharding.device_set))
      res[name] = logits(t, state["params"])
    ckpt.close()
    np.savez(f"{out_dir}/logits.npz", **res)
    print("OK")
""")
# Stated tolerances (float32). Every step moves some parameter by >= ~5e-3 (lr 1e-2), checked
# below against PARAM_ATOL; rounding alone moves parameters by ~3e-6 over 5 steps.
PARAM_ATOL = 2e-5
METRIC_RTOL = 1e-5  # losses and gradient norms (the target over 5 steps)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, cpu_devices):
  # Under pytest-xdist every worker would run the subprocess; the first one to take the lock
  # runs it into the session's shared temp folder and the others read its files.
  base = tmp_path_factory.getbasetemp()
  out = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "sharded_runs"
  out.mkdir(exist_ok=True)
  with open(out / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (out / "logits.npz").exists():
      stdout = cpu_devices(SHARDED, str(out))
      assert "OK" in stdout, stdout
  return {name: dict(np.load(out / f"{name}.npz")) for name in
          ("one", "sharded", "planted", "logits")}


def sharded_mismatches(one: dict, other: dict) -> list[str]:
  """What differs between two runs beyond the stated tolerances: per step, the loss, the
  gradient norm (global, before clipping) and every parameter after the update."""
  bad = []
  for k in ("loss", "grad_norm"):
    rel = np.abs(other[k] - one[k]) / np.abs(one[k])
    bad += [f"{k} at step {s + 1}: rel. diff {r:.2e}" for s, r in enumerate(rel) if r > METRIC_RTOL]
  for s in range(1, len(one["params"])):
    d = np.abs(other["params"][s] - one["params"][s]).max()
    if d > PARAM_ATOL:
      bad.append(f"params after step {s}: max |diff| {d:.2e}")
  return bad


def test_sharded_step_matches_one_device(sharded_runs):
  """5 steps at lr 1e-2 from step 1 on data=4 x fsdp=2 equal one device: losses and gradient
  norms within 1e-5 relative, every parameter within PARAM_ATOL, which is far below what one
  step changes."""
  one = sharded_runs["one"]
  change = [np.abs(one["params"][s] - one["params"][s - 1]).max()
            for s in range(1, len(one["params"]))]
  print("per-step max parameter change", change, "tolerance", PARAM_ATOL)
  assert min(change) > 100 * PARAM_ATOL
  assert sharded_mismatches(one, sharded_runs["sharded"]) == []


def test_planted_gradient_reduction_error_fails_the_check(sharded_runs):
  """Gradients doubled (loss unchanged), as a reduction summing 2 shards instead of averaging
  them would: Adam's normalisation and the clipping hide it from the first steps' parameters and
  losses, but the gradient norm shows it at step 1."""
  bad = sharded_mismatches(sharded_runs["one"], sharded_runs["planted"])
  print("planted error found:", bad)
  assert "grad_norm at step 1: rel. diff 1.00e+00" in bad


def test_checkpoint_restores_onto_other_meshes(sharded_runs):
  """Saved from data=4 x fsdp=2, restored onto tensor=2 x data=4 and onto one device (Orbax
  re-shards onto the target shardings): the same logits."""
  logits = sharded_runs["logits"]
  scale = np.abs(logits["saved"]).max()
  for name in ("tensor2_data4", "one_device"):
    np.testing.assert_allclose(logits[name], logits["saved"], atol=1e-5 * scale, err_msg=name)
