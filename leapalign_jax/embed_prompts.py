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
``pickscore``), so the config's reward paths must be set. ``.jsonl`` records
keep their other fields (e.g. digit / colour / position attributes) in the
manifest. Prompts longer than an encoder's limit
are truncated with one warning per encoder. Bad input (a missing, empty or
unreadable prompt file, wrong encoder weights, an unknown config key) is one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from leapalign_jax import data, errors
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


class TextEncoders:
  """Flux's CLIP-L text + T5 encoders and tokenizers (``config.text``).

  With ``rewards`` (``rewards.text.specs``) it also tokenises the prompts
  for each reward as that reward was trained (``reward_ids/<name>``).
  ``cache=True`` rounds the embeddings to ``text.cache_dtype`` (what the
  cache stores); ``False`` keeps them in float32 (sampling).
  """

  def __init__(self, text_cfg, rewards=None, *, cache: bool = True):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from leapalign_jax import tokenizers
    from leapalign_jax.convert import load_clip, load_t5

    self.cfg = text_cfg
    dtype = text_cfg.dtype
    clip_cfg, clip = load_clip(
      text_cfg.clip_path, towers=("text",), dtype=dtype
    )
    _, t5 = load_t5(text_cfg.t5_path, dtype=dtype)
    # The checkpoint's own tokenizer; the vendored BPE only without one.
    if text_cfg.clip_tokenizer:
      folder = tokenizers.resolve_clip_tokenizer(text_cfg.clip_tokenizer)
    else:
      folder = tokenizers.find_clip_tokenizer(text_cfg.clip_path)
    self.clip_tokenizer_folder = str(folder or "")
    self.clip_tok = tokenizers.load_clip_tokenizer(folder or None)
    tokenizers.check_vocab(
      len(self.clip_tok),
      clip_cfg.text.vocab_size,
      str(folder) if folder else "OpenAI BPE (vendored)",
      f"text.clip_path ({text_cfg.clip_path})",
    )
    self.t5_tok = tokenizers.load_t5_tokenizer(
      text_cfg.t5_tokenizer or text_cfg.t5_path
    )
    self.rewards = dict(rewards or {})
    self.reward_toks = {n: s.tokenizer() for n, s in self.rewards.items()}
    clip_def, clip_params = nnx.split(clip)
    t5_def, t5_params = nnx.split(t5)
    self._params = (clip_params, t5_params)
    out_dtype = jnp.dtype(text_cfg.cache_dtype if cache else jnp.float32)

    @jax.jit
    def encode(params, clip_ids, t5_ids):
      clip_m = nnx.merge(clip_def, params[0])
      t5_m = nnx.merge(t5_def, params[1])
      pooled = clip_m.text_features(clip_ids, project=False)
      return t5_m(t5_ids).astype(out_dtype), pooled.astype(out_dtype)

    self._encode = encode

  @classmethod
  def for_config(cls, config) -> TextEncoders:
    """The encoders of a run config, with its rewards' tokenizers."""
    from leapalign_jax.rewards import text

    specs = text.specs(config.rewards, config.text.reward_max_length)
    return cls(config.text, specs)

  def identity(self) -> dict[str, Any]:
    """What makes two caches compatible: encoders, tokenizers, lengths."""
    c = self.cfg
    return {
      "clip": fingerprint(c.clip_path),
      "t5": fingerprint(c.t5_path),
      "clip_tokenizer": _tokenizer_id(self.clip_tokenizer_folder),
      "t5_tokenizer": fingerprint(c.t5_tokenizer or c.t5_path),
      "t5_max_length": int(c.t5_max_length),
      "clip_max_length": int(c.clip_max_length),
      "rewards": {
        n: {
          "style": s.style,
          "tokenizer": _tokenizer_id(s.folder),
          "length": s.length,
        }
        for n, s in self.rewards.items()
      },
      "dtype": str(c.cache_dtype),
    }

  def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Embeds ``prompts`` (any count) in fixed-size batches."""
    from leapalign_jax import tokenizers

    c = self.cfg
    clip_ids = tokenizers.tokenize_clip(
      self.clip_tok, prompts, c.clip_max_length
    )
    t5_ids = tokenizers.tokenize_t5(self.t5_tok, prompts, c.t5_max_length)
    n, bs = len(prompts), int(c.batch_size)
    t5_out, clip_out = [], []
    for start in range(0, n, bs):
      sl = slice(start, start + bs)
      a, b = clip_ids[sl], t5_ids[sl]
      pad = bs - a.shape[0]
      if pad:  # keep one compiled shape
        a = np.concatenate([a, np.repeat(a[-1:], pad, 0)])
        b = np.concatenate([b, np.repeat(b[-1:], pad, 0)])
      t5_e, clip_e = self._encode(self._params, a, b)
      t5_out.append(np.asarray(t5_e)[: bs - pad])
      clip_out.append(np.asarray(clip_e)[: bs - pad])
    out = {
      "t5": np.concatenate(t5_out),
      "clip_pooled": np.concatenate(clip_out),
    }
    for name, tokenize in self.reward_toks.items():
      out[data.ids_field(name)] = tokenize(prompts).astype(np.int32)
    return out


def _tokenizer_id(folder: str) -> str:
  """A tokenizer folder's fingerprint, or the vendored BPE's name."""
  from leapalign_jax.rewards.text import VENDORED

  return fingerprint(folder) if folder else VENDORED


def embed(
  encoders: TextEncoders,
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
    encoders = TextEncoders.for_config(config)
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
