"""The staging command: copies gs:// weights and caches to this host.

  python -m leapalign_jax.staging --config configs/<run>.py [overrides]
  python -m leapalign_jax.staging --src gs://bucket/path [--src ...]
  python -m leapalign_jax.staging --push LOCAL gs://bucket/path

The library (what is staged where) is ``leapalign_jax.staging``.
"""

from __future__ import annotations

import argparse
import sys

from leapalign_jax import errors, fileio
from leapalign_jax.staging import COMMAND, config_sources, push, stage


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog=COMMAND)
  parser.add_argument("--config", help="stage every gs:// path it names")
  parser.add_argument("--src", action="append", default=[], help="a URL")
  parser.add_argument(
    "--push", nargs=2, metavar=("LOCAL", "URL"), help="upload LOCAL to URL"
  )
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args(argv)

  def run() -> None:
    if args.push:
      push(*args.push)
    sources = list(args.src)
    if args.config:
      from leapalign_jax.configs_io import load_config

      named = config_sources(load_config(args.config, args.overrides))
      if not named and not sources:
        print(f"{args.config}: names no gs:// path; nothing to stage")
      sources += named
    elif args.overrides:
      raise errors.UserError("config overrides need --config")
    if not sources and not args.push and not args.config:
      raise errors.UserError(
        "nothing to stage: pass --config (with gs:// paths) or --src URL"
      )
    for url in sources:
      if not fileio.is_remote(url):
        raise errors.UserError(f"--src {url}: not a URL (gs://bucket/path)")
      stage(url)

  return errors.run_command(run)


if __name__ == "__main__":
  sys.exit(main())
