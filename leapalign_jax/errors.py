"""The errors every command reports the same way, and how it reports them.

- ``UserError`` (and its subclasses: ``ConversionError``, ``ConfigError``,
  ``PromptError``, ``CacheError``, ...): bad input. One line on stderr,
  ``error: <what is wrong and how to fix it>``, exit status 2, no traceback.
- ``OSError`` naming a path (unreadable input, unwritable output): the
  same, since the fix is the user's.
- ``NonFiniteError``: training stopped after too many consecutive
  non-finite steps; the last good state is saved. One line, exit status 3.
- SIGTERM outside the training loop (setup, export, evaluation):
  ``exit_preempted``, status 0 (or ``$LEAPALIGN_EXIT_PREEMPTED``, see
  ``preempted_status``); the same command resumes.

Anything else is a bug and keeps its full traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
# Another process of a multi-process run was lost (distributed.Watchdog).
EXIT_LOST_PROCESS = 4


class UserError(ValueError):
  """Bad input from the user: reported as one line, exit status 2."""


class ConfigError(UserError):
  """A config names a missing file or an impossible combination."""


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps; the last good state is saved."""


def as_user_error(what: str, fn: Callable, *args):
  """``fn(*args)``; a ``ValueError`` it raises becomes a ``UserError``.

  For library calls whose ``ValueError`` s can only come from the user's
  input (a mesh shape, a batch size, a method name); ``what`` names it.
  """
  try:
    return fn(*args)
  except UserError:
    raise
  except ValueError as e:
    raise UserError(f"{what}: {e}") from None


def preempted_status() -> int:
  """The exit status of a preempted run: 0, or ``$LEAPALIGN_EXIT_PREEMPTED``.

  A scheduler that must tell "stopped by a preemption, resume me" from
  "finished" or "failed" sets the variable (``launch/slurm.sbatch`` sets
  75, requeueing the job on that status only).
  """
  value = os.environ.get("LEAPALIGN_EXIT_PREEMPTED", "").strip()
  return int(value) if value.isdigit() and int(value) < 256 else 0


def exit_preempted() -> None:
  """Ends the process at once with status 0 (SIGTERM, nothing to save).

  Used where a SIGTERM finds no state worth a checkpoint (setup, the final
  export and evaluation). Exiting immediately is safe for the same reason a
  SIGKILL is: every file is written aside and renamed into place, and the
  next start resumes. (Raising from the signal handler instead is not:
  Python may wrap the exception, e.g. in a ``RuntimeError`` when it lands
  inside a class definition during an import, or a library may swallow it.)
  """
  print(
    "preempted (SIGTERM): nothing to save here; the same command resumes",
    file=sys.stderr,
  )
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(preempted_status())


def require_local(path: object, what: str = "") -> None:
  """Refuses a ``://`` path where a local file is memory-mapped.

  Raises:
    UserError: one line naming the staging command
      (``leapalign_jax.staging``) that copies it to this host.
  """
  if "://" in str(path):
    raise UserError(not_staged_message(str(path), what))


# The staging command (``leapalign_jax.staging``); named here so that the
# errors of every layer can point at it without importing it.
STAGING_COMMAND = "python -m leapalign_jax.staging"


def not_staged_message(url: str, what: str = "") -> str:
  """The one line for a ``://`` path that has no local copy here."""
  where = f"{what}: " if what else ""
  return (
    f"{where}{url} is not on this host's disk (the loaders memory-map local "
    f"files); copy it here first with `{STAGING_COMMAND} --src {url}` (or "
    "`--config <the run's config>`; on a TPU slice `launch/tpu.sh stage`), "
    "then run again with the same path"
  )


def one_line(message: object) -> str:
  """``message`` on one line (newlines and runs of spaces collapsed)."""
  return " ".join(str(message).split())


def report(error: BaseException) -> int:
  """Prints the one-line report of a known error; returns the exit status."""
  status = (
    EXIT_NONFINITE if isinstance(error, NonFiniteError) else EXIT_USER_ERROR
  )
  if isinstance(error, OSError) and error.filename:
    # A path the user gave that cannot be read or written (permissions, a
    # full disk, a file where a folder is expected).
    message = (
      f"{error.filename}: {error.strerror or error}; check the path, its "
      "permissions and the free space"
    )
  else:
    message = str(error)
  print(f"error: {one_line(message)}", file=sys.stderr)
  return status


def run_command(fn: Callable[[], object]) -> int:
  """Runs ``fn``; known errors become one line and their exit status.

  Returns:
    0 on success, 2 for a ``UserError`` or a file-system ``OSError`` (one
    naming a path), 3 for a ``NonFiniteError``. Other exceptions propagate
    with their traceback.
  """
  try:
    fn()
  except (UserError, NonFiniteError) as e:
    return report(e)
  except OSError as e:
    if not e.filename:
      raise
    return report(e)
  return 0
