"""SecretFlow SPU in its own environment, and the worker process the project calls with arrays.

SPU 0.9.5 pins jax 0.4.34, numpy < 2 and Python < 3.12, so it cannot share the project's
environment. `ensure_env()` builds a virtual environment for it on first use (or run
`python -m mpc.spu --setup`); `Worker` starts mpc/worker.py there and runs mpc.secure's
functions under a protocol, returning outputs and party 0's link statistics.

    with Worker() as w:
      r = w.run("full_deferred", q, k, v, protocol="ABY3")
      r.outputs[0], r.send_bytes, r.send_actions

Protocols: "ABY3" (3PC, honest majority), "CHEETAH" (2PC), "SEMI2K" (2PC with a trusted dealer
for the multiplication triples: label it so). The environment lives in $EFFLLM_SPU_ENV (default
~/.cache/effllm/spu-0.9.5); its Python is the first of $EFFLLM_SPU_PYTHON, this interpreter when
it is < 3.12, python3.11, python3.10.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

SPU_VERSION = "0.9.5"
PROTOCOLS = ("ABY3", "CHEETAH", "SEMI2K")
PARTIES = {"ABY3": 3, "CHEETAH": 2, "SEMI2K": 2}
SETUP_COMMAND = "python -m mpc.spu --setup"
_WORKER = Path(__file__).with_name("worker.py")


class SPUUnavailable(RuntimeError):
  """SPU's environment is missing or failed to build (the message says how to build it)."""


def env_dir() -> Path:
  return Path(os.environ.get("EFFLLM_SPU_ENV", Path.home() / ".cache/effllm" /
                             f"spu-{SPU_VERSION}"))


def env_python() -> Path:
  return env_dir() / "bin" / "python"


def _base_python() -> str:
  if os.environ.get("EFFLLM_SPU_PYTHON"):
    return os.environ["EFFLLM_SPU_PYTHON"]
  if sys.version_info < (3, 12):
    return sys.executable
  for name in ("python3.11", "python3.10"):
    if shutil.which(name):
      return shutil.which(name)
  raise SPUUnavailable(f"SPU {SPU_VERSION} needs Python < 3.12 and none was found; set "
                       f"EFFLLM_SPU_PYTHON to a Python 3.10 or 3.11 and run {SETUP_COMMAND}")


def env_ready() -> bool:
  py = env_python()
  if not py.exists():
    return False
  r = subprocess.run([str(py), "-c", "import spu, jax; print(spu.__version__)"],
                     capture_output=True, text=True)
  return r.returncode == 0 and r.stdout.strip() == SPU_VERSION


def ensure_env(quiet: bool = True) -> Path:
  """SPU's environment's Python, building the environment first when it is missing."""
  if env_ready():
    return env_python()
  d = env_dir()
  try:
    base = _base_python()
    if d.exists():
      shutil.rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", str(d)], check=True, capture_output=quiet)
    # spu's own pins bring jax 0.4.34 and numpy < 2.
    subprocess.run([str(env_python()), "-m", "pip", "install", "-q", f"spu=={SPU_VERSION}"],
                   check=True, capture_output=quiet)
  except (subprocess.CalledProcessError, OSError) as e:
    detail = getattr(e, "stderr", b"") or b""
    raise SPUUnavailable(
        f"building SPU's environment in {d} failed ({e}); build it by hand with "
        f"`{SETUP_COMMAND}` (needs pip access and Python < 3.12)\n"
        f"{detail.decode(errors='replace')[-2000:]}") from e
  if not env_ready():
    raise SPUUnavailable(f"SPU's environment in {d} does not import spu {SPU_VERSION}; "
                         f"rebuild it with `{SETUP_COMMAND}`")
  return env_python()


@dataclasses.dataclass
class Result:
  """One execution under a protocol: outputs and party 0's link statistics."""

  outputs: list[np.ndarray]
  send_bytes: int
  recv_bytes: int
  send_actions: int
  recv_actions: int
  seconds: float


def write_msg(stream, arrays: dict, meta: dict) -> None:
  """One message of the worker's channel: an 8-byte length, then an .npz of `arrays` with
  `meta` as JSON in the entry "__meta__" (numpy 1 and 2 both read it; nothing is pickled)."""
  buf = io.BytesIO()
  np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
  data = buf.getvalue()
  stream.write(struct.pack("<Q", len(data)) + data)
  stream.flush()


def read_msg(stream) -> tuple[dict, dict] | None:
  """(arrays, meta) of the next message, or None when the other side closed the channel."""
  head = stream.read(8)
  if len(head) < 8:
    return None
  (n,) = struct.unpack("<Q", head)
  with np.load(io.BytesIO(stream.read(n)), allow_pickle=False) as z:
    arrays = {key: z[key] for key in z.files}
  return arrays, json.loads(bytes(arrays.pop("__meta__")).decode())


def _reply(stream) -> tuple[dict, dict]:
  msg = read_msg(stream)
  if msg is None:
    raise RuntimeError("the SPU worker exited")
  return msg


class Worker:
  """A long-lived SPU worker process (builds SPU's environment on first use)."""

  def __init__(self, python: str | os.PathLike | None = None):
    py = str(python or ensure_env())
    self._lock = threading.Lock()
    self._proc = subprocess.Popen([py, "-u", str(_WORKER)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
      _, hello = _reply(self._proc.stdout)
    except RuntimeError as e:
      err = self._proc.stderr.read().decode(errors="replace")[-2000:]
      raise SPUUnavailable(f"the SPU worker did not start ({e}); rebuild SPU's environment "
                           f"with `{SETUP_COMMAND}`\n{err}") from e
    if "error" in hello:
      self.close()
      raise SPUUnavailable(f"the SPU worker could not import SPU ({hello['error']}); rebuild "
                           f"SPU's environment with `{SETUP_COMMAND}`")
    self.versions = {"spu": hello["spu"], "jax": hello["jax"]}
    self.log = hello["log"]

  def run(self, fn: str, *args: np.ndarray, protocol: str = "ABY3", field: str = "FM64",
          **kwargs) -> Result:
    """mpc.secure.<fn>(*args, **kwargs) with every argument secret, under `protocol`."""
    if protocol not in PROTOCOLS:
      raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
    arrays = {f"arg{i}": np.asarray(a, np.float32) for i, a in enumerate(args)}
    meta = {"fn": fn, "protocol": protocol, "field": field, "kwargs": kwargs}
    with self._lock:
      write_msg(self._proc.stdin, arrays, meta)
      out, info = _reply(self._proc.stdout)
    if "error" in info:
      raise RuntimeError(f"SPU run of {fn} under {protocol} failed: {info['error']}\n"
                         f"{info.get('traceback', '')}")
    return Result([out[f"out{i}"] for i in range(len(out))], info["send_bytes"],
                  info["recv_bytes"], info["send_actions"], info["recv_actions"],
                  info["seconds"])

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      try:
        self._proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self._proc.kill()

  def __enter__(self) -> Worker:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


if __name__ == "__main__":
  if "--setup" in sys.argv[1:]:
    print(f"SPU {SPU_VERSION} environment: {ensure_env(quiet=False)}")
  else:
    print(f"usage: {SETUP_COMMAND}   (builds SPU's environment in {env_dir()})")
