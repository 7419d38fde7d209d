"""Re-exports any checkpoint of a workdir, finished or interrupted.

The run's own ``config.json`` says what was trained (family, base weights,
LoRA or not); the checkpoint at the requested step (default: the latest)
gives the EMA weights, which go through ``export_run`` as at the end of a
run. Only the flow model is loaded: no VAE, rewards or prompt caches.
"""

from __future__ import annotations

import json

import ml_collections

from leapalign_jax import (
  checkpoint,
  components,
  errors,
  fileio,
  sharding,
  worlds,
)
from leapalign_jax import step as step_lib
from leapalign_jax.errors import UserError
from leapalign_jax.export import export_run


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run was started with (its ``config.json``)."""
  path = fileio.join(workdir, "config.json")
  if not fileio.exists(path):
    raise UserError(
      f"{workdir}: no config.json; pass the --workdir of a training run"
    )
  try:
    return ml_collections.ConfigDict(json.loads(fileio.read_text(path)))
  except ValueError:
    raise UserError(
      f"{path} is not valid JSON (edited by hand?); restore it"
    ) from None


def export_checkpoint(
  workdir: str,
  out: str | None = None,
  *,
  step: int | None = None,
  parts=None,
  layout: str | None = None,
  dtype: str | None = None,
) -> list[str]:
  """Exports the EMA weights of ``workdir``'s checkpoint at ``step``.

  Args:
    workdir: a training workdir (``config.json`` + ``checkpoints/``).
    out: the export folder (default ``<workdir>/exports/step_<N>``; the
      run's own end-of-run export stays in ``<workdir>/export``).
    step: the checkpoint's step (default: the latest).
    parts, layout, dtype: as in ``export_run`` (defaults: the run's
      ``export`` config; the LoRA file in the adapters' own precision).

  Returns:
    The paths written.
  """
  config = run_config(workdir)
  folder = fileio.join(workdir, "checkpoints")
  if not fileio.isdir(folder):
    raise UserError(f"{workdir}: no checkpoints folder; nothing to export")
  ckpt = checkpoint.Checkpointer(folder)
  try:
    if step is None:
      step = ckpt.latest_step()
      if step is None:
        raise UserError(f"{folder}: no complete checkpoint to export")
    checkpoint.require_step(ckpt, step)  # before building the world
    config = worlds.prepare(config, workdir)
    mesh = errors.as_user_error(
      "config.mesh", sharding.mesh_from_config, config.mesh
    )
    parts_of_run = components.load_model(config, mesh)
    abstract = components.abstract_train_state(
      parts_of_run.params,
      step_lib.make_optimizer(config.optim),
      config.seed,
      mesh,
    )
    state, _ = checkpoint.restore_step(ckpt, step, abstract)
  finally:
    ckpt.close()
  out = out or fileio.join(workdir, "exports", f"step_{step}")
  return export_run(
    parts_of_run,
    state["ema"],
    out,
    parts=parts,
    layout=layout,
    dtype=dtype,
  )
