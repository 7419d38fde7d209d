"""GenEval-ready samples: the folder layout GenEval's evaluator reads.

GenEval (github.com/djghosh13/geneval) scores object, count, colour and
position prompts with a detector. Its ``evaluation_metadata.jsonl`` holds
one JSON object per prompt (``prompt``, ``tag``, ``include``, ...); its
``evaluation/evaluate_images.py <outdir>`` reads, for every folder of
``<outdir>`` whose name is a number, ``metadata.jsonl`` (that prompt's
object) and every ``samples/<number>.png``. ``write(sampler, metadata,
outdir)`` writes the layout GenEval's README specifies::

  <outdir>/00000/metadata.jsonl    line 0 of the metadata file, unchanged
  <outdir>/00000/samples/0000.png  image 0 of prompt 0
  <outdir>/00000/samples/0001.png  ...
  <outdir>/samples.jsonl           our index: file, prompt, seed, settings

(Its example generator names samples with 5 digits; the evaluator takes
any ``<digits>.png``, and we follow the README's 4.)

Image ``j`` of prompt ``i`` has the seed ``seed + i * images_per_prompt +
j`` (the evaluation's rule, ``evaluation.image_seed``), so ``python -m
leapalign_jax.sample --prompt <its prompt> --seed <its seed>`` draws it
again. Images already on disk are kept: a killed run resumes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from leapalign_jax import errors, fileio, images, metrics

_LOG = logging.getLogger(__name__)


def read_metadata(path: str) -> list[dict[str, Any]]:
  """The prompts of a GenEval metadata file (one JSON object a line)."""
  try:
    text = fileio.read_text(path)
  except FileNotFoundError:
    raise errors.UserError(
      f"--geneval {path}: no such file; pass GenEval's "
      "prompts/evaluation_metadata.jsonl"
    ) from None
  out = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
    except ValueError:
      raise errors.UserError(
        f"{path}:{n}: not a JSON object; GenEval's metadata has one a line"
      ) from None
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
      raise errors.UserError(
        f'{path}:{n}: no "prompt" string; GenEval\'s metadata lines have one'
      )
    out.append(item)
  if not out:
    raise errors.UserError(f"{path}: no prompts in it")
  return out


def folder(outdir: str, index: int) -> str:
  """The folder of prompt ``index`` (GenEval: 5 digits)."""
  return fileio.join(outdir, f"{index:05d}")


def sample_path(outdir: str, index: int, image: int) -> str:
  """Where image ``image`` of prompt ``index`` goes."""
  return fileio.join(folder(outdir, index), "samples", f"{image:04d}.png")


def write(
  sampler,
  metadata: list[dict[str, Any]],
  outdir: str,
  *,
  images_per_prompt: int = 4,
  seed: int = 0,
  batch_size: int | None = None,
  **sample_kwargs,
) -> list[str]:
  """Samples every prompt ``images_per_prompt`` times into GenEval's layout.

  Args:
    sampler: a ``generation.Sampler``.
    metadata: ``read_metadata`` 's lines.
    outdir: the folder ``evaluate_images.py`` will read.
    images_per_prompt: GenEval's protocol uses 4.
    seed: the first image's seed (see the module docstring).
    batch_size: images per ``sampler`` call (default ``eval.batch_size``).
    **sample_kwargs: ``height``, ``width``, ``num_steps``, ``guidance``.

  Returns:
    The images' paths relative to ``outdir`` (all of them, kept or new).
  """
  from leapalign_jax import evaluation

  per = int(images_per_prompt)
  if per < 1:
    raise errors.UserError(f"images_per_prompt={per}; use at least 1")
  todo, lines = [], []
  for i, item in enumerate(metadata):
    fileio.write_text(
      fileio.join(folder(outdir, i), "metadata.jsonl"), json.dumps(item) + "\n"
    )
    for j in range(per):
      s = evaluation.image_seed(seed, i, j, per)
      path = sample_path(outdir, i, j)
      name = f"{i:05d}/samples/{j:04d}.png"
      lines.append({"file": name, "prompt": item["prompt"], "seed": s})
      if not fileio.exists(path):
        todo.append((path, item["prompt"], s))
  bs = int(batch_size or sampler.config.eval.batch_size)
  progress = metrics.Progress(len(todo), unit="image", log=_LOG)
  for start in range(0, len(todo), bs):
    progress.update(start)
    chunk = todo[start : start + bs]
    out = sampler(
      [p for _, p, _ in chunk],
      [s for _, _, s in chunk],
      batch_size=bs,
      **sample_kwargs,
    )
    for (path, _, _), img in zip(chunk, out.images):
      images.save_png(images.to_uint8(img * 2.0 - 1.0), path)
  progress.update(len(todo), force=True)
  settings = {k: v for k, v in sample_kwargs.items() if v is not None}
  fileio.write_text(
    fileio.join(outdir, "samples.jsonl"),
    "".join(json.dumps({**x, **settings}) + "\n" for x in lines),
  )
  return [x["file"] for x in lines]
