"""Text-to-image sampling from Python: a sampler named by seeds (a library).

From Python (the models load once; each call samples)::

  from leapalign_jax import generation
  sampler = generation.Sampler.from_config("configs/<run>.py", ["k=v"])
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
(nothing is cached, so nothing is rounded to ``text.cache_dtype``). The model
is the run's family (``families.of(config)``). The command is
``leapalign_jax.sample``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leapalign_jax import errors, families, metrics, sampling, staging, worlds

_LOG = logging.getLogger(__name__)


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
    from leapalign_jax.convert import load_autoencoder
    from leapalign_jax.models.autoencoder import decode_fn

    if checkpoint or (config.world and config.world_options.get("dir")):
      # A world's models live in the training workdir (or its own folder).
      config = worlds.prepare(config, checkpoint or "")
    else:
      config = staging.resolve_config(config)  # gs:// -> staged copies
    self.config = config
    self.family = families.of(config)
    self.text = self.family.text_encoders(config, cache=False, rewards=False)
    self.model_config, model = self.family.load(config)
    self.ae_config, ae = load_autoencoder(
      config.vae.path, dtype=config.vae.dtype
    )
    self._decode, self._vae_params = decode_fn(ae)
    self._graphdef, self._params = nnx.split(model, nnx.Param)
    if checkpoint:
      self._params = ema_from_checkpoint(config, checkpoint, self._params)
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
      guidance: the guidance scale; default ``config.sampling.guidance``
        (Flux dev: distilled guidance; ignored by models without a guidance
        embedding, e.g. schnell).
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
    geo = families.Geometry(height, width, *shape)
    fam = self.family
    guidance_g = fam.guidance(self.model_config, g)
    key = (geo, guidance_g)
    if key not in self._jitted:

      def velocity(model, x, t, cond):
        return fam.velocity(model, x, t, cond, geo, guidance_g)

      self._jitted[key] = sampling.make_sampler(
        self._graphdef, velocity, self._decode, geo.tokens, with_latents=True
      )
    fn = self._jitted[key]
    sigmas = jnp.asarray(fam.schedule(c, steps, geo.seq_len))
    unique = {p: n for n, p in enumerate(dict.fromkeys(prompts))}
    text = self.text(list(unique))
    row = [unique[p] for p in prompts]
    # No padding past the request: one image costs one image.
    bs = min(int(batch_size or c.eval.batch_size), len(prompts))
    out_x, out_z = [], []
    progress = metrics.Progress(len(prompts), unit="image", log=_LOG)
    for start in range(0, len(prompts), bs):
      progress.update(start)
      idx = row[start : start + bs]
      pad = bs - len(idx)
      sel = np.asarray(idx + [idx[-1]] * pad)  # one compiled shape
      noise = x1[start : start + bs]
      noise = np.concatenate([noise, np.repeat(noise[-1:], pad, 0)])
      cond = {k: text[k][sel] for k in fam.text_fields}
      x, z = fn(self._params, self._vae_params, cond, noise, sigmas)
      out_x.append(np.asarray(x)[: bs - pad])
      out_z.append(np.asarray(z)[: bs - pad])
    if len(prompts) > bs:
      progress.update(len(prompts), force=True)
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


def ema_from_checkpoint(config, workdir: str, params):
  """The EMA model params of a workdir's latest checkpoint (full fine-tunes)."""
  from leapalign_jax import checkpoint, fileio
  from leapalign_jax import step as step_lib

  if config.lora.enabled:
    raise errors.UserError(
      "--checkpoint with a LoRA run: sample from its export instead "
      "(export/pytorch_lora_weights.safetensors) or use evaluate"
    )
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
