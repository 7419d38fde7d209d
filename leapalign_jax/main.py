"""Entry point: ``python -m leapalign_jax.main --config configs/<run>.py --workdir <dir>``.

The only module that touches flags. Config fields are overridden on the
command line (``--config.optim.lr=8e-6``); configs are locked, so a
misspelled key is an error. On a TPU pod or a multi-node GPU job JAX's
distributed runtime is initialised before anything else touches a device.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Path to a configs/*.py file.", lock_config=True
)
flags.DEFINE_string(
  "workdir", None, "Where checkpoints, metrics and images go."
)
flags.mark_flags_as_required(["config", "workdir"])

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


def _setup_logging() -> None:
  """Our INFO messages on stderr; libraries (orbax, absl) at WARNING.

  ``--verbosity=0`` (absl) brings the libraries' INFO logs back.
  """
  import logging as std_logging

  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  ours = std_logging.getLogger("leapalign_jax")
  if not ours.handlers:
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("[leapalign] %(message)s"))
    ours.addHandler(handler)
  ours.setLevel(std_logging.INFO)
  ours.propagate = False


def main(argv):
  """Initialises JAX (distributed when needed) and runs the training."""
  del argv
  _setup_logging()
  import jax

  kwargs = distributed_kwargs(os.environ, _tpu_vm())
  if kwargs is not None:
    jax.distributed.initialize(**kwargs)
  import logging as std_logging

  from leapalign_jax import train

  std_logging.getLogger("leapalign_jax").info(
    "process %d/%d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.UserError as e:
    # Bad input: one line, no traceback, non-zero exit.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
