"""Multi-host start-up: ``jax.distributed.initialize`` from the environment (docs/parallelism.md).

Three environment variables describe the job explicitly (all three or none):

* ``HYDRAHEAD_COORDINATOR``  ``host:port`` of process 0's coordination service
* ``HYDRAHEAD_NUM_PROCESSES`` number of JAX processes
* ``HYDRAHEAD_PROCESS_ID``   this process's index, ``0 .. NUM_PROCESSES-1``

With none of them set and ``train.distributed=true``, JAX detects the cluster itself (SLURM, Open MPI,
TPU pods, ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, ...). With none set
and ``train.distributed=false`` the run is single-process. On CPU, cross-process collectives use
gloo (``jax_cpu_collectives_implementation``; JAX's default in 0.10).
"""

from __future__ import annotations

import os

from hydrahead_jax.cli import UserError

ENV_COORDINATOR = "HYDRAHEAD_COORDINATOR"
ENV_NUM_PROCESSES = "HYDRAHEAD_NUM_PROCESSES"
ENV_PROCESS_ID = "HYDRAHEAD_PROCESS_ID"
ENV_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)


class DistributedConfigError(UserError, ValueError):
  """The multi-host environment variables are partial or malformed."""


def from_env(environ=None) -> dict | None:
  """``{coordinator_address, num_processes, process_id}`` from the HYDRAHEAD_* variables; None when
  none is set; ``DistributedConfigError`` (one line) when only some are set or a value is bad."""
  environ = os.environ if environ is None else environ
  values = {k: environ.get(k, "").strip() for k in ENV_VARS}
  given = [k for k, v in values.items() if v]
  if not given:
    return None
  if len(given) < len(ENV_VARS):
    missing = [k for k in ENV_VARS if k not in given]
    raise DistributedConfigError(
        f"multi-host: {', '.join(given)} set but {', '.join(missing)} not; set all of "
        f"{', '.join(ENV_VARS)} (or none, and train.distributed=true for JAX's own cluster detection)")
  addr = values[ENV_COORDINATOR]
  host, sep, port = addr.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise DistributedConfigError(f"multi-host: {ENV_COORDINATOR}={addr!r} is not host:port")
  try:
    n, pid = int(values[ENV_NUM_PROCESSES]), int(values[ENV_PROCESS_ID])
  except ValueError:
    raise DistributedConfigError(
        f"multi-host: {ENV_NUM_PROCESSES}={values[ENV_NUM_PROCESSES]!r} and {ENV_PROCESS_ID}="
        f"{values[ENV_PROCESS_ID]!r} must be integers") from None
  if n < 1 or not 0 <= pid < n:
    raise DistributedConfigError(
        f"multi-host: {ENV_PROCESS_ID}={pid} is not in 0..{ENV_NUM_PROCESSES}-1 (= {n - 1})")
  return {"coordinator_address": addr, "num_processes": n, "process_id": pid}


def initialize(distributed: bool, environ=None) -> bool:
  """Calls ``jax.distributed.initialize`` (before any JAX computation) when the HYDRAHEAD_* variables
  are set (explicit) or ``distributed`` is true (JAX's auto-detection). Returns whether it did (or had
  already been done)."""
  import jax  # noqa: PLC0415

  spec = from_env(environ)
  if spec is None and not distributed:
    return False
  if jax.distributed.is_initialized():
    return True
  if spec is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(**spec)
  return True


def check_process_count(step_dir: str, process_count: int) -> None:
  """Raises ``IncompatibleRunDir`` when the checkpoint at ``step_dir`` holds data-iterator positions of
  another number of processes (grain writes ``data/process_<i>-of-<n>.json``; each process's document
  shard depends on n, so the run cannot continue its sample stream with another n)."""
  import glob  # noqa: PLC0415

  from hydrahead_jax.train.checkpoint import IncompatibleRunDir  # noqa: PLC0415

  counts = set()
  for f in glob.glob(os.path.join(step_dir, "data", "process_*-of-*.json")):
    tail = os.path.basename(f)[:-len(".json")].rsplit("-of-", 1)[-1]
    if tail.isdigit():
      counts.add(int(tail))
  if counts and process_count not in counts:
    raise IncompatibleRunDir(
        f"checkpoint {step_dir} was written by {max(counts)} JAX process(es), this run has "
        f"{process_count}; the data stream is sharded per process, so resume with {max(counts)} "
        "process(es) (HYDRAHEAD_NUM_PROCESSES) or use another --workdir")
