"""Orbax checkpoints of a run: params, optimizer state and step, saved atomically, kept K deep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A missing, corrupt or mismatched checkpoint."""


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
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, abstract_state: dict[str, Any], step: int | None = None
              ) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Restores into the shapes, dtypes and shardings of `abstract_state` (ShapeDtypeStructs).

    Raises CheckpointError when there is no checkpoint, or it cannot be read or does not match.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable or mismatched trees
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored: {msg[:300]}") from e
    state = out["state"]
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract_state)
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), state)
    if want != got:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match the "
                            "model configuration (shapes or dtypes differ)")
    return step, state, dict(out["meta"])

  def close(self) -> None:
    self.manager.close()
