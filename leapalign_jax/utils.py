"""Small shared helpers (files, trees)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import jax

from leapalign_jax.errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def atomic_dir(path: str, replace: bool = False) -> Iterator[str]:
  """Yields a temporary sibling folder that becomes ``path`` on success.

  A build interrupted half-way (even by SIGKILL) leaves no ``path``, only a
  ``.tmp-`` folder, so "does ``path`` exist" means "is it complete".

  Args:
    path: the folder to create.
    replace: what to do when ``path`` exists by the time the build is done.
      False (builds of shared artefacts, e.g. a world): keep it and drop
      ours, since another process built the same thing and may be reading
      it. True (outputs that are rewritten, e.g. exports, by a process that
      owns them): swap ours in; the old folder is renamed aside first and
      deleted after, so ``path`` is never a mix of both. Leftovers of killed
      builds of ``path`` are deleted first.
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  name = os.path.basename(path)
  if replace:  # we own ``path``: drop what killed builds left behind
    for stale in os.listdir(parent):
      if stale.startswith((f".tmp-{name}-", f".old-{name}-")):
        shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
  old = None
  try:
    yield tmp
    if os.path.exists(path) and replace:
      old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
      os.replace(path, os.path.join(old, "x"))
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.isdir(path):
        raise  # a real failure, not "someone else finished first"
  finally:
    for leftover in (tmp, old):
      if leftover and os.path.exists(leftover):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on ``workdir`` (process 0).

  Two runs writing one workdir would interleave checkpoints and metrics
  lines. The lock is an ``flock`` on ``workdir/.lock``: the kernel releases
  it when the process dies, even by SIGKILL, so a crashed run never leaves a
  stale lock behind. A ``gs://`` workdir gets a lease object instead
  (``remote_lock``).

  A workdir this call created is removed again when the run fails before
  writing anything into it (bad input leaves no trace).

  Raises:
    UserError: another live process holds the lock, or the workdir cannot
      be created or written.
  """
  if jax.process_index() != 0:
    yield
    return
  if "://" in workdir:
    from leapalign_jax import remote_lock

    with remote_lock.hold(workdir):
      yield
    return
  import fcntl

  created = not os.path.exists(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - closed below
  except OSError as e:
    raise UserError(
      f"--workdir {workdir}: cannot create or write it ({e.strerror}); "
      "pass a writable folder"
    ) from None
  try:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "?"
      raise UserError(
        f"workdir {workdir} is in use by another run (pid {holder}); wait "
        "for it to finish (or stop it) before starting this one, or use "
        "another --workdir"
      ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    yield
  except BaseException:
    if created and os.listdir(workdir) == [LOCK_FILE]:
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  finally:
    f.close()  # closing releases the lock


def count_params(tree) -> int:
  """Number of scalars in a pytree."""
  return sum(x.size for x in jax.tree.leaves(tree))
