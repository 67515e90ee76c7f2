"""Starting a multi-process (multi-host) run: jax.distributed.initialize from flags, environment
variables or the cluster's own.

    # two processes on one machine (what tests/experiments/test_distributed.py runs on CPU)
    python -m experiments train CONFIG --distributed --coordinator localhost:12355 \\
        --num-processes 2 --process-id 0      # and --process-id 1 in a second shell
    # SLURM: srun sets SLURM_* and JAX reads them (coordinator = the first node of the job)
    srun --ntasks-per-node=1 python -m experiments train CONFIG --distributed
    # Kubernetes (an indexed Job with a headless Service), or any launcher: the environment
    JAX_COORDINATOR_ADDRESS=job-0.svc:12355 JAX_NUM_PROCESSES=4 \\
        JAX_PROCESS_ID=$JOB_COMPLETION_INDEX python -m experiments train CONFIG --distributed

Every process then runs the same program over the global mesh (colm.mesh.make_mesh over
jax.devices() of all processes); each loads only its rows of every batch (Trainer.local_rows),
and only process 0 writes the run folder (Orbax writes each process's checkpoint shards).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# Environment variables read when a flag is absent. JAX itself reads JAX_COORDINATOR_ADDRESS;
# the other two are this project's, for launchers JAX does not detect (Kubernetes without the
# kubernetes package, a plain shell).
ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def initialize_args(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, env: Mapping[str, str] | None = None
                    ) -> dict[str, Any]:
  """The keyword arguments for jax.distributed.initialize: each flag, else its ENV variable;
  what is left out JAX detects from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU)."""
  env = os.environ if env is None else env
  given = {"coordinator_address": coordinator, "num_processes": num_processes,
           "process_id": process_id}
  out: dict[str, Any] = {}
  for key, value in given.items():
    if value is None and env.get(ENV[key]):
      value = env[ENV[key]]
    if value is not None:
      out[key] = value if key == "coordinator_address" else int(value)
  n, i = out.get("num_processes"), out.get("process_id")
  if n is not None and n < 1:
    raise ValueError(f"num_processes must be >= 1, got {n}")
  if n is not None and i is not None and not 0 <= i < n:
    raise ValueError(f"process_id {i} is outside 0..{n - 1}")
  return out


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """jax.distributed.initialize with initialize_args; call before anything touches a device."""
  import jax
  jax.distributed.initialize(**initialize_args(coordinator, num_processes, process_id))
