"""leapalign_jax.sde: transition formulas, log-probs, noise 0 = ODE, marginals.

Every check is against an independent float64 numpy/scipy computation
written here from the references' formulas (Flow-GRPO
``sde_step_with_logprob``, DanceGRPO ``flux_step``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from leapalign_jax import sampling, sde

B, L, C, T = 3, 4, 2, 10
SIGMAS = sampling.get_schedule(T, 1024)


def _ref_mean_std(kind, x, v, s, s_next, a, sigma_1):
  """float64 transcription of the two reference steps."""
  x, v = x.astype(np.float64), v.astype(np.float64)
  s, s_next = float(s), float(s_next)
  dt = s_next - s
  if kind == "flow_grpo":
    sig = np.sqrt(s / (1 - (sigma_1 if s == 1 else s))) * a
    mean = (
      x * (1 + sig**2 / (2 * s) * dt)
      + v * (1 + sig**2 * (1 - s) / (2 * s)) * dt
    )
    return mean, sig * np.sqrt(-dt)
  x0 = x - s * v
  score = -(x - x0 * (1 - s)) / s**2
  return x + dt * v + (-0.5 * a**2 * score) * dt, a * np.sqrt(s - s_next)


@pytest.mark.parametrize("kind", sde.KINDS)
@pytest.mark.parametrize("i", [0, 4, T - 1])
def test_mean_std_and_log_prob_match_direct_gaussian(kind, i):
  rng = np.random.default_rng(i)
  x = rng.normal(size=(B, L, C)).astype(np.float32)
  v = rng.normal(size=(B, L, C)).astype(np.float32)
  x_next = rng.normal(size=(B, L, C)).astype(np.float32)
  s, s_next = SIGMAS[i], SIGMAS[i + 1]
  mean, std = sde.mean_std(kind, x, v, s, s_next, 0.7, SIGMAS[1])
  ref_mean, ref_std = _ref_mean_std(kind, x, v, s, s_next, 0.7, SIGMAS[1])
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(std), ref_std, rtol=1e-6)
  lp = sde.log_prob(x_next, mean, std)
  # Direct density: scipy's normal log-pdf of every element, averaged.
  direct = stats.norm.logpdf(x_next, loc=ref_mean, scale=ref_std)
  np.testing.assert_allclose(lp, direct.mean(axis=(1, 2)), rtol=1e-5)
  assert np.all(np.isfinite(lp))


def test_per_sample_sigmas_equal_scalar_ones():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, L, C)).astype(np.float32)
  v = rng.normal(size=(B, L, C)).astype(np.float32)
  idx = np.array([0, 3, 7])
  s_B11 = SIGMAS[idx][:, None, None]
  sn_B11 = SIGMAS[idx + 1][:, None, None]
  for kind in sde.KINDS:
    mean, std = sde.mean_std(kind, x, v, s_B11, sn_B11, 0.5, SIGMAS[1])
    for b, i in enumerate(idx):
      m1, s1 = sde.mean_std(
        kind,
        x[b : b + 1],
        v[b : b + 1],
        SIGMAS[i],
        SIGMAS[i + 1],
        0.5,
        SIGMAS[1],
      )
      np.testing.assert_array_equal(mean[b], m1[0])
      np.testing.assert_array_equal(std[b, 0, 0], s1)


def _field(p, x_BLC, t_B):
  return jnp.tanh(x_BLC @ p["w"]) + t_B[:, None, None] * p["b"][None, None]


@pytest.mark.parametrize("kind", sde.KINDS)
def test_noise_zero_equals_ode_sampler(kind):
  rng = np.random.default_rng(1)
  p = {
    "w": jnp.asarray(rng.normal(size=(C, C)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(C,)), jnp.float32),
  }
  x1 = jnp.asarray(rng.normal(size=(B, L, C)), jnp.float32)
  sig = jnp.asarray(SIGMAS)
  xs, logp = sde.rollout(
    _field, p, x1, sig, jax.random.key(0), kind, 0.0, jnp.ones(T, bool)
  )
  ode = sampling.denoise(_field, p, x1, sig)
  np.testing.assert_allclose(xs[-1], ode, rtol=0, atol=1e-6)
  assert xs.shape == (T + 1, B, L, C) and logp.shape == (T, B)
  np.testing.assert_array_equal(logp, 0.0)


def test_ode_steps_outside_the_mask_and_logp_of_sde_steps():
  rng = np.random.default_rng(2)
  p = {
    "w": jnp.asarray(rng.normal(size=(C, C)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(C,)), jnp.float32),
  }
  x1 = jnp.asarray(rng.normal(size=(B, L, C)), jnp.float32)
  sig = jnp.asarray(SIGMAS)
  mask = jnp.arange(T) % 3 == 1
  xs, logp = sde.rollout(
    _field, p, x1, sig, jax.random.key(3), "flow_grpo", 0.8, mask
  )
  for i in range(T):
    v = _field(p, xs[i], jnp.full((B,), sig[i]))
    if not mask[i]:
      np.testing.assert_allclose(  # eager vs scan: a few ulps
        xs[i + 1], sampling.euler_step(xs[i], v, sig[i], sig[i + 1]), atol=1e-6
      )
      np.testing.assert_array_equal(logp[i], 0.0)
    else:
      mean, std = sde.mean_std(
        "flow_grpo", xs[i], v, sig[i], sig[i + 1], 0.8, sig[1]
      )
      assert not np.allclose(xs[i + 1], mean)  # noise was added
      np.testing.assert_allclose(
        logp[i], sde.log_prob(xs[i + 1], mean, std), rtol=1e-5
      )


@pytest.mark.parametrize(
  "kind,level", [("flow_grpo", 0.7), ("dance_grpo", 0.7)]
)
def test_sde_keeps_the_flow_marginals(kind, level):
  """1-D Gaussian data N(0, c²): the exact velocity is linear in x.

  x_t = (1 - t) x0 + t ε has variance m(t) = (1 - t)² c² + t², and
  v = E[ε - x0 | x_t] = x (t - (1 - t) c²) / m(t). A marginal-preserving
  SDE started from N(0, 1) must end at variance c², like the ODE.
  """
  c2 = 0.25

  def exact(p, x, t_B):
    t = t_B[:, None, None]
    return x * (t - (1 - t) * c2) / ((1 - t) ** 2 * c2 + t**2)

  n, steps = 20000, 200
  sig = jnp.asarray(np.linspace(1.0, 0.0, steps + 1), jnp.float32)
  x1 = jax.random.normal(jax.random.key(0), (n, 1, 1))
  xs, _ = sde.rollout(
    exact, {}, x1, sig, jax.random.key(1), kind, level, jnp.ones(steps, bool)
  )
  mid = steps // 2  # t = 0.5 as well
  want_mid = 0.25 * c2 + 0.25
  assert abs(float(jnp.var(xs[mid])) / want_mid - 1) < 0.05
  assert abs(float(jnp.var(xs[-1])) / c2 - 1) < 0.06
