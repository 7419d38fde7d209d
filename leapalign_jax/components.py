"""Builds a run's models and pure functions from its config (the assembly).

``load(config, mesh)`` reads the flow model of the run's family
(``families.of(config)``), its autoencoder and the reward models from their
checkpoint files (through the converters), places them on the mesh, adds
LoRA adapters when configured, opens the prompt caches and returns a
``Components`` bundle: the trainable parameters, the frozen pytrees, and the
pure velocity / reward / noise functions the train step, the sampler and the
evaluation share. ``abstract_run`` builds the same from shapes alone.

Nothing here imports a world, a command or the evaluation: the commands
prepare the config (``worlds.prepare``) and call this.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from leapalign_jax import data, families, sampling, sharding
from leapalign_jax import step as step_lib
from leapalign_jax.errors import ConfigError
from leapalign_jax.families import Family, Geometry

_LOG = logging.getLogger(__name__)


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
  family: Family
  model_config: Any
  graphdef: Any
  params: Any  # initial trainable params (sharded); copied into the state
  frozen: dict[str, Any]  # {model, vae, reward}
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
    """The cache fields a step reads: conditioning, each reward's ids."""
    ids = tuple(data.ids_field(n) for n in self.reward.tokenizers)
    return (*self.family.text_fields, *ids)

  def batch_to_arrays(self, element: dict[str, np.ndarray]):
    return {k: np.asarray(element[k]) for k in self.batch_fields}

  # --- models -------------------------------------------------------------

  def model(self, params):
    """The flow model with ``params`` (and the frozen LoRA base)."""
    frozen = self.frozen["model"]
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
    fam, geo = self.family, self.geometry
    guidance = fam.guidance(self.model_config, self.config.sampling.guidance)

    def velocity(model, x, t, cond):
      return fam.velocity(model, x, t, cond, geo, guidance)

    sampler = sampling.make_sampler(
      self.graphdef, velocity, self.decode, geo.tokens
    )
    sigmas = jnp.asarray(self.sigma_grid(num_steps))
    latent = (geo.latent_h, geo.latent_w, geo.channels)

    @jax.jit
    def sample(params, frozen, batch, keys):
      # One seed per image: its noise does not depend on the batch
      # (the same function as generation.Sampler's).
      x1 = sampling.seed_noise(keys, latent)
      fm = frozen["model"]
      states = (params,) if fm is None else (params, fm)
      cond = {k: batch[k] for k in fam.text_fields}
      return sampler(states, frozen["vae"], cond, x1, sigmas)

    return sample

  def sigma_grid(self, num_steps: int) -> np.ndarray:
    return self.family.schedule(self.config, num_steps, self.geometry.seq_len)


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


def add_lora(config, model) -> tuple[str, ...]:
  """LoRA adapters on ``model`` when configured; their module paths."""
  from leapalign_jax.models import lora as lora_lib

  if not config.lora.enabled:
    return ()
  base_dtype = families.section(config).param_dtype
  return tuple(
    lora_lib.add_lora(
      model,
      config.lora.targets,
      config.lora.rank,
      config.lora.alpha,
      rngs=nnx.Rngs(config.seed),
      # Adapters train in fp32 even over a bf16 base (<section>.param_dtype).
      param_dtype=jnp.dtype(config.lora.get("param_dtype") or base_dtype),
    )
  )


def _load_model(config, family: Family, mesh):
  rules = config.mesh.rules
  model_cfg, model = family.load(
    config, lambda state: sharding.logical_to_mesh(state, mesh, rules)
  )
  lora_paths = add_lora(config, model)
  if lora_paths:
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, nnx.Param)
    params = _place(params, mesh, rules, True)
  else:
    graphdef, params = nnx.split(model, nnx.Param)
    frozen = None
  return model_cfg, graphdef, params, frozen, lora_paths


@dataclasses.dataclass
class ModelParts:
  """The flow model of a run alone (exports): no VAE, rewards or caches."""

  config: ml_collections.ConfigDict
  family: Family
  model_config: Any
  graphdef: Any
  params: Any  # trainable params (sharded)
  frozen: dict[str, Any]  # {model}: the LoRA base, or None
  lora_paths: tuple[str, ...] = ()

  def model(self, params):
    """The flow model with ``params`` (and the frozen LoRA base)."""
    frozen = self.frozen["model"]
    return nnx.merge(
      self.graphdef, *((params,) if frozen is None else (params, frozen))
    )


def load_model(config: ml_collections.ConfigDict, mesh) -> ModelParts:
  """The run's flow model (with its adapters, if any), placed on ``mesh``."""
  family = families.of(config)
  model_cfg, graphdef, params, frozen, lora_paths = _load_model(
    config, family, mesh
  )
  return ModelParts(
    config, family, model_cfg, graphdef, params, {"model": frozen}, lora_paths
  )


def load(config: ml_collections.ConfigDict, mesh) -> Components:
  """Loads every model and cache the run needs (see module doc)."""
  from leapalign_jax import rewards
  from leapalign_jax.convert import load_autoencoder
  from leapalign_jax.models.autoencoder import decode_fn

  family = families.of(config)
  model_cfg, graphdef, params, frozen_model, lora_paths = _load_model(
    config, family, mesh
  )
  ae_cfg, ae = load_autoencoder(
    config.vae.path, dtype=config.vae.dtype, remat=config.vae.remat
  )
  decode, vae_params = decode_fn(ae)
  rules, shard = config.mesh.rules, config.mesh.shard_frozen
  vae_params = _place(vae_params, mesh, rules, shard)
  reward = rewards.build(config.rewards)
  reward_params = _place(reward.params, mesh, rules, shard)

  geo = geometry(config, family, model_cfg, ae_cfg)
  train_cache = data.PromptCache(config.data.train_cache)
  eval_cache = (
    data.PromptCache(config.data.eval_cache) if config.data.eval_cache else None
  )
  check_cache(train_cache, family, model_cfg, reward)
  if eval_cache is not None:
    check_cache(eval_cache, family, model_cfg, reward)
    if eval_cache.encoders != train_cache.encoders:
      raise ConfigError(
        "data.eval_cache and data.train_cache were embedded by different "
        "encoders; re-embed one of them"
      )

  step_fns, sigmas = make_step_fns(
    config, family, graphdef, model_cfg, geo, decode, reward
  )
  return Components(
    config=config,
    mesh=mesh,
    family=family,
    model_config=model_cfg,
    graphdef=graphdef,
    params=params,
    frozen={"model": frozen_model, "vae": vae_params, "reward": reward_params},
    step_fns=step_fns,
    sigmas=sigmas,
    geometry=geo,
    train_cache=train_cache,
    eval_cache=eval_cache,
    decode=decode,
    reward=reward,
    lora_paths=lora_paths,
  )


def geometry(config, family: Family, model_cfg, ae_cfg) -> Geometry:
  """Image / latent sizes of the run; checks the VAE and model fit together."""
  s = config.sampling
  lh, lw, zc = ae_cfg.latent_shape(s.height, s.width)
  if lh % 2 or lw % 2:
    raise ConfigError(
      f"sampling {s.height}x{s.width} gives a {lh}x{lw} latent; the packed "
      "2x2 patches need even latent sides"
    )
  if zc != family.latent_channels(model_cfg):
    raise ConfigError(
      f"the autoencoder has {zc} latent channels but the {family.name} model "
      f"expects {family.latent_channels(model_cfg)}; they do not belong "
      "together"
    )
  return Geometry(s.height, s.width, lh, lw, zc)


def make_step_fns(
  config, family: Family, graphdef, model_cfg, geo: Geometry, decode, reward
):
  """The step's velocity / reward / noise functions and its sigma grid.

  Shared by ``load`` (real weights) and ``abstract_run`` (shapes only), so
  the ahead-of-time compile builds exactly the training program.
  """
  s = config.sampling
  guidance = family.guidance(model_cfg, s.guidance)
  h_tok, w_tok = geo.tokens

  def velocity(p, frozen_model, x, t, batch):
    states = (p,) if frozen_model is None else (p, frozen_model)
    model = nnx.merge(graphdef, *states)
    return family.velocity(model, x, t, batch, geo, guidance)

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

  sigmas = family.schedule(config, s.num_steps, geo.seq_len)
  return step_lib.StepFns(velocity, reward_fn, noise), sigmas


def check_cache(cache: data.PromptCache, family: Family, model_cfg, reward):
  """Refuses a prompt cache made for another model or other rewards."""
  family.check_cache(cache, model_cfg)
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
    want = reward.lengths.get(name)
    if want and ids[-1] != want:
      raise ConfigError(
        f"{cache.folder}: reward {name!r} ids have length {ids[-1]} but the "
        f"reward model takes {want}; set text.reward_max_length (CLIP "
        "rewards) and re-embed"
      )
