"""GRPO math shared by Flow-GRPO, DanceGRPO and MixGRPO (pure functions).

Group-normalised advantages, the PPO-clipped surrogate, the per-sample
draw of trained timesteps, and MixGRPO's sliding window. The train step
that uses them (rollout, inner updates) is :mod:`methods.grpo_step`.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import sde

# Per-method defaults for the ``grpo`` fields left as None (method.md §10.3
# and the reference scripts): the SDE form, its noise scale, whether the
# last step is excluded from training, and how trained steps are chosen.
VARIANTS = {
  # Flow-GRPO: σ_t = a·sqrt(t/(1-t)), a = 0.7 (SD3; FLUX script 0.9); the
  # reference trains the first ``fraction`` of the steps.
  "flow_grpo": dict(
    sde="flow_grpo", noise_level=0.7, ignore_last=False, select="first"
  ),
  # DanceGRPO: η = 0.3, a random 60% of the steps, the last step dropped.
  "dance_grpo": dict(
    sde="dance_grpo", noise_level=0.3, ignore_last=True, select="random"
  ),
  # MixGRPO: SDE (Flow-GRPO form, --flow_grpo_sampling) only in the window;
  # every window step is trained.
  "mix_grpo": dict(
    sde="flow_grpo", noise_level=0.7, ignore_last=True, select="window"
  ),
}


def options(cfg: ml_collections.ConfigDict, variant: str) -> dict:
  """``cfg.grpo`` with the variant's defaults filled in; checks values."""
  g = cfg.grpo.to_dict() if hasattr(cfg.grpo, "to_dict") else dict(cfg.grpo)
  for k, v in VARIANTS[variant].items():
    if g.get(k) is None:
      g[k] = v
  sde.check_kind(g["sde"])
  if g["select"] not in ("first", "random", "window"):
    raise ValueError(f"Unknown grpo.select={g['select']!r}.")
  if g["group_size"] < 2:
    raise ValueError(f"grpo.group_size must be >= 2, got {g['group_size']}.")
  if not g["noise_level"] > 0:
    raise ValueError("grpo.noise_level must be > 0 (the policy's noise).")
  return g


def group_advantages(
  r_B: jax.Array, group_size: int, clip: float, eps: float, ddof: int
) -> jax.Array:
  """``clip((r - mean_g) / (std_g + eps), ±clip)`` per group of G rows.

  Rows ``g*G .. g*G + G - 1`` are one prompt's images (``jnp.repeat``
  order). DanceGRPO/MixGRPO use the unbiased std (``ddof=1``, torch's
  default), Flow-GRPO the biased one (``ddof=0``, numpy's).
  """
  r_NG = r_B.astype(jnp.float32).reshape(-1, group_size)
  mean = jnp.mean(r_NG, axis=1, keepdims=True)
  std = jnp.std(r_NG, axis=1, keepdims=True, ddof=ddof)
  adv = (r_NG - mean) / (std + eps)
  return jnp.clip(adv, -clip, clip).reshape(-1)


def ppo_loss(
  logp_new_B: jax.Array,
  logp_old_B: jax.Array,
  adv_B: jax.Array,
  clip_range: float,
  valid_B: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``mean(max(-A·ρ, -A·clip(ρ, 1 ± ε)))`` with ``ρ = exp(new - old)``."""
  ratio = jnp.exp(logp_new_B - logp_old_B)
  unclipped = -adv_B * ratio
  clipped = -adv_B * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  per_B = jnp.maximum(unclipped, clipped)
  w_B = jnp.ones_like(per_B) if valid_B is None else valid_B.astype(per_B.dtype)
  denom = jnp.maximum(jnp.sum(w_B), 1.0)
  aux = {
    "ratio_dev": jnp.max(jnp.abs(ratio - 1.0) * w_B),
    "clipfrac": jnp.sum((jnp.abs(ratio - 1.0) > clip_range) * w_B) / denom,
    "approx_kl": 0.5 * jnp.sum((logp_new_B - logp_old_B) ** 2 * w_B) / denom,
  }
  return jnp.sum(per_B * w_B) / denom, aux


def num_trained(num_steps: int, g: dict) -> int:
  """How many (sample, step) slots each sample trains: K (static)."""
  if g["select"] == "window":
    return int(g["window_size"])
  eligible = num_steps - 1 if g["ignore_last"] else num_steps
  # int() truncation as the references (``int(T * timestep_fraction)``).
  return max(1, int(eligible * g["timestep_fraction"]))


def trained_steps(
  key: jax.Array, batch: int, num_steps: int, g: dict, start: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Loop indices ``[B, K]`` each sample trains, and their validity mask.

  "random": a fresh permutation of the eligible steps per sample (as
  DanceGRPO's ``torch.randperm`` per sample), its first K. "first": steps
  ``0..K-1``. "window": MixGRPO's ``range(start, min(start + w, T - 2))``;
  slots past the end are masked out (shapes stay static).
  """
  k = num_trained(num_steps, g)
  eligible = num_steps - 1 if g["ignore_last"] else num_steps
  if g["select"] == "random":
    keys = jax.random.split(key, batch)
    perm = jax.vmap(lambda kk: jax.random.permutation(kk, eligible))(keys)
    idx = perm[:, :k].astype(jnp.int32)
    return idx, jnp.ones(idx.shape, bool)
  base = jnp.arange(k, dtype=jnp.int32)
  if g["select"] == "first":
    idx = jnp.broadcast_to(base, (batch, k))
    return idx, jnp.ones(idx.shape, bool)
  idx = jnp.asarray(start, jnp.int32) + base
  valid = idx < window_limit(num_steps)
  idx = jnp.minimum(idx, num_steps - 1)  # masked slots read a real step
  return jnp.broadcast_to(idx, (batch, k)), jnp.broadcast_to(valid, (batch, k))


def window_limit(num_steps: int) -> int:
  """MixGRPO's ``max_timesteps = sampling_steps - 2`` (exclusive end)."""
  return num_steps - 2


def window_start(iteration, num_steps: int, g: dict, xp=np):
  """MixGRPO's progressive window start after ``iteration`` updates.

  Closed form of ``GRPOTrainingStates.update_iteration`` ("progressive"):
  the start moves by ``window_stride`` (``prog_overlap_step``) every
  ``window_interval`` (``iters_per_group``) iterations; past
  ``max_timesteps`` it rolls back to 0 (``roll_back``) or stays clipped.
  ``iteration`` may be a traced int (``xp=jnp``) inside the step.
  """
  limit = window_limit(num_steps)
  moves = iteration // int(g["window_interval"])
  stride = int(g["window_stride"])
  if g["window_roll_back"]:
    positions = limit // stride + 1  # starts 0, s, ..., <= limit
    return (moves % positions) * stride
  return xp.minimum(moves * stride, limit)


def window_sde_mask(start: jax.Array, num_steps: int, size: int) -> jax.Array:
  """Bool ``[T]``: SDE on ``start .. start + size - 1``, ODE elsewhere."""
  i = jnp.arange(num_steps, dtype=jnp.int32)
  lo = jnp.asarray(start, jnp.int32)
  return (i >= lo) & (i < jnp.minimum(lo + size, window_limit(num_steps)))


def host_window_starts(num_iters: int, num_steps: int, g: dict) -> np.ndarray:
  """The window start of each iteration (host; logged and tested)."""
  return np.asarray(
    [int(window_start(k, num_steps, g)) for k in range(num_iters)]
  )
