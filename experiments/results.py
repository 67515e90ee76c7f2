"""Benchmark and experiment results: JSON files stamped with device, versions and commit."""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jax

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def git_commit() -> str:
  """$EFFLLM_COMMIT when set (a copy of the tree whose .git is not the tree's own, as on the lent
  GPU machine), else the commit of the working tree ('+dirty' when it has uncommitted changes),
  else 'unknown'."""
  if os.environ.get("EFFLLM_COMMIT"):
    return os.environ["EFFLLM_COMMIT"]
  root = Path(__file__).resolve().parent.parent
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.strip()
    return sha + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def environment() -> dict[str, Any]:
  """Device, backend, library versions and commit: what every results file carries."""
  import flax
  dev = jax.devices()[0]
  return {
      "device": getattr(dev, "device_kind", str(dev)),
      "backend": jax.default_backend(),
      "num_devices": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
      "flax": flax.__version__,
      "python": platform.python_version(),
      "commit": git_commit(),
      "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }


def pct(x: float | None) -> str:
  """0.423 -> '42.3%'; None (not defined on this backend) -> 'n/a'."""
  return "n/a" if x is None else f"{100 * x:.1f}%"


_COMPILE_S = [0.0]  # seconds of JAX tracing, lowering and compiling seen so far (see below)
_COMPILE_EVENT = "/jax/core/compile/"


def _on_duration(event: str, seconds: float, **_) -> None:
  if event.startswith(_COMPILE_EVENT):
    _COMPILE_S[0] += seconds


def compile_seconds() -> float:
  """A running total of the seconds JAX spent tracing, lowering and compiling (jax.monitoring's
  /jax/core/compile/ duration events), counted from the first call of this function, which
  installs the listener: a benchmark reads it before and after a timed region and reports the
  difference apart from the wall time (a shape first seen inside the region compiles there)."""
  if not getattr(compile_seconds, "installed", False):
    import jax.monitoring
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    compile_seconds.installed = True
  return _COMPILE_S[0]


def write_results(name: str, payload: dict[str, Any], out_dir: str | os.PathLike | None = None
                  ) -> Path:
  """Writes {environment, **payload} to <out_dir>/<name>_<backend>.json and returns the path.

  out_dir defaults to $EFFLLM_RESULTS or results/ at the repository root.
  """
  out = Path(out_dir or os.environ.get("EFFLLM_RESULTS") or RESULTS_DIR)
  out.mkdir(parents=True, exist_ok=True)
  env = environment()
  path = out / f"{name}_{env['backend']}.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps({"name": name, "environment": env, **payload}, indent=2, default=str))
  tmp.replace(path)
  return path


@contextlib.contextmanager
def trace_to(path: str | os.PathLike):
  """Records a JAX profiler trace of the block and copies its .xplane.pb to `path` (one file,
  readable with xprof / TensorBoard's profile plugin or `python -m experiments.profile`)."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      yield
    found = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    if found:
      Path(path).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(found[0], path)
