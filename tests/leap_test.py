"""Tests for leapalign_jax.leap: step sampling and the leap primitives."""

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import leap, methods, sampling

# ---------------------------------------------------------------------------
# Host-side step sampling.
# ---------------------------------------------------------------------------


def _chi2(counts: collections.Counter, support: list) -> float:
  n = sum(counts.values())
  expected = n / len(support)
  assert set(counts) <= set(support)
  return sum((counts[s] - expected) ** 2 / expected for s in support)


def test_sample_pair_uniform_over_unordered_pairs():
  num_steps, draws = 7, 21_000
  rng = np.random.default_rng(0)
  counts = collections.Counter(
    leap.sample_pair(rng, num_steps) for _ in range(draws)
  )
  pairs = list(itertools.combinations(range(num_steps), 2))
  assert len(counts) == len(pairs) == 21
  # 20 degrees of freedom: the 99.9% quantile of chi2(20) is 45.3.
  assert _chi2(counts, pairs) < 45.3


def test_sample_pair_t25_properties_and_reproducibility():
  pairs = [
    leap.sample_pair(np.random.default_rng((114, step)), 25)
    for step in range(3000)
  ]
  for k, j in pairs:
    assert isinstance(k, int) and isinstance(j, int)
    assert 0 <= k < j <= 24
  assert len(set(pairs)) > 250  # out of 300 possible pairs
  assert min(k for k, _ in pairs) == 0  # the pure-noise step is reachable
  again = [
    leap.sample_pair(np.random.default_rng((114, step)), 25)
    for step in range(3000)
  ]
  assert pairs == again


def test_step_ranges():
  np.testing.assert_array_equal(leap.candidate_steps(25), np.arange(25))
  np.testing.assert_array_equal(
    leap.candidate_steps(25, "late_half_index"), np.arange(13, 25)
  )
  np.testing.assert_array_equal(
    leap.candidate_steps(24, "late_half_index"), np.arange(12, 24)
  )
  sig = sampling.get_schedule(25, 2025)
  np.testing.assert_array_equal(
    leap.candidate_steps(25, "late_half_sigma", sig), np.arange(18, 25)
  )
  rng = np.random.default_rng(0)
  for _ in range(200):
    k, j = leap.sample_pair(rng, 25, step_range="late_half_sigma", sigmas=sig)
    assert 18 <= k < j <= 24
  with pytest.raises(ValueError, match="needs the sigma grid"):
    leap.candidate_steps(25, "late_half_sigma")
  with pytest.raises(ValueError, match="valid"):
    leap.candidate_steps(25, "early")


def test_fixed_gap():
  rng = np.random.default_rng(0)
  counts = collections.Counter(
    leap.sample_pair(rng, 25, pair_sampling="fixed_gap") for _ in range(6500)
  )
  want = [(k, k + 12) for k in range(13)]  # gap T // 2 = 12
  assert _chi2(counts, want) < 32.9  # chi2(12) 99.9% quantile
  k, j, l = leap.sample_steps(
    rng, 25, 3, pair_sampling="fixed_gap", fixed_gap=5
  )
  assert j - k == l - j == 5 and k >= 0 and l <= 24
  k, j = leap.sample_pair(
    rng,
    25,
    pair_sampling="fixed_gap",
    fixed_gap=11,
    step_range="late_half_index",
  )
  assert (k, j) in {(13, 24)}
  with pytest.raises(ValueError, match="No start"):
    leap.sample_pair(rng, 25, pair_sampling="fixed_gap", fixed_gap=25)


def test_sample_three_steps_uniform_subsets():
  rng = np.random.default_rng(1)
  counts = collections.Counter(
    leap.sample_steps(rng, 6, 3) for _ in range(10_000)
  )
  triples = list(itertools.combinations(range(6), 3))
  assert _chi2(counts, triples) < 43.8  # chi2(19) 99.9% quantile
  with pytest.raises(ValueError, match="Cannot draw"):
    leap.sample_steps(rng, 2, 3)


# ---------------------------------------------------------------------------
# Device-side primitives.
# ---------------------------------------------------------------------------


def _rand(seed, shape=(2, 4, 3)):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def test_leap_formula_and_dtype():
  x, v = _rand(0), _rand(1).astype(jnp.bfloat16)
  out = leap.leap(x, v, jnp.float32(0.8), jnp.float32(0.3))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, x - 0.5 * v.astype(jnp.float32), rtol=1e-6)
  # Per-sample times.
  s_k, s_j = jnp.float32([0.8, 0.6]), jnp.float32([0.3, 0.0])
  out = leap.leap(x, v, s_k, s_j)
  want = x - (s_k - s_j)[:, None, None] * v.astype(jnp.float32)
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_connector_value_is_exact_and_gradient_is_identity():
  pred, real = _rand(0), _rand(1) * 1e3 + 0.1
  np.testing.assert_array_equal(leap.connector(pred, real), real)
  cot = _rand(2)
  _, pull = jax.vjp(leap.connector, pred, real)
  g_pred, g_real = pull(cot)
  np.testing.assert_array_equal(g_pred, cot)
  np.testing.assert_array_equal(g_real, 0.0)


@pytest.mark.parametrize("alpha", [0.0, -0.5, 0.1, 0.3, 1.0])
def test_discount_value_exact_gradient_scaled(alpha):
  x = _rand(0) * 37.1
  np.testing.assert_array_equal(leap.discount(x, alpha), x)
  cot = _rand(1)
  _, pull = jax.vjp(lambda y: leap.discount(y, alpha), x)
  np.testing.assert_allclose(pull(cot)[0], max(alpha, 0.0) * cot, rtol=1e-6)


def test_mean_abs_distance_per_sample():
  a, b = _rand(0), _rand(1)
  d = leap.mean_abs_distance(a, b)
  assert d.shape == (2,) and d.dtype == jnp.float32
  np.testing.assert_allclose(
    d, np.abs(np.asarray(a) - np.asarray(b)).mean(axis=(1, 2)), rtol=1e-6
  )


def test_similarity_weight_clips_each_term_and_stops_gradient():
  d_j, d_0 = (
    jnp.float32([0.0, 0.05, 0.3, 1.0]),
    jnp.float32([0.0, 0.2, 0.02, 3.0]),
  )
  w = leap.similarity_weight([d_j, d_0], tau=0.1)
  want = 1 / (
    np.maximum([0, 0.05, 0.3, 1], 0.1) + np.maximum([0, 0.2, 0.02, 3], 0.1)
  )
  np.testing.assert_allclose(w, want, rtol=1e-6)
  assert w[0] == pytest.approx(5.0)  # 1 / (2 tau): the largest weight
  # Stacked input; no normalisation by the batch mean; no gradient.
  np.testing.assert_array_equal(
    leap.similarity_weight(jnp.stack([d_j, d_0]), 0.1), w
  )
  g = jax.grad(lambda d: jnp.sum(leap.similarity_weight([d, d_0], 0.1)))(d_j)
  np.testing.assert_array_equal(g, 0.0)
  np.testing.assert_allclose(
    leap.similarity_weight([d_0], 0.1), 1 / np.maximum(d_0, 0.1)
  )


def test_hinge_and_weighted_loss():
  r, w = jnp.float32([0.3, 0.6, 0.55]), jnp.float32([2.0, 1.0, 1.0])
  np.testing.assert_allclose(leap.hinge(r, 0.55), [0.25, 0.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(
    leap.weighted_hinge_loss(r, w, 0.55), 0.5 / 3, rtol=1e-6
  )


# ---------------------------------------------------------------------------
# Constant velocity field: every leap lands on the rollout.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("grad_passes", ["reuse", "recompute"])
def test_constant_field_leaps_land_on_rollout(grad_passes):
  B, L, C, T = 2, 4, 3, 9
  c_LC = jnp.linspace(-2.0, 3.0, L * C).reshape(L, C)

  def velocity(p, x_BLC, t_B):
    del t_B
    return jnp.broadcast_to(p[None], x_BLC.shape)

  def reward(x0):
    return -jnp.mean(x0**2, axis=(1, 2))

  cfg = methods.default_config()
  cfg.leap.grad_passes = grad_passes
  sigmas = jnp.asarray(sampling.get_schedule(T, 1024))
  noise = _rand(0, (B, L, C))

  @jax.jit
  def run(p, choice):
    problem = methods.Problem(velocity, reward, sigmas, noise)
    return methods.get("leapalign").loss_and_grad(
      p, problem, choice, jax.random.key(0), cfg
    )

  for k, j in [(0, 1), (0, T - 1), (3, 6), (T - 2, T - 1)]:
    choice = {"k_idx": np.int32(k), "j_idx": np.int32(j)}
    _, grads, aux = run(c_LC, choice)
    # The exact rollout of a constant field is x1 - (1 - s) c, so d ~ 0.
    np.testing.assert_array_less(aux["d_j"], 1e-6)
    np.testing.assert_array_less(aux["d_0"], 1e-6)
    np.testing.assert_array_equal(aux["w"], 5.0)  # both clipped to tau
    # x0 = x1 - c. Along the leaps dx0/dc = -s_j - (s_k - s_j) = -s_k
    # (the field ignores its input, so α plays no role), and
    # dL/dx0 = (w / B) * 2 x0 / (L C) with w = 5.
    x0 = noise - c_LC[None]
    np.testing.assert_allclose(
      aux["reward"], -jnp.mean(x0**2, axis=(1, 2)), rtol=1e-5
    )
    want = -sigmas[k] * jnp.sum(5.0 / B * 2 * x0 / (L * C), axis=0)
    np.testing.assert_allclose(grads, want, rtol=1e-5, atol=1e-6)
