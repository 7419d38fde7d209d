"""Command line: convert checkpoints between layouts.

  python -m leapalign_jax.convert flux --src <file|dir> --dst <path> \
      [--layout bfl|diffusers] [--dtype bfloat16] [--axes-dim 16,56,56]
  python -m leapalign_jax.convert vae --src <file|dir> --dst <path> \
      [--layout bfl|diffusers] [--dtype bfloat16] [--norm-groups 32]
  python -m leapalign_jax.convert clip --src <file|dir> --dst <path> \
      [--layout hf|openclip] [--dtype bfloat16] [--towers text,vision] \
      [--variant ViT-bigG-14] [--hidden-act gelu|quick_gelu]
  python -m leapalign_jax.convert t5 --src <file|dir> --dst <dir> \
      [--dtype bfloat16]
  python -m leapalign_jax.convert aesthetic --src <head.pth> \
      --dst <head.safetensors> [--dtype float32]
  python -m leapalign_jax.convert image_reward --src ImageReward.pt \
      --dst <ImageReward.safetensors | dir> [--dtype float32]

Reads any supported layout (auto-detected) and writes the requested one, so
the output loads with ``load_flux`` / ``load_autoencoder`` / ``load_clip`` /
``load_t5`` / ``load_aesthetic_head`` / ``load_image_reward`` and with PyTorch tools (BFL/ComfyUI
single files, diffusers and transformers folders, OpenCLIP state dicts).
Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from leapalign_jax import errors
from leapalign_jax.convert.errors import ConversionError


def _flux(args) -> list[str]:
  from leapalign_jax.convert.flux import convert_flux

  dst = args.dst
  if args.layout == "bfl" and not dst.endswith(".safetensors"):
    dst = os.path.join(dst, "flux1.safetensors")
  try:
    axes = (
      tuple(int(a) for a in args.axes_dim.split(",")) if args.axes_dim else None
    )
  except ValueError:
    raise ConversionError(
      f"--axes-dim {args.axes_dim!r}: use three integers, e.g. 16,56,56"
    ) from None
  return convert_flux(args.src, dst, args.layout, args.dtype, axes)


def _vae(args) -> list[str]:
  from leapalign_jax.convert.autoencoder import convert_autoencoder

  return convert_autoencoder(
    args.src, args.dst, args.layout, args.dtype, args.norm_groups
  )


def _clip(args) -> list[str]:
  from leapalign_jax.convert.clip import convert_clip

  towers = tuple(args.towers.split(",")) if args.towers else None
  return convert_clip(
    args.src,
    args.dst,
    args.layout,
    args.dtype,
    towers=towers,
    hidden_act=args.hidden_act,
    variant=args.variant,
  )


def _aesthetic(args) -> list[str]:
  from leapalign_jax.convert.aesthetic import convert_aesthetic

  dst = args.dst
  if not dst.endswith(".safetensors"):
    dst = os.path.join(dst, "aesthetic_head.safetensors")
  return convert_aesthetic(args.src, dst, args.dtype)


def _image_reward(args) -> list[str]:
  from leapalign_jax.convert.image_reward import convert_image_reward

  return convert_image_reward(args.src, args.dst, args.dtype)


def _t5(args) -> list[str]:
  from leapalign_jax.convert.t5 import convert_t5

  return convert_t5(args.src, args.dst, args.dtype)


COMMANDS = {
  "flux": _flux,
  "vae": _vae,
  "clip": _clip,
  "t5": _t5,
  "aesthetic": _aesthetic,
  "image_reward": _image_reward,
}
# Output layouts per model; the first is the default.
LAYOUTS = {
  "flux": ("bfl", "diffusers"),
  "vae": ("bfl", "diffusers"),
  "clip": ("hf", "openclip"),
  "t5": ("hf",),
  "aesthetic": ("laion",),  # the upstream keys, as .safetensors
  "image_reward": ("imagereward",),  # ImageReward.pt's keys
}


def main(argv: list[str] | None = None) -> int:
  """Runs the converter; returns the process exit status."""
  parser = argparse.ArgumentParser(
    prog="python -m leapalign_jax.convert", description=__doc__.split("\n")[0]
  )
  parser.add_argument("model", choices=sorted(COMMANDS))
  parser.add_argument("--src", required=True, help="checkpoint file or folder")
  parser.add_argument("--dst", required=True, help="output file or folder")
  parser.add_argument(
    "--layout",
    default=None,
    choices=sorted({x for v in LAYOUTS.values() for x in v}),
    help="output layout (default: flux/vae bfl single file, clip/t5 hf folder)",
  )
  parser.add_argument(
    "--dtype",
    default=None,
    choices=["float32", "bfloat16", "float16"],
    help="output dtype (default: as stored in the source)",
  )
  parser.add_argument(
    "--axes-dim",
    default=None,
    help="RoPE axes split, e.g. 16,56,56; only needed to write a diffusers "
    "folder from a BFL file whose head dim is not 128",
  )
  parser.add_argument(
    "--norm-groups",
    type=int,
    default=None,
    help="vae: GroupNorm groups for a diffusers folder written from a BFL "
    "file, which does not record them (default 32, Flux's)",
  )
  parser.add_argument(
    "--towers",
    default=None,
    help="clip: comma-separated towers to convert (default: all present)",
  )
  parser.add_argument(
    "--variant",
    default=None,
    help="clip: the architecture of an OpenCLIP file, which does not record "
    "its head counts (a models.clip.VARIANTS or OpenCLIP model name, e.g. "
    "ViT-bigG-14); needed for sizes that are no known model's",
  )
  parser.add_argument(
    "--hidden-act",
    default=None,
    help="clip: the activation when the file does not say (gelu or "
    "quick_gelu; OpenCLIP files default to gelu)",
  )
  args = parser.parse_args(argv)
  layouts = LAYOUTS[args.model]
  args.layout = args.layout or layouts[0]
  if args.layout not in layouts:
    parser.error(f"{args.model} writes --layout {' or '.join(layouts)}")
  written = []
  status = errors.run_command(
    lambda: written.extend(COMMANDS[args.model](args))
  )
  for path in written:
    print(path)
  return status


if __name__ == "__main__":
  sys.exit(main())
