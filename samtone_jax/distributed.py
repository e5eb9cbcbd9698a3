"""Multi-host start-up: `jax.distributed` on TPU pods, multi-process GPU and CPU.

Every process of a multi-host run calls `initialize_from_flags()` (or `initialize(...)`) before
anything else touches JAX devices. Three cases:

  * Cloud TPU VM (a pod slice or a single host): `jax.distributed.initialize()` with no arguments;
    JAX reads worker count, index and coordinator from the TPU metadata.
  * Explicit multi-process (GPU clusters, or several CPU processes on one machine in tests):
    `--coordinator_address=host:port --process_count=N --process_index=i`; with
    `--multiprocess_gpu` the coordinator/count/index may instead come from SLURM / Open MPI.
  * Otherwise: one process, nothing to do.

The flags use t5x's spelling. After initialisation the rest of the code only asks
`jax.process_index()` / `jax.process_count()`: each host reads its own input shard, the global
batch is assembled with `jax.make_array_from_process_local_data`, and process 0 writes logs.
"""

import glob
import os

from absl import flags
from absl import logging
import jax

MULTIPROCESS_GPU = flags.DEFINE_bool(
    "multiprocess_gpu", False,
    "Initialise jax.distributed for a multi-process GPU run (coordinator, count and index from "
    "the flags below, or auto-detected from SLURM / Open MPI when they are unset).")
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for a multi-process run outside Cloud TPU (GPU, or CPU with gloo).")
PROCESS_COUNT = flags.DEFINE_integer(
    "process_count", None, "Number of processes of a multi-process run outside Cloud TPU.")
PROCESS_INDEX = flags.DEFINE_integer(
    "process_index", None, "Index of this process, in [0, process_count).")

# Environment variables Cloud TPU sets on every TPU VM worker (GCE and GKE).
_TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                 "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")


def on_cloud_tpu_vm() -> bool:
  """Whether this process runs on a Cloud TPU VM worker (TPU chips attached or TPU env vars set).

  Honours an explicit `JAX_PLATFORMS` without `tpu` (e.g. `cpu` on a TPU VM for debugging, or a
  CPU machine with `libtpu` installed for ahead-of-time compilation): then it is not a TPU run.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  # TPU v2-v4 chips appear as /dev/accel*, v5e and later as VFIO groups.
  has_chips = bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
  return has_chips or any(os.environ.get(name) for name in _TPU_ENV_VARS)


def initialize(multiprocess_gpu: bool = False,
               coordinator_address: str | None = None,
               process_count: int | None = None,
               process_index: int | None = None) -> None:
  """Starts `jax.distributed` when this is a multi-process run; a no-op otherwise.

  Must run before the first use of `jax.devices()` (or any computation). Calling it again after a
  successful initialisation does nothing.

  Args:
    multiprocess_gpu: a multi-process GPU run; unset coordinator/count/index are auto-detected by
      JAX from SLURM or Open MPI.
    coordinator_address: `host:port` of process 0 (explicit multi-process run, e.g. CPU + gloo).
    process_count: total number of processes.
    process_index: this process's index in `[0, process_count)`.

  Raises:
    ValueError: if only some of coordinator_address / process_count / process_index are given
      (without `multiprocess_gpu`), or the index is out of range.
  """
  if jax.distributed.is_initialized():
    return
  explicit = (coordinator_address, process_count, process_index)
  if multiprocess_gpu or any(value is not None for value in explicit):
    if not multiprocess_gpu and None in explicit:
      raise ValueError(
          "A multi-process run needs all of --coordinator_address, --process_count and "
          f"--process_index; got coordinator_address={coordinator_address!r}, "
          f"process_count={process_count!r}, process_index={process_index!r}.")
    if process_count is not None and process_index is not None and not (
        0 <= process_index < process_count):
      raise ValueError(f"--process_index={process_index} is outside [0, {process_count}).")
    # CPU processes exchange collectives over gloo (TCP); harmless for GPU runs, whose
    # collectives go over NCCL, and required before the CPU client is created.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize(coordinator_address=%s, num_processes=%s, "
                 "process_id=%s)", coordinator_address, process_count, process_index)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=process_count, process_id=process_index)
  elif on_cloud_tpu_vm():
    # Cloud TPU: JAX reads the worker list, this worker's id and the coordinator from metadata.
    logging.info("Cloud TPU VM detected: jax.distributed.initialize()")
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
  """`initialize(...)` with the values of --multiprocess_gpu, --coordinator_address,
  --process_count and --process_index (call after absl has parsed the flags)."""
  initialize(multiprocess_gpu=MULTIPROCESS_GPU.value,
             coordinator_address=COORDINATOR_ADDRESS.value,
             process_count=PROCESS_COUNT.value,
             process_index=PROCESS_INDEX.value)


def is_chief() -> bool:
  """Whether this is process 0, the one that writes logs, summaries and the operative config."""
  return jax.process_index() == 0
