"""Embedded, offline worlds for end-to-end runs on a CPU, by name.

A world builds (once, resumably) the models and prompt caches a run needs
and fills in their paths: ``digits`` (scikit-learn's 8x8 digits, a tiny
Flux the project pretrains, its own rewards and held-out evaluator) and
``random`` (random tiny weights, for plumbing tests) and ``random_sd3``
(the same for the SD3 family). ``prepare(config,
workdir)`` is what the commands call before ``components.load``; ``""`` (no
world) reads the config's own weights, ``gs://`` ones from this host's
staged copies. ``scorers`` lists a world's held-out evaluators, which are not
training rewards. The assembly (``components``) never imports a world.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import ml_collections

from leapalign_jax import families, staging
from leapalign_jax.errors import ConfigError


def _digits(config, workdir):
  from leapalign_jax.worlds import digits_pipeline

  return digits_pipeline.prepare(config, workdir)


def _random(config, workdir):
  from leapalign_jax.worlds import random_world

  return random_world.prepare(config, workdir)


def _random_sd3(config, workdir):
  from leapalign_jax.worlds import random_sd3

  return random_sd3.prepare(config, workdir)


def _digits_scorers(config, workdir):
  from leapalign_jax.worlds import digits_pipeline

  return [digits_pipeline.evaluator_scorer(config, workdir)]


# name -> prepare(config, workdir) -> config
WORLDS: dict[str, Callable] = {
  "digits": _digits,
  "random": _random,
  "random_sd3": _random_sd3,
}
# name -> scorers(config, workdir) -> [score(images, records) -> {k: [N]}]:
# per-image values (their mean is the summary's k), and optionally a
# "<prefix>/verdict" list of caption lines (one per image).
SCORERS: dict[str, Callable] = {"digits": _digits_scorers}


def prepare(
  config: ml_collections.ConfigDict, workdir: str
) -> ml_collections.ConfigDict:
  """Builds the world's artefacts if the config names one; returns the config.

  A world writes its models and prompt caches under ``workdir`` (skipping
  what exists) and fills in the paths. With no world, ``gs://`` paths are
  read from this host's staged copies (``staging``) and the model, VAE and
  training cache paths must exist.
  """
  if config.world:
    if config.world not in WORLDS:
      raise ConfigError(
        f"unknown world {config.world!r}; use '' or one of {sorted(WORLDS)}"
      )
    return _prepare_world(WORLDS[config.world], config, workdir)
  config = staging.resolve_config(config)
  section = families.of(config).section
  for field in (f"{section}.path", "vae.path", "data.train_cache"):
    part, key = field.split(".")
    path = config[part][key]
    if not path:
      raise ConfigError(
        f"config.{field} is empty; point it at your checkpoint/cache"
      )
    if "://" not in path and not os.path.exists(path):
      raise ConfigError(f"config.{field}: {path} does not exist")
  return config


def _prepare_world(build: Callable, config, workdir: str):
  """``build`` on process 0 first, then on the others (which find it built).

  Every process needs the world's paths; only process 0 writes the files
  (the world lives on a file system the processes share).
  """
  import jax

  from leapalign_jax import distributed

  if jax.process_count() == 1:
    return build(config, workdir)
  out = build(config, workdir) if jax.process_index() == 0 else None
  distributed.barrier("world")
  return out if out is not None else build(config, workdir)


def scorers(config: ml_collections.ConfigDict, workdir: str) -> list:
  """The world's held-out scorers (none for most worlds)."""
  make = SCORERS.get(config.world)
  return make(config, workdir) if make else []
