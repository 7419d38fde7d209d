"""DRaFT-K and DRaFT-LV (Clark et al. 2023), method.md §10.2–10.3.

* ``draft_k``: gradient-free rollout to step ``T - K``, then the last K steps
  with gradient through the whole chain (model inputs not detached), one
  ``jax.checkpoint`` per step; reward on x0. ``K = draft.k`` is static.
* ``draft_lv``: the last step with gradient, ``x0 = x_last - σ_last v``, plus
  ``draft.lv_n`` re-noised copies ``x' = (1 - σ_last) sg(x0) + σ_last ε``
  denoised by the same step; the 1 + n hinge terms are summed.
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
  """DRaFT draws nothing on the host (K is static)."""
  del rng, num_steps, cfg, sigmas
  return {}


def loss_and_grad_k(
  params: Any,
  problem: base.Problem,
  choice: base.Choice,
  key: jax.Array,
  cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, Any, base.Aux]:
  """DRaFT-K: hinge on x0 with gradient through the last K steps (w = 1)."""
  del choice, key
  num_steps, k = problem.num_steps, cfg.draft.k
  if not 1 <= k <= num_steps:
    raise ValueError(f"draft.k must be in [1, {num_steps}], got {k}.")
  x_BLC = sampling.rollout(
    problem.velocity, params, problem.noise, problem.sigmas, 0, num_steps - k
  )

  def loss_fn(p):
    x0_BLC = sampling.rollout_with_grad(
      problem.velocity, p, x_BLC, problem.sigmas, num_steps - k, k
    )
    r_B = problem.reward(x0_BLC)
    return base.hinge_loss(r_B, cfg.loss.lam), r_B

  (loss, r_B), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, {"reward": r_B, "w": jnp.ones_like(r_B, jnp.float32)}


def loss_and_grad_lv(
  params: Any,
  problem: base.Problem,
  choice: base.Choice,
  key: jax.Array,
  cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, Any, base.Aux]:
  """DRaFT-LV: 1 + n last-step hinge terms, summed (w = 1).

  The re-noising draws ``ε`` from ``fold_in(key, m)`` for term m = 1..n.
  """
  del choice
  last = problem.num_steps - 1
  sigmas, vel, lam = problem.sigmas, problem.velocity, cfg.loss.lam
  x_BLC = sampling.rollout(vel, params, problem.noise, sigmas, 0, last)
  s_last = sigmas[last]
  eps_N = [
    jax.random.normal(jax.random.fold_in(key, m), x_BLC.shape, jnp.float32)
    for m in range(1, cfg.draft.lv_n + 1)
  ]

  def last_step(p, x):
    v = sampling.velocity_at(vel, p, x, sigmas, last)
    return leap_lib.leap(x, v, s_last, sigmas[-1])

  def loss_fn(p):
    x0_BLC = last_step(p, x_BLC)
    r_B = problem.reward(x0_BLC)
    loss = base.hinge_loss(r_B, lam)
    for eps_BLC in eps_N:
      x_noisy = (1 - s_last) * jax.lax.stop_gradient(x0_BLC) + s_last * eps_BLC
      loss = loss + base.hinge_loss(problem.reward(last_step(p, x_noisy)), lam)
    return loss, r_B

  (loss, r_B), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, {"reward": r_B, "w": jnp.ones_like(r_B, jnp.float32)}


METHOD_K = base.Method(
  loss_and_grad=loss_and_grad_k, sample_choice=sample_choice
)
METHOD_LV = base.Method(
  loss_and_grad=loss_and_grad_lv, sample_choice=sample_choice
)
