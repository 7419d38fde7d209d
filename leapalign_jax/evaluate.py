"""Evaluates checkpoints on the held-out prompts (the command).

  python -m leapalign_jax.evaluate --config configs/<run>.py --workdir <dir> \
      [--checkpoint [NAME=]SPEC ...] [--compare] [--tag eval] \
      [key=value config overrides]

Without ``--checkpoint``: the EMA weights of the workdir's latest
checkpoint, written to ``<workdir>/eval/<tag>/`` (``leapalign_jax.evaluation``
says what and with which seeds). ``--checkpoint`` (repeatable) names what
to score instead: ``base`` (the config's weights), a training workdir (its
latest EMA weights) or an export of full weights (a diffusers folder or a
BFL file); each goes to ``eval/<tag>/<NAME>/``. Every run also writes
``eval/<tag>/table.md`` and ``table.json`` (one row per checkpoint: mean ±
std of every reward and of the world's evaluator), and ``--compare`` the
side-by-side ``eval/<tag>/compare.png`` (``leapalign_jax.eval_table``).
"""

from __future__ import annotations

import argparse
import json
import sys

from leapalign_jax import errors, eval_table, fileio, metrics, sharding, worlds


def main(argv: list[str] | None = None) -> int:
  """Evaluates checkpoints of a run; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m leapalign_jax.evaluate")
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tag", default="eval")
  parser.add_argument(
    "--checkpoint",
    action="append",
    default=None,
    help="[NAME=]SPEC, repeatable; SPEC: base, a training workdir or an "
    "export (default: the --workdir's latest EMA weights)",
  )
  parser.add_argument(
    "--compare",
    action="store_true",
    help="also compare.png: the checkpoints' images side by side",
  )
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args(argv)
  metrics.log_to_stderr()  # progress lines
  from leapalign_jax import distributed

  def run():
    # Several processes (launch_local, a pod): each holds its shards.
    distributed.start(json.dumps(vars(args), sort_keys=True))
    _evaluate(args)

  status = errors.run_command(run)
  distributed.finish(status)
  return status


def _evaluate(args) -> None:
  """``main`` 's work: load the run's models once, score each checkpoint."""
  from leapalign_jax import components, configs_io

  config = configs_io.load_config(args.config, args.overrides)
  named = [eval_table.parse_spec(c) for c in args.checkpoint or []]
  if not named:
    if not fileio.isdir(fileio.join(args.workdir, "checkpoints")):
      raise errors.UserError(
        f"{args.workdir}: no checkpoints folder; pass a training --workdir "
        "(or --checkpoint base)"
      )
    named = [("ema", args.workdir)]
  eval_table.unique_names(named)
  for _, spec in named:  # before minutes of model loading
    if spec != "base" and not fileio.exists(spec):
      raise errors.UserError(
        f"--checkpoint {spec}: no such file or folder; give 'base', a "
        "training workdir or an export of full weights"
      )
  if args.compare and len(named) < 2:
    raise errors.UserError(
      "--compare needs two or more --checkpoint (e.g. base and a workdir)"
    )
  config = worlds.prepare(config, args.workdir)
  mesh = errors.as_user_error(
    "config.mesh", sharding.mesh_from_config, config.mesh
  )
  comps = components.load(config, mesh)
  data = eval_table.evaluate_checkpoints(
    comps, named, args.workdir, args.tag, compare=args.compare
  )
  folder = fileio.join(args.workdir, "eval", args.tag)
  import jax

  if jax.process_index() != 0:  # process 0 wrote the files and reports
    return
  print(eval_table.markdown(data))
  print(f"table: {fileio.join(folder, 'table.md')} (and table.json)")
  if "compare" in data:
    print(f"compare grid: {data['compare']}")


if __name__ == "__main__":
  sys.exit(main())
