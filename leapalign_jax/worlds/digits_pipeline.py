"""The digits world's pretraining stages, run before alignment (``world="digits"``).

``prepare(config, workdir)`` builds, in ``world_options.dir`` (default
``<workdir>/world``), every model a run needs, each through the production
code and saved as a real checkpoint in the layout users' files come in:

  tokenizer_2/, text_encoder/, text_encoder_2/
      a T5 tokenizer trained on the world's prompts, and frozen random tiny
      CLIP-L / T5 text encoders (their role is to map prompts to features).
  cache_all/, cache_train/, cache_eval/
      prompt-embedding caches (``embed_prompts``): every prompt of the world
      (pretraining), the alignment prompts, the held-out evaluation prompts
      (each digit x colour x position combination exactly once, with
      phrasings not used for alignment).
  vae/        the tiny Flux autoencoder trained on the world's images.
  transformer/  the base Flux, trained with the rectified-flow objective.
  reward_clip/  a tiny CLIP trained contrastively: the ``clip`` reward.
  evaluator.npz the held-out evaluator (GenEval's role; never a reward).

Each stage is skipped when its output exists, and outputs are written
atomically, so an interrupted preparation resumes at the unfinished stage.
The reward and the evaluator depend on no other stage and train on a second
thread while the autoencoder and the base Flux train: neither stage fills
both cores of a 2-core CPU, and overlapping them shortens the first run by
about a minute with the same results (each stage's computation is unchanged).
``world.json`` records the options the folder was built with; a run whose
options differ is refused instead of silently reusing other models.
``stages.json`` records each stage's wall time and final loss.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from leapalign_jax import data, fileio
from leapalign_jax.errors import ConfigError
from leapalign_jax.utils import atomic_dir
from leapalign_jax.worlds import digits, digits_eval, digits_train, random_world

_LOG = logging.getLogger(__name__)

WORLD = "world"

# Every world option with its default (configs/digits.py documents them).
DEFAULTS: dict[str, Any] = {
  "dir": "",
  # The world's own seed (renders, splits, pretraining), separate from the
  # run's `seed`, so alignment runs with several seeds share one world.
  "seed": 0,
  "text_hidden": 64,
  "num_train_prompts": 1000,
  # Pretraining mix: these digits are `rare_factor` times as frequent as
  # the others in the base model's training data (alignment and evaluation
  # prompts are uniform).
  "rare_digits": (),
  "rare_factor": 1.0,
  "eval_templates": (4,),  # phrasings held out for evaluation
  "pretrain_images": 8192,
  "ae_channels": 16,
  "ae_z_channels": 4,
  "ae_steps": 300,
  "ae_batch": 64,
  "ae_lr": 2e-3,
  "flux_hidden": 128,
  "flux_heads": 4,
  "flux_depth": 1,
  "flux_single_depth": 2,
  "flux_steps": 1500,
  "flux_batch": 32,
  "flux_lr": 1e-3,
  "flux_ema": 0.999,
  "reward_hidden": 64,
  "reward_layers": 2,
  "reward_steps": 1200,
  "reward_batch": 64,
  "reward_lr": 2e-3,
  "reward_noise": 0.3,
}


def options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``DEFAULTS`` overridden by ``config.world_options`` (unknown keys fail)."""
  given = config.world_options.to_dict()
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ConfigError(
      f"world_options {unknown} are not digits-world options; known: "
      f"{sorted(DEFAULTS)}"
    )
  out = {**DEFAULTS, **given}
  for key in ("rare_digits", "eval_templates"):
    out[key] = tuple(int(v) for v in out[key])
  return out


def world_config(config: ml_collections.ConfigDict) -> digits.DigitsConfig:
  """The rendered world: the default layout on the run's canvas size."""
  s = config.sampling
  if s.height != s.width:
    raise ConfigError(
      f"the digits world is square; got sampling {s.height}x{s.width}"
    )
  return digits.DigitsConfig(image_size=int(s.height))


def folder_of(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the world's models live."""
  # A gs:// workdir: the world's models are memory-mapped from the host's
  # disk, so they are built in a local folder (fileio.local_scratch).
  return config.world_options.get("dir") or fileio.local_scratch(workdir, WORLD)


# ---------------------------------------------------------------------------
# Prompts.
# ---------------------------------------------------------------------------


def prompt_index(world: digits.DigitsConfig, d, c, p, t) -> np.ndarray:
  """Index of a prompt in ``digits.all_prompts(world)`` (d, c, p, t nested)."""
  C, P, T = len(world.colours), len(world.positions), len(world.templates)
  return ((np.asarray(d) * C + c) * P + p) * T + t


def all_records(world: digits.DigitsConfig) -> list[dict[str, Any]]:
  """Every prompt of the world with its attributes, in ``all_prompts`` order."""
  C, P, T = len(world.colours), len(world.positions), len(world.templates)
  grid = np.stack(
    np.meshgrid(
      np.arange(digits.NUM_DIGITS),
      np.arange(C),
      np.arange(P),
      np.arange(T),
      indexing="ij",
    ),
    -1,
  ).reshape(-1, 4)
  ps = digits.PromptSet(
    prompts=tuple(digits.make_prompt(world, *row) for row in grid),
    digit=grid[:, 0].astype(np.int32),
    colour=grid[:, 1].astype(np.int32),
    position=grid[:, 2].astype(np.int32),
    template=grid[:, 3].astype(np.int32),
  )
  return digits.prompt_records(world, ps)


def split_prompts(world, opts, seed: int) -> tuple[list, list]:
  """(alignment records, evaluation records), disjoint in phrasing.

  Evaluation: every (digit, colour, position) once, each with a random
  held-out phrasing. Alignment: ``num_train_prompts`` drawn uniformly from
  the other phrasings.
  """
  rng = np.random.default_rng([seed, 11])
  records = all_records(world)
  held = set(opts["eval_templates"])
  train_pool = [r for r in records if r["template"] not in held]
  if not held or not train_pool:
    raise ConfigError(
      "world_options.eval_templates must hold out some, not all, of the "
      f"{len(world.templates)} phrasings"
    )
  by_combo: dict[tuple, list] = {}
  for r in records:
    if r["template"] in held:
      key = (r["digit"], r["colour"], r["position"])
      by_combo.setdefault(key, []).append(r)
  evals = [group[rng.integers(len(group))] for group in by_combo.values()]
  n = int(opts["num_train_prompts"])
  pick = rng.choice(len(train_pool), size=n, replace=n > len(train_pool))
  trains = [dict(train_pool[i]) for i in pick]
  return trains, evals


def pretrain_probs(world, opts) -> np.ndarray:
  """The base model's training mix over (digit, colour, position)."""
  weights = {d: float(opts["rare_factor"]) for d in opts["rare_digits"]}
  return digits.mixture_probs(world, digit_weights=weights)


def pretrain_set(world, opts, seed: int) -> digits.Batch:
  """The fixed (image, prompt) set the autoencoder and base Flux train on."""
  return digits.sample_batch(
    world,
    int(opts["pretrain_images"]),
    [seed, 21],
    split="train",
    probs=pretrain_probs(world, opts),
  )


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------


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


def _cache_arrays(folder: str) -> dict[str, np.ndarray]:
  cache = data.PromptCache(folder)
  rows = [cache[i] for i in range(len(cache))]
  return {k: np.stack([r[k] for r in rows]) for k in cache.fields}


def _train_autoencoder(opts, images: np.ndarray, seed: int, out: str, stop):
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


def _encode_images(vae_path: str, images: np.ndarray) -> np.ndarray:
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


def _train_flux(opts, x0: np.ndarray, text, prompt_ids, seed, out, stop):
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


def _train_reward(config, opts, world, reward_ids, seed: int, out: str, stop):
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
    idx = prompt_index(world, ps.digit, ps.colour, ps.position, ps.template)
    other = ps.digit + rng.integers(1, digits.NUM_DIGITS, len(idx))
    other %= digits.NUM_DIGITS
    swap = prompt_index(world, other, ps.colour, ps.position, ps.template)
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
  idx = prompt_index(
    world, d, ps.colour[:, None], ps.position[:, None], ps.template[:, None]
  )
  txt = model.text_features(jnp.asarray(reward_ids[idx.reshape(-1)]))
  txt = txt.reshape(n, digits.NUM_DIGITS, -1)
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  scores = jnp.einsum("nd,nkd->nk", img, txt)
  return float(np.mean(np.argmax(np.asarray(scores), 1) == ps.digit))


# ---------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


_STAGES_LOCK = threading.Lock()  # stages.json: written from two threads


def _stage(folder: str, name: str, out: str, fn: Callable[[], dict]) -> None:
  """Runs ``fn`` unless ``out`` exists; records its summary in stages.json."""
  if os.path.exists(out):
    return
  _LOG.info("digits world: building %s", name)
  start = time.perf_counter()
  summary = fn() or {}
  summary["wall_seconds"] = time.perf_counter() - start
  path = os.path.join(folder, "stages.json")
  with _STAGES_LOCK:
    stages = {}
    if os.path.exists(path):
      with open(path) as f:
        stages = json.load(f)
    stages[name] = summary
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(stages, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  _LOG.info("digits world: %s done in %.1f s", name, summary["wall_seconds"])


def prepare(config: ml_collections.ConfigDict, workdir: str):
  """Builds the world's missing stages; returns the config pointing at them."""
  opts = options(config)
  world = world_config(config)
  folder = folder_of(config, workdir)
  os.makedirs(folder, exist_ok=True)
  seed = int(opts["seed"])
  built = {
    "world": world.to_dict(),
    "options": {k: v for k, v in opts.items() if k != "dir"},
    "text": {
      k: config.text[k]
      for k in ("clip_max_length", "t5_max_length", "reward_max_length")
    },
  }
  random_world.claim(folder, _flatten(json.loads(json.dumps(built))))

  records = all_records(world)
  paths = random_world.write_text_models(
    config,
    folder,
    [r["prompt"] for r in records],
    int(opts["text_hidden"]),
    seed * 100,
  )
  paths.update(
    vae=os.path.join(folder, "vae"),
    flux=os.path.join(folder, "transformer"),
    reward=os.path.join(folder, "reward_clip"),
  )
  c = random_world.point_config(config, paths)
  c.world_options.dir = folder
  trains, evals = split_prompts(world, opts, seed)
  all_cache = os.path.join(folder, "cache_all")
  random_world.embed_caches(
    c,
    {
      "all": (all_cache, records),
      "train_cache": (os.path.join(folder, "cache_train"), trains),
      "eval_cache": (os.path.join(folder, "cache_eval"), evals),
    },
  )
  text = _cache_arrays(all_cache)
  reward_ids = random_world.trained_reward_ids(c, text)

  pre: list[digits.Batch] = []

  def pretrain_data() -> digits.Batch:
    if not pre:
      pre.append(pretrain_set(world, opts, seed))
    return pre[0]

  # Set by whichever thread fails first; the other stops at its next step.
  stop = threading.Event()

  def reward_and_evaluator() -> None:
    evaluator_path = os.path.join(folder, "evaluator.npz")
    try:
      _stage(
        folder,
        "reward",
        paths["reward"],
        lambda: _train_reward(
          config,
          opts,
          world,
          reward_ids,
          seed + 3,
          paths["reward"],
          stop,
        ),
      )
      _stage(
        folder,
        "evaluator",
        evaluator_path,
        lambda: digits_eval.fit(seed, world).save(evaluator_path),
      )
    except BaseException:
      stop.set()
      raise

  def flux_stage():
    b = pretrain_data()
    ps = b.prompt_set
    ids = prompt_index(world, ps.digit, ps.colour, ps.position, ps.template)
    x0 = _encode_images(paths["vae"], b.images)
    return _train_flux(opts, x0, text, ids, seed + 2, paths["flux"], stop)

  # Leaving the block waits for the side thread (at most one step after
  # ``stop`` is set).
  with concurrent.futures.ThreadPoolExecutor(1, "digits-world") as pool:
    side = pool.submit(reward_and_evaluator)
    try:
      _stage(
        folder,
        "autoencoder",
        paths["vae"],
        lambda: _train_autoencoder(
          opts, pretrain_data().images, seed + 1, paths["vae"], stop
        ),
      )
      _stage(folder, "flux", paths["flux"], flux_stage)
    except digits_train.CancelledError:
      pass  # the side thread failed: its error is raised below
    except BaseException:
      stop.set()
      raise
  side.result()  # the side thread's error, if any
  c.lock()
  return c


def evaluator_scorer(
  config: ml_collections.ConfigDict, workdir: str
) -> Callable[[np.ndarray, list[Mapping[str, Any]]], dict[str, float]]:
  """``score(images, records) -> {"eval/digit": acc, ...}`` (held out)."""
  path = os.path.join(folder_of(config, workdir), "evaluator.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} is missing; run the digits world preparation first"
    )
  evaluator = digits_eval.Evaluator.load(path)

  def score(images: np.ndarray, records) -> dict[str, float]:
    acc = evaluator.accuracy(np.asarray(images), records)
    return {f"eval/{k}": v for k, v in acc.items()}

  return score
