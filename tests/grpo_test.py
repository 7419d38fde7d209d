"""The GRPO family: advantages, PPO loss, MixGRPO window, the train step.

The step runs on a toy velocity field and toy rewards through the same
``step.make_train_step`` dispatch that training uses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import defaults, methods, sampling
from leapalign_jax import step as step_lib
from leapalign_jax.methods import grpo
from leapalign_jax.rewards import nondiff

P, L, C, T = 2, 3, 2, 8  # prompts, tokens, channels, steps
SIGMAS = sampling.get_schedule(T, 1024)
GRPO = ("flow_grpo", "dance_grpo", "mix_grpo")


def test_group_advantages_match_numpy_and_vanish_for_constant_rewards():
  r = np.array([1.0, 2.0, 4.0, 0.5, 0.5, 0.5, 3.0, -1.0, 0.0], np.float32)
  adv = grpo.group_advantages(jnp.asarray(r), 3, 5.0, 1e-8, 1)
  want = np.concatenate(
    [(g - g.mean()) / (g.std(ddof=1) + 1e-8) for g in r.reshape(3, 3)]
  )
  np.testing.assert_allclose(adv, want, rtol=1e-5)
  np.testing.assert_array_equal(adv[3:6], 0.0)  # a constant group
  big = grpo.group_advantages(jnp.asarray([0.0, 0, 0, 0, 1]), 5, 1.5, 0, 0)
  assert float(big[-1]) == 1.5  # clipped (unclipped: 2.0)


def test_ppo_loss_clips_the_ratio():
  new = jnp.log(jnp.array([1.0, 1.5, 0.5, 1.5]))
  adv = jnp.array([1.0, 1.0, -1.0, -1.0])
  loss, aux = grpo.ppo_loss(new, jnp.zeros(4), adv, 0.2)
  # max(-A r, -A clip(r)): -1, -1.2 (clipped), 0.8 (clipped), 1.5.
  np.testing.assert_allclose(loss, (-1.0 - 1.2 + 0.8 + 1.5) / 4, rtol=1e-6)
  np.testing.assert_allclose(aux["clipfrac"], 0.75)


def _literal_window(num_iters, g, max_t):
  """GRPOTrainingStates("progressive") transcribed as a state machine."""
  cur, it, out = 0, 0, []
  for _ in range(num_iters):
    out.append(list(range(cur, min(cur + g["window_size"], max_t))))
    it += 1
    if it >= g["window_interval"]:
      it = 0
      cur += g["window_stride"]
    if cur > max_t:
      cur = 0 if g["window_roll_back"] else max_t
      if g["window_roll_back"]:
        it = 0
  return out


@pytest.mark.parametrize("stride,roll", [(1, True), (1, False), (4, True)])
def test_mixgrpo_window_schedule_matches_its_definition(stride, roll):
  g = grpo.options(_config("mix_grpo"), "mix_grpo")
  g.update(window_stride=stride, window_roll_back=roll, window_interval=3)
  num_steps, iters = 12, 120
  want = _literal_window(iters, g, num_steps - 2)
  starts = grpo.host_window_starts(iters, num_steps, g)
  for k in range(iters):
    mask = np.asarray(grpo.window_sde_mask(starts[k], num_steps, 4))
    assert list(np.flatnonzero(mask)) == want[k], k
    idx, valid = grpo.trained_steps(None, 1, num_steps, g, starts[k])
    assert list(np.asarray(idx[0])[np.asarray(valid[0])]) == want[k]
  # Published setting: 25 steps, window 4, moves 1 step every 25 iters.
  g.update(window_stride=1, window_interval=25, window_roll_back=True)
  assert list(grpo.host_window_starts(300, 25, g)[::25]) == list(range(12))


def test_random_steps_are_distinct_eligible_and_per_sample():
  g = grpo.options(_config("dance_grpo"), "dance_grpo")
  idx, valid = grpo.trained_steps(jax.random.key(0), 16, T, g, 0)
  assert idx.shape == (16, int((T - 1) * 0.6)) and bool(valid.all())
  idx = np.asarray(idx)
  assert idx.max() < T - 1  # the last step is never trained
  assert all(len(set(row)) == len(row) for row in idx)
  assert len({tuple(row) for row in idx}) > 1


# --------------------------------------------------------------------------
# The train step on a toy problem.
# --------------------------------------------------------------------------


def _velocity(p, frozen_flux, x, t, batch):
  del frozen_flux
  cond = jnp.mean(batch["t5"], axis=1)[:, None, :]
  return jnp.tanh(x @ p["w"]) + t[:, None, None] * p["b"][None, None] + cond


def _reward_target(frozen, x0, batch):
  del frozen, batch
  return -jnp.mean((x0 - 0.5) ** 2, axis=(1, 2))


def _reward_constant(frozen, x0, batch):
  del frozen, batch
  return jnp.full((x0.shape[0],), 3.0)


def _noise(key, n):
  return jax.random.normal(key, (n, L, C))


def _config(name, **grpo_opts):
  c = defaults.base()
  c.method = name
  c.data.global_batch = P
  c.optim.update(lr=0.05, weight_decay=0.0, clip_norm=0.0)
  c.grpo.update(group_size=4, **grpo_opts)
  return c


def _run(name, reward, steps=1, **grpo_opts):
  c = _config(name, **grpo_opts)
  methods.get(name).sample_choice(None, T, c)  # host-side validation
  fns = step_lib.StepFns(_velocity, reward, _noise)
  tx = step_lib.make_optimizer(c.optim)
  rng = np.random.default_rng(0)
  params = {
    "w": jnp.asarray(rng.normal(size=(C, C)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(C,)), jnp.float32),
  }
  state = step_lib.init_state(params, tx, 0)
  fn = jax.jit(step_lib.make_train_step(c, fns, tx, SIGMAS))
  frozen = {"model": None, "vae": None, "reward": None}
  batch = {"t5": jnp.asarray(rng.normal(size=(P, 5, C)), jnp.float32)}
  out = []
  for _ in range(steps):
    state, m = fn(state, frozen, batch, {})
    out.append(jax.device_get(m))
  return params, state, out


@pytest.mark.parametrize("name", GRPO)
def test_constant_reward_gives_zero_advantages_and_no_update(name):
  params, state, (m,) = _run(name, _reward_constant, num_updates=2)
  assert m["grpo/adv_abs"] == 0.0 and m["train/loss"] == 0.0
  for k in params:
    np.testing.assert_array_equal(state["params"][k], params[k])
  assert bool(m["train/finite"])


@pytest.mark.parametrize("name", GRPO)
def test_first_update_ratio_is_one_and_later_updates_move(name):
  params, state, (m,) = _run(name, _reward_target, num_updates=2)
  assert m["grpo/ratio_dev_first"] == 0.0  # exactly: on-policy
  # The rollout's log-probs, re-evaluated by the update: rounding only.
  assert m["grpo/logp_gap_first"] < 1e-5
  assert m["grpo/ratio_dev"] > 0.0  # update 2 sees the updated policy
  assert m["grpo/adv_abs"] > 0.0
  assert not np.array_equal(state["params"]["w"], params["w"])
  assert int(m["grpo/images"]) == P * 4


@pytest.mark.parametrize("name", GRPO)
def test_training_raises_the_reward(name):
  """The update's sign: 40 rollouts move the toy policy toward the reward.

  (Measured: about -1.0 over the first five rollouts, about -0.3 over the
  last five, for each method.)
  """
  _, _, ms = _run(name, _reward_target, steps=40, num_updates=2, clip_range=0.2)
  r = np.array([float(m["train/reward"]) for m in ms])
  assert r[-5:].mean() > r[:5].mean() + 0.4, r


def test_steps_are_deterministic_in_the_state():
  """Resume: the step is a pure function of (state, batch)."""
  _, state_a, ms = _run("dance_grpo", _reward_target, steps=2)
  _, state_b, ms_b = _run("dance_grpo", _reward_target, steps=2)
  for k in state_a["params"]:
    np.testing.assert_array_equal(state_a["params"][k], state_b["params"][k])
  assert ms[0]["train/reward"] != ms[1]["train/reward"]  # fresh noise


def test_mix_grpo_logs_its_window_and_bad_splits_raise():
  _, _, ms = _run("mix_grpo", _reward_target, steps=2, window_interval=1)
  assert [int(m["grpo/window_start"]) for m in ms] == [0, 1]
  with pytest.raises(ValueError, match="num_updates"):
    methods.get("flow_grpo").sample_choice(
      None, T, _config("flow_grpo", num_updates=3)
    )
  with pytest.raises(ValueError, match="LoRA"):
    _run("flow_grpo", _reward_target, kl_beta=0.1)


def _host_target(x0, ids):
  del ids
  return -np.mean((x0 - 0.5) ** 2, axis=(1, 2))


def test_a_host_callback_reward_trains_like_the_jax_one():
  """The same reward as a numpy host scorer (no gradient) gives the same step."""
  host = nondiff.host_scorer(_host_target)

  def reward(frozen, x0, batch):
    del frozen, batch
    return host({}, x0, None)

  _, state_h, (m_h,) = _run("dance_grpo", reward, num_updates=2)
  _, state_j, (m_j,) = _run("dance_grpo", _reward_target, num_updates=2)
  np.testing.assert_allclose(
    m_h["train/reward"], m_j["train/reward"], rtol=1e-5
  )
  np.testing.assert_allclose(
    state_h["params"]["w"], state_j["params"]["w"], rtol=1e-4, atol=1e-6
  )
  assert m_h["grpo/adv_abs"] > 0
