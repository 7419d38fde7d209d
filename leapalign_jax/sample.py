"""Text-to-image sampling, the command (``generation.Sampler`` is the library).

  python -m leapalign_jax.sample --config configs/<run>.py \
      --prompt "a red digit seven on the left" [--prompt ...] --seed 0 \
      [--seed 1 ...] --out <dir> [--height H] [--width W] [--num-steps N] \
      [--guidance G] [--save-npy] [--save-latents] [--latents init.npy] \
      [--checkpoint <workdir>] [key=value config overrides]

Every prompt is sampled with every seed (the seed alone names an image's
noise: ``leapalign_jax.generation``). The command writes one PNG per image
(``prompt<i>_seed<s>.png``), a ``samples.jsonl`` naming each (prompt, seed,
size, steps, guidance), and ``grid.png`` for several (each image captioned
with its prompt and seed); ``--save-npy`` adds the
float images (``.npy``, [0, 1]) and ``--save-latents`` the denoised latents
(``.latent.npy``). ``--checkpoint`` samples with the EMA weights of a
training workdir.

  python -m leapalign_jax.sample --config configs/<run>.py \
      --geneval evaluation_metadata.jsonl --out <dir> [--images-per-prompt 4] \
      [--seed 0] [--checkpoint <workdir>]

writes GenEval's layout (``<dir>/00000/metadata.jsonl``,
``<dir>/00000/samples/0000.png``, ...; ``leapalign_jax.geneval``), which
GenEval's ``evaluation/evaluate_images.py <dir>`` scores unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from leapalign_jax import errors, images, metrics
from leapalign_jax.generation import Sampler, Samples


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m leapalign_jax.sample")
  p.add_argument("--config", required=True)
  p.add_argument("--prompt", action="append")
  p.add_argument(
    "--geneval",
    metavar="METADATA",
    help="GenEval's evaluation_metadata.jsonl: sample its prompts into the "
    "layout its evaluator reads (--out/<00000>/samples/<0000>.png); "
    "replaces --prompt",
  )
  p.add_argument(
    "--images-per-prompt",
    type=int,
    default=4,
    help="with --geneval: images per prompt (default 4, GenEval's)",
  )
  p.add_argument(
    "--seed",
    type=int,
    action="append",
    default=None,
    help="repeatable; every prompt is sampled with every seed (default 0)",
  )
  p.add_argument("--out", required=True)
  p.add_argument(
    "--height", type=int, help="pixels (default: config sampling.height)"
  )
  p.add_argument(
    "--width", type=int, help="pixels (default: config sampling.width)"
  )
  p.add_argument(
    "--num-steps",
    type=int,
    help="Euler steps (default: config eval.num_steps, the evaluation's; "
    "sampling.num_steps is the training rollouts')",
  )
  p.add_argument(
    "--guidance",
    type=float,
    help="distilled guidance (default: config sampling.guidance)",
  )
  p.add_argument(
    "--latents",
    help="a .npy of initial latents [prompts, h, w, C] instead of seeds",
  )
  p.add_argument(
    "--save-npy", action="store_true", help="also float images in [0, 1]"
  )
  p.add_argument(
    "--save-latents", action="store_true", help="also the denoised latents"
  )
  p.add_argument("--checkpoint", default=None, help="a training workdir")
  p.add_argument("overrides", nargs="*", help="key=value config overrides")
  return p


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  args = _parser().parse_args(argv)
  metrics.log_to_stderr()  # progress lines
  paths = []
  status = errors.run_command(lambda: paths.extend(run(args)))
  for p in paths:
    print(p)
  return status


def run(args) -> list[str]:
  """The command's work: loads the models, samples, writes the files."""
  from leapalign_jax import configs_io

  config = configs_io.load_config(args.config, args.overrides)
  if bool(args.prompt) == bool(args.geneval):
    raise errors.UserError("give --prompt (repeatable) or --geneval METADATA")
  if args.geneval:
    return _geneval(config, args)
  if args.latents and args.seed:
    raise errors.UserError("--latents replaces --seed; give one of them")
  latents = _read_latents(args.latents) if args.latents else None
  seeds = None if latents is not None else (args.seed or [0])
  if latents is None:
    pairs = [(i, p, s) for i, p in enumerate(args.prompt) for s in seeds]
  else:
    pairs = [(i, p, None) for i, p in enumerate(args.prompt)]
  sampler = Sampler(config, args.checkpoint)
  out = sampler(
    [p for _, p, _ in pairs],
    None if latents is not None else [s for _, _, s in pairs],
    height=args.height,
    width=args.width,
    num_steps=args.num_steps,
    guidance=args.guidance,
    latents=latents,
    return_latents=args.save_latents,
  )
  c = sampler.config
  settings = {
    "height": out.images.shape[1],
    "width": out.images.shape[2],
    "num_steps": int(
      c.eval.num_steps if args.num_steps is None else args.num_steps
    ),
    "guidance": float(
      c.sampling.guidance if args.guidance is None else args.guidance
    ),
  }
  return _write(args.out, pairs, out, settings, args.save_npy)


def _geneval(config, args) -> list[str]:
  """``--geneval``: GenEval's folder layout (``leapalign_jax.geneval``)."""
  from leapalign_jax import geneval

  if args.latents or args.save_npy or args.save_latents:
    raise errors.UserError(
      "--geneval writes PNGs from seeds only; drop --latents, --save-npy "
      "and --save-latents"
    )
  if args.seed and len(args.seed) > 1:
    raise errors.UserError(
      "--geneval takes one --seed (the first image's; image j of prompt i "
      "gets seed + i * images_per_prompt + j)"
    )
  metadata = geneval.read_metadata(args.geneval)
  sampler = Sampler(config, args.checkpoint)
  geneval.write(
    sampler,
    metadata,
    args.out,
    images_per_prompt=args.images_per_prompt,
    seed=(args.seed or [0])[0],
    height=args.height,
    width=args.width,
    num_steps=args.num_steps,
    guidance=args.guidance,
  )
  return [args.out]


def _read_latents(path: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise errors.UserError(
      f"--latents {path}: not a readable .npy ({e})"
    ) from None


def _write(folder, pairs, out: Samples, settings, save_npy: bool) -> list[str]:
  """One PNG (and optional .npy files) per image, samples.jsonl, a grid."""
  os.makedirs(folder, exist_ok=True)
  written, lines = [], []
  for k, (i, prompt, seed) in enumerate(pairs):
    stem = f"prompt{i:03d}_" + ("latents" if seed is None else f"seed{seed}")
    png = images.to_uint8(out.images[k] * 2.0 - 1.0)
    written.append(images.save_png(png, os.path.join(folder, stem + ".png")))
    if save_npy:
      written.append(_save_npy(folder, stem + ".npy", out.images[k]))
    if out.latents is not None:
      written.append(_save_npy(folder, stem + ".latent.npy", out.latents[k]))
    lines.append({"file": stem + ".png", "prompt": prompt, "seed": seed})
  path = os.path.join(folder, "samples.jsonl")
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps({**x, **settings}) + "\n" for x in lines)
  os.replace(path + ".tmp", path)
  written.append(path)
  if len(pairs) > 1:
    cols = len({s for _, _, s in pairs})
    grid = out.images * 2.0 - 1.0
    captions = [p if s is None else f"{p}\nseed {s}" for _, p, s in pairs]
    path = os.path.join(folder, "grid.png")
    written.append(images.save_captioned_grid(grid, captions, path, cols))
  return written


def _save_npy(folder: str, name: str, array: np.ndarray) -> str:
  path = os.path.join(folder, name)
  with open(path + ".tmp", "wb") as f:
    np.save(f, np.asarray(array, np.float32))
  os.replace(path + ".tmp", path)
  return path


if __name__ == "__main__":
  sys.exit(main())
