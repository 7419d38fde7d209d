"""DRTune (Wu et al. 2024): input stop-gradient, K spaced steps (§10.4).

Step counting as in the paper (t = T is noise, t = 1 the last step; loop
index ``i = T - t``). K trained steps ``{s, s + g, ..., s + (K-1) g}`` with
``g = T // K`` and s uniform in ``{1, ..., T - (K-1) g}``; the rollout stops
at ``t_min``, uniform in the last ``drtune.last_steps`` steps (rescaled for
T != 25 by :func:`base.scale_steps`), and the reward scores
``x̂0 = x_{t_min} - σ_{t_min} v_{t_min}``.

Every model input is ``sg(x_t)``, untrained velocities are ``sg(v_t)`` and
the state is not detached, so
``x̂0 = const + Σ_{trained i <= stop} c_i v_θ(sg(x_i), σ_i)`` with
``c_i = σ_{i+1} - σ_i`` before the stop and ``c_stop = -σ_stop``. This is
computed exactly that way: a gradient-free capture rollout to the stop gives
the ``x_i`` and the value of x̂0, then K model calls at constant inputs carry
the gradient (steps after the stop get ``c_i = 0``). Memory holds only the K
trained calls.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import leap as leap_lib
from leapalign_jax import sampling
from leapalign_jax.methods import base


def choice_keys(k: int) -> tuple[str, ...]:
  """Choice keys: ``train_idx_0..K-1`` (ascending) and ``stop_idx``."""
  return (*(f"train_idx_{m}" for m in range(k)), "stop_idx")


def sample_choice(
  rng: np.random.Generator,
  num_steps: int,
  cfg: ml_collections.ConfigDict,
  sigmas: np.ndarray | None = None,
) -> dict[str, int]:
  """Trained loop indices (ascending) and the early-stop loop index."""
  del sigmas
  k = cfg.drtune.k
  if not 1 <= k <= num_steps:
    raise ValueError(f"drtune.k must be in [1, {num_steps}], got {k}.")
  gap = num_steps // k
  s = int(rng.integers(1, num_steps - (k - 1) * gap + 1))
  trained = sorted(num_steps - (s + m * gap) for m in range(k))
  stop = base.sample_last_steps(rng, num_steps, cfg.drtune.last_steps)
  return dict(zip(choice_keys(k), (*trained, stop)))


def loss_and_grad(
  params: Any,
  problem: base.Problem,
  choice: base.Choice,
  key: jax.Array,
  cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, Any, base.Aux]:
  """DRTune hinge loss on x̂0 at the early stop (w = 1)."""
  del key
  keys = choice_keys(cfg.drtune.k)
  train_K = jnp.stack([base.index(choice, name) for name in keys[:-1]])
  stop = base.index(choice, "stop_idx")
  vel, sigmas = problem.velocity, problem.sigmas
  x_BLC, xs_KBLC = sampling.rollout_capture(
    vel, params, problem.noise, sigmas, train_K, stop=stop
  )
  v_BLC = sampling.velocity_at(vel, params, x_BLC, sigmas, stop)
  x0_hat = jax.lax.stop_gradient(
    leap_lib.leap(x_BLC, v_BLC, sigmas[stop], sigmas[-1])
  )
  after_K = sigmas[jnp.minimum(train_K + 1, problem.num_steps)]
  coef_K = jnp.where(
    train_K < stop,
    after_K - sigmas[train_K],
    jnp.where(train_K == stop, -sigmas[train_K], 0.0),
  )

  def loss_fn(p):
    x = x0_hat
    for m in range(train_K.shape[0]):
      v = sampling.velocity_at(vel, p, xs_KBLC[m], sigmas, train_K[m])
      x = x + coef_K[m] * (v - jax.lax.stop_gradient(v)).astype(jnp.float32)
    r_B = problem.reward(x)
    return base.hinge_loss(r_B, cfg.loss.lam), r_B

  (loss, r_B), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  aux = {
    "reward": r_B,
    "w": jnp.ones_like(r_B, jnp.float32),
    "stop_idx": stop,
    "sigma_stop": sigmas[stop],
    "train_idx": train_K,
  }
  return loss, grads, aux


METHOD = base.Method(loss_and_grad=loss_and_grad, sample_choice=sample_choice)
