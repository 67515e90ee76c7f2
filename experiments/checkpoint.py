"""Orbax checkpoints of a run: params, optimizer state and step, saved atomically, kept K deep.

Every step folder gets a manifest.json, written last and atomically (temporary name, then
rename): the size and SHA-256 of each file Orbax wrote. A step without a valid manifest, or with
a file whose bytes differ from it, fails verification; `restore_newest` reports it in one line
and falls back to the next older step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
  """A missing, corrupt or mismatched checkpoint."""


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path) -> Path:
  """Records {relative path: [size, sha256]} of every file under step_dir, atomically."""
  files = {str(p.relative_to(step_dir)): [p.stat().st_size, _sha256(p)] for p in _files(step_dir)}
  out = step_dir / MANIFEST
  tmp = step_dir / f".{MANIFEST}.tmp{os.getpid()}"
  tmp.write_text(json.dumps({"format": 1, "files": files}, indent=0))
  os.replace(tmp, out)
  return out


def verify_manifest(step_dir: Path) -> str | None:
  """None when every file listed in step_dir's manifest has its size and checksum; otherwise
  what is wrong, in a few words naming the file."""
  path = step_dir / MANIFEST
  if not path.is_file():
    return f"no {MANIFEST} (the save did not finish)"
  try:
    files = json.loads(path.read_text())["files"]
  except (ValueError, KeyError, TypeError):
    return f"{MANIFEST} is unreadable"
  for rel, (size, digest) in files.items():
    f = step_dir / rel
    if not f.is_file():
      return f"{rel} is missing"
    if f.stat().st_size != size:
      return f"{rel} has {f.stat().st_size} bytes, the manifest says {size} (truncated?)"
    if _sha256(f) != digest:
      return f"{rel} does not match its checksum (corrupt)"
  return None


def _one_line(e: BaseException) -> str:
  """A short message for a library exception: its first line, unless that is an object repr."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  if not text or "<" in text[:80] or "object at 0x" in text or len(text) > 200:
    return f"{type(e).__name__} while reading the data"
  return text


class Checkpoints:
  """Saves and restores {"params", "opt_state"} pytrees plus a JSON dict per step.

  Orbax writes each step to a temporary folder and renames it when complete, so a run killed
  mid-save leaves the previous checkpoints intact.
  """

  def __init__(self, directory: str | Path, keep: int = 3):
    self.directory = Path(directory).resolve()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
    if step in self.all_steps():  # re-saving a step (the state before a divergence): replace it
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()
    if jax.process_index() == 0:  # the manifest last: a step without one is incomplete
      write_manifest(self.step_dir(step))

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def verify(self, step: int) -> str | None:
    """None if step's files match its manifest, else the reason (see verify_manifest).

    A folder where no step has a manifest was written before manifests existed: its steps are
    accepted unverified (Orbax's rename-on-commit still guards against interrupted saves).
    """
    if not any((self.step_dir(s) / MANIFEST).is_file() for s in self.all_steps()):
      return None
    return verify_manifest(self.step_dir(step))

  def verified_steps(self) -> list[int]:
    """The steps that pass verification, oldest first."""
    return [s for s in self.all_steps() if self.verify(s) is None]

  def restore_newest(self, abstract_state: dict[str, Any], step: int | None = None,
                     warn: Callable[[str], None] | None = None
                     ) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """restore() of `step`, or of the newest step that verifies and restores.

    Each newer step that fails is reported through `warn` (one line, default stderr) and
    skipped. Raises CheckpointError when `step` fails or no step is usable.
    """
    if step is not None:
      if step not in self.all_steps():
        raise CheckpointError(f"no checkpoint step {step} in {self.directory} (steps: "
                              f"{', '.join(map(str, self.all_steps())) or 'none'})")
      return self.restore(abstract_state, step)
    warn = warn or (lambda m: print(m, file=sys.stderr))
    bad = []
    for s in sorted(self.all_steps(), reverse=True):
      try:
        return self.restore(abstract_state, s)
      except CheckpointError as e:
        bad.append(s)
        warn(f"warning: skipping {e}")
    if not bad:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    raise CheckpointError(f"no usable checkpoint in {self.directory}: steps "
                          f"{', '.join(map(str, bad))} all failed verification")

  def restore(self, abstract_state: dict[str, Any], step: int | None = None
              ) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Restores into the shapes, dtypes and shardings of `abstract_state` (ShapeDtypeStructs).

    Raises CheckpointError when there is no checkpoint, or it cannot be read or does not match.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if (problem := self.verify(step)) is not None:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} fails verification: "
                            f"{problem}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable or mismatched trees
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored: {_one_line(e)}") from e
    state = out["state"]
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract_state)
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), state)
    if want != got:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match the "
                            "model configuration (shapes or dtypes differ)")
    return step, state, dict(out["meta"])

  def close(self) -> None:
    self.manager.close()
