"""Tests for leapalign_jax.sampling: schedule, packing, ids, Euler rollouts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import sampling

# method.md §1.1: the 25 training sigmas at 720x720 (4 decimals).
SIGMAS_720_T25 = [
  1.0000, .9816, .9624, .9422, .9211, .8990, .8757, .8512, .8254, .7982,
  .7694, .7390, .7067, .6725, .6361, .5972, .5558, .5114, .4638, .4126,
  .3574, .2976, .2327, .1621, .0848, 0.0,
]  # fmt: skip


# ---------------------------------------------------------------------------
# Schedule.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("seq_len", "mu"),
  [(256, 0.5), (4096, 1.15), (1024, 0.63), (2025, 0.7994401041666666)],
)
def test_mu_line(seq_len, mu):
  assert sampling.get_lin_function()(seq_len) == pytest.approx(mu, abs=1e-12)


def test_mu_720_matches_spec():
  mu = sampling.get_lin_function()((720 // 16) ** 2)
  assert mu == pytest.approx(0.79944, abs=5e-6)
  assert math.exp(mu) == pytest.approx(2.22430, abs=5e-6)


def test_schedule_720_25_steps_matches_table():
  sigmas = sampling.get_schedule(25, 2025)
  assert sigmas.dtype == np.float32 and sigmas.shape == (26,)
  np.testing.assert_allclose(sigmas, SIGMAS_720_T25, atol=5e-5, rtol=0)


def test_time_shift_formula():
  t = np.array([0.9, 0.5, 0.1])
  mu = 0.63
  want = np.exp(mu) / (np.exp(mu) + (1 / t - 1))
  np.testing.assert_allclose(sampling.time_shift(mu, 1.0, t), want, rtol=1e-15)
  np.testing.assert_array_equal(
    sampling.time_shift(mu, 1.0, [1.0, 0.0]), [1, 0]
  )


@pytest.mark.parametrize("num_steps", [1, 4, 25, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 2025, 4096])
@pytest.mark.parametrize("shift", [True, False])
def test_schedule_endpoints_and_monotone(num_steps, seq_len, shift):
  sigmas = sampling.get_schedule(num_steps, seq_len, shift=shift)
  assert sigmas.shape == (num_steps + 1,) and sigmas.dtype == np.float32
  assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
  assert np.all(np.diff(sigmas) < 0)


def test_schnell_no_shift_is_linspace():
  sigmas = sampling.get_schedule(4, 4096, shift=False)
  np.testing.assert_array_equal(sigmas, np.float32([1, 0.75, 0.5, 0.25, 0]))


@pytest.mark.torch
@pytest.mark.parametrize(
  ("num_steps", "height", "width"),
  [(25, 720, 720), (50, 720, 720), (28, 1024, 1024), (4, 512, 512),
   (20, 512, 1024), (13, 720, 1280), (30, 256, 256)],
)  # fmt: skip
def test_schedule_matches_diffusers_flux_pipeline(num_steps, height, width):
  """Same grid as diffusers' FluxPipeline (dynamic shift, mu from the seq)."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift

  # FLUX.1-dev's scheduler_config.json.
  scheduler = FlowMatchEulerDiscreteScheduler(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
  )
  seq_len = math.ceil(height / 16) * math.ceil(width / 16)
  mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
  # As FluxPipeline.__call__ builds them.
  sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
  scheduler.set_timesteps(sigmas=sigmas, mu=mu)
  ours = sampling.get_schedule(num_steps, seq_len)
  np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), atol=1e-6, rtol=0)
  np.testing.assert_allclose(
    ours[:-1] * 1000, scheduler.timesteps.numpy(), atol=1e-3, rtol=0
  )


# ---------------------------------------------------------------------------
# Noise, packing and ids.
# ---------------------------------------------------------------------------


def test_get_noise_shape_dtype_and_determinism():
  key = jax.random.key(3)
  z = sampling.get_noise(key, 2, 720, 1000, jnp.bfloat16)
  assert z.shape == (2, 90, 126, 16) and z.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    z, sampling.get_noise(key, 2, 712, 1000, jnp.bfloat16)
  )


def test_pack_unpack_are_exact_inverses():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(2, 6, 8, 16)), jnp.float32)
  x = sampling.pack(z)
  assert x.shape == (2, 12, 64)
  np.testing.assert_array_equal(sampling.unpack(x, 48, 64), z)
  x2 = jnp.asarray(rng.normal(size=(2, 12, 64)), jnp.float32)
  np.testing.assert_array_equal(sampling.pack(sampling.unpack(x2, 48, 64)), x2)


def test_pack_feature_order_by_index():
  """Token (r, c), feature c*4 + ph*2 + pw == z[2r + ph, 2c + pw, c]."""
  B, H, W, C = 1, 4, 6, 3
  z = np.arange(B * H * W * C, dtype=np.float32).reshape(B, H, W, C)
  x = np.asarray(sampling.pack(jnp.asarray(z)))
  for r in range(H // 2):
    for col in range(W // 2):
      for ch in range(C):
        for ph in range(2):
          for pw in range(2):
            tok, feat = r * (W // 2) + col, ch * 4 + ph * 2 + pw
            assert x[0, tok, feat] == z[0, 2 * r + ph, 2 * col + pw, ch]


@pytest.mark.torch
def test_pack_matches_torch_nchw_layout():
  import einops
  import torch

  z_nchw = torch.randn(
    2, 16, 10, 12, generator=torch.Generator().manual_seed(0)
  )
  ref = einops.rearrange(
    z_nchw, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2
  )
  # The reshape/permute form used by diffusers' FluxPipeline._pack_latents.
  ref2 = (
    z_nchw.view(2, 16, 5, 2, 6, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 30, 64)
  )
  np.testing.assert_array_equal(ref.numpy(), ref2.numpy())
  z_nhwc = jnp.asarray(z_nchw.permute(0, 2, 3, 1).numpy())
  ours = sampling.pack(z_nhwc)
  np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
  back = sampling.unpack(jnp.asarray(ref.numpy()), 80, 96)
  np.testing.assert_array_equal(np.asarray(back), z_nhwc)


def test_unpack_rejects_wrong_size():
  with pytest.raises(ValueError, match="Cannot unpack"):
    sampling.unpack(jnp.zeros((1, 12, 64)), 64, 64)


def test_ids():
  ids = sampling.img_ids(2, 3, 4)
  assert ids.shape == (2, 12, 3) and ids.dtype == jnp.float32
  want = np.array([[0, r, c] for r in range(3) for c in range(4)], np.float32)
  np.testing.assert_array_equal(ids[0], want)
  np.testing.assert_array_equal(ids[1], want)
  t = sampling.txt_ids(2, 5)
  assert t.shape == (2, 5, 3) and t.dtype == jnp.float32 and not t.any()


# ---------------------------------------------------------------------------
# Euler rollouts on a toy velocity field.
# ---------------------------------------------------------------------------

B, L, C, T = 2, 4, 3, 7


def velocity(p, x_BLC, t_B):
  h = jnp.tanh(x_BLC @ p["w1"] + t_B[:, None, None] * p["wt"][None, None])
  return h @ p["w2"]


@pytest.fixture(scope="module")
def toy():
  rng = np.random.default_rng(0)
  params = {
    "w1": 0.5 * rng.normal(size=(C, 8)),
    "wt": rng.normal(size=(8,)),
    "w2": 0.5 * rng.normal(size=(8, C)),
  }
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  noise = jnp.asarray(rng.normal(size=(B, L, C)), jnp.float32)
  sigmas = jnp.asarray(sampling.get_schedule(T, 1024))
  return params, noise, sigmas


def _python_loop(params, x, sigmas, start, stop):
  for i in range(start, stop):
    v = velocity(params, x, jnp.full((x.shape[0],), sigmas[i]))
    x = x + (sigmas[i + 1] - sigmas[i]) * v
  return x


@pytest.fixture(scope="module")
def jitted():
  return {
    "denoise": jax.jit(lambda p, x, s: sampling.denoise(velocity, p, x, s)),
    "rollout": jax.jit(
      lambda p, x, s, a, b: sampling.rollout(velocity, p, x, s, a, b)
    ),
    "capture": jax.jit(
      lambda p, x, s, idx, stop: sampling.rollout_capture(
        velocity, p, x, s, idx, stop
      )
    ),
  }


def test_euler_step_is_fp32():
  x = jnp.ones((1, 2, 3), jnp.bfloat16)
  out = sampling.euler_step(x, x, jnp.float32(0.5), jnp.float32(0.25))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.75)


def test_denoise_and_rollout_match_python_loop(toy, jitted):
  params, noise, sigmas = toy
  want = _python_loop(params, noise, sigmas, 0, T)
  np.testing.assert_allclose(
    jitted["denoise"](params, noise, sigmas), want, rtol=1e-6, atol=1e-6
  )
  # Traced bounds; composing segments gives the same x0; one program.
  x = noise
  for a, b in [(0, 2), (2, 2), (2, 5), (5, T)]:
    x = jitted["rollout"](params, x, sigmas, np.int32(a), np.int32(b))
    np.testing.assert_allclose(
      x, _python_loop(params, noise, sigmas, 0, b), rtol=1e-6, atol=1e-6
    )
  assert jitted["rollout"]._cache_size() == 1


def test_rollout_capture(toy, jitted):
  params, noise, sigmas = toy
  idx = np.int32([0, 3, 6, T])
  x0, xs = jitted["capture"](params, noise, sigmas, idx, np.int32(T))
  np.testing.assert_allclose(
    x0, _python_loop(params, noise, sigmas, 0, T), rtol=1e-6, atol=1e-6
  )
  for n, i in enumerate(idx):
    want = _python_loop(params, noise, sigmas, 0, int(i))
    np.testing.assert_allclose(xs[n], want, rtol=1e-6, atol=1e-6)
  # Early stop: indices beyond the stop capture zeros.
  x4, xs = jitted["capture"](params, noise, sigmas, idx, np.int32(4))
  np.testing.assert_allclose(
    x4, _python_loop(params, noise, sigmas, 0, 4), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_array_equal(xs[2:], 0.0)
  # Static full-length variant (a scan).
  x0s, _ = sampling.rollout_capture(velocity, params, noise, sigmas, idx)
  np.testing.assert_allclose(x0s, x0, rtol=1e-6, atol=1e-6)


def test_gradient_free_rollouts_pass_no_gradient(toy):
  params, noise, sigmas = toy

  def f(p):
    x = sampling.rollout(velocity, p, noise, sigmas, jnp.int32(0), T)
    xc, _ = sampling.rollout_capture(velocity, p, noise, sigmas, jnp.int32([1]))
    return jnp.sum(x) + jnp.sum(xc)

  grads = jax.grad(f)(params)
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, 0.0)


def test_rollout_with_grad_value_and_gradient(toy):
  params, noise, sigmas = toy
  target = jnp.linspace(-1, 1, L * C).reshape(1, L, C)

  def ref_loss(p, start):
    x = _python_loop(jax.lax.stop_gradient(p), noise, sigmas, 0, start)
    x = _python_loop(p, x, sigmas, start, T)
    return jnp.sum((x - target) ** 2)

  @jax.jit
  def loss(p, start):
    x = sampling.rollout(velocity, p, noise, sigmas, 0, start)
    x = sampling.rollout_with_grad(
      velocity, p, x, sigmas, 0, T, skip_before=start
    )
    return jnp.sum((x - target) ** 2)

  for start in (0, 3):
    val, grads = jax.value_and_grad(loss)(params, jnp.int32(start))
    want_val, want = jax.value_and_grad(ref_loss)(params, start)
    np.testing.assert_allclose(val, want_val, rtol=1e-5)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      grads,
      want,
    )

  # Static segment, traced start, no remat.
  def seg_loss(p):
    x = sampling.rollout(velocity, p, noise, sigmas, 0, 4)
    x = sampling.rollout_with_grad(
      velocity, p, x, sigmas, jnp.int32(4), T - 4, remat=False
    )
    return jnp.sum((x - target) ** 2)

  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    jax.grad(seg_loss)(params),
    jax.grad(ref_loss)(params, 4),
  )
