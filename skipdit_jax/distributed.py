"""Multi-host start-up: `jax.distributed.initialize`, explicit or auto-detected.

Explicit: `--coordinator_address HOST:PORT --num_processes N --process_id I` (all three).
Auto: under SLURM with more than one task and on TPU pods that set TPU_WORKER_HOSTNAMES
(GKE), JAX finds the cluster itself; SKIPDIT_DISTRIBUTED=1 asks JAX to detect the cluster
anyway (Cloud TPU VMs created with gcloud, where JAX reads the metadata server). On CPU, processes exchange data through gloo collectives.
"""

from __future__ import annotations

import os

import jax
from absl import flags

from skipdit_jax.errors import ConfigError


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes in a multi-process run", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index (0..num_processes-1)", flag_values=fv)


def _auto_cluster() -> bool:
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    forced = os.environ.get("SKIPDIT_DISTRIBUTED", "") == "1"
    return slurm or tpu_pod or forced


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("--coordinator_address, --num_processes and --process_id must be given together")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id must be in 0..{num_processes - 1}, got {process_id}")
        # Only affects the CPU backend: its cross-process collectives go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _auto_cluster():
        jax.distributed.initialize()


def initialize_from_flags(fv: flags.FlagValues) -> None:
    initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
