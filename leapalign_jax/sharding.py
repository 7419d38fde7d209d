"""The only module that names mesh axes: meshes, logical rules, placements.

Models annotate parameters with logical axis names (``embed``, ``mlp``,
``heads``, ...); ``config.mesh.rules`` maps them to the mesh axes ``data``,
``fsdp`` and ``tensor``. State is created already sharded (``eval_shape`` →
``jit`` with ``out_shardings``), and host batches become global arrays from
per-host slices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (None = replicated). Biases, norm scales, conv
# kernels and the stacked-layers axis stay replicated: sharding them buys no
# memory and costs collectives.
DEFAULT_RULES = (
  ("activation_batch", BATCH_AXES),
  ("activation_length", None),
  ("activation_embed", None),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("mod", "tensor"),
  ("vocab", "tensor"),
  ("kv", None),
  ("qkv", None),
  ("layers", None),
  ("bias", None),
  ("norm", None),
  ("conv_in", None),
  ("conv_out", None),
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one ``-1`` entry so the product equals ``num_devices``."""
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have one entry per {MESH_AXES}")
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  known = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % known:
      raise ValueError(
        f"mesh shape {shape} does not divide the {num_devices} devices"
      )
    shape[free[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
      f"mesh shape {tuple(shape)} ({MESH_AXES}) uses {math.prod(shape)} "
      f"devices but {num_devices} are available; use -1 for one axis to fill"
    )
  return tuple(shape)


def make_mesh(
  shape: Sequence[int], devices: Sequence[Any] | None = None
) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all).

  Axes are ``Auto``: XLA's sharding propagation fills in intermediate
  shardings from the parameter / batch placements and the constraints at
  block boundaries (``models.layers.constrain``).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(shape, len(devices))
  arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def mesh_from_config(mesh_cfg) -> Mesh:
  """The mesh described by ``config.mesh`` (shape, optional device count)."""
  devices = jax.devices()
  n = int(mesh_cfg.get("num_devices", 0) or 0)
  if n:
    if n > len(devices):
      raise ValueError(
        f"mesh.num_devices={n} but only {len(devices)} devices are visible"
      )
    devices = devices[:n]
  return make_mesh(mesh_cfg.shape, devices)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Normalises config rules (lists from ConfigDicts) to tuples."""
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def logical_to_mesh(tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for an ``nnx.State`` (or module) of annotated Variables."""
  with nnx.logical_axis_rules(rules_from_config(rules)):
    specs = nnx.get_partition_spec(tree)
  return jax.tree.map(
    lambda p: NamedSharding(mesh, p if p is not None else PartitionSpec()),
    specs,
    is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None,
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_size_per_device_group(mesh: Mesh) -> int:
  """Number of (data, fsdp) device groups the batch is split over."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch: int, mesh: Mesh) -> None:
  """Fails unless the global batch splits evenly over the batch axes."""
  groups = batch_size_per_device_group(mesh)
  if global_batch % groups or global_batch % jax.process_count():
    raise ValueError(
      f"global batch {global_batch} is not divisible by the {groups} "
      f"data x fsdp device groups of the mesh {dict(mesh.shape)} (and the "
      f"{jax.process_count()} hosts); choose a multiple of {groups}"
    )


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from this host's slice of the batch (leading axis)."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    for k, v in batch.items()
  }


def create_sharded(init: Callable[[], Any], shardings: Any) -> Any:
  """Runs ``init`` under jit with ``out_shardings``: never a full host copy."""
  return jax.jit(init, out_shardings=shardings)()


def state_shardings(tx, abstract_state: Any, param_shardings: Any, mesh: Mesh):
  """Shardings for ``{params, ema, opt_state, step, rng}``.

  EMA and every optimizer leaf that mirrors a parameter (Adam's moments)
  take that parameter's sharding; counters and keys are replicated.
  """
  import optax

  rep = replicated(mesh)
  opt = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abstract_state["opt_state"],
    param_shardings,
    transform_non_params=lambda _: rep,
  )
  return {
    "params": param_shardings,
    "ema": param_shardings,
    "opt_state": opt,
    "step": rep,
    "rng": rep,
  }


def put_global(
  batch: dict[str, np.ndarray], mesh: Mesh
) -> dict[str, jax.Array]:
  """Global arrays from a batch every host holds in full.

  Batch-sharded when the leading axis divides the data x fsdp groups,
  replicated otherwise (evaluation batches of any size).
  """
  groups = batch_size_per_device_group(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    s = (
      batch_sharding(mesh, v.ndim)
      if v.shape[0] % groups == 0
      else replicated(mesh)
    )
    out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
  return out


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one numpy array on every host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
