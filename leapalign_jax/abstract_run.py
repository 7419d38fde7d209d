"""A run's training-step inputs as shapes and shardings, without weights.

``build(config, mesh)`` (also ``components.abstract``) makes the Flux model
of ``config.flux.variant``, the autoencoder of ``config.vae.variant`` and
each reward's ``variant`` with ``nnx.eval_shape``, derives their shardings
from the logical rules exactly as ``components.load`` does, and returns the
same step functions plus ``ShapeDtypeStruct`` s for the state, the frozen
pytrees and the global batch. Nothing is read or allocated: the input of the
ahead-of-time compile of the real training step (``leapalign_jax.aot``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from leapalign_jax import components, data, sharding
from leapalign_jax import step as step_lib


@dataclasses.dataclass
class AbstractRun:
  """A run's step inputs as shapes and shardings only (``abstract``)."""

  config: ml_collections.ConfigDict
  mesh: Any
  flux_config: Any
  params: Any  # trainable params: ShapeDtypeStructs with shardings
  frozen: dict[str, Any]  # {flux, vae, reward}: the same
  batch: dict[str, jax.ShapeDtypeStruct]  # the global batch, batch-sharded
  step_fns: step_lib.StepFns
  sigmas: np.ndarray
  geometry: components.Geometry
  lora_paths: tuple[str, ...] = ()

  def abstract_state(self, tx):
    return components.abstract_train_state(
      self.params, tx, self.config.seed, self.mesh
    )


def _with_shardings(tree, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    tree,
    shardings,
  )


def build(config: ml_collections.ConfigDict, mesh) -> AbstractRun:
  """The run's models from ``*.variant`` fields, without weights or caches.

  Builds the same graph, parameter shardings and step functions as ``load``
  with ``nnx.eval_shape`` (nothing is read or allocated), for compiling the
  training step ahead of time (``leapalign_jax.aot``).
  """
  from leapalign_jax import rewards
  from leapalign_jax.models import autoencoder, flux
  from leapalign_jax.models.autoencoder import decode_fn

  f, rules = config.flux, config.mesh.rules
  if f.variant not in flux.VARIANTS:
    raise components.ConfigError(
      f"config.flux.variant={f.variant!r}: ahead-of-time compilation needs "
      f"the architecture; set it to one of {sorted(flux.VARIANTS)}"
    )
  flux_cfg = dataclasses.replace(
    flux.VARIANTS[f.variant],
    dtype=f.dtype,
    param_dtype=f.param_dtype,
    remat=f.remat,
    attention=f.attention,
    scan_layers=f.scan_layers,
  )

  paths: list[str] = []  # strings cannot leave eval_shape's trace

  def build():
    model = flux.Flux(flux_cfg, rngs=nnx.Rngs(0))
    paths.extend(components._add_lora(config, model))
    return model

  model = nnx.eval_shape(build)
  lora_paths = tuple(paths)
  if lora_paths:
    graphdef, params, frozen_flux = nnx.split(model, nnx.LoRAParam, nnx.Param)
    frozen_flux = _with_shardings(
      frozen_flux, sharding.logical_to_mesh(frozen_flux, mesh, rules)
    )
  else:
    graphdef, params = nnx.split(model, nnx.Param)
    frozen_flux = None
  params = _with_shardings(
    params, sharding.logical_to_mesh(params, mesh, rules)
  )
  ae_cfg = dataclasses.replace(
    autoencoder.VARIANTS[config.vae.variant],
    dtype=config.vae.dtype,
    param_dtype=config.vae.dtype,
    remat=config.vae.remat,
  )
  ae = nnx.eval_shape(lambda: autoencoder.AutoEncoder(ae_cfg, rngs=nnx.Rngs(0)))
  decode, vae_params = decode_fn(ae)
  reward = rewards.build(config.rewards, abstract=True)
  frozen = {"flux": frozen_flux}
  for name, tree in (("vae", vae_params), ("reward", reward.params)):
    if config.mesh.shard_frozen:
      shard = sharding.logical_to_mesh(tree, mesh, rules)
    else:
      shard = jax.tree.map(lambda _: sharding.replicated(mesh), tree)
    frozen[name] = _with_shardings(tree, shard)
  geo = components._geometry(config, ae_cfg, flux_cfg)
  step_fns, sigmas = components.make_step_fns(
    config, graphdef, flux_cfg, geo, decode, reward
  )
  B, t = config.data.global_batch, config.text
  cache = jnp.dtype(t.cache_dtype)
  shapes = {
    "t5": ((B, t.t5_max_length, flux_cfg.context_in_dim), cache),
    "clip_pooled": ((B, flux_cfg.vec_in_dim), cache),
  }
  for name in reward.tokenizers:  # each reward's own ids
    length = reward.text_length or t.reward_max_length
    shapes[data.ids_field(name)] = ((B, length), jnp.int32)
  batch = {
    k: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
    )
    for k, (shape, dtype) in shapes.items()
  }
  return AbstractRun(
    config,
    mesh,
    flux_cfg,
    params,
    frozen,
    batch,
    step_fns,
    sigmas,
    geo,
    lora_paths,
  )


def random_arrays(tree, seed: int = 0, std: float = 0.02):
  """Device arrays of the shapes, dtypes and shardings in ``tree``.

  For timing and memory checks at full size without checkpoints
  (``bench/accelerator.py``): kernels and embeddings are normal with
  ``std``, norm scales ones, biases and LoRA ``B`` factors zeros (so the
  adapted model starts at its base, as ``add_lora`` does), integer leaves
  zeros. One jitted program creates the whole tree already placed.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(path) for path, _ in leaves]
  structs = [leaf for _, leaf in leaves]

  def make(key):
    out = []
    for i, (path, s) in enumerate(zip(paths, structs)):
      name = path.lower()
      dtype = jnp.dtype(s.dtype)
      if not jnp.issubdtype(dtype, jnp.floating):
        out.append(jnp.zeros(s.shape, dtype))
      elif "scale" in name:
        out.append(jnp.ones(s.shape, dtype))
      elif "bias" in name or "lora_b" in name:
        out.append(jnp.zeros(s.shape, dtype))
      else:
        k = jax.random.fold_in(key, i)
        x = std * jax.random.normal(k, s.shape, jnp.float32)
        out.append(x.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  shardings = jax.tree_util.tree_unflatten(
    treedef, [getattr(s, "sharding", None) for s in structs]
  )
  return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))
