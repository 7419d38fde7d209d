"""Stable Diffusion 3 / 3.5 (MMDiT-X) as a model family, with CFG.

Conditioning (the prompt cache's fields, ``TEXT_FIELDS``): the prompt's
joint text states ``sd3_context`` ``[B, 77 + T5 length, 4096]`` (CLIP-L and
bigG penultimate states, zero-padded to T5's width, then T5) and pooled
vector ``sd3_pooled`` ``[B, 2048]`` (``models.sd3_text``), and the same two
for the negative prompt (``sd3.negative_prompt``, the empty prompt by
default): ``sd3_neg_context`` / ``sd3_neg_pooled``. The negative embedding is
stored per row like the prompt's: every path that batches, shards or
caches conditioning (the train step, the sampler, ``abstract_run``, the
evaluation) then carries it without a family-specific branch, and a
per-prompt negative prompt would need no new format; the price is twice the
cache size.

Classifier-free guidance: with ``sampling.guidance`` > 1 the velocity is
``v_u + g (v_c - v_u)`` (``StableDiffusion3Pipeline``'s rule) from ONE
batched transformer call on ``[uncond, cond]`` pairs. That guided velocity
is the model ``v_θ`` of every method (method.md §1: "the velocity after
guidance"): LeapAlign's rollouts use it for each Euler step, and its leaps
``x_k -> x_j`` are taken with the guided velocity at ``x_k`` too; the
gradient of the loss reaches the weights through BOTH branches (the
conditional and the unconditional prediction share all parameters), as the
reference fine-tunes the guided prediction. The schedule is diffusers'
``FlowMatchEulerDiscreteScheduler`` with SD3's static shift
(``sd3.shift`` = 3.0); latents are the 16-channel SD3 autoencoder's, packed
2x2 like Flux's (``models.sd3``).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from leapalign_jax import data, flops
from leapalign_jax.errors import ConfigError
from leapalign_jax.families import base
from leapalign_jax.families.base import Family, Geometry
from leapalign_jax.models import sd3 as sd3_model

TEXT_FIELDS = ("sd3_context", "sd3_pooled", "sd3_neg_context", "sd3_neg_pooled")
# The full-weight export's file name in Stability's single-file layout.
STABILITY_FILE = "sd3.5-leapalign.safetensors"
_RUNTIME = ("dtype", "param_dtype", "remat", "attention", "scan_layers")
# diffusers' scheduler: 1000 training timesteps.
NUM_TRAIN_TIMESTEPS = 1000
# LoRA on the attention (qkv, out; the dual blocks' second attention too)
# and MLP linears of both streams of every block.
SD3_TARGETS = (
  r"(dual_blocks|joint_blocks|last_block)/(context_block|x_block)/"
  r"(attn|attn2)/(qkv|proj)",
  r"(dual_blocks|joint_blocks|last_block)/(context_block|x_block)/mlp/"
  r"(fc1|fc2)",
)


def model_config(config) -> sd3_model.SD3Config:
  """``config.sd3.variant`` 's architecture with the section's options."""
  return base.variant_config(config, "sd3", sd3_model.VARIANTS, _RUNTIME)


def build(model_cfg, rngs):
  """An SD3 with random weights (``nnx.eval_shape`` it for shapes)."""
  return sd3_model.SD3(model_cfg, rngs=rngs)


def load(config, sharding_fn=None):
  """``(SD3Config, SD3)`` from ``config.sd3.path`` (Stability or diffusers)."""
  from leapalign_jax.convert.sd3 import load_sd3

  s = config.sd3
  return load_sd3(
    s.path,
    config=s.get("variant") or None,
    sharding=sharding_fn,
    **{k: s[k] for k in _RUNTIME},
  )


def _pairs(a, b):
  """``[B, ...]`` x2 -> ``[2B, ...]`` as ``a0, b0, a1, b1, ...``.

  Interleaved, not concatenated: each row's pair stays on the device that
  holds the row, so a batch-sharded input needs no communication.
  """
  return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])


def velocity(model, x_BLC, t_B, cond, geo: Geometry, guidance=None):
  """``Family.velocity``: SD3's velocity, guided when ``guidance`` is set.

  Without guidance: the conditional prediction. With a scale ``g``: one
  batched call on ``(uncond, cond)`` pairs, then ``v_u + g (v_c - v_u)``;
  gradients flow through both branches (module doc).
  """
  ctx, pooled = cond["sd3_context"], cond["sd3_pooled"]
  if guidance is None:
    return model(x_BLC, geo.tokens, ctx, pooled, t_B)
  B = x_BLC.shape[0]
  v = model(
    _pairs(x_BLC, x_BLC),
    geo.tokens,
    _pairs(cond["sd3_neg_context"].astype(ctx.dtype), ctx),
    _pairs(cond["sd3_neg_pooled"].astype(pooled.dtype), pooled),
    _pairs(t_B, t_B),
  )
  v = v.reshape(B, 2, *v.shape[1:])
  v_u, v_c = v[:, 0], v[:, 1]
  return v_u + guidance * (v_c - v_u)


def guidance(model_cfg, scale: float):
  """Classifier-free guidance scale; None (no CFG) at scale <= 1."""
  del model_cfg
  scale = float(scale)
  return scale if scale > 1.0 else None


def calls_per_velocity(guidance_value) -> int:
  """Transformer passes per image of one velocity: 2 with CFG."""
  return 1 if guidance_value is None else 2


def latent_channels(model_cfg) -> int:
  """Autoencoder channels (16 for SD3's autoencoder)."""
  return model_cfg.in_channels


def shift_sigmas(sigmas, shift: float):
  """SD3's static time shift ``s σ / (1 + (s - 1) σ)``."""
  return shift * sigmas / (1 + (shift - 1) * sigmas)


def schedule(config, num_steps: int, seq_len: int) -> np.ndarray:
  """``FlowMatchEulerDiscreteScheduler(shift=sd3.shift)`` 's sigmas + 0.

  As diffusers computes them: the shifted training grid's smallest sigma
  (float32) bounds a linspace from 1 (in units of the 1000 training
  timesteps), which is shifted again; a final 0 is appended. Independent of
  the resolution (``seq_len``): SD3's shift is static.
  """
  del seq_len
  if num_steps < 1:
    raise ConfigError(f"num_steps={num_steps}; use at least 1 step")
  shift = float(config.sd3.shift)
  n = NUM_TRAIN_TIMESTEPS
  train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
  train = shift_sigmas(train, np.float32(shift)).astype(np.float32)
  sigma_min, sigma_max = float(train[-1]), float(train[0])
  t = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
  sig = shift_sigmas(t, shift).astype(np.float32)
  return np.append(sig, np.float32(0.0)).astype(np.float32)


def context_length(config) -> int:
  """Text tokens: the 77 CLIP positions plus T5's."""
  t = config.text
  return int(t.clip_max_length) + int(t.t5_max_length)


def text_shapes(config, model_cfg, batch: int) -> dict[str, tuple]:
  """Cached prompt and negative-prompt states and pooled vectors."""
  dtype = jnp.dtype(config.text.cache_dtype)
  ctx = ((batch, context_length(config), model_cfg.context_in_dim), dtype)
  pooled = ((batch, model_cfg.pooled_dim), dtype)
  return {
    "sd3_context": ctx,
    "sd3_pooled": pooled,
    "sd3_neg_context": ctx,
    "sd3_neg_pooled": pooled,
  }


def text_tokens(config) -> int:
  """The text stream's length in the joint attention."""
  return context_length(config)


def check_cache(cache: data.PromptCache, model_cfg) -> None:
  """Refuses a cache embedded for another family or other encoders."""
  missing = [f for f in TEXT_FIELDS if f not in cache.fields]
  if missing:
    raise ConfigError(
      f"{cache.folder}: holds no SD3 conditioning ({missing} missing; it has "
      f"{sorted(cache.fields)}); embed the prompts with an SD3 config "
      "(python -m leapalign_jax.embed_prompts)"
    )
  ctx = cache.field_shape("sd3_context")
  pooled = cache.field_shape("sd3_pooled")
  if ctx[-1] != model_cfg.context_in_dim or pooled[-1] != model_cfg.pooled_dim:
    raise ConfigError(
      f"{cache.folder}: embeddings are context {ctx} / pooled {pooled} but "
      f"this SD3 expects {model_cfg.context_in_dim} / {model_cfg.pooled_dim} "
      "features; embed the prompts with this model's text encoders"
    )


def text_encoders(config, cache: bool = True, rewards: bool = True):
  """CLIP-L + bigG + T5 of ``config.text`` / ``config.sd3``."""
  from leapalign_jax.families import sd3_text

  if not rewards:  # sampling: no reward reads these prompts
    return sd3_text.TextEncoders(config, cache=cache)
  return sd3_text.TextEncoders.for_config(config, cache=cache)


def dit_flops(model_cfg, n_img: int, n_txt: int) -> flops.DitFlops:
  """One SD3 pass on one image (``flops.sd3_parts``)."""
  return flops.sd3_parts(model_cfg, n_img, n_txt)


def adapter_flops(model_cfg, n_img: int, n_txt: int, rank: int) -> float:
  """Forward FLOPs of the LoRA adapters on ``SD3_TARGETS``."""
  return flops.sd3_lora_forward(model_cfg, n_img, n_txt, rank)


def full_path(folder: str, layout: str) -> str:
  """Where full weights in ``layout`` go in an export folder."""
  if layout == "stability":
    return os.path.join(folder, STABILITY_FILE)
  return os.path.join(folder, "transformer")


def export(model, folder: str, layout: str, dtype=None) -> list[str]:
  """Full weights in ``layout`` (diffusers folder or Stability file)."""
  from leapalign_jax.convert.sd3 import export_sd3

  return export_sd3(
    model, full_path(folder, layout), layout=layout, dtype=dtype
  )


def export_lora(model, folder: str, dtype=None) -> list[str]:
  """The adapters as a PEFT LoRA file ``StableDiffusion3Pipeline`` loads."""
  from leapalign_jax.convert import lora as lora_convert
  from leapalign_jax.convert.sd3 import export_sd3_lora

  path = os.path.join(folder, lora_convert.LORA_WEIGHT_NAME)
  return export_sd3_lora(model, path, dtype=dtype)


def export_merged(model, folder: str, layout: str, dtype=None) -> list[str]:
  """The adapters folded into the base weights, in ``layout``."""
  from leapalign_jax.convert.sd3 import export_sd3_merged

  return export_sd3_merged(
    model, full_path(folder, layout), layout=layout, dtype=dtype
  )


FAMILY = Family(
  name="sd3",
  section="sd3",
  variants=sd3_model.VARIANTS,
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
  dit_flops=dit_flops,
  adapter_flops=adapter_flops,
  export=export,
  export_lora=export_lora,
  export_merged=export_merged,
  calls_per_velocity=calls_per_velocity,
)
