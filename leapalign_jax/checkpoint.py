"""Orbax checkpoints of the training state; atomic, keep-last-N, resumable.

A checkpoint holds the train state pytree (trainable params, EMA, optimizer
state, step, PRNG key data) and a small JSON record (step, data position,
non-finite counters).

Crash safety (orbax 0.12, local and POSIX file systems): each step is written
into ``<step>.orbax-checkpoint-tmp``, a ``commit_success.txt`` is added and
the folder is renamed to ``<step>`` in one ``rename``; steps are listed from
the final names only. A process killed at any point of a save (including
between the commit file and the rename) leaves the previous checkpoint as the
latest; the unfinished temporary folder is ignored, deleted when that step is
saved again, and (``cleanup_tmp``, the training process only) at start. A kill
while old checkpoints are deleted leaves a partial *older* step, which the
next save deletes; it is never the latest. ``tests/reliability_test.py``
kills a run during its saves and checks the resume is exact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp

from leapalign_jax import errors

_LOG = logging.getLogger(__name__)


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for ``{state, meta}``."""

  def __init__(
    self, directory: str, max_to_keep: int = 3, cleanup_tmp: bool = False
  ):
    """Opens (creates) ``directory``.

    Args:
      directory: the checkpoints folder (local path or ``gs://``).
      max_to_keep: the newest checkpoints kept.
      cleanup_tmp: delete unfinished temporary folders now. Only the process
        that writes checkpoints may pass True (a reader, e.g. ``evaluate``
        next to a running training, would delete its save in progress).
    """
    self.directory = (
      os.path.abspath(directory) if "://" not in directory else directory
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=cleanup_tmp,
      ),
    )

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` and ``meta`` at ``step`` and waits until it is durable."""
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
      ),
      force=True,
    )
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores ``(state, meta)``; arrays get ``abstract_state`` 's shardings."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """``ShapeDtypeStruct`` s (with shardings) describing ``tree``."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
  )


@contextlib.contextmanager
def _quiet_if_failed(grace_s: float = 0.5) -> Iterator[None]:
  """Drops what a failed restore prints on file descriptor 2.

  When one array of a restore fails, orbax closes its event loop while
  tensorstore is still reading the others; their completion callbacks then
  fail with "Event loop is closed" and print dozens of tracebacks from
  tensorstore's threads around the one-line error. Output is captured
  during the restore; after a failure the reads get ``grace_s`` to finish
  and the capture is dropped. After a success it is passed on.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    failed = True
    try:
      yield
      failed = False
    finally:
      if failed:
        time.sleep(grace_s)
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed:
        capture.seek(0)
        sys.stderr.write(capture.read().decode(errors="replace"))


def restore_latest(
  checkpointer: Checkpointer, abstract_state: Any
) -> tuple[Any, dict] | None:
  """``(state, meta)`` of the latest checkpoint; None when there is none.

  Raises:
    UserError: the latest checkpoint cannot be restored (damaged, or written
      by another config; ``checkpointer`` is closed); the message says how
      to fall back to the one before.
  """
  latest = checkpointer.latest_step()
  if latest is None:
    return None
  try:
    with _quiet_if_failed():
      state, meta = checkpointer.restore(latest, abstract_state)
  except Exception as e:  # noqa: BLE001 - any unreadable checkpoint
    checkpointer.close()  # the caller stops here
    earlier = [s for s in checkpointer.all_steps() if s < latest]
    path = os.path.join(checkpointer.directory, str(latest))
    previous = f"step {earlier[-1]}" if earlier else "none: a fresh start"
    raise errors.UserError(
      f"checkpoint {path} cannot be restored ({type(e).__name__}: "
      f"{errors.one_line(e)[:200]}); if it is damaged (disk full, machine "
      f"crash), move it aside (mv {path} {path}.bad) and rerun to use the "
      f"previous one ({previous})"
    ) from None
  if int(jax.device_get(state["step"])) != int(meta["step"]):
    raise errors.UserError(
      f"checkpoint step {latest}: state step {int(state['step'])} and meta "
      f"step {meta['step']} disagree; the checkpoint is damaged"
    )
  return state, meta


def restore_step(
  checkpointer: Checkpointer, step: int, abstract_state: Any
) -> tuple[Any, dict]:
  """``(state, meta)`` of the checkpoint at ``step`` (a reader's restore).

  Raises:
    UserError: no checkpoint at ``step`` (the message lists the saved
      steps), or it cannot be restored.
  """
  require_step(checkpointer, step)
  try:
    with _quiet_if_failed():
      return checkpointer.restore(step, abstract_state)
  except Exception as e:  # noqa: BLE001 - any unreadable checkpoint
    raise errors.UserError(
      f"checkpoint {os.path.join(checkpointer.directory, str(step))} cannot "
      f"be restored ({type(e).__name__}: {errors.one_line(e)[:200]}); was it "
      "written by this workdir's config.json?"
    ) from None


def require_step(checkpointer: Checkpointer, step: int) -> None:
  """Raises (one line, listing the saved steps) unless ``step`` is saved."""
  steps = checkpointer.all_steps()
  if step not in steps:
    raise errors.UserError(
      f"{checkpointer.directory}: no checkpoint at step {step}; saved steps: "
      f"{sorted(steps) or 'none'} (older ones are deleted: "
      "train.keep_checkpoints)"
    )


def resume(checkpointer: Checkpointer, state: Any) -> tuple[Any, dict]:
  """``(state, meta)`` of the latest checkpoint, or ``state`` and step 0.

  Raises:
    UserError: as ``restore_latest``.
  """
  restored = restore_latest(checkpointer, abstract_like(state))
  if restored is None:
    return state, {"step": 0, "nonfinite_total": 0, "nonfinite_run": 0}
  _LOG.info("resumed from step %d", restored[1]["step"])
  return restored
