"""Rewards without gradients: host scorers, stop-gradient scorers, refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import errors, methods, rewards
from leapalign_jax.rewards import base, nondiff

IMAGES = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3))
IMAGES = IMAGES.astype(np.float32)
CALLS = []


def red_share(images, ids):
  """A numpy rule: the share of pixels whose red channel dominates."""
  del ids
  CALLS.append(images.shape)
  red = (images[..., 0] > images[..., 1]) & (images[..., 0] > images[..., 2])
  return red.mean(axis=(1, 2))


def _mean_pixel(params, images, ids):
  del ids
  return params["w"] * jnp.mean(images, axis=(1, 2, 3))


def _bundle():
  return base.Reward(
    names=("smooth", "rule"),
    weights=(0.5, 2.0),
    params={"smooth": {"w": jnp.float32(3.0)}, "rule": {}},
    fns={"smooth": _mean_pixel, "rule": nondiff.host_scorer(red_share)},
    text_length=0,
    differentiable={"smooth": True, "rule": False},
  )


def test_host_scorer_runs_inside_jit_once_per_batch_and_sums_weighted():
  reward = _bundle()
  CALLS.clear()
  total = jax.jit(reward.score)(reward.params, IMAGES, None)
  each = jax.jit(reward.score_each)(reward.params, IMAGES, None)
  want_rule = red_share(IMAGES, None)
  want_smooth = 3.0 * IMAGES.mean(axis=(1, 2, 3))
  np.testing.assert_allclose(each["rule"], want_rule, rtol=1e-6)
  np.testing.assert_allclose(
    total, 0.5 * want_smooth + 2.0 * want_rule, rtol=1e-5
  )
  assert (3, 8, 8, 3) in CALLS  # the whole batch in one host call


def test_no_gradient_scorer_has_zero_gradient():
  score = nondiff.no_gradient(_mean_pixel)
  params = {"w": jnp.float32(3.0)}
  g = jax.grad(lambda x: jnp.sum(score(params, x, None)))(jnp.asarray(IMAGES))
  np.testing.assert_array_equal(g, 0.0)
  np.testing.assert_allclose(
    score(params, IMAGES, None), _mean_pixel(params, IMAGES, None)
  )


def test_python_kind_loads_by_import_path_and_is_not_differentiable():
  r = rewards.get(
    "rule", kind="python", fn="tests.rewards_nondiff_test:red_share"
  )
  assert r.differentiable == {"rule": False}
  out = jax.jit(r.score)(r.params, IMAGES, None)
  np.testing.assert_allclose(out, red_share(IMAGES, None), rtol=1e-6)
  with pytest.raises(errors.UserError, match="cannot be imported"):
    rewards.get("rule", kind="python", fn="no_such_module:f")


@pytest.mark.parametrize("name", methods.names())
def test_direct_methods_refuse_a_gradient_free_reward(name):
  method = methods.get(name)
  needs = method.make_step is None
  if needs:
    with pytest.raises(errors.UserError, match="have no gradient") as e:
      nondiff.check_gradient(name, needs, _bundle())
    assert "\n" not in str(e.value) and "rule" in str(e.value)
  else:
    nondiff.check_gradient(name, needs, _bundle())  # GRPO: accepted
  # Weight 0 (evaluation only) is accepted by every method.
  evaluation_only = _bundle()
  object.__setattr__(evaluation_only, "weights", (1.0, 0.0))
  nondiff.check_gradient(name, needs, evaluation_only)
