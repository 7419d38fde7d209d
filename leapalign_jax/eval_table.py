"""Several checkpoints, one table: the paper's Table 2 for our runs.

``evaluate_checkpoints(comps, [(name, spec), ...], workdir, tag)`` evaluates
each checkpoint with ``evaluation.run`` (the same held-out prompts and
seeds for all of them: image ``j`` of prompt ``i`` has seed ``eval.seed +
i * eval.images_per_prompt + j``), and writes, under ``<workdir>/eval/<tag>/``:

- ``<name>/``: each checkpoint's ``eval.json``, ``samples.jsonl``,
  ``images/`` and captioned ``grid.png`` (a single checkpoint is written to
  ``eval/<tag>/`` itself, the layout of one evaluation);
- ``table.md`` and ``table.json``: one row per checkpoint, one column per
  score (every configured reward, plus the world's held-out evaluator), as
  mean ± std over prompts x images per prompt;
- ``compare.png`` (``compare=True``): the first ``eval.grid_images`` images
  of every checkpoint side by side, one column per checkpoint, each image
  captioned with its prompt (and the world's verdict).

A spec is ``base`` (the config's model weights), a training workdir (the
EMA weights of its latest checkpoint), or an export of full weights (a
diffusers ``transformer/`` folder, an export folder holding one, or a BFL
``.safetensors`` file) loaded with the config's model family.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from flax import nnx

from leapalign_jax import errors, evaluation, families, fileio, images, sharding


def parse_spec(text: str) -> tuple[str, str]:
  """``name=spec`` or ``spec`` -> ``(name, spec)`` (name from the path)."""
  name, sep, spec = text.partition("=")
  if not sep:
    spec = text
    parts = [p for p in spec.rstrip("/").split("/") if p]
    name = parts[-1] if parts else spec
    if name == "export" and len(parts) > 1:
      name = f"{parts[-2]}-export"
  if not name or not spec or "/" in name:
    raise errors.UserError(
      f"--checkpoint {text!r}: use NAME=SPEC or SPEC (NAME without '/')"
    )
  return name, spec


def unique_names(named: list[tuple[str, str]]) -> list[tuple[str, str]]:
  """Refuses two checkpoints under one name (their folders would clash)."""
  names = [n for n, _ in named]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise errors.UserError(
      f"two checkpoints are named {twice[0]!r}; name them: --checkpoint "
      "NAME=SPEC"
    )
  return named


def load_params(comps, spec: str, tx=None):
  """The trainable params of a checkpoint spec, placed like the run's."""
  from leapalign_jax import checkpoint

  if spec == "base":
    return comps.params
  if fileio.isdir(fileio.join(spec, "checkpoints")):
    if tx is None:
      from leapalign_jax import step as step_lib

      tx = step_lib.make_optimizer(comps.config.optim)
    restored = checkpoint.restore_latest(
      checkpoint.Checkpointer(fileio.join(spec, "checkpoints")),
      comps.abstract_state(tx),
    )
    if restored is None:
      raise errors.UserError(f"{spec}: no checkpoint in it to evaluate")
    return restored[0]["ema"]
  if not fileio.exists(spec):
    raise errors.UserError(
      f"--checkpoint {spec}: no such file or folder; give 'base', a "
      "training workdir or an export of full weights"
    )
  if comps.lora_paths:
    raise errors.UserError(
      f"--checkpoint {spec}: an export holds full weights; evaluate it with "
      "a config without lora (lora.enabled=False)"
    )
  return _load_export(comps, spec)


def _load_export(comps, path: str):
  """Full weights from an export, as the run's ``params`` pytree."""
  config = comps.config.copy_and_resolve_references()
  families.section(config).path = path
  mesh, rules = comps.mesh, config.mesh.rules
  _, model = errors.as_user_error(
    f"--checkpoint {path}",
    comps.family.load,
    config,
    lambda state: sharding.logical_to_mesh(state, mesh, rules),
  )
  _, params = nnx.split(model, nnx.Param)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), comps.params)
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise errors.UserError(
      f"--checkpoint {path}: its weights do not fit this config's model; "
      "pass the config the export was trained with"
    )
  return params


def metric_keys(summaries: list[dict[str, Any]]) -> list[str]:
  """The scores every summary holds (rewards first, then the world's)."""
  keys = [
    k
    for k, v in summaries[0].items()
    if isinstance(v, float)
    and not k.endswith("_std")
    and all(k in s for s in summaries)
  ]
  return sorted(keys, key=lambda k: (not k.startswith("reward/"), k))


def table(
  rows: list[tuple[str, str, dict[str, Any]]], config
) -> dict[str, Any]:
  """``table.json`` 's content: one row per ``(name, spec, summary)``."""
  keys = metric_keys([s for _, _, s in rows])
  cfg = config.eval
  return {
    "num_prompts": int(rows[0][2]["num_images"]) // int(cfg.images_per_prompt),
    "images_per_prompt": int(cfg.images_per_prompt),
    "seed": int(cfg.seed),
    "num_steps": int(cfg.num_steps),
    "metrics": keys,
    "rows": [
      {
        "checkpoint": name,
        "source": spec,
        "num_images": s["num_images"],
        # A summary of an older version may lack the _std entries.
        **{k: {"mean": s[k], "std": s.get(f"{k}_std")} for k in keys},
      }
      for name, spec, s in rows
    ],
  }


def markdown(data: dict[str, Any]) -> str:
  """The table as Markdown: ``mean ± std`` per checkpoint and score."""
  keys = data["metrics"]
  out = [
    "| checkpoint | " + " | ".join(keys) + " |",
    "|---|" + "---|" * len(keys),
  ]
  for row in data["rows"]:
    cells = [
      f"{row[k]['mean']:.4f}"
      + ("" if row[k]["std"] is None else f" ± {row[k]['std']:.4f}")
      for k in keys
    ]
    out.append(f"| {row['checkpoint']} | " + " | ".join(cells) + " |")
  out.append(
    f"\nmean ± std over {data['num_prompts']} prompts x "
    f"{data['images_per_prompt']} images per prompt (image j of prompt i: "
    f"seed {data['seed']} + i * {data['images_per_prompt']} + j), "
    f"{data['num_steps']} sampling steps."
  )
  return "\n".join(out) + "\n"


def write_table(
  rows: list[tuple[str, str, dict[str, Any]]], config, folder: str
) -> dict[str, Any]:
  """Writes ``table.json`` and ``table.md`` (process 0); returns the data."""
  data = table(rows, config)
  if jax.process_index() == 0:
    fileio.write_text(
      fileio.join(folder, "table.json"), json.dumps(data, indent=2) + "\n"
    )
    fileio.write_text(fileio.join(folder, "table.md"), markdown(data))
  return data


def compare_grid(
  names: list[str], results: list[evaluation.Result], path: str, n: int
) -> str:
  """The first ``n`` images of every checkpoint, one column each."""
  n = min(n, *(len(r.images) for r in results))
  tiles = np.stack([r.images[i] for i in range(n) for r in results])
  captions = [r.captions[i] for i in range(n) for r in results]
  return images.save_captioned_grid(
    tiles, captions, path, cols=len(results), headers=names
  )


def evaluate_checkpoints(
  comps,
  named: list[tuple[str, str]],
  workdir: str,
  tag: str,
  compare: bool = False,
) -> dict[str, Any]:
  """Evaluates each ``(name, spec)``; writes the table (and compare grid).

  Returns:
    ``table.json`` 's content.
  """
  named = unique_names(list(named))
  if compare and len(named) < 2:
    raise errors.UserError(
      "--compare needs two or more --checkpoint (e.g. base and a workdir)"
    )
  single = len(named) == 1
  rows, results = [], []
  n_grid = int(comps.config.eval.grid_images)
  for name, spec in named:
    params = load_params(comps, spec)
    sub = tag if single else f"{tag}/{name}"
    result = evaluation.run(comps, params, workdir, sub)
    rows.append((name, spec, result.summary))
    # Only the grid's images are kept: a paper-size evaluation of several
    # checkpoints would not fit in host memory.
    result.images = result.images[:n_grid]
    results.append(result)
  folder = fileio.join(workdir, "eval", tag)
  data = write_table(rows, comps.config, folder)
  if jax.process_index() == 0 and compare:
    names = [name for name, _ in named]
    path = fileio.join(folder, "compare.png")
    data["compare"] = compare_grid(names, results, path, n_grid)
  return data
