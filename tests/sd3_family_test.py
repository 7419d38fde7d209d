"""The SD3 family: schedule, guided velocity and its gradient, FLOP model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leapalign_jax import defaults, families, flops
from leapalign_jax.errors import ConfigError
from leapalign_jax.families import sd3 as sd3_family
from leapalign_jax.models import sd3

TINY = dataclasses.replace(sd3.VARIANTS["tiny"], zero_init=False)


def sd3_config(**sd3_overrides):
  c = defaults.base()
  c.model.family = "sd3"
  c.sd3.update(
    {"variant": "tiny", "dtype": "float32", "remat": "none", **sd3_overrides}
  )
  c.text.update(clip_max_length=5, t5_max_length=3, cache_dtype="float32")
  return c


def test_registered_and_section():
  c = sd3_config()
  assert families.of(c) is sd3_family.FAMILY
  assert families.section(c).variant == "tiny"
  assert "sd3" in families.names()


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_schedule_is_diffusers_flow_match_euler_with_shift_3(steps):
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  ref.set_timesteps(steps)
  ours = sd3_family.schedule(sd3_config(), steps, seq_len=1024)
  assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
  np.testing.assert_array_equal(ours, ref.sigmas.numpy())
  # Static: the same grid at any resolution.
  np.testing.assert_array_equal(
    ours, sd3_family.schedule(sd3_config(), steps, seq_len=16)
  )


def _inputs(B=3, seed=0):
  geo = families.Geometry(16, 16, 8, 8, TINY.in_channels)
  L, S = geo.seq_len, 4
  k = jax.random.split(jax.random.key(seed), 6)
  cond = {
    "sd3_context": jax.random.normal(k[0], (B, S, TINY.context_in_dim)),
    "sd3_pooled": jax.random.normal(k[1], (B, TINY.pooled_dim)),
    "sd3_neg_context": jax.random.normal(k[2], (B, S, TINY.context_in_dim)),
    "sd3_neg_pooled": jax.random.normal(k[3], (B, TINY.pooled_dim)),
  }
  x = jax.random.normal(k[4], (B, L, TINY.in_features))
  t = jax.random.uniform(k[5], (B,))
  return geo, x, t, cond


def test_guided_velocity_is_cfg_of_separate_calls():
  model = sd3.SD3(TINY, rngs=nnx.Rngs(0))
  geo, x, t, cond = _inputs()
  g = sd3_family.guidance(TINY, 4.5)
  assert g == 4.5 and sd3_family.guidance(TINY, 1.0) is None
  guided = sd3_family.velocity(model, x, t, cond, geo, g)
  v_c = model(x, geo.tokens, cond["sd3_context"], cond["sd3_pooled"], t)
  v_u = model(x, geo.tokens, cond["sd3_neg_context"], cond["sd3_neg_pooled"], t)
  np.testing.assert_allclose(guided, v_u + 4.5 * (v_c - v_u), atol=2e-5)
  # No guidance: the conditional prediction alone.
  np.testing.assert_allclose(
    sd3_family.velocity(model, x, t, cond, geo, None), v_c, atol=1e-6
  )
  assert sd3_family.calls_per_velocity(g) == 2
  assert sd3_family.calls_per_velocity(None) == 1


def test_gradient_flows_through_both_branches():
  model = sd3.SD3(TINY, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(model, nnx.Param)
  geo, x, t, cond = _inputs(B=2, seed=1)
  w = jax.random.normal(jax.random.key(9), x.shape)
  g = 3.0

  def loss(p, fn):
    return jnp.sum(w * fn(nnx.merge(graphdef, p)))

  def branch(neg):
    pre = "sd3_neg_" if neg else "sd3_"
    return lambda m: m(
      x, geo.tokens, cond[pre + "context"], cond[pre + "pooled"], t
    )

  guided = jax.grad(loss)(
    params, lambda m: sd3_family.velocity(m, x, t, cond, geo, g)
  )
  grad_c = jax.grad(loss)(params, branch(False))
  grad_u = jax.grad(loss)(params, branch(True))
  for a, c, u in zip(
    jax.tree.leaves(guided), jax.tree.leaves(grad_c), jax.tree.leaves(grad_u)
  ):
    np.testing.assert_allclose(a, g * c + (1 - g) * u, rtol=1e-4, atol=1e-4)
  # The unconditional branch really contributes.
  norm_u = sum(float(jnp.sum(u**2)) for u in jax.tree.leaves(grad_u))
  assert norm_u > 0


def test_text_shapes_and_tokens():
  c = sd3_config()
  shapes = sd3_family.text_shapes(c, TINY, 6)
  assert set(shapes) == set(sd3_family.TEXT_FIELDS)
  assert shapes["sd3_context"][0] == (6, 5 + 3, TINY.context_in_dim)
  assert shapes["sd3_neg_pooled"][0] == (6, TINY.pooled_dim)
  assert sd3_family.text_tokens(c) == 8
  assert sd3_family.latent_channels(TINY) == TINY.in_channels


def test_unknown_variant_is_one_config_error():
  with pytest.raises(ConfigError, match="config.sd3.variant"):
    sd3_family.model_config(sd3_config(variant=""))


def test_flop_model_matches_xla_on_an_unscanned_model():
  """XLA counts every dot of an unrolled forward; ours must agree."""
  cfg = dataclasses.replace(
    sd3.VARIANTS["tiny"],
    num_heads=4,
    head_dim=64,
    context_in_dim=256,
    pooled_dim=128,
    depth=4,
    num_dual=2,
    scan_layers=False,
  )
  n_txt, h, w = 24, 8, 8
  model = nnx.eval_shape(lambda: sd3.SD3(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  args = (
    jax.ShapeDtypeStruct((1, h * w, cfg.in_features), jnp.float32),
    jax.ShapeDtypeStruct((1, n_txt, cfg.context_in_dim), jnp.float32),
    jax.ShapeDtypeStruct((1, cfg.pooled_dim), jnp.float32),
    jax.ShapeDtypeStruct((1,), jnp.float32),
  )

  def fwd(p, x, ctx, y, t):
    return nnx.merge(graphdef, p)(x, (h, w), ctx, y, t)

  cost = jax.jit(fwd).lower(params, *args).cost_analysis()
  xla = float(cost["flops"])
  ours = flops.sd3_parts(cfg, h * w, n_txt).total
  # XLA also counts element-wise work (norms, activations, softmax).
  assert 0.97 < ours / xla <= 1.0, (ours, xla)


def test_train_step_counts_two_passes_under_cfg():
  c = sd3_config()
  c.sampling.update(height=16, width=16)
  from leapalign_jax.models import autoencoder

  ae = autoencoder.VARIANTS["tiny"]
  c.sampling.guidance = 4.5
  guided = flops.train_step(c, sd3_family.FAMILY, TINY, ae, (8, 8))
  c.sampling.guidance = 1.0
  plain = flops.train_step(c, sd3_family.FAMILY, TINY, ae, (8, 8))
  assert guided.dit == pytest.approx(2 * plain.dit)
  assert guided.vae == plain.vae


def test_paper_config_builds_by_shape_with_the_published_size():
  """configs/leap_hpsv2_sd35m.py: SD3.5-M full fine-tune, 512², CFG."""
  from leapalign_jax import abstract_run, configs_io, sharding

  config = configs_io.load_config("configs/leap_hpsv2_sd35m.py")
  assert config.model.family == "sd3" and config.train.num_steps == 200
  assert (config.sampling.height, config.sampling.width) == (512, 512)
  run = abstract_run.build(config, sharding.make_mesh((1, -1, 1)))
  n = sum(x.size for x in jax.tree.leaves(run.params))
  assert n == 2_243_171_520  # diffusers' SD3Transformer2DModel count
  assert run.geometry.tokens == (32, 32) and run.geometry.channels == 16
  assert run.batch["sd3_context"].shape == (64, 77 + 256, 4096)
  assert run.batch["sd3_neg_pooled"].shape == (64, 2048)
  assert run.sigmas[0] == 1.0 and run.sigmas[-1] == 0.0
  step = flops.train_step(
    config, run.family, run.model_config, run.autoencoder_config, (64, 64)
  )
  # One pass: ~2 x 801 M block weights per image token (12 D² per block,
  # 4 D² more in the 13 dual ones) x 1024 + 2 x 679 M x 333 text tokens
  # + attention: ~2.44 TF. 64 images x (25 forwards + 2 backwards) x 2
  # CFG passes.
  one = flops.sd3_parts(run.model_config, 1024, 333).total
  assert 2.35e12 < one < 2.55e12
  assert step.dit > 64 * 2 * 25 * one


@pytest.mark.skipif(
  __import__("importlib").util.find_spec("libtpu") is None,
  reason="needs libtpu (the TPU compiler)",
)
def test_tiny_sd3_compiles_for_a_tpu_topology(tmp_path):
  import json

  from leapalign_jax import aot

  out = tmp_path / "report.json"
  code = aot.main(
    [
      "--config",
      "configs/tiny_sd3.py",
      "--topology",
      "v5e-4",
      "--json",
      str(out),
    ]
  )
  report = json.loads(out.read_text())
  assert code == 0 and report["fits"] and report["devices"] == 4
  assert report["flops_parts"]["dit"] > 0
