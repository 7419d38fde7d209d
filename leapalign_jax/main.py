"""Entry point: ``python -m leapalign_jax.main --config configs/<run>.py --workdir <dir>``.

The only module that touches flags. Config fields are overridden on the
command line (``--config.optim.lr=8e-6``); configs are locked, so a
misspelled key is an error. On a TPU pod or a multi-node GPU job JAX's
distributed runtime is initialised before anything else touches a device.

Exit status: 0 when the run finished or was preempted (SIGTERM: checkpoint,
then exit; the same command resumes), 2 for bad input (flags, config, files:
one ``error:`` line, no traceback), 3 when training stopped on non-finite
steps (one line saying what to do). Anything else is a bug: a traceback.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

from leapalign_jax import errors


def _sigterm_before_training(signum, frame):
  """SIGTERM before the training installed its handler: nothing to save."""
  del signum, frame
  errors.exit_preempted()


if __name__ == "__main__":
  # First thing: the imports below and JAX's distributed start-up take
  # seconds, and a launcher may stop the job during them.
  signal.signal(signal.SIGTERM, _sigterm_before_training)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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


def _config_path(argv: list[str]) -> str | None:
  """The ``--config`` file named in ``argv`` (without its ``:arg``)."""
  for i, a in enumerate(argv):
    if a in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
    if a.startswith(("--config=", "-config=")):
      return a.split("=", 1)[1].split(":")[0]
  return None


def _flag_error(e: Exception, argv: list[str]) -> str:
  """One line for a failure while parsing the flags (and the config file)."""
  inner = e
  while inner.args and isinstance(inner.args[0], BaseException):
    inner = inner.args[0]  # AttributeError(KeyError(...)) from ml_collections
  text = str(inner.args[0]) if inner.args else str(inner)
  if isinstance(e, (AttributeError, KeyError)):
    # ml_collections: "'lrr'\nDid you mean \"lr\" instead of \"lrr\"?"
    key, _, hint = text.partition("\n")
    key = key.strip("'\" ")
    given = [a for a in argv if a.startswith("--config.") and key in a]
    where = given[0] if given else f"--config.*{key}*"
    return errors.one_line(
      f"{where}: the config has no field {key!r} (configs are locked; check "
      f"the spelling{'; ' + hint if hint else ''})"
    )
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if len(lines) > 2:  # a traceback from the config file: its first + last
    lines = [lines[0], lines[-1]]
  return errors.one_line(" ".join(lines))


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags like absl; a bad flag or config: one line, exit 2."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    print(f"error: --config {path}: no such config file", file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  try:
    rest = FLAGS(argv)
    FLAGS.config  # noqa: B018 - loads the config file and its overrides
  except Exception as e:  # noqa: BLE001 - every parse failure is bad input
    print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  return rest


def main(argv):
  """Initialises JAX (distributed when needed) and runs the training."""
  del argv
  signal.signal(signal.SIGTERM, _sigterm_before_training)
  status = errors.run_command(_main)
  if status:
    # Straight out: library threads (orbax, tensorstore) left mid-way by the
    # error would print shutdown noise under the one-line report.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _main() -> None:
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
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
