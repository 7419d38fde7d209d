"""Text-to-image sampling: one Python call and a command, named by seeds.

  python -m leapalign_jax.sample --config configs/<run>.py \
      --prompt "a red digit seven on the left" [--prompt ...] --seed 0 \
      [--seed 1 ...] --out <dir> [--height H] [--width W] [--num-steps N] \
      [--guidance G] [--save-npy] [--save-latents] [--latents init.npy] \
      [--checkpoint <workdir>] [key=value config overrides]

From Python (the models load once; each call samples)::

  from leapalign_jax import sample
  sampler = sample.Sampler.from_config("configs/<run>.py", ["k=v"])
  out = sampler(["a red fox", "a blue cat"], seeds=[0, 7], height=720,
                width=720, num_steps=50, guidance=3.5, return_latents=True)
  out.images   # [2, 720, 720, 3] float32 in [0, 1]
  out.latents  # [2, 90, 90, 16] float32, the denoised latents

Image ``k`` is ``(prompts[k], seeds[k])``. Its initial noise is
``pack(normal(jax.random.key(seed), [1, h, w, C]))`` for the latent
``(h, w, C)`` of the size (``sampling.seed_noise``): the seed alone names it,
so an image does not change when its prompt moves in a list or the batch
changes, and evaluation draws its noise the same way (image ``j`` of
held-out prompt ``i`` has the seed ``eval.seed + i * images_per_prompt + j``,
listed in ``samples.jsonl``). Initial latents may be given instead of seeds.
The defaults are the evaluation's: size ``sampling.height`` /
``sampling.width``, ``eval.num_steps`` steps (``sampling.num_steps`` is the
training rollouts'), ``sampling.guidance``. Prompts are encoded in float32
(nothing is cached, so nothing is rounded to ``text.cache_dtype``).

The command writes one PNG per image (``prompt<i>_seed<s>.png``), a
``samples.jsonl`` naming each (prompt, seed, size, steps, guidance), and
``grid.png`` for several; ``--save-npy`` adds the float images (``.npy``,
[0, 1]) and ``--save-latents`` the denoised latents (``.latent.npy``).
``--checkpoint`` samples with the EMA weights of a training workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

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
  with_latents: bool = False,
) -> Callable:
  """A jitted ``(params, vae_params, t5, clip, x1, sigmas) -> images``.

  ``params`` is the Flux Param state (or a tuple of states to merge, e.g.
  LoRA + base); ``x1`` is packed noise ``[B, L, C]``; images are NHWC in
  ``[-1, 1]``. ``with_latents`` also returns the denoised NHWC latents.
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
    imgs = jnp.clip(decode(vae_params, z), -1.0, 1.0)
    return (imgs, z) if with_latents else imgs

  return sample


def noise_for(
  seeds: Sequence[int], latent_shape: tuple[int, int, int]
) -> np.ndarray:
  """Packed initial noise ``[N, L, 4C]`` of the images named by ``seeds``."""
  return np.asarray(
    sampling.seed_noise(sampling.seed_keys(seeds), latent_shape)
  )


@dataclasses.dataclass
class Samples:
  """What a ``Sampler`` call returns.

  Attributes:
    images: ``[N, H, W, 3]`` float32 in [0, 1].
    latents: ``[N, h, w, C]`` float32 denoised latents (the decoder's
      input), when asked for.
  """

  images: np.ndarray
  latents: np.ndarray | None = None


class Sampler:
  """Loads a config's Flux, autoencoder and text encoders once; samples.

  Args:
    config: a run config (``configs_io.load_config``). A world config
      (``configs/digits.py``) reads the world of ``checkpoint`` or of
      ``world_options.dir``.
    checkpoint: a training workdir whose latest EMA weights to use.
  """

  def __init__(self, config, checkpoint: str | None = None):
    from leapalign_jax import embed_prompts
    from leapalign_jax.convert import load_autoencoder, load_flux
    from leapalign_jax.models.autoencoder import decode_fn

    if checkpoint or (config.world and config.world_options.get("dir")):
      from leapalign_jax import components

      # A world's models live in the training workdir (or its own folder).
      config = components.prepare_world(config, checkpoint or "")
    else:
      from leapalign_jax import staging

      config = staging.resolve_config(config)  # gs:// -> staged copies
    self.config = config
    self.text = embed_prompts.TextEncoders(config.text, cache=False)
    f = config.flux
    self.flux_config, model = load_flux(
      f.path,
      config=f.get("variant") or None,
      dtype=f.dtype,
      param_dtype=f.param_dtype,
      attention=f.attention,
    )
    self.ae_config, ae = load_autoencoder(
      config.vae.path, dtype=config.vae.dtype
    )
    self._decode, self._vae_params = decode_fn(ae)
    self._graphdef, self._params = nnx.split(model, nnx.Param)
    if checkpoint:
      self._params = _ema_from_checkpoint(config, checkpoint, self._params)
    self._jitted = {}

  @classmethod
  def from_config(
    cls,
    spec: str,
    overrides: Sequence[str] = (),
    checkpoint: str | None = None,
  ) -> Sampler:
    """``Sampler(load_config(spec, overrides), checkpoint)``."""
    from leapalign_jax import configs_io

    return cls(configs_io.load_config(spec, overrides), checkpoint)

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    """The NHWC latent ``(h, w, C)`` of an image size; refuses bad sizes."""
    # 2x2 latent patches of a downsample-by-f autoencoder: 2f pixels.
    step = 2 * self.ae_config.downsample_factor
    if height < step or width < step or height % step or width % step:
      raise errors.UserError(
        f"image size {height}x{width}: height and width must be positive "
        f"multiples of {step} (2x2 patches of the autoencoder's latent)"
      )
    return self.ae_config.latent_shape(height, width)

  def __call__(
    self,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    latents: np.ndarray | None = None,
    return_latents: bool = False,
    batch_size: int | None = None,
  ) -> Samples:
    """Samples image ``k`` from ``(prompts[k], seeds[k])``.

    Args:
      prompts: the prompts, one per image.
      seeds: one per prompt (see the module docstring); exclusive with
        ``latents``.
      height: pixels; default ``config.sampling.height``.
      width: pixels; default ``config.sampling.width``.
      num_steps: Euler steps; default ``config.eval.num_steps``.
      guidance: distilled guidance; default ``config.sampling.guidance``
        (ignored by models without a guidance embedding, e.g. schnell).
      latents: initial noise ``[N, h, w, C]`` (NHWC latents, one per
        prompt) instead of seeds.
      return_latents: also return the denoised latents.
      batch_size: images per compiled call (at most); default
        ``config.eval.batch_size``; images do not depend on it (beyond
        float rounding).

    Returns:
      ``Samples``.
    """
    c = self.config
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    height = int(c.sampling.height if height is None else height)
    width = int(c.sampling.width if width is None else width)
    steps = int(c.eval.num_steps if num_steps is None else num_steps)
    g = float(c.sampling.guidance if guidance is None else guidance)
    if steps < 1:
      raise errors.UserError(f"num_steps={steps}; use at least 1 step")
    shape = self.latent_shape(height, width)
    x1 = self._initial_noise(prompts, seeds, latents, shape)
    grid = (shape[0] // 2, shape[1] // 2)
    guidance_g = g if self.flux_config.guidance_embed else None
    key = (grid, guidance_g)
    if key not in self._jitted:
      self._jitted[key] = make_sampler(
        self._graphdef, self._decode, grid, guidance_g, with_latents=True
      )
    fn = self._jitted[key]
    sigmas = jnp.asarray(
      sampling.get_schedule(steps, grid[0] * grid[1], shift=c.sampling.shift)
    )
    unique = {p: n for n, p in enumerate(dict.fromkeys(prompts))}
    text = self.text(list(unique))
    row = [unique[p] for p in prompts]
    # No padding past the request: one image costs one image.
    bs = min(int(batch_size or c.eval.batch_size), len(prompts))
    out_x, out_z = [], []
    for start in range(0, len(prompts), bs):
      idx = row[start : start + bs]
      pad = bs - len(idx)
      sel = np.asarray(idx + [idx[-1]] * pad)  # one compiled shape
      noise = x1[start : start + bs]
      noise = np.concatenate([noise, np.repeat(noise[-1:], pad, 0)])
      x, z = fn(
        self._params,
        self._vae_params,
        text["t5"][sel],
        text["clip_pooled"][sel],
        noise,
        sigmas,
      )
      out_x.append(np.asarray(x)[: bs - pad])
      out_z.append(np.asarray(z)[: bs - pad])
    imgs = (np.concatenate(out_x) + 1.0) / 2.0
    return Samples(imgs, np.concatenate(out_z) if return_latents else None)

  def _initial_noise(self, prompts, seeds, latents, shape) -> np.ndarray:
    """Packed noise per prompt, from seeds or from given latents."""
    if not prompts:
      raise errors.UserError("no prompts to sample")
    if (seeds is None) == (latents is None):
      raise errors.UserError("give either seeds or initial latents")
    if latents is not None:
      z = np.asarray(latents, np.float32)
      if z.shape != (len(prompts), *shape):
        raise errors.UserError(
          f"initial latents have shape {z.shape}; {len(prompts)} prompts at "
          f"this size need {(len(prompts), *shape)} (NHWC)"
        )
      return np.asarray(sampling.pack(z))
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(prompts):
      raise errors.UserError(
        f"{len(seeds)} seeds for {len(prompts)} prompts; give one per prompt"
      )
    return errors.as_user_error("seeds", noise_for, seeds, shape)


def generate(config, prompts, seeds=None, **kwargs) -> Samples:
  """One call: ``Sampler(config)(prompts, seeds, **kwargs)``."""
  return Sampler(config)(prompts, seeds, **kwargs)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m leapalign_jax.sample")
  p.add_argument("--config", required=True)
  p.add_argument("--prompt", action="append", required=True)
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
  paths = []
  status = errors.run_command(lambda: paths.extend(run(args)))
  for p in paths:
    print(p)
  return status


def run(args) -> list[str]:
  """The command's work: loads the models, samples, writes the files."""
  from leapalign_jax import configs_io

  config = configs_io.load_config(args.config, args.overrides)
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
    written.append(
      images.save_grid(grid, os.path.join(folder, "grid.png"), cols=cols)
    )
  return written


def _save_npy(folder: str, name: str, array: np.ndarray) -> str:
  path = os.path.join(folder, name)
  with open(path + ".tmp", "wb") as f:
    np.save(f, np.asarray(array, np.float32))
  os.replace(path + ".tmp", path)
  return path


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
