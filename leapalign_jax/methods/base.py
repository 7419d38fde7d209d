"""The method interface shared by LeapAlign and every baseline.

A method is a pair of pure functions (no class hierarchy):

* ``loss_and_grad(params, problem, choice, key, cfg) -> (loss, grads, aux)``
  runs inside the jitted train step. ``choice`` maps names to traced int32
  scalars drawn on the host, so one compiled program serves every choice.
* ``sample_choice(rng, num_steps, cfg, sigmas=None) -> dict[str, int]`` runs
  on the host (numpy generator seeded from ``(seed, step)``); its result is
  logged and passed to the step. ``sigmas`` (the host grid) is only needed by
  LeapAlign's ``step_range="late_half_sigma"``.

Rules that the paper states for T = 25 steps ("the last 11 steps") are scaled
to other step counts with :func:`scale_steps`.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import leap as leap_lib

Choice = dict[str, jax.Array]
Aux = dict[str, jax.Array]
LossAndGrad = Callable[
  [Any, "Problem", Choice, jax.Array, ml_collections.ConfigDict],
  tuple[jax.Array, Any, Aux],
]
SampleChoice = Callable[..., dict[str, int]]

# Step count of the paper's training rollouts; step-count rules are given
# for it and rescaled proportionally for other T.
REFERENCE_NUM_STEPS = 25


class Problem(NamedTuple):
  """Everything a method needs for one batch; every callable is pure.

  Attributes:
    velocity: ``(params, x_BLC f32, t_B f32) -> v_BLC``, the model velocity
      (after guidance), closing over conditioning and frozen weights.
    reward: ``x0_BLC -> r_B``, differentiable w.r.t. the packed latent
      (decode + reward model, frozen).
    sigmas: ``[T + 1]`` f32 grid, ``sigmas[0] = 1`` and ``sigmas[T] = 0``.
    noise: the initial latent x1, ``[B, L, C]`` f32.
  """

  velocity: Callable[[Any, jax.Array, jax.Array], jax.Array]
  reward: Callable[[jax.Array], jax.Array]
  sigmas: jax.Array
  noise: jax.Array

  @property
  def num_steps(self) -> int:
    return self.sigmas.shape[0] - 1


class Method(NamedTuple):
  """A registered method: the jitted-side loss/grad and the host sampler.

  ``make_step`` (optional) replaces the whole train step for methods that
  take several optimizer updates per rollout (the GRPO family,
  ``methods.grpo_step``): ``(config, fns, tx, sigmas) -> step``; their
  ``loss_and_grad`` is None.
  """

  loss_and_grad: LossAndGrad | None
  sample_choice: SampleChoice
  make_step: Callable[..., Callable] | None = None


def scale_steps(n_ref: int, num_steps: int) -> int:
  """Rescales a step count stated for T = 25 to ``num_steps`` steps.

  ``round(n_ref * T / 25)`` (half up), clipped to ``[1, T]``: "the last 11 of
  25 steps" becomes the last 22 of 50, the last 4 of 10, and stays 11 at 25.
  """
  scaled = math.floor(n_ref * num_steps / REFERENCE_NUM_STEPS + 0.5)
  return max(1, min(num_steps, scaled))


def check_option(value: str, valid: tuple[str, ...], field: str) -> str:
  """Raises a ValueError naming the valid values if ``value`` is not one."""
  if value not in valid:
    raise ValueError(f"Unknown {field}={value!r}; valid: {valid}.")
  return value


def index(choice: Choice, name: str) -> jax.Array:
  """A host choice as an int32 scalar (traced inside jit)."""
  return jnp.asarray(choice[name], jnp.int32)


def sample_last_steps(
  rng: np.random.Generator, num_steps: int, n_last_ref: int
) -> int:
  """Uniform loop index among the last ``scale_steps(n_last_ref, T)`` steps."""
  n_last = scale_steps(n_last_ref, num_steps)
  return int(rng.integers(num_steps - n_last, num_steps))


def hinge_loss(
  r_B: jax.Array, lam: float, w_B: jax.Array | None = None
) -> jax.Array:
  """``mean_B(w * max(0, λ - r))``; ``w = 1`` for the baselines."""
  if w_B is None:
    w_B = jnp.ones(r_B.shape, jnp.float32)
  return leap_lib.weighted_hinge_loss(r_B, w_B, lam)
