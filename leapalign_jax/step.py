"""The training step: a pure function of explicit pytrees.

``make_train_step`` closes over the static pieces (config, model graph, the
method, the optimizer) and returns

  ``step(state, frozen, batch, choice) -> (state, metrics)``

state:  ``{params, ema, opt_state, step, rng}`` (trainable params only: the
        whole flow model, or its LoRA adapters), donated.
frozen: ``{model, vae, reward}`` parameter pytrees that receive no gradient
        (``model`` is the LoRA base, or None for a full fine-tune).
batch:  the family's conditioning fields (Flux: ``t5``, ``clip_pooled``)
        and ``reward_ids/<name>...``, for the global batch.
choice: the method's host-drawn indices, traced int32 scalars.

Inside: noise from ``fold_in(rng, step)`` → the method's rollout + gradient
(methods/) → global-norm clip + AdamW → EMA. A non-finite loss or gradient
leaves params, EMA and optimizer state untouched (the step counter still
advances, so the next batch is a new one) and is reported in the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from leapalign_jax import sharding
from leapalign_jax.methods import base as methods_base


class StepFns(NamedTuple):
  """The model-facing pure functions the step closes over.

  velocity: ``(params, frozen_model, x_BLC, t_B, batch) -> v_BLC`` float32.
  reward:   ``(frozen, x0_BLC, batch) -> r_B``; decode + reward, frozen.
  noise:    ``(key, batch_size) -> x1_BLC``; packed latent noise.
  """

  velocity: Callable[..., jax.Array]
  reward: Callable[..., jax.Array]
  noise: Callable[[jax.Array, int], jax.Array]


def make_optimizer(
  optim: ml_collections.ConfigDict,
) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (constant LR, as the reference)."""
  parts = []
  if optim.clip_norm:
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  parts.append(
    optax.adamw(
      learning_rate=optim.lr,
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
    )
  )
  return optax.chain(*parts)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int):
  """A fresh train state for ``params`` (EMA starts at the params)."""
  key = jax.random.key(seed)
  return {
    "params": params,
    "ema": jax.tree.map(jnp.copy, params),
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.key_data(key),
  }


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _summary(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Scalar metrics from the method's per-sample aux."""
  out = {}
  r = aux["reward"].astype(jnp.float32)
  out["train/reward"] = jnp.mean(r)
  out["train/reward_std"] = jnp.std(r)
  w = aux["w"].astype(jnp.float32)
  out["leap/w_mean"], out["leap/w_min"], out["leap/w_max"] = (
    jnp.mean(w),
    jnp.min(w),
    jnp.max(w),
  )
  for name, value in aux.items():
    if name in ("reward", "w", "distances"):
      continue
    value = jnp.asarray(value)
    out[f"leap/{name}"] = (
      jnp.mean(value.astype(jnp.float32)) if value.ndim else value
    )
  return out


def make_train_step(
  config: ml_collections.ConfigDict,
  fns: StepFns,
  tx: optax.GradientTransformation,
  sigmas: np.ndarray,
) -> Callable:
  """Builds the pure train step for ``config.method``.

  Args:
    config: the run config (``method``, ``loss``, ``leap``/baseline fields,
      ``optim.ema_decay``, ``debug``).
    fns: velocity, reward and noise functions.
    tx: the optimizer.
    sigmas: the training sigma grid ``[T + 1]`` (host array).
  """
  from leapalign_jax import methods

  method = methods.get(config.method)
  if method.make_step is not None:  # GRPO family: several updates per step
    return method.make_step(config, fns, tx, sigmas)
  ema_decay = float(config.optim.ema_decay)
  sigmas = np.asarray(sigmas, np.float32)
  nan_steps = tuple(config.get("debug", {}).get("nan_at_steps", ()) or ())

  def step(state, frozen, batch, choice):
    key = jax.random.fold_in(
      jax.random.wrap_key_data(state["rng"]), state["step"]
    )
    noise_key, method_key = jax.random.split(key)
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    problem = methods_base.Problem(
      velocity=lambda p, x, t: fns.velocity(p, frozen["model"], x, t, batch),
      reward=lambda x0: fns.reward(frozen, x0, batch),
      sigmas=jnp.asarray(sigmas),
      noise=fns.noise(noise_key, batch_size),
    )
    params = state["params"]
    loss, grads, aux = method.loss_and_grad(
      params, problem, choice, method_key, config
    )
    if nan_steps:  # test-only hook: poison the gradient at given steps
      poison = jnp.isin(state["step"], jnp.asarray(nan_steps))
      grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_ema = jax.tree.map(
      lambda e, p: e + (1.0 - ema_decay) * (p - e), state["ema"], new_params
    )
    new_state = {
      "params": _select(finite, new_params, params),
      "ema": _select(finite, new_ema, state["ema"]),
      "opt_state": _select(finite, opt_state, state["opt_state"]),
      "step": state["step"] + 1,
      "rng": state["rng"],
    }
    metrics = {
      "train/loss": loss,
      "train/grad_norm": grad_norm,
      "train/param_norm": optax.tree.norm(new_state["params"]),
      "train/update_norm": optax.tree.norm(updates),
      "train/finite": finite,
      **_summary(aux),
    }
    return new_state, metrics

  return step


def host_choice(
  config, method, step: int, sigmas: np.ndarray
) -> dict[str, int]:
  """The method's host-side draws for ``step``: a pure function of the seed."""
  rng = np.random.default_rng((config.seed, 114, step))
  return method.sample_choice(rng, len(sigmas) - 1, config, sigmas)


def jit_train_step(
  config, step_fns, tx, sigmas, state_shardings, frozen_shardings, mesh
):
  """The jitted train step: the one program both training and ``aot`` build.

  Explicit state shardings keep the state's placement from step to step, so
  one program serves the whole run and a resumed run (restored with the
  same shardings) executes exactly the same program. The batch keeps the
  shardings it arrives with (``sharding.put_batch``); the state is donated.
  """
  step = make_train_step(config, step_fns, tx, sigmas)
  return jax.jit(
    sharding.under_rules(step, mesh, config.mesh.rules),
    in_shardings=(state_shardings, frozen_shardings, None, None),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
