"""Text-to-image sampling: prompts -> PNGs, one jitted loop with the decode.

  python -m leapalign_jax.sample --config configs/<run>.py \
      --prompt "a red digit seven on the left" [--prompt ...] --seed 0 \
      --out <dir> [--num-steps 50] [--checkpoint <workdir>]

Encodes the prompts with the config's CLIP-L / T5 encoders, integrates the
rectified flow from noise with Euler steps on the shifted sigma grid
(BFL ``sampling.py``), decodes with the autoencoder and writes one PNG per
image plus ``grid.png`` for several. ``--checkpoint`` samples with the EMA
weights of a training workdir instead of the base model.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leapalign_jax import errors, images, sampling


def make_sampler(
  graphdef,
  decode: Callable,
  token_grid: tuple[int, int],
  guidance: float | None,
) -> Callable:
  """A jitted ``(params, vae_params, t5, clip, x1, sigmas) -> images``.

  ``params`` is the Flux Param state (or a tuple of states to merge, e.g.
  LoRA + base); ``x1`` is packed noise ``[B, L, C]``; images are NHWC in
  ``[-1, 1]``.
  """
  h_tok, w_tok = token_grid

  @jax.jit
  def sample(params, vae_params, t5, clip, x1, sigmas):
    states = params if isinstance(params, tuple) else (params,)
    model = nnx.merge(graphdef, *states)
    B = x1.shape[0]
    g = None if guidance is None else jnp.full((B,), guidance, jnp.float32)

    def velocity(_, x, t):
      return model(
        img=x,
        img_ids=sampling.img_ids(B, h_tok, w_tok),
        txt=t5,
        txt_ids=sampling.txt_ids(B, t5.shape[1]),
        timesteps=t,
        y=clip,
        guidance=g,
      )

    x0 = sampling.denoise(velocity, None, x1, sigmas)
    z = sampling.unpack_tokens(x0, h_tok, w_tok)
    return jnp.clip(decode(vae_params, z), -1.0, 1.0)

  return sample


def noise_for(
  seeds: list[int], prompt_index: list[int], latent_shape: tuple[int, int, int]
) -> np.ndarray:
  """Packed noise per image from ``fold_in(key(seed), prompt_index)``."""
  out = []
  for s, i in zip(seeds, prompt_index):
    key = jax.random.fold_in(jax.random.key(s), i)
    out.append(jax.random.normal(key, (1, *latent_shape), jnp.float32))
  return np.asarray(sampling.pack(jnp.concatenate(out)))


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m leapalign_jax.sample")
  parser.add_argument("--config", required=True)
  parser.add_argument("--prompt", action="append", required=True)
  parser.add_argument("--seed", type=int, action="append", default=None)
  parser.add_argument("--out", required=True)
  parser.add_argument("--num-steps", type=int, default=None)
  parser.add_argument("--checkpoint", default=None, help="a training workdir")
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args(argv)
  paths = []
  status = errors.run_command(lambda: paths.extend(run(args)))
  for p in paths:
    print(p)
  return status


def run(args) -> list[str]:
  """Loads the models named by the config and writes the images."""
  from leapalign_jax import configs_io, embed_prompts
  from leapalign_jax.convert import load_autoencoder, load_flux
  from leapalign_jax.models.autoencoder import decode_fn

  config = configs_io.load_config(args.config, args.overrides)
  if args.checkpoint:
    from leapalign_jax import components

    config = components.prepare_world(config, args.checkpoint)
  else:
    from leapalign_jax import staging

    config = staging.resolve_config(config)
  seeds = args.seed or [0]
  pairs = [(p, i, s) for i, p in enumerate(args.prompt) for s in seeds]
  text = embed_prompts.TextEncoders(config.text)(list(args.prompt))
  f = config.flux
  flux_cfg, model = load_flux(
    f.path,
    config=f.get("variant") or None,
    dtype=f.dtype,
    param_dtype=f.param_dtype,
    attention=f.attention,
  )
  ae_cfg, ae = load_autoencoder(config.vae.path, dtype=config.vae.dtype)
  decode, vae_params = decode_fn(ae)
  graphdef, params = nnx.split(model, nnx.Param)
  if args.checkpoint:
    params = _ema_from_checkpoint(config, args.checkpoint, params)
  s = config.sampling
  lh, lw, zc = ae_cfg.latent_shape(s.height, s.width)
  grid = (lh // 2, lw // 2)
  guidance = float(s.guidance) if flux_cfg.guidance_embed else None
  sample = make_sampler(graphdef, decode, grid, guidance)
  sigmas = sampling.get_schedule(
    args.num_steps or config.eval.num_steps, grid[0] * grid[1], shift=s.shift
  )
  idx = [i for _, i, _ in pairs]
  x1 = noise_for([s_ for _, _, s_ in pairs], idx, (lh, lw, zc))
  imgs = np.asarray(
    sample(
      params,
      vae_params,
      text["t5"][idx],
      text["clip_pooled"][idx],
      x1,
      jnp.asarray(sigmas),
    )
  )
  written = []
  for k, (_, i, seed) in enumerate(pairs):
    path = os.path.join(args.out, f"prompt{i:03d}_seed{seed}.png")
    written.append(images.save_png(images.to_uint8(imgs[k]), path))
  if len(pairs) > 1:
    written.append(
      images.save_grid(
        imgs, os.path.join(args.out, "grid.png"), cols=len(seeds)
      )
    )
  return written


def _ema_from_checkpoint(config, workdir: str, params):
  """The EMA Flux params of a workdir's latest checkpoint (full fine-tunes)."""
  from leapalign_jax import checkpoint
  from leapalign_jax import step as step_lib

  if config.lora.enabled:
    raise errors.UserError(
      "--checkpoint with a LoRA run: sample from its export instead "
      "(export/pytorch_lora_weights.safetensors) or use evaluate"
    )
  from leapalign_jax import fileio

  folder = fileio.join(workdir, "checkpoints")
  restored = None
  if fileio.isdir(folder):
    tx = step_lib.make_optimizer(config.optim)
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx, 0), params)
    restored = checkpoint.restore_latest(
      checkpoint.Checkpointer(folder), abstract
    )
  if restored is None:
    raise errors.UserError(
      f"--checkpoint {workdir}: no checkpoint there (train first, or pass "
      "the training --workdir)"
    )
  return restored[0]["ema"]


if __name__ == "__main__":
  sys.exit(main())
