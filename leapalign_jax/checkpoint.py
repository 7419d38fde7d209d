"""Orbax checkpoints of the training state; atomic, keep-last-N, resumable.

A checkpoint holds the train state pytree (trainable params, EMA, optimizer
state, step, PRNG key data) and a small JSON record (data position, counters,
the config fingerprint). Orbax writes each step into a temporary folder and
renames it when complete, so a process killed mid-write leaves the previous
checkpoint as the latest valid one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for ``{state, meta}``."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = (
      os.path.abspath(directory) if "://" not in directory else directory
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,
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
