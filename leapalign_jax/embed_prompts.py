"""Prompt-embedding cache job: prompts -> T5 + CLIP pooled + each reward's ids.

  python -m leapalign_jax.embed_prompts --config configs/<run>.py \
      --prompts <file.txt | file.jsonl | tfds:name/split[:field]> --out <dir> \
      [key=value config overrides, e.g. text.batch_size=32]

Encodes in fixed-size batches (one compiled program) with a progress bar and
writes whole shards atomically (``leapalign_jax.data``), so an interrupted
job resumes where it stopped. Duplicate prompts are embedded once, prompts
already in the cache are skipped, and a cache written by other encoders is
refused. Each reward that reads text gets the ids of the tokenizer it was
trained with (``rewards.text``: OpenCLIP's for ``hpsv2``, transformers' for
``pickscore``, BLIP's BERT for ``image_reward``), so the config's reward
paths must be set. ``.jsonl`` records
keep their other fields (e.g. digit / colour / position attributes) in the
manifest. Prompts longer than an encoder's limit
are truncated with one warning per encoder. Bad input (a missing, empty or
unreadable prompt file, wrong encoder weights, an unknown config key) is one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from leapalign_jax import errors, families
from leapalign_jax.prompts import SHARD_SIZE, embed, read_prompts


def _is_process_0() -> bool:
  import jax

  return jax.process_index() == 0


def _barrier() -> None:
  """Multi-process runs: every process waits here for the others."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("embed_prompts done")


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m leapalign_jax.embed_prompts")
  parser.add_argument("--config", required=True, help="configs/<run>.py")
  parser.add_argument(
    "--prompts", required=True, help="file.txt|.jsonl|tfds:name/split"
  )
  parser.add_argument(
    "--out",
    required=True,
    help="cache folder; a gs:// URL: embedded into the host's staging "
    "folder (as leapalign_jax.stage would copy it), then uploaded",
  )
  parser.add_argument("--shard-size", type=int, default=SHARD_SIZE)
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args(argv)
  from leapalign_jax.configs_io import load_config

  counts = {}

  def run() -> None:
    from leapalign_jax import distributed, staging

    # On a multi-host TPU slice every worker must start JAX (the slice's
    # chips start together); process 0 embeds, the others wait for it.
    if distributed.initialize() and not _is_process_0():
      _barrier()  # until process 0 has embedded
      return
    # Only the text encoders: the config's caches may be what this makes.
    config = staging.resolve_config(
      load_config(args.config, args.overrides), ("text",)
    )
    records = read_prompts(args.prompts)
    encoders = families.of(config).text_encoders(config, cache=True)
    out = staging.local_path(args.out) if "://" in args.out else args.out
    counts.update(embed(encoders, records, out, shard_size=args.shard_size))
    if "://" in args.out:  # the whole cache, then it counts as staged here
      staging.push(out, args.out)
    _barrier()

  status = errors.run_command(run)
  if status or not counts:
    return status
  print(
    f"{args.out}: {counts['written']} prompts embedded, {counts['skipped']} "
    f"already cached, {counts['total']} distinct"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
