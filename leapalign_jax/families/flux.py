"""Flux (FLUX.1 dev / schnell and the tiny digits Flux) as a model family.

Conditioning: the T5 sequence (``t5``, ``[B, N, context_in_dim]``) and the
pooled CLIP-L vector (``clip_pooled``, ``[B, vec_in_dim]``) of the prompt
cache; dev's distilled guidance enters as an embedding (schnell has none).
Latents are packed in 2x2 patches; the schedule is BFL's resolution-shifted
grid (``sampling.get_schedule``). Weights load from a BFL file or a diffusers
folder (``convert.flux``) and export to either, adapters as PEFT files.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from leapalign_jax import data, flops, sampling
from leapalign_jax.errors import ConfigError
from leapalign_jax.families import base
from leapalign_jax.families.base import Family, Geometry
from leapalign_jax.models import flux as flux_model

# The full-weight export's file name in BFL's single-file layout.
BFL_FILE = "flux1-leapalign.safetensors"
TEXT_FIELDS = ("t5", "clip_pooled")
_RUNTIME = ("dtype", "param_dtype", "remat", "attention", "scan_layers")


def model_config(config) -> flux_model.FluxConfig:
  """``config.flux.variant`` 's architecture with the section's options."""
  return base.variant_config(config, "flux", flux_model.VARIANTS, _RUNTIME)


def build(model_cfg, rngs):
  """A Flux with random weights (``nnx.eval_shape`` it for shapes)."""
  return flux_model.Flux(model_cfg, rngs=rngs)


def load(config, sharding_fn=None):
  """``(FluxConfig, Flux)`` from ``config.flux.path`` (BFL or diffusers)."""
  from leapalign_jax.convert import load_flux

  f = config.flux
  return load_flux(
    f.path,
    config=f.get("variant") or None,
    sharding=sharding_fn,
    **{k: f[k] for k in _RUNTIME},
  )


def call(model, x_BLC, t_B, cond, tokens, guidance=None):
  """Flux's velocity for packed latents on a ``tokens`` ``(h, w)`` grid.

  ``cond`` holds ``t5`` and ``clip_pooled``; ``guidance`` is the distilled
  guidance scale (None for models without a guidance embedding).
  """
  B = x_BLC.shape[0]
  t5 = cond["t5"]
  return model(
    img=x_BLC,
    img_ids=sampling.img_ids(B, *tokens),
    txt=t5,
    txt_ids=sampling.txt_ids(B, t5.shape[1]),
    timesteps=t_B,
    y=cond["clip_pooled"],
    guidance=None
    if guidance is None
    else jnp.full((B,), guidance, jnp.float32),
  )


def velocity(model, x_BLC, t_B, cond, geo: Geometry, guidance=None):
  """``Family.velocity``: ``call`` on the geometry's token grid."""
  return call(model, x_BLC, t_B, cond, geo.tokens, guidance)


def guidance(model_cfg, scale: float):
  """Distilled guidance for dev (an input embedding); none for schnell."""
  return float(scale) if model_cfg.guidance_embed else None


def latent_channels(model_cfg) -> int:
  """Autoencoder channels: the input features over the 2x2 patch."""
  return model_cfg.in_channels // 4  # 2x2 patches


def schedule(config, num_steps: int, seq_len: int) -> np.ndarray:
  """BFL's grid, shifted by the token count if ``sampling.shift``."""
  return sampling.get_schedule(num_steps, seq_len, shift=config.sampling.shift)


def text_shapes(config, model_cfg, batch: int) -> dict[str, tuple]:
  """Cached T5 sequence and pooled CLIP vector of a batch."""
  t = config.text
  dtype = jnp.dtype(t.cache_dtype)
  return {
    "t5": ((batch, t.t5_max_length, model_cfg.context_in_dim), dtype),
    "clip_pooled": ((batch, model_cfg.vec_in_dim), dtype),
  }


def text_tokens(config) -> int:
  """The T5 sequence length (the text stream of the joint attention)."""
  return int(config.text.t5_max_length)


def check_cache(cache: data.PromptCache, model_cfg) -> None:
  """Refuses a cache embedded by encoders of another width."""
  t5 = cache.field_shape("t5")
  clip = cache.field_shape("clip_pooled")
  if t5[-1] != model_cfg.context_in_dim or clip[-1] != model_cfg.vec_in_dim:
    raise ConfigError(
      f"{cache.folder}: embeddings are T5 {t5} / CLIP {clip} but Flux expects "
      f"{model_cfg.context_in_dim} / {model_cfg.vec_in_dim} features; embed "
      "the prompts with this model's text encoders"
    )


def text_encoders(config, cache: bool = True, rewards: bool = True):
  """CLIP-L + T5 of ``config.text`` (``flux_text.TextEncoders``)."""
  from leapalign_jax.families import flux_text

  if not rewards:  # sampling: no reward reads these prompts
    return flux_text.TextEncoders(config.text, cache=cache)
  return flux_text.TextEncoders.for_config(config, cache=cache)


def adapter_flops(model_cfg, n_img: int, n_txt: int, rank: int) -> float:
  """Forward FLOPs of the LoRA adapters (``flops.lora_forward``)."""
  return flops.lora_forward(model_cfg, n_img, n_txt, rank)


def full_path(folder: str, layout: str) -> str:
  """Where full weights in ``layout`` go in an export folder."""
  if layout == "bfl":
    return os.path.join(folder, BFL_FILE)
  return os.path.join(folder, "transformer")


def export(model, folder: str, layout: str, dtype=None) -> list[str]:
  """Full weights in ``layout`` (``bfl`` file or diffusers folder)."""
  from leapalign_jax.convert import export_flux

  return export_flux(
    model, full_path(folder, layout), layout=layout, dtype=dtype
  )


def export_lora(model, folder: str, dtype=None) -> list[str]:
  """The adapters as a diffusers/PEFT LoRA file."""
  from leapalign_jax.convert import lora as lora_convert

  path = os.path.join(folder, lora_convert.LORA_WEIGHT_NAME)
  return lora_convert.export_flux_lora(model, path, dtype=dtype)


def export_merged(model, folder: str, layout: str, dtype=None) -> list[str]:
  """The adapters folded into the base weights, in ``layout``."""
  from leapalign_jax.convert import lora as lora_convert

  return lora_convert.export_flux_merged(
    model, full_path(folder, layout), layout=layout, dtype=dtype
  )


FAMILY = Family(
  name="flux",
  section="flux",
  variants=flux_model.VARIANTS,
  text_fields=TEXT_FIELDS,
  model_config=model_config,
  build=build,
  load=load,
  velocity=velocity,
  guidance=guidance,
  latent_channels=latent_channels,
  schedule=schedule,
  text_shapes=text_shapes,
  text_tokens=text_tokens,
  check_cache=check_cache,
  text_encoders=text_encoders,
  dit_flops=flops.dit_parts,
  adapter_flops=adapter_flops,
  export=export,
  export_lora=export_lora,
  export_merged=export_merged,
)
