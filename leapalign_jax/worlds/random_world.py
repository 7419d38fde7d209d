"""A tiny world of randomly initialised models, written as real checkpoints.

For tests and smoke runs (``configs/tiny.py``): every model a run needs — the
Flux transformer, its autoencoder, the CLIP-L / T5 text encoders, a CLIP
reward — is created at a tiny size with random weights and saved through the
project's exporters (diffusers / transformers layouts), prompts are embedded
into caches with ``embed_prompts``, and the config's paths are pointed at
those files. The run then loads everything through the production loaders,
exactly as it would load FLUX.1-dev.

Every artefact is built aside and renamed into place, and the caches are
completed (``embed_prompts`` resumes) when a build was killed half-way, so
``prepare`` survives SIGKILL at any moment. ``world.json`` records what the
world was built for; a run with a different seed or sizes is refused instead
of silently reusing another world.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import ml_collections
import numpy as np
from flax import nnx

from leapalign_jax import fileio
from leapalign_jax.convert.safetensors_io import write_json_atomic
from leapalign_jax.data import read_manifest
from leapalign_jax.utils import atomic_dir
from leapalign_jax.worlds import digits

WORLD = "world"
IDENTITY = "world.json"
_LOG = logging.getLogger(__name__)


def _sizes(opts) -> dict:
  return {
    "flux_hidden": int(opts.get("flux_hidden", 64)),
    "text_hidden": int(opts.get("text_hidden", 32)),
    "num_train_prompts": int(opts.get("num_train_prompts", 32)),
    "num_eval_prompts": int(opts.get("num_eval_prompts", 8)),
  }


def write_text_models(
  config, folder: str, prompts: list[str], hidden: int, seed: int
) -> dict[str, str]:
  """Writes random tiny text encoders and a T5 tokenizer; returns paths.

  The tokenizer is trained on ``prompts``; existing outputs are kept.

  Frozen random encoders still map different prompts to different token
  features; the models that read them (Flux, trained or not) learn from
  that. Shared by the random and the digits worlds.
  """
  from leapalign_jax import tokenizers
  from leapalign_jax.convert import export_clip, export_t5
  from leapalign_jax.models import clip, t5

  paths = {
    "t5_tokenizer": os.path.join(folder, "tokenizer_2"),
    "clip_text": os.path.join(folder, "text_encoder"),
    "t5": os.path.join(folder, "text_encoder_2"),
  }
  if not os.path.isdir(paths["t5_tokenizer"]):
    with atomic_dir(paths["t5_tokenizer"]) as tmp:
      tokenizers.train_t5_tokenizer(prompts, tmp, vocab_size=128)
  t5_vocab = len(tokenizers.load_t5_tokenizer(paths["t5_tokenizer"]))
  if not os.path.isdir(paths["clip_text"]):
    model = clip.CLIP(
      clip.CLIPConfig(text_config(config, hidden), None, None),
      rngs=nnx.Rngs(seed),
    )
    with atomic_dir(paths["clip_text"]) as tmp:
      export_clip(model, tmp, layout="hf")
  t5_cfg = dataclasses.replace(
    t5.VARIANTS["tiny"], vocab_size=max(t5_vocab, 128), d_model=hidden
  )
  if not os.path.isdir(paths["t5"]):
    with atomic_dir(paths["t5"]) as tmp:
      export_t5(t5.T5Encoder(t5_cfg, rngs=nnx.Rngs(seed + 1)), tmp)
  return paths


def text_config(config, hidden: int):
  """The tiny CLIP text tower (CLIP-L's role) of width ``hidden``."""
  from leapalign_jax.models import clip

  return clip.CLIPTextConfig(
    hidden_size=hidden,
    intermediate_size=2 * hidden,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=config.text.clip_max_length,
  )


def _models(config, folder: str, sizes: dict, prompts: list[str]) -> dict:
  """Writes the random models (skipping existing ones); returns their paths."""
  from leapalign_jax.convert import export_autoencoder, export_clip, export_flux
  from leapalign_jax.models import autoencoder, clip, flux

  # One stream per model, so a partly built world completes identically.
  def rngs(k: int) -> nnx.Rngs:
    return nnx.Rngs(config.seed * 100 + k)

  th = sizes["text_hidden"]
  paths = write_text_models(config, folder, prompts, th, config.seed * 100)
  paths.update(
    flux=os.path.join(folder, "transformer"),
    vae=os.path.join(folder, "vae"),
    reward=os.path.join(folder, "reward_clip"),
  )
  text_cfg = text_config(config, th)
  ae_cfg = autoencoder.VARIANTS["tiny"]
  if not os.path.isdir(paths["vae"]):
    ae = autoencoder.AutoEncoder(ae_cfg, rngs=rngs(2))
    with atomic_dir(paths["vae"]) as tmp:
      export_autoencoder(ae, tmp, layout="diffusers")
  fh = sizes["flux_hidden"]
  flux_cfg = flux.FluxConfig(
    in_channels=4 * ae_cfg.z_channels,
    out_channels=4 * ae_cfg.z_channels,
    vec_in_dim=th,
    context_in_dim=th,
    hidden_size=fh,
    num_heads=2,
    axes_dim=(fh // 2 - 16, 8, 8),
    depth=1,
    depth_single_blocks=1,
    zero_init=False,
  )
  if not os.path.isdir(paths["flux"]):
    with atomic_dir(paths["flux"]) as tmp:
      export_flux(flux.Flux(flux_cfg, rngs=rngs(3)), tmp, layout="diffusers")
  size = config.sampling.height
  reward_cfg = clip.CLIPConfig(
    dataclasses.replace(
      text_cfg, max_position_embeddings=config.text.reward_max_length
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
  if not os.path.isdir(paths["reward"]):
    with atomic_dir(paths["reward"]) as tmp:
      export_clip(clip.CLIP(reward_cfg, rngs=rngs(4)), tmp, layout="hf")
  return paths


def _identity(config, sizes: dict) -> dict:
  """What the world's files depend on."""
  t = config.text
  return {
    "seed": int(config.seed),
    **sizes,
    "image_size": int(config.sampling.height),
    "clip_max_length": int(t.clip_max_length),
    "t5_max_length": int(t.t5_max_length),
    "reward_max_length": int(t.reward_max_length),
    "cache_dtype": str(t.cache_dtype),
  }


def claim(folder: str, identity: dict) -> None:
  """Records ``identity`` in a new world; refuses a world built otherwise."""
  from leapalign_jax.errors import ConfigError

  path = os.path.join(folder, IDENTITY)
  if not os.path.exists(path):
    write_json_atomic(path, identity)
    return
  with open(path) as f:
    old = json.load(f)
  diff = sorted(k for k in identity if old.get(k) != identity[k])
  if diff:
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {identity[k]!r}" for k in diff)
    raise ConfigError(
      f"world folder {folder} was built for another config ({shown}); set "
      "world_options.dir to another folder (or delete that one)"
    )


def _complete(path: str, records: list[dict]) -> bool:
  """Whether the cache at ``path`` holds exactly ``records`` ' prompts.

  False for a missing cache or one cut short (``embed`` completes it).
  """
  from leapalign_jax.data import FORMAT_VERSION, MANIFEST
  from leapalign_jax.errors import ConfigError
  from leapalign_jax.prompts import dedupe

  if _outdated(path, FORMAT_VERSION):
    # A world's cache is derived from its own files: rebuilt, not refused.
    _LOG.info("%s: cache of an older format; embedding it again", path)
    os.remove(os.path.join(path, MANIFEST))
    shutil.rmtree(path)
  manifest = read_manifest(path)
  if manifest is None:
    return False
  have = [r["prompt"] for r in manifest["records"]]
  want = [r["prompt"] for r in dedupe(records)]
  if have != want[: len(have)]:
    raise ConfigError(
      f"{path}: holds other prompts than this world's; delete the world "
      "folder (or set world_options.dir to a new one)"
    )
  return len(have) == len(want)


def _outdated(path: str, version: int) -> bool:
  """Whether ``path`` holds a cache manifest of another format."""
  from leapalign_jax.data import MANIFEST

  try:
    with open(os.path.join(path, MANIFEST)) as f:
      return json.load(f).get("version") != version
  except (OSError, ValueError):
    return False


def prepare(config: ml_collections.ConfigDict, workdir: str):
  """Builds (once) the random world in ``workdir/world``; returns the config."""
  # A gs:// workdir: built on the host's disk (memory-mapped models).
  folder = config.world_options.get("dir") or fileio.local_scratch(
    workdir, WORLD
  )
  os.makedirs(folder, exist_ok=True)
  sizes = _sizes(config.world_options)
  claim(folder, _identity(config, sizes))
  world = digits.DigitsConfig(image_size=config.sampling.height)
  rng = np.random.default_rng(config.seed)
  n_train, n_eval = sizes["num_train_prompts"], sizes["num_eval_prompts"]
  ps = digits.draw_prompt_set(world, n_train + n_eval, rng)
  records = digits.prompt_records(world, ps)
  paths = _models(config, folder, sizes, list(ps.prompts))
  caches = {
    "train_cache": (os.path.join(folder, "cache_train"), records[:n_train]),
    "eval_cache": (os.path.join(folder, "cache_eval"), records[n_train:]),
  }
  c = point_config(config, paths)
  embed_caches(c, caches)
  c.lock()
  return c


def point_config(config, paths: dict[str, str]) -> ml_collections.ConfigDict:
  """A copy of ``config`` reading the world's models from ``paths``."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.flux.path = paths["flux"]
  # A world builds its own architecture: `flux.variant` names real
  # checkpoints' (and what `aot` compiles), not the world's tiny model.
  c.flux.variant = ""
  c.vae.path = paths["vae"]
  c.text.clip_path = paths["clip_text"]
  c.text.t5_path = paths["t5"]
  c.text.t5_tokenizer = paths["t5_tokenizer"]
  for entry in c.rewards.values():
    # A world's rule reward (``digits_rule``) reads its own file; every
    # other reward is the world's CLIP.
    if entry.get("kind") == "digits_rule":
      if "rule" in paths:
        entry.path = paths["rule"]
    else:
      entry.path = paths["reward"]
  return c


def reward_texts(c) -> dict:
  """The world's rewards' tokenizers (``rewards.text.RewardText``).

  A world's reward is a transformers-layout CLIP over the OpenAI BPE,
  written by the world itself (possibly after the caches, as the digits
  world trains it on them), so its tokenizer is known without reading it.
  """
  from leapalign_jax.models.clip import CLIPTextConfig
  from leapalign_jax.rewards import text

  out = {}
  for name, entry in c.rewards.items():
    declared = text.TOKENIZERS.get(entry.get("kind") or name)
    if declared is None:
      continue
    out[name] = text.RewardText(
      name=name,
      style=text.style_of(declared, entry.get("tokenizer", ""), "hf"),
      folder="",
      length=int(c.text.reward_max_length),
      rows=CLIPTextConfig.vocab_size,
      where=f"the world's {entry.path}",
    )
  return out


def trained_reward_ids(c, arrays: dict) -> np.ndarray:
  """The cached ids of the one reward a world trains (its entry's own)."""
  from leapalign_jax.data import ids_field

  names = list(reward_texts(c))
  if len(names) != 1:
    raise ValueError(f"a world trains one CLIP reward; config has {names}")
  return arrays[ids_field(names[0])]


def embed_caches(c, caches: dict[str, tuple[str, list[dict]]]) -> None:
  """Embeds each ``{data field: (folder, records)}`` once; sets ``c.data``."""
  from leapalign_jax import prompts
  from leapalign_jax.families import flux_text

  encoders = None
  for field, (path, recs) in caches.items():
    if not _complete(path, recs):  # new, or a build killed half-way
      encoders = encoders or flux_text.TextEncoders(c.text, reward_texts(c))
      prompts.embed(encoders, recs, path, progress=False)
    if field in c.data:
      c.data[field] = path
