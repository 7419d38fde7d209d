"""Multi-process JAX: when to call ``jax.distributed.initialize``, and how.

Used by ``main`` (training) and ``embed_prompts`` (which runs on every
worker of a TPU slice, since a slice's chips start together).
"""

from __future__ import annotations

import glob
import os
import signal
from collections.abc import Mapping
from typing import Any

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (jax._src.hardware_utils)


def _tpu_vm() -> bool:
  """True on a Cloud TPU VM (TPU chips on the PCI bus, as JAX checks)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def distributed_kwargs(
  env: Mapping[str, str], on_tpu_vm: bool = False
) -> dict[str, Any] | None:
  """Arguments for ``jax.distributed.initialize``, or None (one process).

  - ``LEAPALIGN_DISTRIBUTED=0|1`` forces the decision (auto-detection).
  - ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``
    (what ``launch/slurm.sbatch`` exports: one process per node driving all
    its GPUs) are passed explicitly with cluster detection off. JAX does not
    read the last two itself, and its SLURM auto-detection would give each
    process only GPU ``SLURM_LOCALID`` (its one-process-per-GPU layout).
  - Otherwise JAX auto-detects: a coordinator address alone, a multi-task
    SLURM step (one process per GPU), GKE / multi-slice TPU environment
    variables, and every Cloud TPU VM (``launch/tpu.sh`` sets nothing; JAX
    reads the worker list from the metadata server, and one host is a
    one-process job).
  """
  forced = env.get("LEAPALIGN_DISTRIBUTED", "")
  if forced == "0":
    return None
  coordinator = env.get("JAX_COORDINATOR_ADDRESS", "")
  num, pid = env.get("JAX_NUM_PROCESSES", ""), env.get("JAX_PROCESS_ID", "")
  if coordinator and num and pid:
    if int(num) <= 1 and forced != "1":
      return None
    return {
      "coordinator_address": coordinator,
      "num_processes": int(num),
      "process_id": int(pid),
      "cluster_detection_method": "deactivate",
    }
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  if (
    forced == "1"
    or coordinator
    or int(env.get("SLURM_NTASKS", "1")) > 1
    or len([h for h in (hosts or "").split(",") if h]) > 1
    or int(env.get("MEGASCALE_NUM_SLICES", "1")) > 1
    or on_tpu_vm
  ):
    return {}
  return None


def initialize() -> bool:
  """``jax.distributed.initialize`` when needed; True when it ran.

  JAX's preemption service installs its own SIGTERM handler there, which
  only records the notice for ``multihost_utils.reached_preemption_sync_point``
  (not used here): a SIGTERM from then until the caller's handler is back
  would be swallowed and the program would go on. The handler that was
  installed before is restored at once; callers with none install theirs
  right after.
  """
  import jax

  kwargs = distributed_kwargs(os.environ, _tpu_vm())
  if kwargs is None:
    return False
  before = signal.getsignal(signal.SIGTERM)
  jax.distributed.initialize(**kwargs)
  if before is not None:
    signal.signal(signal.SIGTERM, before)
  return True
