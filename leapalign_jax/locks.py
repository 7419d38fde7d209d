"""Workdir locks: one run per workdir, local (flock) or on ``gs://`` (a lease).

``workdir_lock(workdir)`` is what a run holds; a local workdir gets an
``flock`` on ``<workdir>/.lock``, a ``gs://`` one the lease lock below.

A lease lock for workdirs on object stores (``gs://``), where no flock exists.

The lock is the object ``<workdir>/.lock``: JSON naming its holder (host,
pid, a random token) and the time of its last heartbeat. The holder rewrites
it every ``HEARTBEAT_S`` seconds from a daemon thread and deletes it when
the run ends.

A start is refused while the lock is *live*: held by a live process of this
host (checked by pid, so a run killed by SIGKILL is resumed at once on the
same machine), or, for another host, heartbeaten within ``TTL_S`` seconds
(a preempted pod's lock expires in that time; recreating the slice takes
longer). A start that finds no live lock writes its own, waits
``SETTLE_S`` and reads the lock back: GCS reads are strongly consistent and
the last write wins, so of two starts within the same moment exactly one
reads its own token back and the other is refused. (Two starts race only if
one stalls for more than ``SETTLE_S`` between reading and writing the lock;
no emulator supports the generation preconditions that would close that
window, so they are not used.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import jax

from leapalign_jax import fileio
from leapalign_jax.errors import UserError

LOCK_FILE = ".lock"
TTL_S = 180.0
HEARTBEAT_S = 30.0
SETTLE_S = 1.5

_LOG = logging.getLogger(__name__)


def _read(path: str) -> dict | None:
  try:
    return json.loads(fileio.read_text(path))
  except FileNotFoundError:
    return None
  except ValueError:  # torn or edited: treat as no lock
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def is_live(holder: dict, now: float | None = None) -> bool:
  """Whether ``holder`` (a lock's content) still holds the workdir."""
  if holder.get("host") == socket.gethostname():
    return _pid_alive(int(holder.get("pid", -1)))
  now = time.time() if now is None else now
  return now - float(holder.get("time", 0.0)) < TTL_S


def _describe(holder: dict) -> str:
  age = time.time() - float(holder.get("time", 0.0))
  return (
    f"host {holder.get('host')}, pid {holder.get('pid')}, last heartbeat "
    f"{age:.0f} s ago"
  )


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the lease on ``workdir`` for the duration of the block.

  Raises:
    UserError: a live run holds the workdir.
  """
  path = fileio.join(workdir, LOCK_FILE)
  holder = _read(path)
  if holder is not None and is_live(holder):
    raise UserError(
      f"workdir {workdir} is in use by another run ({_describe(holder)}); "
      "wait for it to finish (or stop it) before starting this one, or use "
      f"another --workdir (a dead run's lock expires {TTL_S:.0f} s after "
      "its last heartbeat)"
    )
  me = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "token": uuid.uuid4().hex,
  }

  def write() -> None:
    fileio.write_text(path, json.dumps({**me, "time": time.time()}))

  write()
  time.sleep(SETTLE_S)
  now = _read(path)
  if now is None or now.get("token") != me["token"]:
    raise UserError(
      f"workdir {workdir}: another run started at the same moment "
      f"({_describe(now or {})}); stop one of them"
    )
  stop = threading.Event()

  def heartbeat() -> None:
    while not stop.wait(HEARTBEAT_S):
      try:
        write()
      except Exception as e:  # noqa: BLE001 - a missed beat is not fatal
        _LOG.warning("workdir lock heartbeat failed: %s", e)

  thread = threading.Thread(target=heartbeat, daemon=True, name="lock")
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    with contextlib.suppress(Exception):
      current = _read(path)
      if current is not None and current.get("token") == me["token"]:
        fileio.remove(path)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on ``workdir`` (process 0).

  Two runs writing one workdir would interleave checkpoints and metrics
  lines. The lock is an ``flock`` on ``workdir/.lock``: the kernel releases
  it when the process dies, even by SIGKILL, so a crashed run never leaves a
  stale lock behind. A ``gs://`` workdir gets a lease object instead
  (``hold``).

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
    with hold(workdir):
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
