"""The SPU worker: runs mpc.secure's functions in SPU's simulator, inside SPU's own environment.

Started by mpc.spu.Worker as `<spu env python> -u mpc/worker.py`; never imported by the project.
Requests and replies travel over stdin / stdout as mpc.spu's messages (write_msg / read_msg:
length-prefixed .npz payloads), the request's JSON in the entry "__meta__":

    {"fn": "full_deferred", "protocol": "ABY3", "field": "FM64", "kwargs": {...}}

and the inputs as "arg0", "arg1", ... (all secret). The reply holds "out0", ... and in
"__meta__" party 0's link statistics of the execution (send / recv bytes and actions, read from
SPU's profile log) and its wall time, or {"error": "..."}. SPU's own log output goes to a file,
not to the channel.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import traceback

import numpy as np

LINK = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), "
                  r"recv actions (\d+)")


def main() -> None:
  channel_in = sys.stdin.buffer
  channel_out = os.fdopen(os.dup(1), "wb")
  log_path = os.environ.get("EFFLLM_SPU_LOG") or tempfile.mkstemp(prefix="spu-", suffix=".log")[1]
  log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
  os.dup2(log_fd, 1)
  os.dup2(log_fd, 2)
  here = os.path.dirname(os.path.abspath(__file__))
  # The script's folder (mpc/, which holds an spu.py of the project's) must not shadow SPU.
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
  sys.path.insert(0, os.path.dirname(here))
  from mpc.spu import PARTIES, read_msg, write_msg  # stdlib and numpy only
  try:
    import jax
    jax.config.update("jax_platforms", "cpu")
    import spu.utils.simulation as spsim
    from spu import libspu

    from mpc import secure
  except Exception as e:
    write_msg(channel_out, {}, {"error": f"{type(e).__name__}: {e}", "log": log_path})
    return

  write_msg(channel_out, {}, {"ready": True, "spu": __import__("spu").__version__,
                              "jax": jax.__version__, "log": log_path})
  while True:
    msg = read_msg(channel_in)
    if msg is None:
      return
    req, meta = msg
    try:
      fn = getattr(secure, meta["fn"])
      kwargs = meta.get("kwargs", {})
      args = [req[f"arg{i}"] for i in range(len(req))]
      cfg = libspu.RuntimeConfig(protocol=getattr(libspu.ProtocolKind, meta["protocol"]),
                                 field=getattr(libspu.FieldType, meta.get("field", "FM64")))
      cfg.enable_pphlo_profile = True  # party 0 logs its link statistics per execution
      sim = spsim.Simulator(PARTIES[meta["protocol"]], cfg)
      run = spsim.sim_jax(sim, lambda *a, fn=fn, kwargs=kwargs: fn(*a, **kwargs))
      with open(log_path, "rb") as f:
        start = f.seek(0, 2)
      t0 = time.perf_counter()
      out = run(*args)
      seconds = time.perf_counter() - t0
      with open(log_path, "rb") as f:
        f.seek(start)
        found = LINK.findall(f.read().decode(errors="replace"))
      if not found:
        raise RuntimeError(f"no link statistics in SPU's log {log_path}")
      sb, rb, sa, ra = (int(x) for x in found[-1])
      flat = out if isinstance(out, list | tuple) else [out]
      flat = jax.tree_util.tree_leaves(flat)
      write_msg(channel_out, {f"out{i}": np.asarray(x) for i, x in enumerate(flat)},
                {"send_bytes": sb, "recv_bytes": rb, "send_actions": sa, "recv_actions": ra,
                 "seconds": seconds})
    except Exception as e:  # reported to the caller, the worker stays up
      write_msg(channel_out, {}, {"error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()})


if __name__ == "__main__":
  main()
