"""Meshes, rules and placements; the sharded step equals the single-device one.

Runs on the 8 fake CPU devices of conftest.py with the tiny random world.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from leapalign_jax import (
  checkpoint,
  components,
  configs_io,
  methods,
  sharding,
  worlds,
)
from leapalign_jax import step as step_lib
from leapalign_jax.models import flux

TINY = "configs/tiny.py"
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  """Equality of programs, not XLA's optimiser, is under test here."""
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


def tiny(world_dir, shape, num_devices=0):
  return configs_io.load_config(
    TINY,
    [
      f"world_options.dir={world_dir!r}",
      f"mesh.shape={tuple(shape)!r}",
      f"mesh.num_devices={num_devices}",
    ],
  )


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  world = str(tmp_path_factory.mktemp("world"))
  worlds.prepare(tiny(world, (1, -1, 1)), world)
  return world


def setup(world_dir, shape, num_devices=0):
  """Components, optimizer, fresh state, the jitted step and its inputs."""
  config = tiny(world_dir, shape, num_devices)
  config = worlds.prepare(config, world_dir)
  mesh = sharding.mesh_from_config(config.mesh)
  comps = components.load(config, mesh)
  tx = step_lib.make_optimizer(config.optim)
  state = comps.init_state(tx)
  step = step_lib.jit_train_step(
    config,
    comps.step_fns,
    tx,
    comps.sigmas,
    jax.tree.map(lambda x: x.sharding, state),
    jax.tree.map(lambda x: x.sharding, comps.frozen),
    mesh,
  )
  batch = sharding.put_batch(
    comps.batch_to_arrays(comps.train_batches()[0]), mesh
  )
  method = methods.get(config.method)
  choice = step_lib.host_choice(config, method, 0, comps.sigmas)
  choice = {k: np.int32(v) for k, v in choice.items()}
  return comps, tx, state, step, batch, choice


@pytest.fixture(scope="module")
def reference(world_dir):
  """One step on a single device: (new state, metrics) on the host."""
  comps, _, state, step, batch, choice = setup(world_dir, (1, 1, 1), 1)
  new_state, metrics = step(state, comps.frozen, batch, choice)
  return jax.device_get(new_state), jax.device_get(metrics)


def _spec(x) -> PartitionSpec:
  return x.sharding.spec


def test_mesh_shape_and_errors():
  mesh = sharding.make_mesh((2, -1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="uses 4 devices"):
    sharding.make_mesh((2, 2, 1))
  # One process and no TPU slices: there is nothing to span over DCN.
  with pytest.raises(ValueError, match="span 1"):
    sharding.make_mesh((1, -1, 1), dcn_shape=(2, 1, 1))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """Just the attributes mesh construction reads (no libtpu needed)."""

  id: int
  process_index: int
  slice_index: int | None = None
  platform: str = "cpu"
  device_kind: str = "fake"


def fake_devices(granules, per_granule, slices=True):
  return [
    FakeDevice(
      g * per_granule + i,
      process_index=g,
      slice_index=g if slices else None,
    )
    for g in range(granules)
    for i in range(per_granule)
  ]


@pytest.mark.parametrize("slices", [True, False], ids=["slices", "processes"])
def test_device_grid_factors_ici_inside_dcn_outside(slices):
  devices = fake_devices(4, 4, slices)
  granule = (lambda d: d.slice_index) if slices else (lambda d: d.process_index)
  assert sharding.num_granules(devices) == 4
  assert sharding.num_slices(devices) == (4 if slices else 1)
  # data = 2 (DCN) x 1, fsdp = 2 (DCN) x 2 (ICI), tensor = 1 x 2 (ICI).
  grid = sharding.device_grid((1, 2, 2), (2, 2, 1), devices)
  assert grid.shape == (2, 4, 2)
  g = np.vectorize(granule)(grid)
  # Tensor pairs and fsdp ICI pairs stay inside one granule ...
  assert (g[:, :, 0] == g[:, :, 1]).all()
  assert (g[:, 0::2] == g[:, 1::2]).all()
  # ... and the DCN factors walk across all four granules.
  assert sorted(set(g.flat)) == [0, 1, 2, 3]
  assert g[0, 0, 0] != g[1, 0, 0] and g[0, 0, 0] != g[0, 2, 0]
  assert sorted(d.id for d in grid.flat) == list(range(16))


def test_device_grid_rejects_a_wrong_slice_count():
  with pytest.raises(ValueError, match="must equal the product"):
    sharding.device_grid((1, 4, 1), (3, 1, 1), fake_devices(2, 4))


def test_multislice_mesh_keeps_ici_axes_inside_slices():
  aot = pytest.importorskip("leapalign_jax.aot")
  pytest.importorskip("libtpu")
  devices = aot.topology_devices("v5e:2x2", num_slices=2)
  mesh = sharding.make_mesh((1, 4, 1), devices, dcn_shape=(2, 1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  for row in mesh.devices.reshape(2, -1):  # one data index = one slice
    assert len({d.slice_index for d in row}) == 1
  assert sharding.num_slices(list(mesh.devices.flat)) == 2


def test_host_batch_blocks_follow_the_mesh():
  aot = pytest.importorskip("leapalign_jax.aot")
  pytest.importorskip("libtpu")
  devices = aot.topology_devices("v5p-64")  # 32 chips on 8 hosts
  fsdp = sharding.make_mesh((1, -1, 1), devices)
  blocks = sharding.host_batch_blocks(fsdp, 64)
  assert sorted(blocks.values()) == list(range(8))
  # tensor=8 spans two hosts: each pair of hosts reads the same block.
  tp = sharding.make_mesh((1, 4, 8), devices)
  blocks = sharding.host_batch_blocks(tp, 64)
  assert sorted(blocks.values()) == [0, 0, 1, 1, 2, 2, 3, 3]
  assert sharding.num_batch_blocks(tp, 64) == 4


def test_full_size_params_all_have_logical_names():
  """Every Flux-dev parameter is annotated, one name per axis."""
  model = nnx.eval_shape(
    lambda: flux.Flux(flux.VARIANTS["dev"], rngs=nnx.Rngs(0))
  )
  state = nnx.state(model, nnx.Param)
  n = 0
  for path, var in jax.tree.leaves_with_path(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  ):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, path
    n += 1
  assert n > 50


def test_every_leaf_sharded_small_params_replicated(world_dir):
  comps, tx, state, *_ = setup(world_dir, (2, 2, 2))
  leaves = jax.tree.leaves_with_path(state)
  assert leaves
  for path, x in leaves:
    assert isinstance(x.sharding, jax.sharding.NamedSharding), path
    assert len(_spec(x)) <= x.ndim, path
  sharded = 0
  for path, x in jax.tree.leaves_with_path(state["params"]):
    name = jax.tree_util.keystr(path)
    axes = {
      a for s in _spec(x) if s for a in (s if isinstance(s, tuple) else (s,))
    }
    if name.endswith("['bias']") or "norm" in name:
      # Biases may follow a tensor-parallel output; never FSDP / data.
      assert not axes & {"data", "fsdp"}, name
    if "norm" in name:
      assert not axes, name
    sharded += bool(axes)
  assert sharded > 10
  # Adam's moments follow the params.
  mu = state["opt_state"][1][0].mu
  for p, m in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(mu)):
    assert p.sharding == m.sharding
  # Frozen models: replicated unless mesh.shard_frozen.
  for x in jax.tree.leaves(comps.frozen["vae"]) + jax.tree.leaves(
    comps.frozen["reward"]
  ):
    assert x.sharding.is_fully_replicated


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_matches_single_device(world_dir, reference, shape):
  comps, _, state, step, batch, choice = setup(world_dir, shape)
  assert dict(comps.mesh.shape) == dict(zip(sharding.MESH_AXES, shape))
  new_state, metrics = step(state, comps.frozen, batch, choice)
  ref_state, ref_metrics = reference
  for k in ("train/loss", "train/reward", "train/grad_norm", "leap/w_mean"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=2e-5, err_msg=k)
  got = jax.device_get(new_state)
  # The gradient itself (Adam's first moment after one step is 0.1 x the
  # clipped gradient) must agree to fp32 summation-order noise.
  mu, ref_mu = (s["opt_state"][1][0].mu for s in (got, ref_state))
  for (path, a), b in zip(
    jax.tree.leaves_with_path(mu), jax.tree.leaves(ref_mu)
  ):
    atol = 1e-5 * float(np.abs(b).max()) + 1e-12
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=str(path))
  # Adam's first update is lr * g / (|g| + eps): entries whose gradient is
  # near eps (1e-8) move by up to lr on rounding noise alone. Elsewhere the
  # parameters must agree to 1% of the learning rate.
  lr = comps.config.optim.lr
  for (path, a), b, m in zip(
    jax.tree.leaves_with_path(got["params"]),
    jax.tree.leaves(ref_state["params"]),
    jax.tree.leaves(ref_mu),
  ):
    clear = np.abs(m) > 1e-7  # |g| > 1e-6 = 100 eps (mu = 0.1 g)
    assert clear.mean() > 0.5, path
    np.testing.assert_allclose(
      a[clear], b[clear], rtol=0, atol=1e-2 * lr, err_msg=str(path)
    )
    np.testing.assert_allclose(a, b, rtol=0, atol=2.1 * lr, err_msg=str(path))
  # The step keeps every leaf where the in_shardings put it.
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    assert a.sharding == b.sharding


def test_checkpoint_restores_onto_another_mesh(world_dir, tmp_path):
  comps_a, tx, state_a, *_ = setup(world_dir, (2, 4, 1))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, state_a, {"step": 1})
  comps_b, _, state_b, *_ = setup(world_dir, (2, 2, 2))
  restored, meta = ckpt.restore(1, comps_b.abstract_state(tx))
  ckpt.close()
  assert meta["step"] == 1
  for a, r, b in zip(
    jax.tree.leaves(state_a),
    jax.tree.leaves(restored),
    jax.tree.leaves(state_b),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
    assert r.sharding == b.sharding
  assert os.path.isdir(tmp_path / "ckpt" / "1")
