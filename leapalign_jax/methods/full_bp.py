"""Full backprop / AlignProp-style truncation (method.md §10.5).

``full_bp.truncation="none"``: the reward gradient flows through all T steps
(a scanned chain with one ``jax.checkpoint`` per step: memory grows with T,
one latent per step plus one model call's activations).

``"random"``: each iteration keeps the gradient only for the last K model
calls, K drawn on the host from ``round(N(full_bp.mean_k, full_bp.std_k))``
clipped to ``[1, T]``; this is DRaFT-K with a random, traced K. The earlier
steps run gradient-free; the differentiated scan still has T slots and skips
those before ``T - K`` (a ``lax.cond``), so one program serves every K.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import sampling
from leapalign_jax.methods import base

TRUNCATIONS = ("none", "random")


def sample_choice(
  rng: np.random.Generator,
  num_steps: int,
  cfg: ml_collections.ConfigDict,
  sigmas: np.ndarray | None = None,
) -> dict[str, int]:
  """``{}`` or, for random truncation, ``{"start_idx": T - K}``."""
  del sigmas
  truncation = cfg.full_bp.truncation
  base.check_option(truncation, TRUNCATIONS, "full_bp.truncation")
  if truncation == "none":
    return {}
  k = round(rng.normal(cfg.full_bp.mean_k, cfg.full_bp.std_k))
  return {"start_idx": num_steps - int(np.clip(k, 1, num_steps))}


def loss_and_grad(
  params: Any,
  problem: base.Problem,
  choice: base.Choice,
  key: jax.Array,
  cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, Any, base.Aux]:
  """Hinge on x0 with the gradient through all (or the last K) steps."""
  del key
  truncation = cfg.full_bp.truncation
  base.check_option(truncation, TRUNCATIONS, "full_bp.truncation")
  vel, sigmas, num_steps = problem.velocity, problem.sigmas, problem.num_steps
  if truncation == "none":
    start, x_BLC = None, problem.noise
  else:
    start = base.index(choice, "start_idx")
    x_BLC = sampling.rollout(vel, params, problem.noise, sigmas, 0, start)

  def loss_fn(p):
    x0_BLC = sampling.rollout_with_grad(
      vel, p, x_BLC, sigmas, 0, num_steps, skip_before=start
    )
    r_B = problem.reward(x0_BLC)
    return base.hinge_loss(r_B, cfg.loss.lam), r_B

  (loss, r_B), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  aux = {"reward": r_B, "w": jnp.ones_like(r_B, jnp.float32)}
  if start is not None:
    aux["start_idx"] = start
  return loss, grads, aux


METHOD = base.Method(loss_and_grad=loss_and_grad, sample_choice=sample_choice)
