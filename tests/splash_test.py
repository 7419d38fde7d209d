"""Splash attention: tile padding, masks, parity with XLA (Pallas interpret).

The Pallas TPU kernel runs on the CPU in interpret mode (slow, so shapes stay
small); the real kernel is compiled by the TPU compiler for compile-only
devices (libtpu, no TPU) and runs in the ``tpu`` test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_test import qkv, tiny_flux_outputs

from leapalign_jax import sharding
from leapalign_jax.models import attention, splash


def test_padding_to_tiles():
  assert splash.padded_length(2537) == 2560  # 720², T5-512: 43 x 59
  assert splash.padded_length(4608) == 4608  # 1024²: already a multiple
  assert splash.padded_length(257) == 384  # ViT-H-14 at 224
  assert splash.padded_length(40) == 128
  assert splash.tile_for(2537) == 512 and splash.tile_for(257) == 128


def test_mask_covers_only_the_padding():
  m = np.asarray(splash.padding_mask(5, 8))
  assert m[:5, :5].all()  # every real token sees every real token
  assert not m[:5, 5:].any() and not m[5:, :5].any()
  assert m[5:, 5:].all()  # padded rows see something: no empty softmax
  np.testing.assert_array_equal(
    splash.segment_ids(5, 8), [1, 1, 1, 1, 1, 0, 0, 0]
  )


def test_matches_xla_forward_and_grad():
  q, k, v = qkv((2, 200, 2, 64))  # 200 tokens -> padded to 256

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  xla = jax.jit(
    jax.value_and_grad(
      lambda *a: loss(attention.xla_attention, *a), argnums=(0, 1, 2)
    )
  )
  spl = jax.jit(
    jax.value_and_grad(
      lambda *a: loss(splash.splash_attention, *a), argnums=(0, 1, 2)
    )
  )
  (lx, gx), (ls, gs) = xla(q, k, v), spl(q, k, v)
  np.testing.assert_allclose(ls, lx, rtol=1e-5)
  for a, b in zip(gs, gx):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_shard_map_over_batch_and_heads():
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  q, k, v = qkv((4, 40, 2, 64), seed=1)
  ref = attention.xla_attention(q, k, v)
  fn = jax.jit(sharding.under_rules(splash.splash_attention, mesh, rules))
  s = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
  )
  out = fn(*(jax.device_put(x, s) for x in (q, k, v)))
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
  lowered = fn.lower(q, k, v).as_text()
  assert "shard_map" in lowered or "sdy.manual_computation" in lowered


def test_shard_map_rejects_indivisible_heads():
  mesh = sharding.make_mesh((1, 2, 4))
  fn = sharding.under_rules(
    splash.splash_attention, mesh, sharding.DEFAULT_RULES
  )
  with pytest.raises(ValueError, match="heads 2 is not divisible by the 4"):
    jax.jit(fn).lower(*qkv((2, 16, 2, 64)))


def test_real_kernel_compiles_for_tpu_at_flux_length():
  """The Mosaic kernel (not the interpreter) through the TPU compiler.

  Compile-only v5e devices (libtpu, no TPU): 720² with T5-512 (L = 2537,
  padded to 2560), bf16, batch on (data, fsdp) and heads on tensor; forward
  and all three gradients.
  """
  pytest.importorskip("libtpu")
  from leapalign_jax import aot

  mesh = sharding.make_mesh((1, 2, 2), aot.topology_devices("v5e-4"))
  spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
  x = jax.ShapeDtypeStruct(
    (2, 2537, 4, 128),
    jnp.bfloat16,
    sharding=jax.sharding.NamedSharding(mesh, spec),
  )

  def loss(q, k, v):
    return splash.splash_attention(q, k, v).astype(jnp.float32).sum()

  grads = jax.grad(loss, argnums=(0, 1, 2))
  fn = jax.jit(sharding.under_rules(grads, mesh, sharding.DEFAULT_RULES))
  # conftest asks for fp32 matmuls; Mosaic refuses them on bf16 operands.
  with pytest.raises(ValueError, match="default matmul precision"):
    fn.lower(x, x, x)
  with jax.default_matmul_precision("default"):
    compiled = fn.lower(x, x, x).compile()
  assert "tpu_custom_call" in compiled.as_text()  # the Pallas kernel
  assert [g.shape for g in compiled.out_info] == [x.shape] * 3


@pytest.mark.slow
def test_flux_switch_splash_equals_xla():
  out = tiny_flux_outputs(("xla", "splash"))
  np.testing.assert_allclose(out["splash"], out["xla"], atol=5e-5, rtol=1e-4)


@pytest.mark.tpu
def test_kernel_on_tpu_bf16_at_flux_length():
  """The real kernel at 720² with T5-512 (L = 2537), bf16, vs XLA."""
  q, k, v = qkv((2, 2537, 24, 128), jnp.bfloat16, seed=3)
  ref = jax.jit(attention.xla_attention)(q, k, v).astype(jnp.float32)
  out = jax.jit(splash.splash_attention)(q, k, v).astype(jnp.float32)
  np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)
  g = jax.jit(jax.grad(lambda q: splash.splash_attention(q, k, v).sum()))(q)
  assert bool(jnp.isfinite(g.astype(jnp.float32)).all())
