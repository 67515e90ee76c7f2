"""Multi-process training on one CPU machine: `train --distributed` in two processes of 4
simulated devices each (a local coordinator) equals the one-process, one-device run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from colm.params import split_params
from experiments.config import load_config
from experiments.distributed import initialize_args
from experiments.train import load_run, train

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5  # losses and gradient norms, float32, 5 steps (the target)


def test_initialize_args_flags_then_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "node0:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert initialize_args(env=env) == {"coordinator_address": "node0:1234", "num_processes": 4,
                                      "process_id": 3}
  assert initialize_args("h:1", 2, 0, env=env) == {"coordinator_address": "h:1",
                                                   "num_processes": 2, "process_id": 0}
  assert initialize_args(env={}) == {}  # all left to JAX's cluster detection (SLURM, ...)
  with pytest.raises(ValueError, match="process_id 4 is outside 0..3"):
    initialize_args(process_id=4, env=env)


def _overrides(tmp_path: Path, corpus: Path, name: str) -> list[str]:
  # warmup_steps=0 and adam_eps=1e-5: a real update from step 1, smooth in the gradient (see
  # tests/experiments/test_train.py).
  return [f"name={name}", f"out_dir={tmp_path / 'runs'}", "model.preset=tiny",
          "model.vocab_size=320", "model.max_seq_len=16", "model.n_layers=1",
          f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "steps=5",
          "batch_size=8", "seq_len=16", "warmup_steps=0", "lr=1e-2", "adam_eps=1e-5",
          "log_every=1", "eval_every=5", "eval_batches=1", "save_every=5", "sample_tokens=1"]


def _rows(run_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_device(tmp_path, corpus):
  """2 processes x 4 devices on a data=2 x fsdp=2 x tensor=2 mesh, 5 steps at lr 1e-2 from step
  1: the losses, gradient norms and validation loss that process 0 logs equal the one-device
  run's within 1e-5 relative; each process read only its rows; the run folder was written once
  and its checkpoint restores onto one device."""
  # The reference: this process, one device. It also builds the token cache both reuse.
  single = train(load_config(None, _overrides(tmp_path, corpus, "single")), progress=False)
  cfg_file = tmp_path / "multi.yaml"  # every setting from the overrides, as for the reference
  cfg_file.write_text("name: multi\n")
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  args = [sys.executable, "-m", "experiments", "train", str(cfg_file),
          *_overrides(tmp_path, corpus, "multi"), "mesh_fsdp=2", "mesh_tensor=2",
          "--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2",
          "--no-progress"]
  procs = [subprocess.Popen([*args, "--process-id", str(i)], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-6000:]
  # Each process fed its own half of every batch on the global mesh of 8 devices.
  assert "process 0 of 2, feeding rows 0:4 of each batch), mesh {'data': 2, 'fsdp': 2, " \
      "'tensor': 2}" in outs[0], outs[0][-3000:]
  assert "process 1 of 2, feeding rows 4:8 of each batch)" in outs[1], outs[1][-3000:]
  one, multi = _rows(Path(single["run_dir"])), _rows(tmp_path / "runs" / "multi")
  assert [r["step"] for r in multi] == [r["step"] for r in one]  # one writer: no doubled rows
  worst = {}
  for a, b in zip(one, multi):
    for k in ("loss", "grad_norm", "val_loss"):
      if k in a:
        worst[k] = max(worst.get(k, 0.0), abs(b[k] - a[k]) / abs(a[k]))
  print("largest relative differences to one device:", worst, "tolerance", RTOL)
  assert max(worst.values()) <= RTOL, worst
  # The checkpoint the two processes wrote restores onto this process's one device, with the
  # one-device run's parameters (to rounding: see PARAM_ATOL in test_train.py).
  _, model, _, step = load_run(tmp_path / "runs" / "multi")
  _, ref, _, _ = load_run(single["run_dir"])
  assert step == 5
  got, want = split_params(model)[1], split_params(ref)[1]
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=2e-5, err_msg=k)
