"""Command line: export a training workdir's checkpoint for PyTorch tools.

  python -m leapalign_jax.export --workdir <dir> [--step N] \
      [--layout bfl|diffusers] [--lora | --merged] [--dtype bfloat16] \
      [--out <dir>]

Reads the run's ``config.json`` and the checkpoint at ``--step`` (default:
the latest) from the workdir, finished or interrupted, and writes its EMA
weights (``leapalign_jax.export.workdir``): a LoRA run's adapters
(``--lora``, a diffusers/PEFT file) or the adapters fused into the base
(``--merged``), by default what the run's ``export`` config names; a full
fine-tune's weights. Prints the paths written; errors print one line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from leapalign_jax import errors


def main(argv: list[str] | None = None) -> int:
  """Exports one checkpoint of a workdir; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m leapalign_jax.export")
  parser.add_argument("--workdir", required=True, help="a training workdir")
  parser.add_argument(
    "--step", type=int, default=None, help="checkpoint step (default: latest)"
  )
  parser.add_argument(
    "--layout",
    default=None,
    help="full or fused weights: flux bfl|diffusers, sd3 diffusers|stability "
    "(default: the run's export.layout)",
  )
  which = parser.add_mutually_exclusive_group()
  which.add_argument(
    "--lora", action="store_true", help="LoRA runs: the adapters alone"
  )
  which.add_argument(
    "--merged",
    action="store_true",
    help="LoRA runs: the adapters fused into the base weights",
  )
  parser.add_argument(
    "--dtype",
    default=None,
    help="output dtype (default: export.dtype for full and fused weights, "
    "the adapters' training precision for the LoRA file)",
  )
  parser.add_argument(
    "--out", default=None, help="default: <workdir>/exports/step_<N>"
  )
  args = parser.parse_args(argv)
  parts = ("lora",) if args.lora else ("merged",) if args.merged else None
  written = []

  def export():
    from leapalign_jax import distributed
    from leapalign_jax.export.workdir import export_checkpoint

    # Several processes (launch_local, a pod): each holds its shards.
    distributed.start(json.dumps(vars(args), sort_keys=True))

    written.extend(
      export_checkpoint(
        args.workdir,
        args.out,
        step=args.step,
        parts=parts,
        layout=args.layout,
        dtype=args.dtype,
      )
    )

  status = errors.run_command(export)
  from leapalign_jax import distributed

  distributed.finish(status)
  for path in written:
    print(path)
  return status


if __name__ == "__main__":
  sys.exit(main())
