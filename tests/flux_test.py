"""Flux model contracts that need no torch: shapes, dtypes, remat, sharding names."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leapalign_jax.models import flux
from leapalign_jax.models.flux_layers import apply_rope, timestep_embedding

TINY = dataclasses.replace(
  flux.VARIANTS["tiny"],
  hidden_size=64,
  num_heads=2,
  axes_dim=(8, 12, 12),
  depth=2,
  depth_single_blocks=2,
  zero_init=False,
)


def inputs(B=2, h=2, w=3, S=5, cfg=TINY):
  k = jax.random.split(jax.random.key(0), 4)
  L = h * w
  ids = jnp.stack(
    [jnp.zeros(L), jnp.repeat(jnp.arange(h), w), jnp.tile(jnp.arange(w), h)], -1
  )
  return dict(
    img=jax.random.normal(k[0], (B, L, cfg.in_channels)),
    img_ids=jnp.broadcast_to(ids, (B, L, 3)),
    txt=jax.random.normal(k[1], (B, S, cfg.context_in_dim)),
    txt_ids=jnp.zeros((B, S, 3)),
    timesteps=jnp.array([0.7, 0.1][:B]),
    y=jax.random.normal(k[2], (B, cfg.vec_in_dim)),
    guidance=jnp.full((B,), 3.5),
  )


def forward(cfg, x, seed=0):
  model = flux.Flux(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def f(params, x):
    return nnx.merge(graphdef, params)(**x)

  return f(params, x), (graphdef, params)


def test_output_shape_and_dtype():
  out, _ = forward(TINY, inputs())
  assert out.shape == (2, 6, 64) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


@pytest.fixture
def fast_compiles():
  """Remat is under test, not XLA's optimiser: compile 2x faster."""
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


def test_remat_policies_agree_in_value_and_gradient(fast_compiles):
  x = inputs()
  results = {}
  for policy in ("none", "full", "dots", "names"):
    cfg = dataclasses.replace(
      TINY, remat=policy, depth=1, depth_single_blocks=1
    )
    model = flux.Flux(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, graphdef=graphdef):
      return jnp.mean(nnx.merge(graphdef, params)(**x) ** 2)

    results[policy] = jax.jit(jax.value_and_grad(loss))(params)
  ref_v, ref_g = results["none"]
  for policy, (v, g) in results.items():
    np.testing.assert_allclose(v, ref_v, rtol=1e-6, err_msg=policy)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy)


def test_bf16_compute_keeps_fp32_params_and_output():
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  out32, _ = forward(TINY, inputs())
  out16, (_, params) = forward(cfg, inputs())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert out16.dtype == jnp.float32
  rel = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
  assert 0 < rel < 5e-2


def test_every_param_has_logical_names_and_stacked_axis():
  model = nnx.eval_shape(
    lambda: flux.Flux(flux.VARIANTS["dev"], rngs=nnx.Rngs(0))
  )
  state = nnx.state(model, nnx.Param)
  specs = nnx.get_partition_spec(state)
  flat_specs = dict(nnx.to_flat_state(specs))
  for path, var in nnx.to_flat_state(state):
    spec = flat_specs[path].get_value()
    assert len(spec) == var.ndim, path
    if path[0] in ("double_blocks", "single_blocks"):
      assert spec[0] == "layers", path
  qkv = flat_specs[("double_blocks", "img_attn", "qkv", "kernel")].get_value()
  assert tuple(qkv) == ("layers", "embed", "qkv", "heads", "kv")


def test_guidance_changes_output_and_schnell_ignores_it():
  x = inputs()
  out_a, _ = forward(TINY, x)
  out_b, _ = forward(TINY, {**x, "guidance": jnp.full((2,), 1.0)})
  assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-4
  schnell = dataclasses.replace(TINY, guidance_embed=False)
  out_c, _ = forward(schnell, {**x, "guidance": None})
  assert out_c.shape == out_a.shape


def test_timestep_embedding_cos_first_and_scaled():
  emb = timestep_embedding(jnp.array([0.0, 0.001]))
  assert emb.shape == (2, 256)
  np.testing.assert_allclose(emb[0, :128], 1.0)  # cos(0)
  np.testing.assert_allclose(emb[0, 128:], 0.0)
  # t = 0.001 -> 1000 t = 1: the first frequency is exactly 1.
  np.testing.assert_allclose(emb[1, 0], np.cos(1.0), rtol=1e-6)
  np.testing.assert_allclose(emb[1, 128], np.sin(1.0), rtol=1e-6)


def test_rope_rotates_interleaved_pairs():
  x = jnp.arange(8.0).reshape(1, 1, 1, 8)
  theta = jnp.array([[[0.5, 1.0, 0.0, 2.0]]])
  out = apply_rope(x, (jnp.cos(theta), jnp.sin(theta)))
  x = np.arange(8.0)
  for m in range(4):
    c, s = np.cos(theta[0, 0, m]), np.sin(theta[0, 0, m])
    want = (c * x[2 * m] - s * x[2 * m + 1], s * x[2 * m] + c * x[2 * m + 1])
    np.testing.assert_allclose(out[0, 0, 0, 2 * m : 2 * m + 2], want, rtol=1e-6)


def test_invalid_configs_fail_clearly():
  with pytest.raises(ValueError, match="axes_dim"):
    dataclasses.replace(TINY, axes_dim=(8, 8, 8))
  with pytest.raises(ValueError, match="divisible"):
    dataclasses.replace(TINY, num_heads=3)
  with pytest.raises(ValueError, match="remat"):
    forward(dataclasses.replace(TINY, remat="some"), inputs())
