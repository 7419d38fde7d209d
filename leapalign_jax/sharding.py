"""The only module that names mesh axes: meshes, logical rules, placements.

Models annotate parameters with logical axis names (``embed``, ``mlp``,
``heads``, ...); ``config.mesh.rules`` maps them to the mesh axes ``data``,
``fsdp`` and ``tensor``. State is created already sharded (``eval_shape`` →
``jit`` with ``out_shardings``), and host batches become global arrays from
per-host slices.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_LOG = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (None = replicated). Biases, norm scales, conv
# kernels and the stacked-layers axis stay replicated: sharding them buys no
# memory and costs collectives.
DEFAULT_RULES = (
  ("activation_batch", BATCH_AXES),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  # adaLN modulation outputs stay off `tensor`: with both `mod` and `mlp` on
  # a tensor axis of 2, the partitioned step's forward differed from the
  # one-device step (reward -0.2547 vs -0.2598, tests/sharding_test.py
  # 2x2x2; XLA CPU, jax 0.10.2; not root-caused). Each alone matches. The
  # kernels are still FSDP-sharded on `embed`.
  ("mod", None),
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


def _granule_attr(devices: Sequence[Any]) -> str:
  """What groups devices into DCN granules: TPU slices, else processes."""
  d = devices[0]
  return (
    "slice_index"
    if getattr(d, "slice_index", None) is not None
    else "process_index"
  )


def num_slices(devices: Sequence[Any]) -> int:
  """Number of TPU slices the devices span (1 off TPU)."""
  return len({getattr(d, "slice_index", None) or 0 for d in devices})


def num_granules(devices: Sequence[Any]) -> int:
  """Number of TPU slices (or processes, off TPU) the devices span."""
  attr = _granule_attr(devices)
  return len({getattr(d, attr) for d in devices})


def device_grid(
  ici: tuple[int, ...], dcn: tuple[int, ...], devices: Sequence[Any]
) -> np.ndarray:
  """Devices laid out as ``ici * dcn`` following the physical topology.

  Each mesh axis has size ``ici[i] * dcn[i]``; along it, the DCN factor is
  outermost (slice by slice), so an axis whose DCN factor is 1 never
  crosses a slice (or, off TPU, a process): only the DCN factors pay the
  slow network.
  """
  devices = list(devices)
  from jax.experimental import mesh_utils

  if math.prod(dcn) > 1:
    return mesh_utils.create_hybrid_device_mesh(
      ici,
      dcn,
      devices,
      process_is_granule=_granule_attr(devices) == "process_index",
      allow_split_physical_axes=True,
    )
  try:
    return mesh_utils.create_device_mesh(
      ici, devices, allow_split_physical_axes=True
    )
  except (ValueError, NotImplementedError, AssertionError) as e:
    # A subset of a TPU slice (``mesh.num_devices``) may not form a torus;
    # a plain reshape is still a correct mesh, only a slower one.
    _LOG.warning("mesh %s: not topology-aware (%s); plain order", ici, e)
    return np.asarray(devices).reshape(ici)


def make_mesh(
  shape: Sequence[int],
  devices: Sequence[Any] | None = None,
  dcn_shape: Sequence[int] | None = None,
) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all).

  Args:
    shape: the per-slice (ICI) factors; one entry may be -1.
    devices: the devices (default ``jax.devices()``; compile-only topology
      devices for ``aot``).
    dcn_shape: factors across slices (DCN), default all 1. The mesh axis
      sizes are ``shape * dcn_shape``; a multi-slice mesh is built with
      ``mesh_utils.create_hybrid_device_mesh`` so that only the DCN factors
      cross slices.

  Axes are ``Auto``: XLA's sharding propagation fills in intermediate
  shardings from the parameter / batch placements and the constraints at
  block boundaries (``models.layers.constrain``).
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = tuple(int(d) for d in (dcn_shape or (1,) * len(MESH_AXES)))
  if len(dcn) != len(MESH_AXES) or min(dcn) < 1:
    raise ValueError(
      f"mesh dcn_shape {dcn} must have one positive entry per {MESH_AXES}"
    )
  n_dcn = math.prod(dcn)
  if len(devices) % n_dcn:
    raise ValueError(
      f"mesh dcn_shape {dcn} ({n_dcn} slices) does not divide the "
      f"{len(devices)} devices"
    )
  if n_dcn > 1 and num_granules(devices) != n_dcn:
    raise ValueError(
      f"mesh dcn_shape {dcn} asks for {n_dcn} slices but the devices span "
      f"{num_granules(devices)}; set mesh.dcn_shape to the number of slices"
    )
  ici = mesh_shape(shape, len(devices) // n_dcn)
  arr = device_grid(ici, dcn, devices)
  return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def mesh_from_config(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
  """The mesh described by ``config.mesh`` (shape, DCN shape, device count).

  ``devices`` defaults to ``jax.devices()``; ``aot`` passes the compile-only
  devices of a TPU topology.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = int(mesh_cfg.get("num_devices", 0) or 0)
  if n:
    if n > len(devices):
      raise ValueError(
        f"mesh.num_devices={n} but only {len(devices)} devices are visible"
      )
    devices = devices[:n]
  return make_mesh(mesh_cfg.shape, devices, mesh_cfg.get("dcn_shape", None))


def under_rules(fn: Callable, mesh: Mesh, rules) -> Callable:
  """``fn`` traced with ``mesh`` and the logical ``rules`` in context.

  Activates the activation constraints at block boundaries
  (``models.layers.constrain``) and lets kernels that need explicit
  partitioning (splash attention's ``shard_map``) see the mesh, whenever
  ``fn`` is traced: by ``jax.jit`` at the first call or by ``aot``'s
  ``lower``. Uses the abstract mesh, which is allowed inside ``jit``.
  """
  rules = rules_from_config(rules)

  def wrapped(*args, **kwargs):
    with (
      jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
      nnx.logical_axis_rules(rules),
    ):
      return fn(*args, **kwargs)

  return wrapped


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


def host_batch_blocks(mesh: Mesh, global_batch: int) -> dict[int, int]:
  """Which block of the global batch each process feeds: ``{process: block}``.

  The batch axis is split over (data, fsdp); the devices of one process
  address a set of rows (not necessarily contiguous: a topology-aware mesh
  interleaves hosts). Processes whose devices address the same rows (e.g. a
  tensor axis spanning hosts) get the same block and must read the same
  examples. A process's block is the examples ``put_batch`` places on its
  rows in order, so the global batch is a fixed permutation of the data
  stream; blocks are numbered by their first row.

  Raises:
    ValueError: when two processes' rows overlap without being equal (a
      non-uniform mesh); reorder ``mesh.shape``.
  """
  indices = batch_sharding(mesh, 1).devices_indices_map((global_batch,))
  rows: dict[int, set[int]] = {}
  for device, (sl,) in indices.items():
    rows.setdefault(device.process_index, set()).update(
      range(*sl.indices(global_batch))
    )
  distinct = sorted({tuple(sorted(r)) for r in rows.values()})
  seen: set[int] = set()
  for r in distinct:
    if seen & set(r) or len(r) != len(distinct[0]):
      raise ValueError(
        f"the mesh {dict(mesh.shape)} gives processes overlapping, unequal "
        f"sets of batch rows (e.g. {list(r)[:8]}); reorder mesh.shape"
      )
    seen |= set(r)
  block = {r: i for i, r in enumerate(distinct)}
  return {proc: block[tuple(sorted(r))] for proc, r in rows.items()}


def num_batch_blocks(mesh: Mesh, global_batch: int) -> int:
  """How many distinct per-host blocks the global batch is read in."""
  return len(set(host_batch_blocks(mesh, global_batch).values()))


def check_batch(global_batch: int, mesh: Mesh) -> None:
  """Fails unless the global batch splits evenly over the batch axes."""
  groups = batch_size_per_device_group(mesh)
  if global_batch % groups:
    raise ValueError(
      f"global batch {global_batch} is not divisible by the {groups} "
      f"data x fsdp device groups of the mesh {dict(mesh.shape)}; choose a "
      f"multiple of {groups}"
    )
  host_batch_blocks(mesh, global_batch)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from this host's block of the batch (leading axis).

  ``batch`` holds the rows of ``host_batch_blocks(mesh, B)[process]``.
  """
  blocks = num_batch_blocks(mesh, batch_size_per_device_group(mesh))
  return {
    k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, v.ndim), v, (v.shape[0] * blocks, *v.shape[1:])
    )
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
