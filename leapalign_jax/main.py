"""Entry point: ``python -m leapalign_jax.main --config configs/<run>.py --workdir <dir>``.

The only module that touches flags. Config fields are overridden on the
command line (``--config.optim.lr=8e-6``); configs are locked, so a
misspelled key is an error. On a TPU pod or a multi-node GPU job JAX's
distributed runtime is initialised before anything else touches a device.

Exit status: 0 when the run finished or was preempted (SIGTERM: checkpoint,
then exit; the same command resumes; ``LEAPALIGN_EXIT_PREEMPTED=N`` makes a
preempted run exit with N instead), 2 for bad input (flags, config, files:
one ``error:`` line, no traceback), 3 when training stopped on non-finite
steps (one line saying what to do). Anything else is a bug: a traceback.
"""

from __future__ import annotations

import os
import signal
import sys

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


def _setup_logging() -> None:
  """Our INFO messages on stderr; libraries (orbax, absl) at WARNING.

  ``--verbosity=0`` (absl) brings the libraries' INFO logs back.
  """
  from leapalign_jax import metrics

  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  metrics.log_to_stderr()


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
  outcome = {}
  status = errors.run_command(lambda: outcome.update(_guarded_main() or {}))
  if not status and outcome.get("preempted"):
    status = errors.preempted_status()
  from leapalign_jax import distributed

  # A preempted process ends as planned: the others stop watching it.
  distributed.finish(0 if outcome.get("preempted") else status)
  if status:
    # Straight out: library threads (orbax, tensorstore) left mid-way by the
    # error would print shutdown noise under the one-line report.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _guarded_main() -> dict:
  """``_main``; a collective broken by a lost process ends in one line."""
  from leapalign_jax import distributed

  try:
    return _main()
  except Exception as e:
    if distributed.lost_peer_error(e):
      distributed.exit_lost_peer(e)  # does not return
    raise


def _main() -> dict:
  _setup_logging()
  import jax

  from leapalign_jax import distributed

  # Puts _sigterm_before_training back over the handler JAX installs.
  distributed.start(FLAGS.config.to_json_best_effort())
  import logging as std_logging

  from leapalign_jax import train

  std_logging.getLogger("leapalign_jax").info(
    "process %d/%d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
