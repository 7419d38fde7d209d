"""Evaluates a training workdir's latest checkpoint (the command).

  python -m leapalign_jax.evaluate --config configs/<run>.py --workdir <dir> \
      [--tag eval] [key=value config overrides]

samples the held-out prompts with the EMA weights of the latest checkpoint,
scores them and writes ``<workdir>/eval/<tag>/`` (``leapalign_jax.evaluation``
says what and with which seeds).
"""

from __future__ import annotations

import argparse
import json
import sys

from leapalign_jax import errors, evaluation, fileio, metrics, sharding, worlds


def main(argv: list[str] | None = None) -> int:
  """Evaluates the latest checkpoint of a workdir; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m leapalign_jax.evaluate")
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tag", default="eval")
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args(argv)
  metrics.log_to_stderr()  # progress lines
  return errors.run_command(lambda: _evaluate_workdir(args))


def _evaluate_workdir(args) -> None:
  """``main`` 's work: the latest checkpoint's EMA weights, evaluated."""
  from leapalign_jax import checkpoint, components, configs_io
  from leapalign_jax import step as step_lib

  config = configs_io.load_config(args.config, args.overrides)
  ckpt_dir = fileio.join(args.workdir, "checkpoints")
  if not fileio.isdir(ckpt_dir):
    raise errors.UserError(
      f"{args.workdir}: no checkpoints folder; pass a training --workdir"
    )
  config = worlds.prepare(config, args.workdir)
  mesh = errors.as_user_error(
    "config.mesh", sharding.mesh_from_config, config.mesh
  )
  comps = components.load(config, mesh)
  tx = step_lib.make_optimizer(config.optim)
  restored = checkpoint.restore_latest(
    checkpoint.Checkpointer(ckpt_dir), comps.abstract_state(tx)
  )
  if restored is None:
    raise errors.UserError(f"{args.workdir}: no checkpoint to evaluate")
  state, _ = restored
  summary = evaluation.evaluate(comps, state["ema"], args.workdir, args.tag)
  print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  sys.exit(main())
