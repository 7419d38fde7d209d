"""A run's training-step inputs as shapes and shardings, without weights.

``build(config, mesh)`` makes the flow model of the run's family
(``families.of(config)``, e.g. ``config.flux.variant``), the autoencoder of
``config.vae.variant`` and
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

from leapalign_jax import components, data, families, sharding
from leapalign_jax import step as step_lib


@dataclasses.dataclass
class AbstractRun:
  """A run's step inputs as shapes and shardings only (``abstract``)."""

  config: ml_collections.ConfigDict
  mesh: Any
  family: families.Family
  model_config: Any
  autoencoder_config: Any
  params: Any  # trainable params: ShapeDtypeStructs with shardings
  frozen: dict[str, Any]  # {model, vae, reward}: the same
  batch: dict[str, jax.ShapeDtypeStruct]  # the global batch, batch-sharded
  step_fns: step_lib.StepFns
  sigmas: np.ndarray
  geometry: families.Geometry
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

  Builds the same graph, parameter shardings and step functions as
  ``components.load`` with ``nnx.eval_shape`` (nothing is read or
  allocated), for compiling the training step ahead of time
  (``leapalign_jax.aot``).
  """
  from leapalign_jax import rewards
  from leapalign_jax.models import autoencoder
  from leapalign_jax.models.autoencoder import decode_fn

  family, rules = families.of(config), config.mesh.rules
  model_cfg = family.model_config(config)
  paths: list[str] = []  # strings cannot leave eval_shape's trace

  def build_model():
    model = family.build(model_cfg, nnx.Rngs(0))
    paths.extend(components.add_lora(config, model))
    return model

  model = nnx.eval_shape(build_model)
  lora_paths = tuple(paths)
  if lora_paths:
    graphdef, params, frozen_model = nnx.split(model, nnx.LoRAParam, nnx.Param)
    frozen_model = _with_shardings(
      frozen_model, sharding.logical_to_mesh(frozen_model, mesh, rules)
    )
  else:
    graphdef, params = nnx.split(model, nnx.Param)
    frozen_model = None
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
  frozen = {"model": frozen_model}
  for name, tree in (("vae", vae_params), ("reward", reward.params)):
    if config.mesh.shard_frozen:
      shard = sharding.logical_to_mesh(tree, mesh, rules)
    else:
      shard = jax.tree.map(lambda _: sharding.replicated(mesh), tree)
    frozen[name] = _with_shardings(tree, shard)
  geo = components.geometry(config, family, model_cfg, ae_cfg)
  step_fns, sigmas = components.make_step_fns(
    config, family, graphdef, model_cfg, geo, decode, reward
  )
  B, t = config.data.global_batch, config.text
  shapes = dict(family.text_shapes(config, model_cfg, B))
  for name in reward.tokenizers:  # each reward's own ids
    length = reward.lengths.get(name) or t.reward_max_length
    shapes[data.ids_field(name)] = ((B, length), jnp.int32)
  batch = {
    k: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
    )
    for k, (shape, dtype) in shapes.items()
  }
  return AbstractRun(
    config=config,
    mesh=mesh,
    family=family,
    model_config=model_cfg,
    autoencoder_config=ae_cfg,
    params=params,
    frozen=frozen,
    batch=batch,
    step_fns=step_fns,
    sigmas=sigmas,
    geometry=geo,
    lora_paths=lora_paths,
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
