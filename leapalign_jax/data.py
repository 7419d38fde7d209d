"""Prompt-embedding caches: the on-disk format, its writer and a grain reader.

A cache folder holds ``manifest.json`` and ``shard-XXXXX.safetensors`` files.
Each shard stores, per prompt, the T5 hidden states (``t5``, ``[S, D]``), the
CLIP pooled vector (``clip_pooled``), each text-reading reward's own prompt
ids (``reward_ids/<reward name>``, tokenised as that reward was trained:
``rewards.text``) and the prompt's row in the manifest (``index``). The
manifest lists the prompts (with optional structured attributes), the field
shapes/dtypes and the encoders' and tokenizers' identity, so embeddings from
different encoders are never mixed. Caches of format 1 (one ``reward_ids``
for every reward) are refused with a line saying to re-embed.

Training reads a cache through ``grain``: a shuffled, per-epoch reshuffled,
random-access ``MapDataset``; the batch for step ``s`` on host ``h`` is a pure
function of ``(seed, s, h)``, so the data position is the step and resuming is
exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from leapalign_jax.convert.safetensors_io import (
  TensorSource,
  save_file,
  write_json_atomic,
)
from leapalign_jax.errors import UserError, require_local

MANIFEST = "manifest.json"
# 2: reward ids per reward (``reward_ids/<name>``); 1 had one ``reward_ids``.
FORMAT_VERSION = 2
IDS_PREFIX = "reward_ids/"


def ids_field(reward: str) -> str:
  """The cache field holding ``reward`` 's prompt ids."""
  return IDS_PREFIX + reward


def reward_ids(batch: Mapping[str, Any]) -> dict[str, Any]:
  """``{reward name: ids}`` of a cache row or batch."""
  return {
    k[len(IDS_PREFIX) :]: v
    for k, v in batch.items()
    if k.startswith(IDS_PREFIX)
  }


class CacheError(UserError):
  """A prompt-embedding cache is missing, inconsistent or incompatible."""


def shard_name(i: int) -> str:
  """File name of shard ``i``."""
  return f"shard-{i:05d}.safetensors"


def read_manifest(folder: str) -> dict[str, Any] | None:
  """The cache's manifest, or None when the folder holds no cache yet."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise CacheError(
      f"{path}: unreadable manifest ({e}); delete the cache"
    ) from None
  if manifest.get("version") != FORMAT_VERSION:
    raise CacheError(
      f"{path}: cache format {manifest.get('version')} is not "
      f"{FORMAT_VERSION} (reward ids per reward); re-embed the prompts: "
      "python -m leapalign_jax.embed_prompts into a new folder"
    )
  return manifest


class CacheWriter:
  """Appends shards to a cache; resumable, one atomic step per shard.

  A shard is written (atomically) before the manifest that lists it, so an
  interrupted run leaves a valid cache of whole shards; ``done`` tells the
  caller which prompts are already embedded.
  """

  def __init__(self, folder: str, encoders: Mapping[str, Any]):
    self.folder = folder
    os.makedirs(folder, exist_ok=True)
    manifest = read_manifest(folder)
    if manifest is None:
      manifest = {
        "version": FORMAT_VERSION,
        "encoders": dict(encoders),
        "fields": {},
        "shards": [],
        "records": [],
      }
    elif manifest["encoders"] != dict(encoders):
      raise CacheError(
        f"{folder}: holds embeddings from other encoders "
        f"({manifest['encoders']}) than these ({dict(encoders)}); write to a "
        "new folder instead of mixing them"
      )
    self.manifest = manifest

  @property
  def done(self) -> set[str]:
    """Prompts already in the cache."""
    return {r["prompt"] for r in self.manifest["records"]}

  def append(
    self,
    records: Sequence[Mapping[str, Any]],
    arrays: Mapping[str, np.ndarray],
  ) -> None:
    """Writes one shard for ``records`` (dicts with at least ``prompt``)."""
    n = len(records)
    if not n:
      return
    fields = {}
    for name in sorted(arrays):
      arr = np.asarray(arrays[name])
      if arr.shape[0] != n:
        raise ValueError(f"{name}: {arr.shape[0]} rows for {n} records")
      fields[name] = {"shape": list(arr.shape[1:]), "dtype": str(arr.dtype)}
    if self.manifest["fields"] and self.manifest["fields"] != fields:
      raise CacheError(
        f"{self.folder}: new embeddings have fields {fields}, the cache has "
        f"{self.manifest['fields']}; use a new folder"
      )
    start = len(self.manifest["records"])
    shard = shard_name(len(self.manifest["shards"]))
    tensors = {k: np.ascontiguousarray(arrays[k]) for k in fields}
    tensors["index"] = np.arange(start, start + n, dtype=np.int64)
    save_file(tensors, os.path.join(self.folder, shard))
    self.manifest["fields"] = fields
    self.manifest["shards"].append({"file": shard, "count": n})
    self.manifest["records"].extend(dict(r) for r in records)
    write_json_atomic(os.path.join(self.folder, MANIFEST), self.manifest)


class PromptCache:
  """Random access to a cache: ``cache[i]`` -> dict of numpy arrays."""

  def __init__(self, folder: str):
    require_local(folder, "prompt cache")
    manifest = read_manifest(folder)
    if manifest is None:
      raise CacheError(
        f"{folder}: no prompt-embedding cache ({MANIFEST} missing); create it "
        "with python -m leapalign_jax.embed_prompts"
      )
    if not manifest["records"]:
      raise CacheError(f"{folder}: the cache holds no prompts")
    self.folder = folder
    self.manifest = manifest
    self.records = manifest["records"]
    self.encoders = manifest["encoders"]
    # Every shard uses the same tensor names: one source per shard.
    self.shards = [
      TensorSource.from_files([os.path.join(folder, s["file"])])
      for s in manifest["shards"]
    ]
    self.offsets = np.cumsum([0] + [s["count"] for s in manifest["shards"]])
    self.fields = tuple(manifest["fields"])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    s = int(np.searchsorted(self.offsets, i, side="right") - 1)
    row = i - int(self.offsets[s])
    shard = self.shards[s]
    return {k: np.array(shard[k][row]) for k in (*self.fields, "index")}

  def field_shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.manifest["fields"][name]["shape"])


def check_compatible(cache: PromptCache, encoders: Mapping[str, Any]) -> None:
  """Fails unless ``cache`` was written by the given encoders."""
  if cache.encoders != dict(encoders):
    raise CacheError(
      f"{cache.folder}: embeddings come from {cache.encoders}, but this run "
      f"uses {dict(encoders)}; re-embed the prompts"
    )


def trace(step: int, element: dict[str, np.ndarray]) -> None:
  """Records which prompts this process read at ``step`` (instrumentation).

  With ``$LEAPALIGN_DATA_TRACE`` set to a folder, appends ``{"step",
  "process", "index", "pid", "ppid"}`` to ``p<process>.jsonl`` there (the
  parent pid tells the starts of a ``launch_local`` job apart); the
  multi-process tests and ``bench/reliability.py`` check from it that no
  prompt is skipped or read twice across processes and resumes.
  """
  folder = os.environ.get("LEAPALIGN_DATA_TRACE")
  if not folder:
    return
  import jax

  os.makedirs(folder, exist_ok=True)
  line = json.dumps(
    {
      "step": int(step),
      "process": jax.process_index(),
      "index": [int(i) for i in np.asarray(element["index"]).ravel()],
      "pid": os.getpid(),
      "ppid": os.getppid(),
    }
  )
  with open(os.path.join(folder, f"p{jax.process_index()}.jsonl"), "a") as f:
    f.write(line + "\n")


def batches(
  cache: PromptCache,
  batch_per_host: int,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """Per-host batches: element ``s`` is this host's slice of global step ``s``.

  The global batch of step ``s`` is ``process_count * batch_per_host``
  consecutive elements of a shuffled (freshly every epoch), repeated stream;
  host ``h`` takes its contiguous part. Random access makes the position a
  pure function of the step.
  """
  records = (
    grain.MapDataset.source(cache)
    .shuffle(seed=seed)
    .repeat()
    .batch(batch_per_host, drop_remainder=True)
  )
  return records[process_index::process_count]
