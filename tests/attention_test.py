"""Attention switch: padded cuDNN path, ``auto`` resolution, GPU parity.

The cuDNN kernel only runs on a GPU, but the code path it takes (pad to the
tile, pass the real length as query / key-value sequence lengths, slice) is
the same for ``jax.nn.dot_product_attention``'s XLA implementation: run with
``implementation="xla"`` on the CPU it must equal unpadded attention in
value and in gradient at odd lengths such as the DiT's 2537 tokens.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leapalign_jax.models import attention, clip, flux


def qkv(shape, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, shape, dtype) for k in keys]


def causal_reference(q, k, v):
  return clip.causal_attention(q, k, v, impl="xla")


def value_and_grads(fn, q, k, v):
  # A nonlinear read-out so every output element has its own cotangent.
  def loss(q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_padded_lengths():
  assert attention.padded_length(2537) == 2560  # 720², T5-512
  assert attention.padded_length(1536) == 1536  # 512²: no padding
  assert attention.padded_length(4608) == 4608  # 1024²
  assert attention.padded_length(257) == 320  # ViT-H-14 at 224
  assert attention.padded_length(77) == 128  # CLIP text


@pytest.mark.parametrize(
  "length, causal", [(37, False), (257, False), (77, True), (64, False)]
)
def test_padded_path_equals_unpadded_value_and_grad(length, causal):
  q, k, v = qkv((2, length, 3, 16), seed=length)
  ref_fn = causal_reference if causal else attention.xla_attention

  def padded(q, k, v):
    return attention.padded_attention(
      q, k, v, implementation="xla", is_causal=causal
    )

  (l_ref, g_ref), (l_pad, g_pad) = (
    value_and_grads(ref_fn, q, k, v),
    value_and_grads(padded, q, k, v),
  )
  np.testing.assert_allclose(l_pad, l_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(g_pad, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_padded_path_at_the_dit_length():
  """2537 tokens (720² with T5-512), the length cuDNN refused in training."""
  q, k, v = qkv((1, 2537, 1, 32), seed=7)
  (l_ref, g_ref), (l_pad, g_pad) = (
    value_and_grads(attention.xla_attention, q, k, v),
    value_and_grads(
      lambda *a: attention.padded_attention(*a, implementation="xla"), q, k, v
    ),
  )
  np.testing.assert_allclose(l_pad, l_ref, rtol=1e-5)
  for a, b in zip(g_pad, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cudnn_path_pads_to_an_even_tile(monkeypatch):
  """What the cuDNN kernel is handed: a tile-multiple length plus lengths."""
  calls = []
  real = jax.nn.dot_product_attention

  def spy(q, k, v, **kw):
    calls.append((q.shape, dict(kw)))
    # Run the same call on the CPU.
    return real(q, k, v, **{**kw, "implementation": "xla"})

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  q, k, v = qkv((2, 41, 2, 8))
  out = attention.attention(q, k, v, impl="cudnn")
  ((shape, kw),) = calls
  assert shape == (2, 64, 2, 8) and kw["implementation"] == "cudnn"
  np.testing.assert_array_equal(kw["query_seq_lengths"], [41, 41])
  np.testing.assert_array_equal(kw["key_value_seq_lengths"], [41, 41])
  np.testing.assert_allclose(
    out, attention.xla_attention(q, k, v), rtol=1e-5, atol=1e-6
  )
  calls.clear()
  clip.causal_attention(q, k, v, impl="cudnn")
  assert calls[0][1]["is_causal"] and calls[0][0][1] == 64


def test_auto_resolution(monkeypatch):
  assert attention.resolve("auto", jnp.bfloat16) == "xla"  # on the CPU
  assert attention.resolve("cudnn", jnp.float32) == "cudnn"  # explicit wins
  for platform, half, full in (
    ("gpu", "cudnn", "xla"),
    ("tpu", "splash", "xla"),
    ("cpu", "xla", "xla"),
  ):
    monkeypatch.setattr(attention, "target_platform", lambda p=platform: p)
    assert attention.resolve("auto", jnp.bfloat16) == half
    assert attention.resolve("auto", jnp.float16) == half
    assert attention.resolve("auto", jnp.float32) == full
  with pytest.raises(ValueError, match="unknown attention"):
    attention.resolve("flash", jnp.bfloat16)


def tiny_flux_outputs(impls) -> dict:
  """The tiny Flux's output per attention ``impl``: same weights, inputs."""
  cfg = dataclasses.replace(flux.VARIANTS["tiny"], zero_init=False)
  B, n_img, n_txt = 1, 16, 7
  keys = jax.random.split(jax.random.key(2), 3)
  args = dict(
    img=jax.random.normal(keys[0], (B, n_img, cfg.in_channels)),
    img_ids=jnp.zeros((B, n_img, 3)).at[..., 1].set(jnp.arange(n_img) // 4),
    txt=jax.random.normal(keys[1], (B, n_txt, cfg.context_in_dim)),
    txt_ids=jnp.zeros((B, n_txt, 3)),
    timesteps=jnp.full((B,), 0.7),
    y=jax.random.normal(keys[2], (B, cfg.vec_in_dim)),
    guidance=jnp.full((B,), 3.5),
  )
  out = {}
  for impl in impls:
    c = dataclasses.replace(cfg, attention=impl)
    graphdef, state = nnx.split(flux.Flux(c, rngs=nnx.Rngs(0)))
    out[impl] = jax.jit(lambda s, a, g=graphdef: nnx.merge(g, s)(**a))(
      state, args
    )
  return out


def test_flux_auto_equals_xla_on_cpu():
  out = tiny_flux_outputs(("xla", "auto"))
  np.testing.assert_array_equal(out["auto"], out["xla"])


@pytest.mark.gpu
@pytest.mark.parametrize(
  "shape, causal",
  [
    ((2, 2537, 24, 128), False),  # Flux at 720² with T5-512
    ((2, 257, 16, 80), False),  # HPSv2.1 ViT-H-14 vision tower
    ((2, 77, 16, 64), True),  # CLIP-H text tower
  ],
)
def test_cudnn_matches_xla_in_training_at_odd_lengths(shape, causal):
  def ref(q, k, v):
    if causal:
      return causal_reference(q, k, v)
    return attention.xla_attention(q, k, v)

  def fast(q, k, v):
    if causal:
      return clip.causal_attention(q, k, v, impl="cudnn")
    return attention.cudnn_attention(q, k, v)

  def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) / np.linalg.norm(b)

  with jax.default_matmul_precision("default"):
    q, k, v = qkv(shape, jnp.bfloat16, seed=3)
    w = jax.random.normal(jax.random.key(4), shape, jnp.float32)
    outs, grads = [], []
    for fn in (ref, fast):
      outs.append(jax.jit(fn)(q, k, v))

      def loss(q, k, v, fn=fn):
        return jnp.sum(w * fn(q, k, v).astype(jnp.float32))

      grads.append(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
  assert rel(outs[1], outs[0]) < 2e-2
  for a, b in zip(grads[1], grads[0]):
    assert np.isfinite(np.asarray(a, np.float32)).all()
    assert rel(a, b) < 2e-2
