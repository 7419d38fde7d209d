"""A tiny SD3 world of random models, written as real checkpoints.

The SD3 counterpart of ``random_world`` (``configs/tiny_sd3.py``): a tiny
MMDiT-X (a dual-attention, a plain and the last block) in diffusers layout,
the tiny autoencoder with SD3's scaling and shift, CLIP-L and bigG-style
text towers with projections, a T5 encoder as wide as the transformer's
context, a T5 tokenizer trained on the prompts and a CLIP reward. Prompts
(with the empty negative prompt) are embedded through
``families.sd3_text.TextEncoders`` and the config is pointed at the files,
so a run loads everything through the production loaders, as it would load
SD3.5 Medium. Built aside and renamed into place, resumable, and refused
when built for another config (``random_world.claim``).
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
from flax import nnx

from leapalign_jax import fileio
from leapalign_jax.utils import atomic_dir
from leapalign_jax.worlds import digits, random_world

WORLD = "world_sd3"


def _sizes(opts) -> dict:
  return {
    "sd3_heads": int(opts.get("sd3_heads", 2)),
    "clip_l_hidden": int(opts.get("clip_l_hidden", 32)),
    "clip_g_hidden": int(opts.get("clip_g_hidden", 48)),
    "t5_hidden": int(opts.get("t5_hidden", 96)),
    "num_train_prompts": int(opts.get("num_train_prompts", 16)),
    "num_eval_prompts": int(opts.get("num_eval_prompts", 4)),
  }


def sd3_config(sizes: dict, latent_channels: int):
  """The world's transformer: dual, plain and last block, random adaLN."""
  from leapalign_jax.models import sd3

  return dataclasses.replace(
    sd3.VARIANTS["tiny"],
    in_channels=latent_channels,
    out_channels=latent_channels,
    num_heads=sizes["sd3_heads"],
    context_in_dim=sizes["t5_hidden"],
    pooled_dim=sizes["clip_l_hidden"] // 2 + sizes["clip_g_hidden"] // 2,
    zero_init=False,  # random modulations: every block matters
  )


def _clip_text(config, hidden: int, act: str, seed: int):
  """A one-block CLIP text tower with a ``hidden / 2`` projection."""
  from leapalign_jax.models import clip

  text = dataclasses.replace(
    random_world.text_config(config, hidden),
    num_hidden_layers=2,  # a penultimate state that is not the embedding
    hidden_act=act,
  )
  return clip.CLIP(
    clip.CLIPConfig(text, None, hidden // 2), rngs=nnx.Rngs(seed)
  )


def _models(config, folder: str, sizes: dict, prompts: list[str]) -> dict:
  """Writes the random models (skipping existing ones); returns their paths."""
  from leapalign_jax import tokenizers
  from leapalign_jax.convert import export_autoencoder, export_clip, export_t5
  from leapalign_jax.convert.sd3 import export_sd3
  from leapalign_jax.models import autoencoder, clip, sd3, t5

  seed = config.seed * 100
  paths = {
    name: os.path.join(folder, name)
    for name in (
      "transformer",
      "vae",
      "text_encoder",
      "text_encoder_2",
      "text_encoder_3",
      "tokenizer_3",
      "reward_clip",
    )
  }
  if not os.path.isdir(paths["tokenizer_3"]):
    with atomic_dir(paths["tokenizer_3"]) as tmp:
      tokenizers.train_t5_tokenizer(prompts, tmp, vocab_size=128)
  t5_vocab = len(tokenizers.load_t5_tokenizer(paths["tokenizer_3"]))
  for name, hidden, act, k in (
    ("text_encoder", sizes["clip_l_hidden"], "quick_gelu", 1),
    ("text_encoder_2", sizes["clip_g_hidden"], "gelu", 2),
  ):
    if not os.path.isdir(paths[name]):
      with atomic_dir(paths[name]) as tmp:
        export_clip(_clip_text(config, hidden, act, seed + k), tmp, layout="hf")
  if not os.path.isdir(paths["text_encoder_3"]):
    t5_cfg = dataclasses.replace(
      t5.VARIANTS["tiny"],
      vocab_size=max(t5_vocab, 128),
      d_model=sizes["t5_hidden"],
    )
    with atomic_dir(paths["text_encoder_3"]) as tmp:
      export_t5(t5.T5Encoder(t5_cfg, rngs=nnx.Rngs(seed + 3)), tmp)
  ae_cfg = dataclasses.replace(
    autoencoder.VARIANTS["tiny"],
    scale_factor=autoencoder.VARIANTS["sd3"].scale_factor,
    shift_factor=autoencoder.VARIANTS["sd3"].shift_factor,
  )
  if not os.path.isdir(paths["vae"]):
    ae = autoencoder.AutoEncoder(ae_cfg, rngs=nnx.Rngs(seed + 4))
    with atomic_dir(paths["vae"]) as tmp:
      export_autoencoder(ae, tmp, layout="diffusers")
  if not os.path.isdir(paths["transformer"]):
    model_cfg = sd3_config(sizes, ae_cfg.z_channels)
    with atomic_dir(paths["transformer"]) as tmp:
      export_sd3(sd3.SD3(model_cfg, rngs=nnx.Rngs(seed + 5)), tmp)
  th = sizes["clip_l_hidden"]
  size = config.sampling.height
  reward_cfg = clip.CLIPConfig(
    dataclasses.replace(
      random_world.text_config(config, th),
      max_position_embeddings=config.text.reward_max_length,
    ),
    clip.CLIPVisionConfig(
      hidden_size=th,
      intermediate_size=2 * th,
      num_hidden_layers=1,
      num_attention_heads=2,
      image_size=size,
      patch_size=size // 4,
    ),
    16,
  )
  if not os.path.isdir(paths["reward_clip"]):
    with atomic_dir(paths["reward_clip"]) as tmp:
      reward = clip.CLIP(reward_cfg, rngs=nnx.Rngs(seed + 6))
      export_clip(reward, tmp, layout="hf")
  return paths


def _identity(config, sizes: dict) -> dict:
  t = config.text
  return {
    "world": "random_sd3",
    "seed": int(config.seed),
    **sizes,
    "image_size": int(config.sampling.height),
    "clip_max_length": int(t.clip_max_length),
    "t5_max_length": int(t.t5_max_length),
    "reward_max_length": int(t.reward_max_length),
    "cache_dtype": str(t.cache_dtype),
    "negative_prompt": str(config.sd3.negative_prompt),
  }


def point_config(config, paths: dict[str, str]) -> ml_collections.ConfigDict:
  """A copy of ``config`` reading the world's models from ``paths``."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.sd3.path = paths["transformer"]
  c.sd3.variant = ""  # the world's own architecture (read from its files)
  c.sd3.clip_g_path = paths["text_encoder_2"]
  c.vae.path = paths["vae"]
  c.text.clip_path = paths["text_encoder"]
  c.text.t5_path = paths["text_encoder_3"]
  c.text.t5_tokenizer = paths["tokenizer_3"]
  for name in c.rewards:
    c.rewards[name].path = paths["reward_clip"]
  return c


def prepare(config: ml_collections.ConfigDict, workdir: str):
  """Builds (once) the SD3 world in ``workdir/world_sd3``; returns the config."""
  from leapalign_jax import prompts
  from leapalign_jax.families import sd3_text

  folder = config.world_options.get("dir") or fileio.local_scratch(
    workdir, WORLD
  )
  os.makedirs(folder, exist_ok=True)
  sizes = _sizes(config.world_options)
  random_world.claim(folder, _identity(config, sizes))
  world = digits.DigitsConfig(image_size=config.sampling.height)
  rng = np.random.default_rng(config.seed)
  n_train, n_eval = sizes["num_train_prompts"], sizes["num_eval_prompts"]
  ps = digits.draw_prompt_set(world, n_train + n_eval, rng)
  records = digits.prompt_records(world, ps)
  paths = _models(config, folder, sizes, list(ps.prompts))
  c = point_config(config, paths)
  encoders = None
  for field, path, recs in (
    ("train_cache", os.path.join(folder, "cache_train"), records[:n_train]),
    ("eval_cache", os.path.join(folder, "cache_eval"), records[n_train:]),
  ):
    if not random_world._complete(path, recs):  # new, or cut short
      encoders = encoders or sd3_text.TextEncoders(
        c, random_world.reward_texts(c)
      )
      prompts.embed(encoders, recs, path, progress=False)
    c.data[field] = path
  c.lock()
  return c
