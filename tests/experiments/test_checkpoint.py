"""Checkpoint integrity: manifests, a garbled and a truncated step skipped by name, --step."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.checkpoint import MANIFEST, CheckpointError, Checkpoints

SEED = 0


def _state(step: int):
  rng = np.random.default_rng([SEED, step])
  return {"params": {"w": rng.standard_normal((64, 80)).astype(np.float32)},
          "opt_state": {"m": rng.standard_normal((64, 80)).astype(np.float32)}}


def _abstract():
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _biggest_file(step_dir):
  return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST),
             key=lambda p: p.stat().st_size)


def test_garbled_and_truncated_steps_are_skipped_by_name(tmp_path):
  print(f"seed {SEED}")
  ck = Checkpoints(tmp_path / "ck", keep=5)
  for s in (1, 2, 3):
    ck.save(s, _state(s), {"step": s})
  assert all(ck.verify(s) is None for s in (1, 2, 3))
  # Step 3: 4 KB XOR-ed in place (same size); step 2: truncated.
  f = _biggest_file(ck.step_dir(3))
  raw = bytearray(f.read_bytes())
  n = min(4096, len(raw))
  raw[:n] = bytes(b ^ 0x5A for b in raw[:n])
  f.write_bytes(bytes(raw))
  g = _biggest_file(ck.step_dir(2))
  g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
  warnings = []
  step, state, meta = ck.restore_newest(_abstract(), warn=warnings.append)
  assert step == 1 and meta["step"] == 1
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), _state(1)["params"]["w"])
  assert len(warnings) == 2
  assert "step 3" in warnings[0] and "checksum" in warnings[0]
  assert "step 2" in warnings[1] and "truncated" in warnings[1]
  assert all("\n" not in w and "<" not in w for w in warnings)
  with pytest.raises(CheckpointError, match="step 3 .* fails verification"):
    ck.restore_newest(_abstract(), step=3)
  with pytest.raises(CheckpointError, match="no checkpoint step 7"):
    ck.restore_newest(_abstract(), step=7)
  assert ck.verified_steps() == [1]
  ck.close()


def test_missing_manifest_fails_and_nothing_usable_is_one_line(tmp_path):
  ck = Checkpoints(tmp_path / "ck")
  ck.save(1, _state(1), {"step": 1})
  ck.save(2, _state(2), {"step": 2})
  (ck.step_dir(2) / MANIFEST).unlink()  # killed between Orbax's commit and the manifest
  assert "no manifest" in ck.verify(2)
  (ck.step_dir(1) / MANIFEST).write_text("{")
  with pytest.raises(CheckpointError, match="no usable checkpoint .* steps 2, 1") as e:
    ck.restore_newest(_abstract(), warn=lambda m: None)
  assert "\n" not in str(e.value)
  ck.close()
