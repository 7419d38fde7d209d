"""LeapAlign: reward gradients through a few one-step leaps (method.md §3–7).

The leap trajectory over loop indices ``i_0 < ... < i_{n-1}`` (sigmas
``s_0 > ... > s_{n-1}``, ``s_n = 0``) starts from the real rollout latent
``y_0 = x_{i_0}`` and, for ``m = 0..n-1``::

  u_m     = y_m                       (m = 0: a constant)
          = discount(y_m, alpha)      (m >= 1: value y_m, gradient x alpha)
  v_m     = v_θ(u_m, s_m)
  x̂_{m+1} = y_m - (s_m - s_{m+1}) v_m                     (leap)
  d_{m+1} = mean|x_{i_{m+1}} - x̂_{m+1}|   (x_{i_n} = x0)    (distance)
  y_{m+1} = connector(x̂_{m+1}, x_{i_{m+1}})                 (value = real)

The reward sees ``y_n`` (= x0, ``reward_on="x0"``) or ``x̂_n`` (``"leap"``);
``w = sg(1 / Σ max(d, τ))`` over the distances chosen by ``weighting``;
``loss = mean(w · max(0, λ - r))``. n = 2 is the paper's method (k = i_0,
j = i_1); n = 1 and 3 are the ablations of §11.

Two exact implementations (``cfg.leap.grad_passes``):

* ``"recompute"``: a gradient-free rollout captures ``x_{i_m}`` and x0, then
  ``jax.value_and_grad`` of the surrogate above with n fresh model calls
  (T + n forwards). The plain reference for the other one.
* ``"reuse"`` (default, the reference's cost of T forwards): the rollout runs
  in gradient-free segments between the chosen indices; at each ``i_m`` the
  rollout's own model call is a ``jax.vjp`` (w.r.t. the params, and for
  m >= 1 the input), and the reward cotangent is pulled back by hand through
  the leaps, connectors (identity) and discounts (× alpha). Only those n sets
  of residuals are kept. Every option is supported; there is no fallback.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import leap as leap_lib
from leapalign_jax import sampling
from leapalign_jax.methods import base

REWARD_ON = ("x0", "leap")
WEIGHTINGS = ("both", "d_j", "d_0", "none")
GRAD_PASSES = ("reuse", "recompute")
_NAMES = ("k", "j", "l")


def step_names(num_leaps: int) -> tuple[str, ...]:
  """Names of the leap start points: ``k, j, l`` then ``3, 4, ...``."""
  return tuple(
    _NAMES[m] if m < len(_NAMES) else str(m) for m in range(num_leaps)
  )


def choice_keys(num_leaps: int) -> tuple[str, ...]:
  """Choice keys, e.g. ``("k_idx", "j_idx")`` for the two-leap method."""
  return tuple(f"{name}_idx" for name in step_names(num_leaps))


def sample_choice(
  rng: np.random.Generator,
  num_steps: int,
  cfg: ml_collections.ConfigDict,
  sigmas: np.ndarray | None = None,
) -> dict[str, int]:
  """Draws the leap indices (one set shared by the whole batch), §3.2, §11."""
  n = cfg.leap.num_leaps
  idx = leap_lib.sample_steps(
    rng,
    num_steps,
    n,
    step_range=cfg.leap.step_range,
    pair_sampling=cfg.leap.pair_sampling if n > 1 else "random",
    fixed_gap=cfg.leap.fixed_gap,
    sigmas=sigmas,
  )
  return dict(zip(choice_keys(n), idx))


def _check_cfg(cfg: ml_collections.ConfigDict) -> None:
  base.check_option(cfg.leap.reward_on, REWARD_ON, "leap.reward_on")
  base.check_option(cfg.leap.weighting, WEIGHTINGS, "leap.weighting")
  base.check_option(cfg.leap.grad_passes, GRAD_PASSES, "leap.grad_passes")
  if cfg.leap.num_leaps < 1:
    raise ValueError(f"leap.num_leaps must be >= 1, got {cfg.leap.num_leaps}.")
  if cfg.leap.weighting == "d_j" and cfg.leap.num_leaps < 2:
    raise ValueError("leap.weighting='d_j' needs at least two leaps.")


def _weight(d_NB: list[jax.Array], cfg: ml_collections.ConfigDict):
  """Similarity weight from the distances selected by ``leap.weighting``.

  ``both``: every distance; ``d_j``: the intermediate connectors only (all
  but the last); ``d_0``: the final one only; ``none``: w = 1.
  """
  weighting = cfg.leap.weighting
  if weighting == "none":
    return jnp.ones(d_NB[0].shape, jnp.float32)
  picked = {"both": d_NB, "d_j": d_NB[:-1], "d_0": d_NB[-1:]}[weighting]
  return leap_lib.similarity_weight(picked, cfg.leap.tau)


def _aux(idx_N, s_N, d_NB, w_B, r_B) -> base.Aux:
  n = len(idx_N)
  names = step_names(n)
  targets = (*names[1:], "0")
  aux = {"reward": r_B, "w": w_B, "distances": jnp.stack(d_NB)}
  for m in range(n):
    aux[f"{names[m]}_idx"] = idx_N[m]
    aux[f"sigma_{names[m]}"] = s_N[m]
    aux[f"d_{targets[m]}"] = d_NB[m]
  return aux


def _leap_schedule(problem: base.Problem, choice: base.Choice, n: int):
  """Loop indices (int32 scalars) and sigmas, with ``s_n = sigmas[T] = 0``."""
  idx_N = [base.index(choice, key) for key in choice_keys(n)]
  s_N1 = [problem.sigmas[i] for i in idx_N] + [problem.sigmas[-1]]
  return idx_N, s_N1


# ---------------------------------------------------------------------------
# (a) recompute: capture rollout, then value_and_grad with n fresh calls.
# ---------------------------------------------------------------------------


def _loss_and_grad_recompute(params, problem, choice, key, cfg):
  del key
  n, alpha, lam = cfg.leap.num_leaps, cfg.leap.alpha, cfg.loss.lam
  idx_N, s_N1 = _leap_schedule(problem, choice, n)
  x0_BLC, xs_NBLC = sampling.rollout_capture(
    problem.velocity, params, problem.noise, problem.sigmas, jnp.stack(idx_N)
  )
  real_N = [xs_NBLC[m] for m in range(1, n)] + [x0_BLC]
  batch = x0_BLC.shape[0]

  def loss_fn(p):
    y, d_NB = xs_NBLC[0], []
    for m in range(n):
      u = y if m == 0 else leap_lib.discount(y, alpha)
      v = problem.velocity(p, u, sampling.time_batch(s_N1[m], batch))
      pred = leap_lib.leap(y, v, s_N1[m], s_N1[m + 1])
      d_NB.append(leap_lib.mean_abs_distance(real_N[m], pred))
      y = leap_lib.connector(pred, real_N[m])
    r_B = problem.reward(y if cfg.leap.reward_on == "x0" else pred)
    w_B = _weight(d_NB, cfg)
    return base.hinge_loss(r_B, lam, w_B), (d_NB, w_B, r_B)

  (loss, (d_NB, w_B, r_B)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    params
  )
  return loss, grads, _aux(idx_N, s_N1, d_NB, w_B, r_B)


# ---------------------------------------------------------------------------
# (b) reuse: vjp at the rollout's own calls, manual backward through leaps.
# ---------------------------------------------------------------------------


def _vjp_velocity(velocity, params, x_BLC, t_B, wrt_input: bool):
  """``(v, pullback)`` of the velocity w.r.t. params (and the input)."""
  if wrt_input:
    return jax.vjp(lambda p, x: velocity(p, x, t_B), params, x_BLC)
  return jax.vjp(lambda p: velocity(p, x_BLC, t_B), params)


def _loss_and_grad_reuse(params, problem, choice, key, cfg):
  del key
  n, alpha, lam = cfg.leap.num_leaps, cfg.leap.alpha, cfg.loss.lam
  idx_N, s_N1 = _leap_schedule(problem, choice, n)
  vel, sigmas = problem.velocity, problem.sigmas
  batch = problem.noise.shape[0]

  # Forward: gradient-free segments; the call at each i_m is a vjp, and its
  # velocity also advances the rollout (T model calls in total).
  x, start = problem.noise.astype(jnp.float32), 0
  xs_N, vs_N, pulls_N = [], [], []
  for m in range(n):
    x = sampling.rollout(vel, params, x, sigmas, start, idx_N[m])
    t_B = sampling.time_batch(s_N1[m], batch)
    wrt_input = m > 0 and alpha > 0  # alpha <= 0: the input is sg'd
    v, pull = _vjp_velocity(vel, params, x, t_B, wrt_input)
    xs_N.append(x)
    vs_N.append(v)
    pulls_N.append(pull)
    x = sampling.euler_step(x, v, sigmas[idx_N[m]], sigmas[idx_N[m] + 1])
    start = idx_N[m] + 1
  x0_BLC = sampling.rollout(vel, params, x, sigmas, start, problem.num_steps)

  # Leaps (connector values are the real latents, so y_m = x_{i_m}).
  real_N = xs_N[1:] + [x0_BLC]
  preds_N = [
    leap_lib.leap(xs_N[m], vs_N[m], s_N1[m], s_N1[m + 1]) for m in range(n)
  ]
  d_NB = [leap_lib.mean_abs_distance(real_N[m], preds_N[m]) for m in range(n)]
  w_B = _weight(d_NB, cfg)
  scored = x0_BLC if cfg.leap.reward_on == "x0" else preds_N[-1]
  r_B, pull_reward = jax.vjp(problem.reward, scored)
  loss, pull_loss = jax.vjp(lambda r: base.hinge_loss(r, lam, w_B), r_B)

  # Backward. The reward cotangent reaches x̂_n (through the connector or
  # directly); x̂_{m+1} = y_m - (s_m - s_{m+1}) v_m sends it to y_m
  # (identity) and v_m; v_m's input cotangent returns to y_m scaled by alpha;
  # y_m's connector passes it on to x̂_m unchanged.
  (r_bar,) = pull_loss(jnp.ones_like(loss))
  (g_BLC,) = pull_reward(r_bar)
  g_BLC = g_BLC.astype(jnp.float32)
  grads = None
  for m in reversed(range(n)):
    v_bar = (-(s_N1[m] - s_N1[m + 1]) * g_BLC).astype(vs_N[m].dtype)
    if m == 0 or alpha <= 0:
      (p_bar,) = pulls_N[m](v_bar)
    else:
      p_bar, u_bar = pulls_N[m](v_bar)
      g_BLC = g_BLC + alpha * u_bar.astype(jnp.float32)
    grads = p_bar if grads is None else jax.tree.map(jnp.add, grads, p_bar)
  return loss, grads, _aux(idx_N, s_N1, d_NB, w_B, r_B)


def loss_and_grad(
  params: Any,
  problem: base.Problem,
  choice: base.Choice,
  key: jax.Array,
  cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, Any, base.Aux]:
  """LeapAlign loss, parameter gradients and per-sample aux.

  Args:
    params: trainable parameters.
    problem: velocity, reward, grid and noise.
    choice: traced int32 loop indices, ``choice_keys(cfg.leap.num_leaps)``
      (``k_idx < j_idx`` for two leaps).
    key: unused (the method is deterministic given the noise).
    cfg: method config (``loss.lam``, ``leap.*``).

  Returns:
    ``(loss, grads, aux)``; aux holds per-sample ``reward``, ``w``,
    ``distances [n, B]`` and ``d_<target>`` (``d_j``, ``d_0`` for two leaps),
    and the scalars ``<name>_idx`` and ``sigma_<name>`` (``k``, ``j``, ...).
  """
  _check_cfg(cfg)
  if cfg.leap.grad_passes == "reuse":
    return _loss_and_grad_reuse(params, problem, choice, key, cfg)
  return _loss_and_grad_recompute(params, problem, choice, key, cfg)


METHOD = base.Method(loss_and_grad=loss_and_grad, sample_choice=sample_choice)
