"""Builds a run's models and pure functions from its config.

``load(config, mesh)`` reads the Flux transformer, its autoencoder and the
reward models from their checkpoint files (through the converters), places
them on the mesh, adds LoRA adapters when configured, opens the prompt
caches and returns a ``Components`` bundle: the trainable Flux parameters,
the frozen pytrees, and the pure velocity / reward / noise functions the
train step, the sampler and the evaluation share.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from leapalign_jax import data, fileio, sampling, sharding, staging
from leapalign_jax import step as step_lib
from leapalign_jax.errors import UserError

_LOG = logging.getLogger(__name__)


class ConfigError(UserError):
  """A config names a missing file or an impossible combination."""


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Image and latent sizes of a run (the autoencoder fixes the factor)."""

  height: int
  width: int
  latent_h: int
  latent_w: int
  channels: int

  @property
  def tokens(self) -> tuple[int, int]:
    return self.latent_h // 2, self.latent_w // 2

  @property
  def seq_len(self) -> int:
    h, w = self.tokens
    return h * w


def prepare_world(config: ml_collections.ConfigDict, workdir: str):
  """Builds the world's artefacts if the config names one; returns the config.

  ``digits`` and ``random`` worlds write their models and prompt caches under
  the workdir (skipping what exists) and fill in the paths.
  """
  if config.world == "digits":
    from leapalign_jax.worlds import digits_pipeline

    return digits_pipeline.prepare(config, workdir)
  if config.world == "random":
    from leapalign_jax.worlds import random_world

    return random_world.prepare(config, workdir)
  if config.world:
    raise ConfigError(
      f"unknown world {config.world!r}; use '', 'digits' or 'random'"
    )
  # gs:// paths are read from this host's staged copies (staging.py).
  config = staging.resolve_config(config)
  for field in ("flux.path", "vae.path", "data.train_cache"):
    section, key = field.split(".")
    path = config[section][key]
    if not path:
      raise ConfigError(
        f"config.{field} is empty; point it at your checkpoint/cache"
      )
    if "://" not in path and not os.path.exists(path):
      raise ConfigError(f"config.{field}: {path} does not exist")
  return config


def _place(tree, mesh, rules, shard: bool):
  if shard:
    shardings = sharding.logical_to_mesh(tree, mesh, rules)
  else:
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), tree)
  return jax.device_put(tree, shardings)


@dataclasses.dataclass
class Components:
  """Everything the loop, sampler and evaluation need (see module doc)."""

  config: ml_collections.ConfigDict
  mesh: Any
  flux_config: Any
  graphdef: Any
  params: Any  # initial trainable params (sharded); copied into the state
  frozen: dict[str, Any]
  step_fns: step_lib.StepFns
  sigmas: np.ndarray
  geometry: Geometry
  train_cache: data.PromptCache
  eval_cache: data.PromptCache | None
  decode: Any  # (vae_params, z_BHWC) -> images in [-1, 1]
  reward: Any  # rewards.Reward: .score / .score_each / .names
  lora_paths: tuple[str, ...] = ()
  # One compiled sampler / scorer per shape, shared by the evaluations
  # before and after training (a fresh jit per call recompiled them).
  _jitted: dict = dataclasses.field(
    default_factory=dict, init=False, repr=False
  )

  # --- state --------------------------------------------------------------

  def init_state(self, tx):
    """A fresh train state, created sharded like the params."""
    out = jax.tree.map(lambda a: a.sharding, self.abstract_state(tx))
    seed = self.config.seed
    # Copy the params: the state is donated to the step, these are not.
    return jax.jit(
      lambda p: step_lib.init_state(jax.tree.map(jnp.copy, p), tx, seed),
      out_shardings=out,
    )(self.params)

  def abstract_state(self, tx):
    """Shapes and shardings of the train state (for restoring)."""
    return abstract_train_state(self.params, tx, self.config.seed, self.mesh)

  def reward_each(self, reward_params, images, ids) -> dict[str, jax.Array]:
    """Every configured reward separately, ``{name: r_B}`` (evaluation)."""
    return self.reward.score_each(reward_params, images, ids)

  def _once(self, key, make):
    """``make()`` on the first call with ``key``, the same object after."""
    if key not in self._jitted:
      self._jitted[key] = make()
    return self._jitted[key]

  def reward_each_fn(self):
    """``reward_each``, jitted once per Components."""
    return self._once("reward_each", lambda: jax.jit(self.reward_each))

  def log_parameter_overview(self, state) -> None:
    from clu import parameter_overview

    tree = (
      nnx.to_pure_dict(state["params"])
      if isinstance(state["params"], nnx.State)
      else state["params"]
    )
    _LOG.info(
      "trainable parameters (%s):\n%s",
      "LoRA" if self.lora_paths else "full fine-tune",
      parameter_overview.get_parameter_overview(tree, include_stats=False),
    )

  # --- data ---------------------------------------------------------------

  def train_batches(self):
    """This host's block of every global batch (``sharding.put_batch``)."""
    global_batch = self.config.data.global_batch
    blocks = sharding.host_batch_blocks(self.mesh, global_batch)
    count = len(set(blocks.values()))
    return data.batches(
      self.train_cache,
      global_batch // count,
      seed=self.config.seed,
      process_index=blocks[jax.process_index()],
      process_count=count,
    )

  @property
  def batch_fields(self) -> tuple[str, ...]:
    """The cache fields a step reads: embeddings, each reward's ids."""
    ids = tuple(data.ids_field(n) for n in self.reward.tokenizers)
    return (*data.TEXT_FIELDS, *ids)

  def batch_to_arrays(self, element: dict[str, np.ndarray]):
    return {k: np.asarray(element[k]) for k in self.batch_fields}

  # --- models -------------------------------------------------------------

  def flux_model(self, params):
    frozen = self.frozen["flux"]
    states = (params,) if frozen is None else (params, frozen)
    return nnx.merge(self.graphdef, *states)

  def sample_fn(self, num_steps: int):
    """Jitted ``(params, frozen, batch, keys [B, 2]) -> images [B, H, W, 3]``.

    ``keys`` are the images' ``sampling.seed_keys``.
    """
    return self._once(
      ("sample", num_steps), lambda: self._make_sample_fn(num_steps)
    )

  def _make_sample_fn(self, num_steps: int):
    from leapalign_jax.sample import make_sampler

    g = (
      self.config.sampling.guidance if self.flux_config.guidance_embed else None
    )
    sampler = make_sampler(self.graphdef, self.decode, self.geometry.tokens, g)
    sigmas = jnp.asarray(self.sigma_grid(num_steps))
    geo = self.geometry
    latent = (geo.latent_h, geo.latent_w, geo.channels)

    @jax.jit
    def sample(params, frozen, batch, keys):
      # One seed per image: its noise does not depend on the batch
      # (the same function as leapalign_jax.sample's).
      x1 = sampling.seed_noise(keys, latent)
      states = (params,) if frozen["flux"] is None else (params, frozen["flux"])
      return sampler(
        states, frozen["vae"], batch["t5"], batch["clip_pooled"], x1, sigmas
      )

    return sample

  def sigma_grid(self, num_steps: int) -> np.ndarray:
    return sampling.get_schedule(
      num_steps, self.geometry.seq_len, shift=self.config.sampling.shift
    )

  def sample_grid(self, state, step: int, workdir: str) -> str | None:
    """Fixed-seed EMA samples of the first eval prompts, saved as a PNG."""
    from leapalign_jax import evaluate, images

    cache = self.eval_cache or self.train_cache
    n = min(self.config.eval.grid_images, len(cache))
    imgs = evaluate.generate(
      self,
      state["ema"],
      cache,
      list(range(n)),
      seed=self.config.eval.seed,
      num_steps=self.config.sampling.num_steps,
    )
    if jax.process_index() != 0:
      return None
    return images.save_grid(
      imgs, fileio.join(workdir, "samples", f"step_{step:06d}.png")
    )

  def export(self, state, workdir: str) -> list[str]:
    """Writes the EMA weights for PyTorch tools (process 0)."""
    from leapalign_jax import export as export_lib

    if not self.config.export.enabled:
      return []
    return export_lib.export_run(
      self, state["ema"], fileio.join(workdir, "export")
    )


def abstract_train_state(params, tx, seed: int, mesh):
  """``ShapeDtypeStruct`` s (with shardings) of the state over ``params``.

  ``params`` are arrays or ``ShapeDtypeStruct`` s that carry shardings.
  """
  shardings = jax.tree.map(lambda x: x.sharding, params)
  abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx, seed), params)
  out = sharding.state_shardings(tx, abstract, shardings, mesh)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    out,
  )


def abstract(config: ml_collections.ConfigDict, mesh):
  """The run's step inputs from ``*.variant`` fields, without any weights.

  Same graph, shardings and step functions as ``load``, built with
  ``nnx.eval_shape`` (``abstract_run.AbstractRun``): the input of the
  ahead-of-time compile (``leapalign_jax.aot``).
  """
  from leapalign_jax import abstract_run

  return abstract_run.build(config, mesh)


def _load_flux(config, mesh):
  from leapalign_jax.convert import load_flux

  rules = config.mesh.rules
  f = config.flux
  flux_cfg, model = load_flux(
    f.path,
    config=f.get("variant") or None,
    dtype=f.dtype,
    param_dtype=f.param_dtype,
    remat=f.remat,
    attention=f.attention,
    scan_layers=f.scan_layers,
    sharding=lambda state: sharding.logical_to_mesh(state, mesh, rules),
  )
  lora_paths = _add_lora(config, model)
  if lora_paths:
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, nnx.Param)
    params = _place(params, mesh, rules, True)
  else:
    graphdef, params = nnx.split(model, nnx.Param)
    frozen = None
  return flux_cfg, graphdef, params, frozen, lora_paths


def _add_lora(config, model) -> tuple[str, ...]:
  """LoRA adapters on ``model`` when configured; their module paths."""
  from leapalign_jax.models import lora as lora_lib

  if not config.lora.enabled:
    return ()
  return tuple(
    lora_lib.add_lora(
      model,
      config.lora.targets,
      config.lora.rank,
      config.lora.alpha,
      rngs=nnx.Rngs(config.seed),
      # Adapters train in fp32 even over a bf16 base (flux.param_dtype).
      param_dtype=jnp.dtype(
        config.lora.get("param_dtype") or config.flux.param_dtype
      ),
    )
  )


def load(config: ml_collections.ConfigDict, mesh) -> Components:
  """Loads every model and cache the run needs (see module doc)."""
  from leapalign_jax import rewards
  from leapalign_jax.convert import load_autoencoder
  from leapalign_jax.models.autoencoder import decode_fn

  flux_cfg, graphdef, params, frozen_flux, lora_paths = _load_flux(config, mesh)
  ae_cfg, ae = load_autoencoder(
    config.vae.path, dtype=config.vae.dtype, remat=config.vae.remat
  )
  decode, vae_params = decode_fn(ae)
  rules, shard = config.mesh.rules, config.mesh.shard_frozen
  vae_params = _place(vae_params, mesh, rules, shard)
  reward = rewards.build(config.rewards)
  reward_params = _place(reward.params, mesh, rules, shard)

  geo = _geometry(config, ae_cfg, flux_cfg)
  train_cache = data.PromptCache(config.data.train_cache)
  eval_cache = (
    data.PromptCache(config.data.eval_cache) if config.data.eval_cache else None
  )
  _check_cache(train_cache, flux_cfg, reward)
  if eval_cache is not None:
    _check_cache(eval_cache, flux_cfg, reward)
    if eval_cache.encoders != train_cache.encoders:
      raise ConfigError(
        "data.eval_cache and data.train_cache were embedded by different "
        "encoders; re-embed one of them"
      )

  step_fns, sigmas = make_step_fns(
    config, graphdef, flux_cfg, geo, decode, reward
  )
  return Components(
    config=config,
    mesh=mesh,
    flux_config=flux_cfg,
    graphdef=graphdef,
    params=params,
    frozen={"flux": frozen_flux, "vae": vae_params, "reward": reward_params},
    step_fns=step_fns,
    sigmas=sigmas,
    geometry=geo,
    train_cache=train_cache,
    eval_cache=eval_cache,
    decode=decode,
    reward=reward,
    lora_paths=lora_paths,
  )


def _geometry(config, ae_cfg, flux_cfg) -> Geometry:
  """Image / latent sizes of the run; checks the VAE and Flux fit together."""
  s = config.sampling
  lh, lw, zc = ae_cfg.latent_shape(s.height, s.width)
  if lh % 2 or lw % 2:
    raise ConfigError(
      f"sampling {s.height}x{s.width} gives a {lh}x{lw} latent; the packed "
      "2x2 patches need even latent sides"
    )
  if 4 * zc != flux_cfg.in_channels:
    raise ConfigError(
      f"the autoencoder has {zc} latent channels but Flux expects "
      f"{flux_cfg.in_channels // 4}; they do not belong together"
    )
  return Geometry(s.height, s.width, lh, lw, zc)


def flux_velocity(model, x_BLC, t_B, batch, tokens, guidance=None):
  """Flux's velocity for packed latents and a cached-embedding batch.

  ``tokens`` is the ``(h, w)`` token grid; ``guidance`` the distilled
  guidance scale (None for models without a guidance embedding).
  """
  B = x_BLC.shape[0]
  return model(
    img=x_BLC,
    img_ids=sampling.img_ids(B, *tokens),
    txt=batch["t5"],
    txt_ids=sampling.txt_ids(B, batch["t5"].shape[1]),
    timesteps=t_B,
    y=batch["clip_pooled"],
    guidance=None
    if guidance is None
    else jnp.full((B,), guidance, jnp.float32),
  )


def make_step_fns(config, graphdef, flux_cfg, geo: Geometry, decode, reward):
  """The step's velocity / reward / noise functions and its sigma grid.

  Shared by ``load`` (real weights) and ``abstract`` (shapes only), so the
  ahead-of-time compile builds exactly the training program.
  """
  s = config.sampling
  guidance = float(s.guidance) if flux_cfg.guidance_embed else None
  h_tok, w_tok = geo.tokens

  def velocity(p, frozen_flux, x, t, batch):
    states = (p,) if frozen_flux is None else (p, frozen_flux)
    model = nnx.merge(graphdef, *states)
    return flux_velocity(model, x, t, batch, geo.tokens, guidance)

  def reward_fn(frozen, x0, batch):
    z = sampling.unpack_tokens(x0, h_tok, w_tok)
    images = jnp.clip(decode(frozen["vae"], z), -1.0, 1.0)
    # Each reward reads the ids of its own tokenizer (rewards/text.py).
    return reward.score(frozen["reward"], images, data.reward_ids(batch))

  def noise(key, batch_size):
    z = jax.random.normal(
      key, (batch_size, geo.latent_h, geo.latent_w, geo.channels), jnp.float32
    )
    return sampling.pack(z)

  sigmas = sampling.get_schedule(s.num_steps, geo.seq_len, shift=s.shift)
  return step_lib.StepFns(velocity, reward_fn, noise), sigmas


def _check_cache(cache: data.PromptCache, flux_cfg, reward) -> None:
  t5 = cache.field_shape("t5")
  clip = cache.field_shape("clip_pooled")
  if t5[-1] != flux_cfg.context_in_dim or clip[-1] != flux_cfg.vec_in_dim:
    raise ConfigError(
      f"{cache.folder}: embeddings are T5 {t5} / CLIP {clip} but Flux expects "
      f"{flux_cfg.context_in_dim} / {flux_cfg.vec_in_dim} features; embed the "
      "prompts with this model's text encoders"
    )
  tokenized = cache.encoders.get("rewards", {})
  for name, style in reward.tokenizers.items():
    field = data.ids_field(name)
    if field not in cache.fields:
      raise ConfigError(
        f"{cache.folder}: holds no prompt ids for reward {name!r} (it has "
        f"ids for {sorted(data.reward_ids(dict.fromkeys(cache.fields)))}); "
        "re-embed the prompts with this config (python -m "
        "leapalign_jax.embed_prompts)"
      )
    if tokenized.get(name, {}).get("style") != style:
      raise ConfigError(
        f"{cache.folder}: reward {name!r} reads {style} ids but the cache "
        f"holds {tokenized.get(name, {}).get('style')} ones; re-embed the "
        "prompts with this config"
      )
    ids = cache.field_shape(field)
    if reward.text_length and ids[-1] != reward.text_length:
      raise ConfigError(
        f"{cache.folder}: reward {name!r} ids have length {ids[-1]} but the "
        f"reward model takes {reward.text_length}; set "
        "text.reward_max_length and re-embed"
      )
