"""ReFL (Xu et al. 2023): one late step with gradient, reward on x̂0 (§10.1).

The rollout stops at a loop index drawn uniformly from the last
``refl.last_steps`` steps (11 of 25: indices 14..24; rescaled for other T by
:func:`base.scale_steps`). One model call at that index carries the gradient,
its input is a constant, and the reward scores ``x̂0 = x_t - σ_t v``.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import leap as leap_lib
from leapalign_jax import sampling
from leapalign_jax.methods import base


def sample_choice(
  rng: np.random.Generator,
  num_steps: int,
  cfg: ml_collections.ConfigDict,
  sigmas: np.ndarray | None = None,
) -> dict[str, int]:
  """``{"stop_idx": i}``, i uniform in the last ``refl.last_steps`` steps."""
  del sigmas
  return {
    "stop_idx": base.sample_last_steps(rng, num_steps, cfg.refl.last_steps)
  }


def loss_and_grad(
  params: Any,
  problem: base.Problem,
  choice: base.Choice,
  key: jax.Array,
  cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, Any, base.Aux]:
  """ReFL hinge loss on ``x̂0`` predicted at ``choice["stop_idx"]`` (w = 1)."""
  del key
  stop = base.index(choice, "stop_idx")
  sigmas = problem.sigmas
  x_BLC = sampling.rollout(
    problem.velocity, params, problem.noise, sigmas, 0, stop
  )

  def loss_fn(p):
    v_BLC = sampling.velocity_at(problem.velocity, p, x_BLC, sigmas, stop)
    r_B = problem.reward(leap_lib.leap(x_BLC, v_BLC, sigmas[stop], sigmas[-1]))
    return base.hinge_loss(r_B, cfg.loss.lam), r_B

  (loss, r_B), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  aux = {
    "reward": r_B,
    "w": jnp.ones_like(r_B, jnp.float32),
    "stop_idx": stop,
    "sigma_stop": sigmas[stop],
  }
  return loss, grads, aux


METHOD = base.Method(loss_and_grad=loss_and_grad, sample_choice=sample_choice)
