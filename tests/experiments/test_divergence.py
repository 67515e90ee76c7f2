"""Divergence: stopped before the update with the pre-update state saved, rollback and its
resume, spikes, the rollback rule, and the CLI's one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.checkpoint import Checkpoints
from experiments.cli import main as cli_main
from experiments.divergence import init_guard, make_guarded_step, rollback_target
from experiments.train import Trainer, TrainState, train

SEED = 0


def test_guarded_step_skips_bad_updates_and_spikes():
  print(f"seed {SEED}")
  x = jnp.asarray(np.random.default_rng(SEED).standard_normal(5), jnp.float32)

  def loss_fn(p, batch):
    return jnp.sum((p["w"] - x) ** 2) * batch[0]

  step = jax.jit(make_guarded_step(loss_fn, optax.sgd(0.1), spike=3.0, window=2))
  p, o, g = {"w": jnp.zeros(5)}, optax.sgd(0.1).init({"w": jnp.zeros(5)}), init_guard()
  for scale in (1.0, 1.0):
    p, o, g, m = step(p, o, g, jnp.asarray([scale]), jnp.float32(1.0))
    assert bool(m["ok"])
  before = np.asarray(p["w"])
  p, o, g, m = step(p, o, g, jnp.asarray([100.0]), jnp.float32(1.0))  # a 100x loss: a spike
  assert not bool(m["ok"]) and bool(m["spike"])
  np.testing.assert_array_equal(np.asarray(p["w"]), before)
  p, o, g, m = step(p, o, g, jnp.asarray([1.0]), jnp.float32(1.0))  # sticky: still skipped
  assert not bool(m["ok"])
  np.testing.assert_array_equal(np.asarray(p["w"]), before)
  g = init_guard()
  p, o, g, m = step(p, o, g, jnp.asarray([jnp.nan]), jnp.float32(1.0))
  assert not bool(m["ok"]) and not bool(m["spike"])


def test_rollback_target():
  assert rollback_target([2, 4, 6], 7, None) == 6
  assert rollback_target([2, 4, 6], 6, None) == 4
  assert rollback_target([2, 4], 5, 4) == 2  # diverged again before a newer save: go further
  assert rollback_target([2], 3, 2) == 0  # a fresh start


def test_lr_1e8_stops_before_the_update_with_a_finite_checkpoint(tmp_path, corpus, tiny_config,
                                                                 capsys):
  cfg = tiny_config(tmp_path, corpus, "lr", "lr=1e8", "steps=8", "save_every=4", "log_every=4")
  cfg_file = tmp_path / "lr.yaml"
  cfg_file.write_text("name: lr\n")
  args = [f"{k}={v}" for k, v in (("out_dir", tmp_path / "runs"), ("model.preset", "tiny"),
                                   ("model.vocab_size", 320), ("model.max_seq_len", 32),
                                   ("data.source", corpus), ("data.cache_dir", tmp_path / "cache"),
                                   ("steps", 8), ("batch_size", 4), ("seq_len", 32),
                                   ("warmup_steps", 2), ("save_every", 4), ("log_every", 4),
                                   ("eval_every", 3), ("eval_batches", 2), ("lr", 1e8))]
  assert cli_main(["train", str(cfg_file), *args, "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: divergence at step") and err.count("\n") == 1, err
  s = int(err.split("divergence at step ")[1].split(":")[0])
  assert f"newest checkpoint that is finite and passed the check is step {s - 1}" in err
  ck = Checkpoints(tmp_path / "runs" / "lr" / "checkpoints")
  assert ck.latest_step() == s - 1 and ck.verify(s - 1) is None
  step, state, meta = ck.restore_newest(Trainer(cfg).abstract_state())
  ck.close()
  assert meta["diverged_at"] == s
  assert all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree.leaves(state))


def test_rollback_recovers_and_resume_continues(tmp_path, corpus, tiny_config):
  cfg = tiny_config(tmp_path, corpus, "rb", "lr=1e8", "on_divergence=rollback",
                    "rollback_lr_factor=1e-5", "steps=8", "save_every=2", "eval_every=4",
                    "log_every=1")
  first = train(cfg, stop_after=6, progress=False)
  assert first["step"] == 6
  run_dir = Path(first["run_dir"])
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert any("rollback" in r for r in rows)
  ck = Checkpoints(run_dir / "checkpoints")
  _, _, meta = ck.restore_newest(Trainer(cfg).abstract_state())
  ck.close()
  assert meta["step"] == 6 and meta["lr_scale"] < 1 and meta["batch_offset"] > 0
  resumed = train(cfg, progress=False)  # continues with the lowered lr and the skipped batches
  assert resumed["step"] == 8 and np.isfinite(resumed["val_loss"])
  assert all(bool(np.all(np.isfinite(np.asarray(v)))) for v in resumed["params"].values())
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in rows if r.get("step") == 8 and "lr" in r][-1]
  assert last["lr"] < cfg.lr * meta["lr_scale"] * 1.0001
  state = TrainState.from_checkpoint(8, {"params": {}, "opt_state": {}}, meta)
  assert state.rollbacks >= 1 and state.lr_scale == meta["lr_scale"]
