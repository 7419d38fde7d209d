"""LeapAlign math: step sampling, leaps, connectors, discount, weight, hinge.

Everything follows method.md §2–7 and §11. The array functions are pure and
compute in fp32 whatever the model's dtype. ``sample_steps``/``sample_pair``
run on the host (numpy) so the choice can be logged and passed to the jitted
step as traced ints.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

STEP_RANGES = ("all", "late_half_index", "late_half_sigma")
PAIR_SAMPLINGS = ("random", "fixed_gap")

sg = jax.lax.stop_gradient


# ---------------------------------------------------------------------------
# Host side: which loop indices get a leap.
# ---------------------------------------------------------------------------


def candidate_steps(
  num_steps: int,
  step_range: str = "all",
  sigmas: np.ndarray | None = None,
) -> np.ndarray:
  """Loop indices admissible for a leap under a step-range ablation (§11).

  Args:
    num_steps: number of Euler steps T.
    step_range: ``"all"``: ``0..T-1``. ``"late_half_index"``: the cleaner half
      of the unshifted grid, ``1 - i/T <= 1/2`` (13..24 for T = 25).
      ``"late_half_sigma"``: ``sigmas[i] <= 1/2`` (18..24 at 720², T = 25).
    sigmas: the ``[T + 1]`` grid; required for ``"late_half_sigma"``.

  Returns:
    Sorted int64 indices.
  """
  idx = np.arange(num_steps)
  if step_range == "all":
    return idx
  if step_range == "late_half_index":
    return idx[2 * idx >= num_steps]
  if step_range == "late_half_sigma":
    if sigmas is None:
      raise ValueError("step_range='late_half_sigma' needs the sigma grid.")
    sigmas = np.asarray(sigmas)
    if sigmas.shape != (num_steps + 1,):
      raise ValueError(f"Expected {num_steps + 1} sigmas, got {sigmas.shape}.")
    return idx[sigmas[:-1] <= 0.5]
  raise ValueError(f"Unknown step_range {step_range!r}; valid: {STEP_RANGES}.")


def sample_steps(
  rng: np.random.Generator,
  num_steps: int,
  num: int = 2,
  *,
  step_range: str = "all",
  pair_sampling: str = "random",
  fixed_gap: int | None = None,
  sigmas: np.ndarray | None = None,
) -> tuple[int, ...]:
  """Draws ``num`` distinct loop indices, sorted ascending (noisiest first).

  ``"random"`` is uniform over all unordered ``num``-subsets of the admissible
  steps (300 pairs for T = 25). ``"fixed_gap"`` takes
  ``k, k + gap, ..., k + (num - 1) * gap`` with k uniform over the starts that
  keep every index admissible; ``gap`` defaults to ``T // 2``.

  Args:
    rng: host generator, e.g. ``np.random.default_rng((seed, step))``.
    num_steps: number of Euler steps T.
    num: how many indices (the number of leaps).
    step_range: see :func:`candidate_steps`.
    pair_sampling: ``"random"`` or ``"fixed_gap"``.
    fixed_gap: gap for ``"fixed_gap"``; None means ``T // 2``.
    sigmas: the grid (for ``step_range="late_half_sigma"``).

  Returns:
    Python ints ``i_0 < i_1 < ... < i_{num-1}``.
  """
  cand = candidate_steps(num_steps, step_range, sigmas)
  if num < 1 or len(cand) < num:
    raise ValueError(
      f"Cannot draw {num} distinct steps from {len(cand)} admissible ones"
      f" (T={num_steps}, step_range={step_range!r})."
    )
  if pair_sampling == "random":
    picked = rng.choice(cand, size=num, replace=False)
  elif pair_sampling == "fixed_gap":
    gap = num_steps // 2 if fixed_gap is None else int(fixed_gap)
    if gap < 1:
      raise ValueError(f"fixed_gap must be >= 1, got {gap}.")
    offsets = gap * np.arange(num)
    starts = cand[np.isin(cand[:, None] + offsets[None], cand).all(axis=1)]
    if not len(starts):
      raise ValueError(
        f"No start admits {num} steps spaced by {gap} (T={num_steps},"
        f" step_range={step_range!r})."
      )
    picked = rng.choice(starts) + offsets
  else:
    raise ValueError(
      f"Unknown pair_sampling {pair_sampling!r}; valid: {PAIR_SAMPLINGS}."
    )
  return tuple(int(i) for i in np.sort(picked))


def sample_pair(
  rng: np.random.Generator, num_steps: int, **kwargs
) -> tuple[int, int]:
  """Draws ``(k_idx, j_idx)``, ``k_idx < j_idx``; see :func:`sample_steps`."""
  k_idx, j_idx = sample_steps(rng, num_steps, 2, **kwargs)
  return k_idx, j_idx


# ---------------------------------------------------------------------------
# Device side: the leap trajectory.
# ---------------------------------------------------------------------------


def _per_sample(s: jax.Array, x: jax.Array) -> jax.Array:
  """A scalar or ``[B]`` time as fp32, broadcastable against ``x`` [B, ...]."""
  s = jnp.asarray(s, jnp.float32)
  return s.reshape(s.shape + (1,) * (x.ndim - s.ndim)) if s.ndim else s


def leap(x_k: jax.Array, v_k: jax.Array, s_k, s_j) -> jax.Array:
  """One-step leap ``x̂_{j|k} = x_k - (s_k - s_j) * v`` in fp32 (Eq. 3).

  ``s_k`` and ``s_j`` are scalars or per-sample ``[B]`` times.
  """
  x_k = x_k.astype(jnp.float32)
  return x_k - _per_sample(s_k - s_j, x_k) * v_k.astype(jnp.float32)


def connector(pred: jax.Array, real: jax.Array) -> jax.Array:
  """Latent connector: value of ``real``, gradient (identity) into ``pred``.

  Equal to ``pred + sg(real - pred)`` (Eq. 6–7), written as
  ``real + (pred - sg(pred))`` so that the forward value is bit-exact.
  """
  return sg(real) + (pred - sg(pred))


def discount(x: jax.Array, alpha: float) -> jax.Array:
  """Gradient discount: value ``x``, gradient scaled by ``alpha`` (Eq. 9–10).

  Equal to ``alpha * x + (1 - alpha) * sg(x)``, written as
  ``sg(x) + alpha * (x - sg(x))`` so that the forward value is bit-exact.
  ``alpha <= 0`` gives a plain stop-gradient, as in the reference.
  """
  if alpha <= 0:
    return sg(x)
  return sg(x) + alpha * (x - sg(x))


def mean_abs_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-sample mean absolute difference in fp32, ``[B, ...] -> [B]``."""
  diff = jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
  return jnp.mean(diff.reshape(diff.shape[0], -1), axis=-1)


def similarity_weight(
  distances: Sequence[jax.Array] | jax.Array, tau: float
) -> jax.Array:
  """Trajectory-similarity weight ``sg(1 / Σ_i max(d_i, τ))`` per sample.

  Args:
    distances: per-sample distances, a sequence of ``[B]`` or an ``[N, B]``.
    tau: clipping floor applied to each distance before the sum.

  Returns:
    ``w_B`` (fp32, no batch normalisation, at most ``1 / (N τ)``).
  """
  d_NB = jnp.stack([jnp.asarray(d, jnp.float32) for d in distances])
  return sg(1.0 / jnp.sum(jnp.maximum(d_NB, tau), axis=0))


def hinge(r: jax.Array, lam: float) -> jax.Array:
  """Per-sample hinge ``max(0, λ - r)``."""
  return jax.nn.relu(lam - r)


def weighted_hinge_loss(r_B: jax.Array, w_B: jax.Array, lam: float):
  """Batch mean of ``w * max(0, λ - r)`` (method.md §7)."""
  return jnp.mean(w_B * hinge(r_B.astype(jnp.float32), lam))
