"""The GRPO train step: one SDE rollout, then several PPO updates, one jit.

``make_step(variant)`` returns a ``(config, fns, tx, sigmas) -> step``
builder with the signature of :func:`leapalign_jax.step.make_train_step`'s
result, ``step(state, frozen, batch, choice) -> (state, metrics)``, because
the references take several optimizer steps per rollout (DanceGRPO: 12
images per GPU, accumulation 4 -> 3 updates; MixGRPO: 3 -> 4; Flow-GRPO:
``num_batches_per_epoch / gradient_accumulation_steps``), which the
one-update ``loss_and_grad`` interface cannot express.

Inside: each prompt of the batch is repeated G times (``group_size``);
initial noise is drawn per prompt and shared by its group (``same_noise``)
or per image; the gradient-free SDE rollout records every latent and
log-prob; rewards (no gradient needed) give clipped group advantages; the
images are shuffled into ``num_updates`` minibatches, and each minibatch is
one optimizer update whose gradient is accumulated over the K trained
steps of its samples (a scan: one model forward/backward at a time, as the
references loop). Every random draw derives from ``fold_in(rng, step)``,
so a resumed run repeats the uninterrupted one; MixGRPO's window start is a
function of the step counter. Trained steps and minibatch order are drawn
on the device, so one compiled program serves the whole run.
"""

import jax
import jax.numpy as jnp
import optax

from leapalign_jax import sde
from leapalign_jax.methods import grpo


def _select(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_step(variant: str):
  """The step builder for ``variant`` (a key of ``grpo.VARIANTS``)."""

  def build(config, fns, tx, sigmas):
    return _build(config, fns, tx, sigmas, variant)

  return build


def _build(config, fns, tx, sigmas_host, variant):
  g = grpo.options(config, variant)
  num_steps = len(sigmas_host) - 1
  group, num_updates = int(g["group_size"]), int(g["num_updates"])
  kind, noise = g["sde"], float(g["noise_level"])
  k_slots = grpo.num_trained(num_steps, g)
  beta, ema_decay = float(g["kl_beta"]), float(config.optim.ema_decay)

  def step(state, frozen, batch, choice):
    del choice  # every draw is on the device, from fold_in(rng, step)
    key = jax.random.fold_in(
      jax.random.wrap_key_data(state["rng"]), state["step"]
    )
    noise_key, sde_key, t_key, mb_key = jax.random.split(key, 4)
    sigmas = jnp.asarray(sigmas_host, jnp.float32)
    prompts = jax.tree.leaves(batch)[0].shape[0]
    n_img = prompts * group
    if n_img % num_updates:
      raise ValueError(
        f"{n_img} images per step do not split into grpo.num_updates="
        f"{num_updates} equal minibatches."
      )
    gbatch = jax.tree.map(lambda a: jnp.repeat(a, group, axis=0), batch)
    if g["same_noise"]:
      x1 = jnp.repeat(fns.noise(noise_key, prompts), group, axis=0)
    else:
      x1 = fns.noise(noise_key, n_img)

    def velocity(p, x, t, b):
      return fns.velocity(p, frozen["model"], x, t, b)

    start = grpo.window_start(state["step"], num_steps, g, xp=jnp)
    if g["select"] == "window":
      sde_T = grpo.window_sde_mask(start, num_steps, k_slots)
    else:
      sde_T = jnp.ones((num_steps,), bool)
    params = state["params"]
    xs, logp_TN = sde.rollout(
      lambda p, x, t: velocity(p, x, t, gbatch),
      params,
      x1,
      sigmas,
      sde_key,
      kind,
      noise,
      sde_T,
    )
    # The reward needs no gradient: any scorer (rewards.nondiff) works.
    r_N = jax.lax.stop_gradient(fns.reward(frozen, xs[-1], gbatch))
    adv_N = grpo.group_advantages(
      r_N, group, g["adv_clip_max"], g["std_eps"], int(g["std_ddof"])
    )
    idx_NK, valid_NK = grpo.trained_steps(t_key, n_img, num_steps, g, start)
    order = jax.random.permutation(mb_key, n_img)
    n_mb = n_img // num_updates
    if beta > 0 and frozen["model"] is None:
      raise ValueError(
        "grpo.kl_beta > 0 needs LoRA (the reference policy is the base "
        "with the adapters off); set lora.enabled=True or kl_beta=0."
      )

    def slot(p, rows, sub, k):
      """Log-prob of the recorded step under ``p``, and its Gaussian."""
      t_n = idx_NK[rows, k]
      x, x_next = xs[t_n, rows], xs[t_n + 1, rows]
      s, s_next = sigmas[t_n], sigmas[t_n + 1]
      v = velocity(p, x, s, sub)
      args = (s[:, None, None], s_next[:, None, None], noise, sigmas[1])
      mean, std = sde.mean_std(kind, x, v, *args)
      return sde.log_prob(x_next, mean, std), (x, s, args, mean, std)

    rows_UM = order.reshape(num_updates, n_mb)
    # The rollout's log-probs of each minibatch's trained slots [U, K, M].
    t_UMK = idx_NK[rows_UM]
    old_UKM = logp_TN[t_UMK, rows_UM[..., None]].transpose(0, 2, 1)

    def slot_loss(p, rows, sub, k, old_M, first):
      new, (x, s, args, mean, std) = slot(p, rows, sub, k)
      valid = valid_NK[rows, k]
      gap = jnp.max(jnp.abs(new - old_M) * valid)
      # The first update runs at the rollout's parameters: on-policy, its
      # ratio is 1 by definition. Taking old = stop_gradient(new) there
      # keeps the rollout-vs-update float rounding (different batch
      # shapes) out of the clip; the gradient is the same.
      old_M = jnp.where(first, jax.lax.stop_gradient(new), old_M)
      loss, aux = grpo.ppo_loss(new, old_M, adv_N[rows], g["clip_range"], valid)
      if beta > 0:
        ref = jax.tree.map(jnp.zeros_like, p)  # LoRA off = the base policy
        v_ref = jax.lax.stop_gradient(velocity(ref, x, s, sub))
        mean_ref, _ = sde.mean_std(kind, x, v_ref, *args)
        # Exact KL of the two Gaussian steps (same std), per element mean.
        kl_n = jnp.mean((mean - mean_ref) ** 2, axis=(1, 2)) / (
          2.0 * std[:, 0, 0] ** 2
        )
        aux["kl"] = jnp.mean(kl_n * valid)
        loss = loss + beta * aux["kl"]
      return loss, {**aux, "logp_gap": gap}

    # Mean over the trained steps, as the references divide by their count.
    k_count = jnp.maximum(jnp.sum(valid_NK[0]), 1).astype(jnp.float32)

    def update(carry, u):
      params, opt_state, ema, finite_all = carry
      rows = rows_UM[u]
      sub = jax.tree.map(lambda a: a[rows], gbatch)

      def accumulate(acc, k):
        (loss, aux), grads = jax.value_and_grad(slot_loss, has_aux=True)(
          params, rows, sub, k, old_UKM[u, k], u == 0
        )
        acc = jax.tree.map(lambda a, b: a + b / k_count, acc, grads)
        return acc, (loss, aux)

      zeros = jax.tree.map(jnp.zeros_like, params)
      grads, (loss_K, aux_K) = jax.lax.scan(
        accumulate, zeros, jnp.arange(k_slots)
      )
      loss = jnp.sum(loss_K) / k_count
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updates, new_opt = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      new_ema = jax.tree.map(
        lambda e, p: e + (1.0 - ema_decay) * (p - e), ema, new_params
      )
      carry = (
        _select(finite, new_params, params),
        _select(finite, new_opt, opt_state),
        _select(finite, new_ema, ema),
        finite_all & finite,
      )
      out = {
        "loss": loss,
        "grad_norm": grad_norm,
        "update_norm": optax.tree.norm(updates),
        "ratio_dev": jnp.max(aux_K["ratio_dev"]),
        "clipfrac": jnp.mean(aux_K["clipfrac"]),
        "approx_kl": jnp.mean(aux_K["approx_kl"]),
        "logp_gap": jnp.max(aux_K["logp_gap"]),
        **({"kl": jnp.mean(aux_K["kl"])} if beta > 0 else {}),
      }
      return carry, out

    init = (params, state["opt_state"], state["ema"], jnp.array(True))
    (params, opt_state, ema, finite), per_u = jax.lax.scan(
      update, init, jnp.arange(num_updates)
    )
    new_state = {
      "params": params,
      "ema": ema,
      "opt_state": opt_state,
      "step": state["step"] + 1,
      "rng": state["rng"],
    }
    metrics = {
      "train/loss": jnp.mean(per_u["loss"]),
      "train/grad_norm": per_u["grad_norm"][-1],
      "train/param_norm": optax.tree.norm(params),
      "train/update_norm": per_u["update_norm"][-1],
      "train/finite": finite,
      "train/reward": jnp.mean(r_N),
      "train/reward_std": jnp.std(r_N),
      # On the first update the policy is the rollout's: ratio 1.
      "grpo/ratio_dev_first": per_u["ratio_dev"][0],
      "grpo/ratio_dev": jnp.max(per_u["ratio_dev"]),
      # |update log-prob - rollout log-prob| at the rollout's parameters:
      # float rounding only (checks the (step, image) bookkeeping).
      "grpo/logp_gap_first": per_u["logp_gap"][0],
      "grpo/clipfrac": jnp.mean(per_u["clipfrac"]),
      "grpo/approx_kl": jnp.mean(per_u["approx_kl"]),
      "grpo/adv_abs": jnp.mean(jnp.abs(adv_N)),
      "grpo/window_start": jnp.asarray(start, jnp.int32),
      "grpo/images": jnp.asarray(n_img, jnp.int32),
      **({"grpo/kl": jnp.mean(per_u["kl"])} if beta > 0 else {}),
    }
    return new_state, metrics

  return step


def sample_choice(variant: str):
  """Host side: validates the options; nothing is drawn on the host."""

  def fn(rng, num_steps: int, cfg, sigmas=None) -> dict[str, int]:
    del rng, sigmas
    g = grpo.options(cfg, variant)
    n_img = int(cfg.data.global_batch) * int(g["group_size"])
    if n_img % int(g["num_updates"]):
      raise ValueError(
        f"data.global_batch x grpo.group_size = {n_img} images do not split "
        f"into grpo.num_updates={g['num_updates']} equal minibatches."
      )
    if g["select"] == "window" and grpo.window_limit(num_steps) < 1:
      raise ValueError("mix_grpo needs at least 3 sampling steps.")
    return {}

  return fn
