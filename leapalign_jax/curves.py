"""Draws a workdir's training curves (the command; ``plots`` is the library).

  python -m leapalign_jax.curves --workdir <dir>

reads ``<dir>/metrics.jsonl`` (local or ``gs://``) and writes
``<dir>/curves.png`` (reward, loss, gradient norm, k/j, w: whichever the
run logged). Training writes the same file at the end of a run. Needs
matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import sys

from leapalign_jax import errors, fileio, metrics, plots


def main(argv: list[str] | None = None) -> int:
  """Writes ``curves.png`` for a workdir; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m leapalign_jax.curves")
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args(argv)
  return errors.run_command(lambda: print(_curves(args.workdir)))


def _curves(workdir: str) -> str:
  if not plots.have_matplotlib():
    raise errors.UserError(
      "matplotlib is not installed; pip install matplotlib, then rerun"
    )
  if not fileio.exists(fileio.join(workdir, metrics.JSONL)):
    raise errors.UserError(
      f"{workdir}: no {metrics.JSONL}; pass a training --workdir"
    )
  path = plots.write_curves(workdir)
  if path is None:
    raise errors.UserError(
      f"{workdir}/{metrics.JSONL} holds no numeric metric to draw yet"
    )
  return path


if __name__ == "__main__":
  sys.exit(main())
