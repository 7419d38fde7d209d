"""Prompt sources and the prompt-embedding cache writer (a library).

``read_prompts`` reads prompt records from a ``.txt`` / ``.jsonl`` file (local
or ``gs://``) or a TFDS split; ``dedupe`` keeps the first of each prompt;
``embed`` adds a model family's text embeddings (``families.<name>``'s
``text_encoders``) to a cache folder in whole shards (``data.CacheWriter``),
skipping prompts already there, so an interrupted job resumes.
``fingerprint`` / ``tokenizer_id`` name an encoder checkpoint or tokenizer in
a cache's identity. The command is ``leapalign_jax.embed_prompts``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from leapalign_jax import data
from leapalign_jax.errors import UserError

SHARD_SIZE = 1024
_PROMPT_FIELDS = ("prompt", "text", "caption")


class PromptError(UserError):
  """The prompt source is missing, unreadable or empty."""


# ---------------------------------------------------------------- sources --


def _record(obj: Any, where: str) -> dict[str, Any]:
  if isinstance(obj, str):
    obj = {"prompt": obj}
  if not isinstance(obj, dict):
    raise PromptError(f"{where}: expected a JSON object with a 'prompt' field")
  for field in _PROMPT_FIELDS:
    if isinstance(obj.get(field), str):
      rec = {k: v for k, v in obj.items() if k not in _PROMPT_FIELDS}
      return {"prompt": obj[field], **rec}
  raise PromptError(f"{where}: no 'prompt' (or 'text'/'caption') string field")


def _read_tfds(spec: str) -> list[dict[str, Any]]:
  name_split, _, field = spec[len("tfds:") :].partition(":")
  name, _, split = name_split.partition("/")
  if not name or not split:
    raise PromptError(f"{spec!r}: use tfds:<name>/<split>[:<field>]")
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise PromptError(
      f"{spec}: tensorflow-datasets is not installed; pip install "
      "tensorflow-datasets (no TensorFlow needed for as_data_source)"
    ) from None
  try:
    source = tfds.builder(
      name, data_dir=os.environ.get("TFDS_DATA_DIR")
    ).as_data_source(split)
  except Exception as e:  # tfds raises many types; report one line
    raise PromptError(f"{spec}: cannot open the dataset ({e})") from None
  out = []
  for i in range(len(source)):
    ex = dict(source[i])
    key = field or next((f for f in _PROMPT_FIELDS if f in ex), None)
    if key is None or key not in ex:
      raise PromptError(
        f"{spec}: examples have no field {field or _PROMPT_FIELDS}"
      )
    value = ex[key]
    value = value.decode() if isinstance(value, bytes) else str(value)
    out.append({"prompt": value, "source_index": i})
  return out


def read_prompts(spec: str) -> list[dict[str, Any]]:
  """Reads prompt records from a ``.txt``/``.jsonl`` file or a TFDS split.

  Raises:
    PromptError: with one line naming the source and the problem.
  """
  if spec.startswith("tfds:"):
    records = _read_tfds(spec)
  else:
    try:
      if "://" in spec:  # a prompt file in a bucket: read once, whole
        from leapalign_jax import fileio

        lines = fileio.read_bytes(spec).decode("utf-8").splitlines()
      else:
        with open(spec, encoding="utf-8") as f:
          lines = f.read().splitlines()
    except FileNotFoundError:
      raise PromptError(f"{spec}: no such prompt file") from None
    except IsADirectoryError:
      raise PromptError(
        f"{spec}: is a folder; pass a .txt (one prompt a line) or .jsonl file"
      ) from None
    except UnicodeDecodeError as e:
      raise PromptError(
        f"{spec}: not UTF-8 text (byte {e.start}); save the prompt file as "
        "UTF-8 text"
      ) from None
    except OSError as e:
      raise PromptError(
        f"{spec}: cannot read the prompt file ({e.strerror})"
      ) from None
    if spec.endswith(".jsonl"):
      records = []
      for n, line in enumerate(lines, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except ValueError:
          raise PromptError(f"{spec}:{n}: not valid JSON") from None
        records.append(_record(obj, f"{spec}:{n}"))
    else:
      records = [{"prompt": line.strip()} for line in lines if line.strip()]
  records = [r for r in records if r["prompt"].strip()]
  if not records:
    raise PromptError(f"{spec}: holds no prompts (empty or blank lines only)")
  return records


def dedupe(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
  """Keeps the first record of each distinct prompt text."""
  seen, out = set(), []
  for r in records:
    if r["prompt"] not in seen:
      seen.add(r["prompt"])
      out.append(r)
  return out


# -------------------------------------------------------------- encoders --


def fingerprint(path: str) -> str:
  """A cheap identity of a checkpoint: headers, sizes and edge bytes.

  Two checkpoints with the same fingerprint have the same tensor names,
  shapes and the same first/last megabyte of every weight file.
  """
  files = []
  if os.path.isdir(path):
    for root, _, names in os.walk(path):
      files += [os.path.join(root, n) for n in names]
  else:
    files = [path]
  h = hashlib.sha256()
  for f in sorted(files):
    if not f.endswith(
      (".safetensors", ".json", ".bin", ".pt", ".model", ".txt")
    ):
      continue
    size = os.path.getsize(f)
    h.update(os.path.relpath(f, path).encode() + str(size).encode())
    with open(f, "rb") as fh:
      h.update(fh.read(1 << 20))
      if size > 2 << 20:
        fh.seek(-(1 << 20), os.SEEK_END)
        h.update(fh.read())
  return h.hexdigest()[:16]


def tokenizer_id(folder: str) -> str:
  """A tokenizer folder's fingerprint, or the vendored BPE's name."""
  from leapalign_jax.rewards.text import VENDORED

  return fingerprint(folder) if folder else VENDORED


def embed(
  encoders: Any,
  records: Sequence[dict[str, Any]],
  out_dir: str,
  *,
  shard_size: int = SHARD_SIZE,
  progress: bool = True,
) -> dict[str, int]:
  """Adds the records' embeddings to the cache in ``out_dir`` (resumable).

  Returns:
    Counts: ``total`` distinct prompts, ``skipped`` already cached,
    ``written`` now.
  """
  from tqdm import tqdm

  writer = data.CacheWriter(out_dir, encoders.identity())
  records = dedupe(records)
  done = writer.done
  todo = [r for r in records if r["prompt"] not in done]
  bar = tqdm(total=len(todo), unit="prompt", disable=not progress)
  for start in range(0, len(todo), shard_size):
    chunk = todo[start : start + shard_size]
    writer.append(chunk, encoders([r["prompt"] for r in chunk]))
    bar.update(len(chunk))
  bar.close()
  return {
    "total": len(records),
    "skipped": len(records) - len(todo),
    "written": len(todo),
  }
