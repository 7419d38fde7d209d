"""Marginal-preserving SDE steps with exact Gaussian log-probabilities.

The GRPO family (methods/grpo.py) turns the deterministic Euler sampler of
:mod:`sampling` into a stochastic policy: each step from ``s = sigmas[i]`` to
``s' = sigmas[i + 1]`` (``dt = s' - s < 0``) draws

  ``x' ~ N(mean(x, v), std^2 I)``

whose mean adds a score correction to the Euler step, so the SDE keeps the
flow's marginals. Two published forms (formulas read from the reference
code; written anew here):

* ``flow_grpo`` (Flow-GRPO, ``sde_step_with_logprob``):
  ``σ_t = a·sqrt(s / (1 − s))`` (at ``s = 1`` the reference uses
  ``sigmas[1]`` in the denominator to stay finite),
  ``mean = x (1 + σ_t² dt / (2s)) + v (1 + σ_t² (1 − s) / (2s)) dt``,
  ``std = σ_t sqrt(−dt)``.
* ``dance_grpo`` (DanceGRPO, ``flux_step`` with ``sde_solver``):
  ``x̂0 = x − s v``, ``score = −(x − (1 − s) x̂0) / s²``,
  ``mean = x + v dt − ½ η² score dt``, ``std = η sqrt(−dt)``.

With the noise scale at 0 both means reduce to the Euler step. Log-probs are
the exact Gaussian log-density of each element, averaged (not summed) over
the non-batch axes as both references do; the average only rescales the
log-ratio, which the PPO clip range is tuned for.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from leapalign_jax import sampling

KINDS = ("flow_grpo", "dance_grpo")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def check_kind(kind: str) -> str:
  """Raises a one-line ValueError for an unknown SDE form."""
  if kind not in KINDS:
    raise ValueError(f"Unknown grpo.sde={kind!r}; valid: {KINDS}.")
  return kind


def mean_std(
  kind: str,
  x_BLC: jax.Array,
  v_BLC: jax.Array,
  s: jax.Array,
  s_next: jax.Array,
  noise_level: float,
  sigma_1: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Mean ``[B, L, C]`` and std of the step ``s -> s_next``.

  Args:
    kind: "flow_grpo" (noise_level = a) or "dance_grpo" (noise_level = η).
    x_BLC: latent at ``s``; v_BLC: model velocity there.
    s, s_next: sigmas (fp32), ``s_next < s``: scalars, or ``[B, 1, 1]`` for
      a per-sample step (then the std is ``[B, 1, 1]`` too).
    noise_level: a or η; 0 gives the Euler step with std 0.
    sigma_1: ``sigmas[1]``, Flow-GRPO's stand-in for ``s`` at ``s = 1``.
  """
  x = x_BLC.astype(jnp.float32)
  v = v_BLC.astype(jnp.float32)
  s = jnp.asarray(s, jnp.float32)
  dt = jnp.asarray(s_next, jnp.float32) - s
  if kind == "flow_grpo":
    denom = 1.0 - jnp.where(s == 1.0, sigma_1, s)
    sig_t = noise_level * jnp.sqrt(s / denom)
    mean = (
      x * (1.0 + sig_t**2 / (2.0 * s) * dt)
      + v * (1.0 + sig_t**2 * (1.0 - s) / (2.0 * s)) * dt
    )
    return mean, sig_t * jnp.sqrt(-dt)
  check_kind(kind)
  x0_hat = x - s * v
  score = -(x - x0_hat * (1.0 - s)) / s**2
  mean = x + dt * v - 0.5 * noise_level**2 * score * dt
  return mean, noise_level * jnp.sqrt(-dt)


def log_prob(x_next_BLC: jax.Array, mean_BLC: jax.Array, std) -> jax.Array:
  """Per-sample Gaussian log-density, averaged over the non-batch axes."""
  z = (x_next_BLC.astype(jnp.float32) - mean_BLC) / std
  lp = -0.5 * z**2 - jnp.log(std) - _LOG_SQRT_2PI
  return jnp.mean(lp, axis=tuple(range(1, lp.ndim)))


def rollout(
  velocity_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
  params: Any,
  x1_BLC: jax.Array,
  sigmas_T1: jax.Array,
  key: jax.Array,
  kind: str,
  noise_level: float,
  sde_T: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Gradient-free stochastic rollout; ODE (Euler) where ``sde_T`` is False.

  Args:
    sde_T: bool ``[T]`` (may be traced): which steps are SDE steps.

  Returns:
    ``(xs_T1BLC, logp_TB)``: every latent from ``x1`` to ``x0`` and each
    step's log-probability (0 on ODE steps, which are deterministic).
  """
  check_kind(kind)
  params = jax.lax.stop_gradient(params)
  x1 = jax.lax.stop_gradient(x1_BLC).astype(jnp.float32)
  num_steps = sigmas_T1.shape[0] - 1

  def body(x, inp):
    i, step_key, sde = inp
    s, s_next = sigmas_T1[i], sigmas_T1[i + 1]
    v = velocity_fn(params, x, sampling.time_batch(s, x.shape[0]))
    mean, std = mean_std(kind, x, v, s, s_next, noise_level, sigmas_T1[1])
    eps = jax.random.normal(step_key, x.shape, jnp.float32)
    x_sde = mean + std * eps
    x_ode = sampling.euler_step(x, v, s, s_next)
    x_next = jnp.where(sde, x_sde, x_ode)
    # At noise 0 the step is deterministic: no density (std 0); report 0.
    lp = log_prob(x_sde, mean, std) if noise_level > 0 else jnp.zeros(())
    lp = jnp.where(sde, lp, 0.0) * jnp.ones((x.shape[0],), jnp.float32)
    return x_next, (x_next, lp)

  idx = jnp.arange(num_steps, dtype=jnp.int32)
  keys = jax.random.split(key, num_steps)
  _, (xs, logp_TB) = jax.lax.scan(body, x1, (idx, keys, sde_T))
  return jnp.concatenate([x1[None], xs], axis=0), logp_TB
