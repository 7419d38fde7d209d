"""Entry point: ``python -m leapalign_jax.main --config configs/<run>.py --workdir <dir>``.

The only module that touches flags. Config fields are overridden on the
command line (``--config.optim.lr=8e-6``); configs are locked, so a
misspelled key is an error. On a TPU pod or a multi-node GPU job JAX's
distributed runtime is initialised before anything else touches a device.
"""

from __future__ import annotations

import os
import sys

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


def _multi_process() -> bool:
  """True on a multi-host TPU slice or a multi-process GPU job."""
  env = os.environ
  if (
    env.get("JAX_COORDINATOR_ADDRESS")
    or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
  ):
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


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

  if _multi_process():
    jax.distributed.initialize()
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
