"""The digits world's stage trainers: its autoencoder, base Flux and reward.

Each stage trains one tiny model through the production code (our Flax
modules and losses) and saves it through the real exporters, in the layout
users' files come in; ``digits_pipeline.prepare`` orders the stages, skips
finished ones and records them. ``*_config`` give the models' sizes from the
world options.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leapalign_jax import data
from leapalign_jax.utils import atomic_dir
from leapalign_jax.worlds import digits, digits_train, random_world


def ae_config(opts):
  """The tiny autoencoder (scale/shift are set after training)."""
  from leapalign_jax.models import autoencoder

  ch = int(opts["ae_channels"])
  return dataclasses.replace(
    autoencoder.VARIANTS["tiny"],
    ch=ch,
    z_channels=int(opts["ae_z_channels"]),
    norm_groups=4,
    scale_factor=1.0,
    shift_factor=0.0,
  )


def flux_config(opts, z_channels: int):
  """The base Flux: no guidance embedding (sampled without guidance)."""
  from leapalign_jax.models import flux

  h, heads = int(opts["flux_hidden"]), int(opts["flux_heads"])
  head_dim = h // heads
  # RoPE: the two spatial axes get a quarter of the head each.
  axes = (head_dim // 2, head_dim // 4, head_dim // 4)
  th = int(opts["text_hidden"])
  return flux.FluxConfig(
    in_channels=4 * z_channels,
    out_channels=4 * z_channels,
    vec_in_dim=th,
    context_in_dim=th,
    hidden_size=h,
    num_heads=heads,
    axes_dim=axes,
    depth=int(opts["flux_depth"]),
    depth_single_blocks=int(opts["flux_single_depth"]),
    guidance_embed=False,
  )


def reward_config(config, opts, image_size: int):
  """The reward CLIP: both towers of width ``reward_hidden``."""
  from leapalign_jax.models import clip

  h, layers = int(opts["reward_hidden"]), int(opts["reward_layers"])
  text = dataclasses.replace(
    random_world.text_config(config, h),
    num_hidden_layers=layers,
    max_position_embeddings=config.text.reward_max_length,
  )
  vision = clip.CLIPVisionConfig(
    hidden_size=h,
    intermediate_size=2 * h,
    num_hidden_layers=layers,
    num_attention_heads=2,
    image_size=image_size,
    patch_size=4,
  )
  return clip.CLIPConfig(text, vision, h)


def cache_arrays(folder: str) -> dict[str, np.ndarray]:
  """Every row of a prompt cache, stacked per field."""
  cache = data.PromptCache(folder)
  rows = [cache[i] for i in range(len(cache))]
  return {k: np.stack([r[k] for r in rows]) for k in cache.fields}


def train_autoencoder(opts, images: np.ndarray, seed: int, out: str, stop):
  """Trains the autoencoder on the world's images; exports it to ``out``."""
  from leapalign_jax.convert import export_autoencoder
  from leapalign_jax.models import autoencoder

  cfg = ae_config(opts)
  ae = autoencoder.AutoEncoder(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(ae, nnx.Param)
  bs = int(opts["ae_batch"])

  def batch_fn(i):
    idx = np.random.default_rng([seed, 31, i]).choice(len(images), bs)
    return {"images": images[idx]}

  params, summary = digits_train.fit(
    params,
    digits_train.autoencoder_loss(graphdef, kl_weight=1e-3, ink_weight=5.0),
    batch_fn,
    steps=int(opts["ae_steps"]),
    lr=float(opts["ae_lr"]),
    seed=seed,
    name="autoencoder",
    stop=stop,
  )
  nnx.update(ae, params)
  mean, std = digits_train.latent_stats(ae, images[:2048])
  # Unit-variance, zero-mean Flux latents (as Flux's 0.3611 / 0.1159 do).
  cfg = dataclasses.replace(cfg, scale_factor=1.0 / std, shift_factor=mean)
  ae.config = cfg
  with atomic_dir(out) as tmp:
    export_autoencoder(ae, tmp, layout="diffusers", config=cfg)
  return summary


def encode_images(vae_path: str, images: np.ndarray) -> np.ndarray:
  """The saved autoencoder's (scaled) latents of ``images``."""
  from leapalign_jax import sampling
  from leapalign_jax.convert import load_autoencoder
  from leapalign_jax.models.autoencoder import encode_fn

  _, ae = load_autoencoder(vae_path)
  enc, params = encode_fn(ae)
  enc = jax.jit(enc)
  z = np.concatenate(
    [
      np.asarray(enc(params, images[i : i + 512]))
      for i in range(0, len(images), 512)
    ]
  )
  return np.asarray(sampling.pack(jnp.asarray(z)))


def train_flux(opts, x0: np.ndarray, text, prompt_ids, seed, out, stop):
  """Pretrains the base Flux (rectified flow); exports its EMA to ``out``."""
  from leapalign_jax.convert import export_flux
  from leapalign_jax.models import flux

  cfg = flux_config(opts, x0.shape[-1] // 4)
  model = flux.Flux(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  side = int(round(np.sqrt(x0.shape[1])))
  velocity = digits_train.flux_velocity(graphdef, side, side)
  bs = int(opts["flux_batch"])

  def batch_fn(i):
    idx = np.random.default_rng([seed, 41, i]).choice(len(x0), bs)
    p = prompt_ids[idx]
    return {
      "x0": x0[idx],
      "t5": text["t5"][p],
      "clip_pooled": text["clip_pooled"][p],
    }

  params, summary = digits_train.fit(
    params,
    digits_train.flow_matching_loss(velocity),
    batch_fn,
    steps=int(opts["flux_steps"]),
    lr=float(opts["flux_lr"]),
    seed=seed,
    name="flux",
    ema_decay=float(opts["flux_ema"]),
    stop=stop,
  )
  nnx.update(model, params)
  with atomic_dir(out) as tmp:
    export_flux(model, tmp, layout="diffusers")
  return summary


def train_reward(config, opts, world, reward_ids, seed: int, out: str, stop):
  """Trains the contrastive CLIP reward; exports it to ``out``."""
  from leapalign_jax.convert import export_clip
  from leapalign_jax.models import clip

  cfg = reward_config(config, opts, world.image_size)
  model = clip.CLIP(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  bs = int(opts["reward_batch"])
  T = len(world.templates)

  C, P = len(world.colours), len(world.positions)
  groups = max(1, min(C * P, bs // 8))

  def batch_fn(i):
    rng = np.random.default_rng([seed, 51, i])
    # Hard negatives by batch construction: a batch holds only `groups`
    # (colour, position) pairs, ~8 images each with random digits, so most
    # in-batch negatives differ only in the digit. (With i.i.d. batches
    # nearly every negative differs in colour or position, which the towers
    # learn first; digit identity then gets almost no gradient.)
    probs = np.zeros((digits.NUM_DIGITS, C * P))
    probs[:, rng.choice(C * P, size=groups, replace=False)] = 1.0
    b = digits.sample_batch(
      world, bs, rng, split="train", probs=probs.reshape(-1, C, P)
    )
    ps = b.prompt_set
    idx = digits.prompt_index(
      world, ps.digit, ps.colour, ps.position, ps.template
    )
    other = ps.digit + rng.integers(1, digits.NUM_DIGITS, len(idx))
    other %= digits.NUM_DIGITS
    swap = digits.prompt_index(
      world, other, ps.colour, ps.position, ps.template
    )
    return {
      "images": b.images,
      "ids": reward_ids[idx],
      "combo": idx // T,  # same attributes, any phrasing: not a negative
      "swap_ids": reward_ids[swap],
      "swap_combo": swap // T,
    }

  params, summary = digits_train.fit(
    params,
    digits_train.clip_loss(
      graphdef, world.image_size, float(opts["reward_noise"])
    ),
    batch_fn,
    steps=int(opts["reward_steps"]),
    lr=float(opts["reward_lr"]),
    seed=seed,
    name="reward",
    stop=stop,
  )
  nnx.update(model, params)
  summary["digit_rank_acc"] = reward_digit_accuracy(
    model, world, reward_ids, seed
  )
  with atomic_dir(out) as tmp:
    export_clip(model, tmp, layout="hf")
  return summary


def reward_digit_accuracy(model, world, reward_ids, seed: int, n: int = 500):
  """Share of held-out renders whose own digit the reward ranks first.

  Each image (sklearn's test split) is scored against its prompt with each
  of the ten digit words; colour and position are the same in all ten. Chance is 0.1; colour and position do not help. A reward that cannot
  rank digits can only be raised by colour, position and texture, which is
  what alignment would then optimise.
  """
  from leapalign_jax.rewards import preprocess as pp

  b = digits.sample_batch(world, n, [seed, 53], split="test")
  ps = b.prompt_set
  img = model.image_features(
    pp.clip_preprocess(jnp.asarray(b.images), size=world.image_size)
  )
  d = np.arange(digits.NUM_DIGITS)[None, :]  # [1, 10] -> [n, 10] prompts
  idx = digits.prompt_index(
    world, d, ps.colour[:, None], ps.position[:, None], ps.template[:, None]
  )
  txt = model.text_features(jnp.asarray(reward_ids[idx.reshape(-1)]))
  txt = txt.reshape(n, digits.NUM_DIGITS, -1)
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  scores = jnp.einsum("nd,nkd->nk", img, txt)
  return float(np.mean(np.argmax(np.asarray(scores), 1) == ps.digit))
