"""Evaluation: fixed-seed samples of held-out prompts, scored by every reward.

``evaluate(comps, params, workdir, tag)`` samples ``eval.num_prompts``
prompts of ``data.eval_cache`` × ``eval.images_per_prompt`` seeds with
``params``, scores them with every configured reward (and the world's
held-out scorers, ``worlds.scorers``) and writes ``eval/<tag>/``: one PNG per
image, ``samples.jsonl`` (file, prompt, seed, attributes, per-image scores
and the world's verdict), ``eval.json`` (means and standard deviations over
every image) and ``grid.png`` (each image captioned with its prompt and
verdict). ``run`` also returns the images (``Result``); ``eval_table``
builds the several-checkpoint table and comparison grid on it.
``after_training`` is the end-of-run evaluation; ``sample_grid`` the periodic
grid of training. The command is ``leapalign_jax.evaluate``.

Seeds: image ``j`` of held-out prompt ``i`` has the seed
``eval.seed + i * eval.images_per_prompt + j`` (``image_seed``; written to
``samples.jsonl``), and an image's initial noise is a function of its seed
alone (``sampling.seed_noise``), as in ``generation.Sampler``: any
checkpoint and any batch size see the same noise, and
``python -m leapalign_jax.sample --prompt <its prompt> --seed <its seed>``
with the same config and weights draws the same image.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from leapalign_jax import (
  data,
  fileio,
  images,
  metrics,
  sampling,
  sharding,
  worlds,
)

_LOG = logging.getLogger(__name__)


def image_seed(seed: int, prompt_index: int, image: int, per_prompt: int):
  """The seed of image ``image`` of held-out prompt ``prompt_index``."""
  return int(seed) + prompt_index * per_prompt + image


def generate(
  comps,
  params,
  cache: data.PromptCache,
  indices: list[int],
  *,
  seed: int,
  num_steps: int,
  images_per_prompt: int = 1,
) -> np.ndarray:
  """Images ``[len(indices) * images_per_prompt, H, W, 3]`` in ``[-1, 1]``."""
  per = images_per_prompt
  pairs = [
    (i, image_seed(seed, i, j, per)) for i in indices for j in range(per)
  ]
  bs = int(comps.config.eval.batch_size)
  sample = comps.sample_fn(num_steps)
  progress = metrics.Progress(len(pairs), unit="image", log=_LOG)
  out = []
  for start in range(0, len(pairs), bs):
    progress.update(start)
    chunk = pairs[start : start + bs]
    pad = bs - len(chunk)
    chunk_p = chunk + [chunk[-1]] * pad  # one compiled shape
    rows = [cache[i] for i, _ in chunk_p]
    batch = {
      k: np.stack([r[k] for r in rows]) for k in comps.family.text_fields
    }
    batch = sharding.put_global(batch, comps.mesh)
    keys = sampling.seed_keys([s for _, s in chunk_p])
    keys = sharding.put_global({"k": keys}, comps.mesh)["k"]
    imgs = sharding.to_host(sample(params, comps.frozen, batch, keys))
    out.append(imgs[: len(chunk)])
  if len(pairs) > bs:
    progress.update(len(pairs), force=True)
  return np.concatenate(out)


def score(
  comps, imgs: np.ndarray, cache, indices, per_prompt: int
) -> dict[str, np.ndarray]:
  """Per-image scores of every configured reward, ``{name: [N]}``."""
  from leapalign_jax import rewards

  # The rewards clip silently inside jit; a wrong value range (e.g. [0, 1]
  # or [0, 255] images) must fail here instead of being scored.
  rewards.check_images(imgs)
  # Each reward's own ids (rewards/text.py), one row per image.
  fields = [data.ids_field(n) for n in comps.reward.tokenizers]
  rows = [cache[i] for i in indices]
  ids = {
    f: np.repeat(np.stack([r[f] for r in rows]), per_prompt, 0) for f in fields
  }
  fn = comps.reward_each_fn()
  bs = int(comps.config.eval.batch_size)
  out: dict[str, list] = {}
  for start in range(0, len(imgs), bs):
    chunk = {"x": imgs[start : start + bs]}
    chunk.update({f: v[start : start + bs] for f, v in ids.items()})
    pad = bs - len(chunk["x"])
    if pad:
      chunk = {
        k: np.concatenate([v, np.repeat(v[-1:], pad, 0)])
        for k, v in chunk.items()
      }
    placed = sharding.put_global(chunk, comps.mesh)
    x = placed.pop("x")
    scores = fn(comps.frozen["reward"], x, data.reward_ids(placed))
    for name, v in scores.items():
      out.setdefault(name, []).append(sharding.to_host(v)[: bs - pad])
  return {k: np.concatenate(v) for k, v in out.items()}


@dataclasses.dataclass
class Result:
  """One checkpoint's evaluation.

  Attributes:
    summary: what ``eval.json`` holds (means, ``_std`` companions).
    images: ``[N, H, W, 3]`` in ``[-1, 1]``, prompt-major.
    per_image: ``{key: [N]}`` of every reward and world score.
    captions: one line per image: its prompt (and the world's verdict).
  """

  summary: dict[str, Any]
  images: np.ndarray
  per_image: dict[str, np.ndarray]
  captions: list[str]


def run(comps, params, workdir: str, tag: str) -> Result:
  """Samples, scores and writes ``eval/<tag>/``; returns everything."""
  cfg = comps.config.eval
  cache = comps.eval_cache or comps.train_cache
  n = min(int(cfg.num_prompts), len(cache))
  indices = list(range(n))
  per = int(cfg.images_per_prompt)
  imgs = generate(
    comps,
    params,
    cache,
    indices,
    seed=cfg.seed,
    num_steps=cfg.num_steps,
    images_per_prompt=per,
  )
  scores = score(comps, imgs, cache, indices, per)
  records = [dict(cache.records[i]) for i in indices for _ in range(per)]
  per_image = {f"reward/{k}": np.asarray(v) for k, v in scores.items()}
  verdicts: list[list[str]] = []
  for scorer in worlds.scorers(comps.config, workdir):
    for k, v in scorer(imgs, records).items():
      if k.endswith("/verdict"):  # caption lines, not numbers
        verdicts.append([str(x) for x in v])
      else:
        per_image[k] = np.asarray(v, np.float64)
  summary: dict[str, Any] = {"tag": tag, "num_images": len(imgs)}
  for name, v in per_image.items():
    summary[name] = float(np.mean(v))
    summary[f"{name}_std"] = float(np.std(v))
  verdict = ["; ".join(v[k] for v in verdicts) for k in range(len(imgs))]
  captions = [
    "\n".join(filter(None, [str(r.get("prompt", "")), verdict[k]]))
    for k, r in enumerate(records)
  ]
  if jax.process_index() == 0:
    _write(
      fileio.join(workdir, "eval", tag),
      imgs,
      records,
      per_image,
      verdict,
      captions,
      indices,
      per,
      cfg.seed,
      summary,
      cfg.grid_images,
    )
  return Result(summary, imgs, per_image, captions)


def evaluate(comps, params, workdir: str, tag: str) -> dict[str, Any]:
  """Samples, scores and writes ``eval/<tag>/``; returns the summary."""
  return run(comps, params, workdir, tag).summary


def _write(folder, imgs, records, per_image, verdict, captions, *rest):
  """Writes ``folder`` whole: built aside, then swapped in (never half).

  On ``gs://`` the folder is uploaded with ``eval.json`` last: a folder
  holding it is complete (``fileio.publish_dir``).
  """
  with fileio.publish_dir(folder, last="eval.json") as tmp:
    _write_files(tmp, imgs, records, per_image, verdict, captions, *rest)


def _write_files(
  folder,
  imgs,
  records,
  per_image,
  verdict,
  captions,
  indices,
  per,
  seed,
  summary,
  n,
):
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  lines = []
  for k, (img, rec) in enumerate(zip(imgs, records)):
    i, j = indices[k // per], k % per
    name = f"images/{i:05d}_{j}.png"
    images.save_png(images.to_uint8(img), os.path.join(folder, name))
    lines.append(
      {
        "file": name,
        "prompt_index": i,
        "seed": image_seed(seed, i, j, per),  # sample --seed draws it again
        **rec,
        **{key: float(v[k]) for key, v in per_image.items()},
        **({"eval/verdict": verdict[k]} if verdict[k] else {}),
      }
    )
  with open(os.path.join(folder, "samples.jsonl"), "w") as f:
    f.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)
  images.save_captioned_grid(
    imgs[:n],
    captions[:n],
    os.path.join(folder, "grid.png"),
    cols=per if per > 1 else None,  # one prompt a row
  )
  with open(os.path.join(folder, "eval.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)


def table(before: dict | None, after: dict) -> str:
  """A small before/after markdown table of the shared numeric entries."""
  keys = [
    k
    for k, v in after.items()
    if isinstance(v, float) and not k.endswith("_std")
  ]
  rows = ["| metric | before | after |", "|---|---|---|"]
  for k in keys:
    b = "" if before is None or k not in before else f"{before[k]:.4f}"
    rows.append(f"| {k} | {b} | {after[k]:.4f} |")
  return "\n".join(rows)


def after_training(config, workdir: str, comps, state) -> dict[str, Any]:
  """The end-of-run evaluation: EMA weights, plus the base model if asked."""
  if not config.eval.num_prompts:
    return {"before": None, "after": None, "grid": None}
  before = None
  before_path = fileio.join(workdir, "eval", "before", "eval.json")
  if config.eval.before:
    if fileio.exists(before_path):
      before = json.loads(fileio.read_text(before_path))
    else:
      before = evaluate(comps, comps.params, workdir, "before")
  after = evaluate(comps, state["ema"], workdir, "after")
  text = table(before, after)
  grid = fileio.join(workdir, "eval", "after", "grid.png")
  if jax.process_index() == 0:
    print(text)
    print(f"image grid: {grid}")
    fileio.write_text(
      fileio.join(workdir, "eval", "summary.md"),
      text + f"\n\nimage grid: {grid}\n",
    )
  return {"before": before, "after": after, "grid": grid}


def sample_grid(comps, state, step: int, workdir: str) -> str | None:
  """Fixed-seed EMA samples of the first eval prompts, saved as a PNG."""
  cache = comps.eval_cache or comps.train_cache
  n = min(comps.config.eval.grid_images, len(cache))
  imgs = generate(
    comps,
    state["ema"],
    cache,
    list(range(n)),
    seed=comps.config.eval.seed,
    num_steps=comps.config.sampling.num_steps,
  )
  if jax.process_index() != 0:
    return None
  captions = [str(cache.records[i].get("prompt", "")) for i in range(n)]
  return images.save_captioned_grid(
    imgs, captions, fileio.join(workdir, "samples", f"step_{step:06d}.png")
  )
