"""SIGTERM handling for training: checkpoint at a step boundary, exit 0.

Preemptible TPU VMs, SLURM time limits and ``launch/worker.sh stop`` all send
SIGTERM and wait for the program to checkpoint and exit. ``Preemption``
installs a handler for the whole run with two modes:

- *deferred* (the training loop, including checkpoint writes): the signal
  only sets ``requested``; the loop reads it at the next step boundary,
  writes a checkpoint and returns. A second SIGTERM changes nothing, so it
  can never interrupt a checkpoint write.
- *immediate* (setup, final export, evaluation): nothing is lost by
  stopping, so SIGTERM ends the process at once with status 0
  (``errors.exit_preempted``; the setup of a large run, or its final
  evaluation, can take longer than the launcher waits). That is as safe as
  the SIGKILL the run survives anyway: every file those phases write is
  written aside and renamed into place.

On several hosts the flag is combined across processes at each boundary, so
every host stops after the same step (the checkpoint is a collective).

The exit status after a preemption is 0, or ``$LEAPALIGN_EXIT_PREEMPTED``
when set (``launch/slurm.sbatch`` sets it, to requeue a job only when the
program stopped for a preemption; see ``errors.preempted_status``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

import jax
import numpy as np

from leapalign_jax import errors

_LOG = logging.getLogger(__name__)


class Preemption:
  """A SIGTERM handler: a flag while deferred, an immediate exit otherwise."""

  def __init__(self):
    self.requested = False
    self._deferred = False
    self._old = None

  def _handler(self, signum, frame) -> None:
    del signum, frame
    self.requested = True
    if not self._deferred:
      errors.exit_preempted()

  def __enter__(self) -> Preemption:
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. some notebooks)
      self._old = None
    return self

  def __exit__(self, *exc) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    """Within this block SIGTERM only sets ``requested`` (see module doc)."""
    self._deferred = True
    try:
      yield
    finally:
      self._deferred = False

  def at_boundary(self, save_due: bool = False) -> tuple[bool, bool]:
    """``(stop, save)`` at this step boundary, the same on every host.

    ``stop``: any host received SIGTERM. ``save``: any host's time-based
    checkpoint is due (``save_due``); a checkpoint is a collective, so every
    host must decide alike. One ``process_allgather`` carries both.
    """
    flags = np.array([self.requested, save_due], np.int32)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      flags = np.any(multihost_utils.process_allgather(flags), axis=0)
    stop, save = bool(flags[0]), bool(flags[1])
    if stop and not self.requested:
      _LOG.warning("another host received SIGTERM: stopping here too")
      self.requested = True
    return stop, save

  def stop_now(self) -> bool:
    """Whether to stop at this step boundary (any host asked)."""
    return self.at_boundary()[0]
