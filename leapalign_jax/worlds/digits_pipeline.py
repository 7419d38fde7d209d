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
  rule.npz    the rule-based reward's classifier (``digits_rule``: GenEval's
              role in *training*, no gradient; another model than the
              evaluator, see ``digits_rule.py``).

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
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np

from leapalign_jax import fileio, utils
from leapalign_jax.errors import ConfigError
from leapalign_jax.worlds import (
  digits,
  digits_eval,
  digits_rule,
  digits_stages,
  digits_train,
  random_world,
)

_LOG = logging.getLogger(__name__)

WORLD = "world"
RULE = "rule.npz"  # the digits_rule reward's classifier

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
# The pipeline.
# ---------------------------------------------------------------------------


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
  random_world.claim(folder, utils.flatten_dict(json.loads(json.dumps(built))))

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
    rule=os.path.join(folder, RULE),
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
  text = digits_stages.cache_arrays(all_cache)
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
        lambda: digits_stages.train_reward(
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
      _stage(
        folder,
        "rule",
        paths["rule"],
        lambda: rule_stage(world, seed + 4, reward_ids, records, paths["rule"]),
      )
    except BaseException:
      stop.set()
      raise

  def flux_stage():
    b = pretrain_data()
    ps = b.prompt_set
    ids = digits.prompt_index(
      world, ps.digit, ps.colour, ps.position, ps.template
    )
    x0 = digits_stages.encode_images(paths["vae"], b.images)
    return digits_stages.train_flux(
      opts, x0, text, ids, seed + 2, paths["flux"], stop
    )

  # Leaving the block waits for the side thread (at most one step after
  # ``stop`` is set).
  with concurrent.futures.ThreadPoolExecutor(1, "digits-world") as pool:
    side = pool.submit(reward_and_evaluator)
    try:
      _stage(
        folder,
        "autoencoder",
        paths["vae"],
        lambda: digits_stages.train_autoencoder(
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


def rule_stage(world, seed: int, reward_ids, records, out: str) -> dict:
  """Fits and saves the rule reward's classifier (``rule.npz``).

  Its summary: the argmax accuracy per attribute on clean renders of the
  test split's digits (writers it never saw).
  """
  classifier = digits_rule.fit(world, seed, reward_ids, records)
  test = digits.sample_batch(world, 1000, [seed, 43], split="test")
  ps = test.prompt_set
  labels = np.stack([ps.digit, ps.colour, ps.position], -1)
  acc = digits_rule.accuracy(classifier, test.images, labels)
  classifier.save(out)
  return {f"test_{k}_acc": v for k, v in acc.items()}


def evaluator_scorer(
  config: ml_collections.ConfigDict, workdir: str
) -> Callable[[np.ndarray, list[Mapping[str, Any]]], dict[str, Any]]:
  """``score(images, records) -> {"eval/digit": [N] hits, ...}`` (held out).

  Per image: 0/1 hits (``digit``, ``colour``, ``position``, ``all``,
  ``found``), the ``stray`` ink share, and ``eval/verdict`` (one caption
  line each; ``Evaluator.judge``).
  """
  path = os.path.join(folder_of(config, workdir), "evaluator.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} is missing; run the digits world preparation first"
    )
  evaluator = digits_eval.Evaluator.load(path)

  def score(images: np.ndarray, records) -> dict[str, Any]:
    per = evaluator.judge(np.asarray(images), records)
    return {f"eval/{k}": v for k, v in per.items()}

  return score
