"""Tests for leapalign_jax.methods on toy velocity fields.

Every gradient is checked against an independent definition written here:
the closed form of method.md §5 (float64 numpy on a linear field, vjps of
the field on an MLP), spec-literal surrogates with explicit stop-gradients,
and explicitly unrolled baselines.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import methods, sampling

B, L, C, T = 2, 4, 3, 8
SG = jax.lax.stop_gradient
SIGMAS = sampling.get_schedule(T, 1024)  # host float32 [T + 1]
TARGET = np.linspace(-1.0, 1.0, L * C, dtype=np.float32).reshape(L, C)


def linear_field(p, x_BLC, t_B):
  """v = x A + t b + c."""
  return (
    x_BLC @ p["A"]
    + t_B[:, None, None] * p["b"][None, None]
    + p["c"][None, None]
  )


def mlp_field(p, x_BLC, t_B):
  h = jnp.tanh(x_BLC @ p["w1"] + t_B[:, None, None] * p["wt"][None, None])
  return h @ p["w2"] + p["b2"][None, None]


FIELDS = {"linear": linear_field, "mlp": mlp_field}


def reward(x0_BLC):
  return -jnp.mean((x0_BLC - TARGET[None]) ** 2, axis=(1, 2))


def _params(field):
  rng = np.random.default_rng(1)

  def normal(scale, *shape):
    return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

  if field == "linear":
    return {"A": normal(0.3, C, C), "b": normal(1.0, C), "c": normal(1.0, C)}
  return {
    "w1": normal(0.7, C, 6),
    "wt": normal(1.0, 6),
    "w2": normal(0.7, 6, C),
    "b2": normal(0.3, C),
  }


PARAMS = {f: _params(f) for f in FIELDS}
NOISE = jnp.asarray(
  np.random.default_rng(2).normal(size=(B, L, C)), jnp.float32
)
KEY = jax.random.key(3)


def _cfg(overrides):
  cfg = methods.default_config()
  for path, value in overrides:
    *parents, leaf = path.split(".")
    node = cfg
    for name in parents:
      node = node[name]
    node[leaf] = value
  return cfg


@functools.cache
def runner(name, field, overrides=()):
  """One jitted program per (method, field, config); choices are traced."""
  cfg = _cfg(overrides)
  method = methods.get(name)

  @jax.jit
  def run(params, noise, choice, key):
    problem = methods.Problem(FIELDS[field], reward, jnp.asarray(SIGMAS), noise)
    return method.loss_and_grad(params, problem, choice, key, cfg)

  return run


def _choice(**idx):
  return {k: np.int32(v) for k, v in idx.items()}


def _pair(k, j):
  return _choice(k_idx=k, j_idx=j)


def assert_tree_close(got, want, rtol=1e-5, atol_scale=1e-6):
  def check(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    atol = atol_scale * max(1.0, float(np.max(np.abs(b)))) if b.size else 0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)

  jax.tree.map(check, got, want)


def _rollout(vel, params, x, start, stop):
  """Plain Python Euler loop (eager), the reference rollout."""
  for i in range(start, stop):
    t_B = jnp.full((B,), SIGMAS[i])
    x = x + (SIGMAS[i + 1] - SIGMAS[i]) * vel(params, x, t_B)
  return x


def _hinge_mean(r, lam, w=1.0):
  return jnp.mean(w * jnp.maximum(lam - r, 0.0))


# ---------------------------------------------------------------------------
# Registry and config.
# ---------------------------------------------------------------------------


def test_registry():
  assert methods.names() == (
    "leapalign",
    "refl",
    "draft_lv",
    "draft_k",
    "drtune",
    "full_backprop",
    "flow_grpo",
    "dance_grpo",
    "mix_grpo",
  )
  for name in methods.names():
    assert isinstance(methods.get(name), methods.Method)
  with pytest.raises(ValueError, match="leapalign, refl, draft_lv"):
    methods.get("alignprop")


def test_default_config():
  cfg = methods.default_config()
  assert cfg.method == "leapalign" and cfg.loss.lam == 0.55
  assert (cfg.leap.alpha, cfg.leap.tau, cfg.leap.num_leaps) == (0.3, 0.1, 2)
  assert cfg.leap.fixed_gap is None
  cfg.leap.fixed_gap = 12  # the placeholder accepts an int
  assert (cfg.refl.last_steps, cfg.drtune.k, cfg.drtune.last_steps) == (
    11,
    2,
    11,
  )
  assert (cfg.draft.k, cfg.draft.lv_n, cfg.full_bp.truncation) == (1, 2, "none")


def test_scale_steps():
  assert [methods.scale_steps(11, t) for t in (25, 50, 10, 1)] == [11, 22, 4, 1]


def test_invalid_options_raise():
  problem = methods.Problem(linear_field, reward, jnp.asarray(SIGMAS), NOISE)
  run = methods.get("leapalign").loss_and_grad
  for overrides, match in [
    ((("leap.reward_on", "x1"),), "leap.reward_on"),
    ((("leap.weighting", "d_j"), ("leap.num_leaps", 1)), "two leaps"),
    ((("leap.grad_passes", "both"),), "leap.grad_passes"),
  ]:
    with pytest.raises(ValueError, match=match):
      run(PARAMS["linear"], problem, _pair(1, 2), KEY, _cfg(overrides))


# ---------------------------------------------------------------------------
# LeapAlign: reuse == recompute.
# ---------------------------------------------------------------------------

LEAP_CONFIGS = {
  "default": (),
  "alpha0_dj": (("leap.alpha", 0.0), ("leap.weighting", "d_j")),
  "alpha1_leap_d0": (
    ("leap.alpha", 1.0),
    ("leap.reward_on", "leap"),
    ("leap.weighting", "d_0"),
  ),
  "one_leap_none": (("leap.num_leaps", 1), ("leap.weighting", "none")),
  "three_leaps": (("leap.num_leaps", 3),),
  "three_leaps_leap_dj": (
    ("leap.num_leaps", 3),
    ("leap.alpha", 1.0),
    ("leap.reward_on", "leap"),
    ("leap.weighting", "d_j"),
  ),
}
CHOICES = {
  1: [(0,), (3,), (T - 1,)],
  2: [(0, 1), (0, T - 1), (2, 5), (T - 2, T - 1)],
  3: [(0, 1, 2), (1, 4, T - 1), (5, 6, 7)],
}


def _leap_choice(idx):
  names = ("k_idx", "j_idx", "l_idx")
  return _choice(**dict(zip(names, idx)))


def _leap_run(field, config, mode, idx):
  overrides = (*LEAP_CONFIGS[config], ("leap.grad_passes", mode))
  run = runner("leapalign", field, overrides)
  return run(PARAMS[field], NOISE, _leap_choice(idx), KEY)


@pytest.mark.parametrize("config", list(LEAP_CONFIGS))
def test_leapalign_reuse_equals_recompute(config):
  n = dict(LEAP_CONFIGS[config]).get("leap.num_leaps", 2)
  for idx in CHOICES[n]:
    loss_a, grads_a, aux_a = _leap_run("mlp", config, "recompute", idx)
    loss_b, grads_b, aux_b = _leap_run("mlp", config, "reuse", idx)
    assert set(aux_a) == set(aux_b)
    assert_tree_close(loss_b, loss_a)
    assert_tree_close(aux_b, aux_a)
    assert_tree_close(grads_b, grads_a)
    assert float(jnp.abs(grads_a["w1"]).max()) > 1e-4  # not trivially zero
  # One compiled program serves every choice.
  for mode in ("reuse", "recompute"):
    overrides = (*LEAP_CONFIGS[config], ("leap.grad_passes", mode))
    assert runner("leapalign", "mlp", overrides)._cache_size() == 1


# ---------------------------------------------------------------------------
# LeapAlign: closed form of method.md §5.
# ---------------------------------------------------------------------------


def _closed_form_linear(params, k, j, alpha, tau=0.1, lam=0.55):
  """§5 in float64: two single-step terms + alpha x the nested term."""
  A, b, c = (np.asarray(params[n], np.float64) for n in "Abc")
  sig = SIGMAS.astype(np.float64)
  xs = [np.asarray(NOISE, np.float64)]
  for i in range(T):
    v = xs[-1] @ A + sig[i] * b + c
    xs.append(xs[-1] + (sig[i + 1] - sig[i]) * v)
  s_k, s_j, x_k, x_j, x0 = sig[k], sig[j], xs[k], xs[j], xs[T]
  xh_j = x_k - (s_k - s_j) * (x_k @ A + s_k * b + c)
  xh_0 = x_j - s_j * (x_j @ A + s_j * b + c)
  d_j = np.abs(x_j - xh_j).mean(axis=(1, 2))
  d_0 = np.abs(x0 - xh_0).mean(axis=(1, 2))
  w = 1 / (np.maximum(d_j, tau) + np.maximum(d_0, tau))
  r = -((x0 - TARGET) ** 2).mean(axis=(1, 2))
  # dL/dx0 for L = mean_B(w * (lam - r)), the hinge being active.
  G = (w * (lam > r) / B)[:, None, None] * 2 * (x0 - TARGET) / (L * C)

  def through_params(x, t, g):  # g^T dv(x, t)/dθ
    return {
      "A": np.einsum("blc,bld->cd", x, g),
      "b": t * g.sum((0, 1)),
      "c": g.sum((0, 1)),
    }

  single_j = through_params(x_j, s_j, -s_j * G)
  single_k = through_params(x_k, s_k, -(s_k - s_j) * G)
  nested = through_params(x_k, s_k, s_j * (s_k - s_j) * (G @ A.T))
  grads = {n: single_j[n] + single_k[n] + alpha * nested[n] for n in single_j}
  loss = np.mean(w * np.maximum(lam - r, 0))
  return loss, grads, {"w": w, "d_j": d_j, "d_0": d_0, "reward": r}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mode", ["reuse", "recompute"])
def test_leapalign_closed_form_linear(alpha, mode):
  run = runner(
    "leapalign", "linear", (("leap.alpha", alpha), ("leap.grad_passes", mode))
  )
  for k, j in CHOICES[2]:
    loss, grads, aux = run(PARAMS["linear"], NOISE, _pair(k, j), KEY)
    want_loss, want_grads, want_aux = _closed_form_linear(
      PARAMS["linear"], k, j, alpha
    )
    assert_tree_close(loss, want_loss, rtol=1e-5)
    assert_tree_close({n: aux[n] for n in want_aux}, want_aux, rtol=1e-5)
    assert_tree_close(grads, want_grads, rtol=1e-4, atol_scale=1e-5)
    assert int(aux["k_idx"]) == k and int(aux["j_idx"]) == j
    assert float(aux["sigma_k"]) == SIGMAS[k]
    assert float(aux["sigma_j"]) == SIGMAS[j]


@pytest.mark.parametrize("mode", ["reuse", "recompute"])
def test_leapalign_closed_form_mlp(mode):
  """The same three terms with the field's own vjps (alpha = 0.3)."""
  vel, params, alpha = mlp_field, PARAMS["mlp"], 0.3
  for k, j in CHOICES[2]:
    _, grads, aux = _leap_run("mlp", "default", mode, (k, j))
    x_k = _rollout(vel, params, NOISE, 0, k)
    x_j = _rollout(vel, params, x_k, k, j)
    x0 = _rollout(vel, params, x_j, j, T)
    s_k, s_j = SIGMAS[k], SIGMAS[j]
    t_k, t_j = jnp.full((B,), s_k), jnp.full((B,), s_j)
    G = (aux["w"] / B)[:, None, None] * 2 * (x0 - TARGET[None]) / (L * C)
    _, pull_k = jax.vjp(functools.partial(vel, x_BLC=x_k, t_B=t_k), params)
    _, pull_j = jax.vjp(functools.partial(vel, t_B=t_j), params, x_j)
    single_j, jac_x = pull_j(-s_j * G)  # jac_x = -s_j G dv/dx(x_j)
    (single_k,) = pull_k(-(s_k - s_j) * G)
    (nested,) = pull_k(-(s_k - s_j) * jac_x)
    want = jax.tree.map(
      lambda a, b, n: a + b + alpha * n, single_j, single_k, nested
    )
    assert_tree_close(grads, want, rtol=1e-5, atol_scale=1e-6)


def test_alpha0_equals_input_stop_gradient():
  """alpha = 0 is a DRTune-style stop-gradient on the model input at j."""
  vel, params = mlp_field, PARAMS["mlp"]
  for k, j in CHOICES[2]:
    _, grads, aux = _leap_run("mlp", "alpha0_dj", "reuse", (k, j))
    x_k = _rollout(vel, params, NOISE, 0, k)
    x_j = _rollout(vel, params, x_k, k, j)
    x0 = _rollout(vel, params, x_j, j, T)
    s_k, s_j = SIGMAS[k], SIGMAS[j]

    def loss(p, x_k=x_k, x_j=x_j, x0=x0, s_k=s_k, s_j=s_j, w=aux["w"]):
      xh_j = x_k - (s_k - s_j) * vel(p, x_k, jnp.full((B,), s_k))
      xj_c = xh_j + SG(x_j - xh_j)
      xh_0 = xj_c - s_j * vel(p, SG(xj_c), jnp.full((B,), s_j))
      x0_c = xh_0 + SG(x0 - xh_0)
      return _hinge_mean(reward(x0_c), 0.55, w)

    assert_tree_close(grads, jax.grad(loss)(params))


def _spec_surrogate(field, idx, alpha, reward_on, weighting, tau=0.1, lam=0.55):
  """method.md §3–7 written literally (pred + sg(real - pred), etc.)."""
  vel, params = FIELDS[field], PARAMS[field]
  n = len(idx)
  real = [_rollout(vel, params, NOISE, 0, i) for i in idx]
  real.append(_rollout(vel, params, NOISE, 0, T))
  s = [SIGMAS[i] for i in idx] + [0.0]

  def loss(p):
    y, ds = real[0], []
    for m in range(n):
      if m == 0:
        u = y
      elif alpha > 0:
        u = alpha * y + (1 - alpha) * SG(y)
      else:
        u = SG(y)
      pred = y - (s[m] - s[m + 1]) * vel(p, u, jnp.full((B,), s[m]))
      ds.append(jnp.mean(jnp.abs(real[m + 1] - pred), axis=(1, 2)))
      y = pred + SG(real[m + 1] - pred)
    r = reward(y if reward_on == "x0" else pred)
    picked = {"both": ds, "d_j": ds[:-1], "d_0": ds[-1:], "none": []}
    w = sum(jnp.maximum(d, tau) for d in picked[weighting])
    w = SG(1 / w) if picked[weighting] else 1.0
    return _hinge_mean(r, lam, w), (r, jnp.stack(ds))

  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("config", list(LEAP_CONFIGS))
def test_leapalign_matches_spec_surrogate(config):
  """All ablations (1/2/3 leaps, reward_on, weighting, alpha) vs the spec."""
  opts = dict(LEAP_CONFIGS[config])
  n = opts.get("leap.num_leaps", 2)
  for idx in CHOICES[n][:2]:
    (loss, (r, ds)), grads = _spec_surrogate(
      "mlp",
      idx,
      opts.get("leap.alpha", 0.3),
      opts.get("leap.reward_on", "x0"),
      opts.get("leap.weighting", "both"),
    )
    got_loss, got_grads, aux = _leap_run("mlp", config, "reuse", idx)
    assert_tree_close(got_loss, loss)
    assert_tree_close(aux["reward"], r)
    assert_tree_close(aux["distances"], ds)
    assert_tree_close(got_grads, grads)


def test_gradient_is_lambda_independent_when_hinge_active():
  """Rewards are <= 0 here, so every lambda > 0 gives the same gradient."""
  loss, grads, aux = _leap_run("mlp", "default", "reuse", (2, 5))  # λ 0.55
  assert float(jnp.max(aux["reward"])) < 0.55
  loss_10, grads_10, _ = runner("leapalign", "mlp", (("loss.lam", 10.0),))(
    PARAMS["mlp"], NOISE, _pair(2, 5), KEY
  )
  assert_tree_close(grads_10, grads)
  assert float(loss_10) > float(loss)
  # A lambda below every reward switches the hinge off.
  loss, grads, aux = runner("leapalign", "mlp", (("loss.lam", -100.0),))(
    PARAMS["mlp"], NOISE, _pair(2, 5), KEY
  )
  assert float(jnp.min(aux["reward"])) > -100.0 and float(loss) == 0.0
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, 0.0)


# ---------------------------------------------------------------------------
# Baselines vs. their definitions (linear field, unrolled loops).
# ---------------------------------------------------------------------------


def _value_and_grad(loss):
  return jax.value_and_grad(loss)(PARAMS["linear"])


def test_refl_matches_definition():
  vel, run = linear_field, runner("refl", "linear")
  for stop in (0, 4, T - 1):
    loss, grads, aux = run(PARAMS["linear"], NOISE, _choice(stop_idx=stop), KEY)
    x = _rollout(vel, PARAMS["linear"], NOISE, 0, stop)

    def ref(p, x=x, s=SIGMAS[stop]):
      return _hinge_mean(reward(x - s * vel(p, x, jnp.full((B,), s))), 0.55)

    want_loss, want = _value_and_grad(ref)
    assert_tree_close(loss, want_loss)
    assert_tree_close(grads, want)
    assert int(aux["stop_idx"]) == stop


@pytest.mark.parametrize("k", [1, 3])
def test_draft_k_matches_definition(k):
  vel = linear_field
  loss, grads, _ = runner("draft_k", "linear", (("draft.k", k),))(
    PARAMS["linear"], NOISE, {}, KEY
  )

  def ref(p):  # all steps unrolled; params detached before step T - K
    x = _rollout(vel, SG(p), NOISE, 0, T - k)
    return _hinge_mean(reward(_rollout(vel, p, x, T - k, T)), 0.55)

  want_loss, want = _value_and_grad(ref)
  assert_tree_close(loss, want_loss)
  assert_tree_close(grads, want)


def test_draft_lv_matches_definition():
  vel, n = linear_field, 2
  loss, grads, aux = runner("draft_lv", "linear")(
    PARAMS["linear"], NOISE, {}, KEY
  )
  s = SIGMAS[T - 1]
  x = _rollout(vel, PARAMS["linear"], NOISE, 0, T - 1)

  def ref(p):
    x0 = x - s * vel(p, x, jnp.full((B,), s))
    total = _hinge_mean(reward(x0), 0.55)
    for m in range(1, n + 1):
      eps = jax.random.normal(jax.random.fold_in(KEY, m), x.shape)
      xn = (1 - s) * SG(x0) + s * eps
      total += _hinge_mean(reward(xn - s * vel(p, xn, jnp.full((B,), s))), 0.55)
    return total

  want_loss, want = _value_and_grad(ref)
  assert_tree_close(loss, want_loss)
  assert_tree_close(grads, want)
  assert_tree_close(
    aux["reward"], reward(_rollout(vel, PARAMS["linear"], x, T - 1, T))
  )


def _drtune_ref(trained, stop):
  """DRTune written literally: input sg(x_t), untrained v sg'd, x kept."""
  vel = linear_field

  def ref(p):
    x = NOISE
    for i in range(stop + 1):
      t_B = jnp.full((B,), SIGMAS[i])
      v = vel(p, SG(x), t_B) if i in trained else SG(vel(p, SG(x), t_B))
      if i == stop:
        return _hinge_mean(reward(x - SIGMAS[i] * v), 0.55)
      x = x + (SIGMAS[i + 1] - SIGMAS[i]) * v

  return _value_and_grad(ref)


def test_drtune_matches_definition():
  run = runner("drtune", "linear")
  rng = np.random.default_rng(0)
  cfg = methods.default_config()
  cases = [((1, 5), 6), ((2, 6), 6), ((3, 7), 5), ((0, 4), 7)]
  cases += [
    (tuple(c[f"train_idx_{m}"] for m in range(2)), c["stop_idx"])
    for c in (
      methods.get("drtune").sample_choice(rng, T, cfg) for _ in range(3)
    )
  ]
  for trained, stop in cases:
    choice = _choice(
      train_idx_0=trained[0], train_idx_1=trained[1], stop_idx=stop
    )
    loss, grads, _ = run(PARAMS["linear"], NOISE, choice, KEY)
    want_loss, want = _drtune_ref(trained, stop)
    assert_tree_close(loss, want_loss)
    assert_tree_close(grads, want)
  assert run._cache_size() == 1


def test_full_backprop_matches_definition():
  vel = linear_field
  loss, grads, _ = runner("full_backprop", "linear")(
    PARAMS["linear"], NOISE, {}, KEY
  )

  def ref(p):
    return _hinge_mean(reward(_rollout(vel, p, NOISE, 0, T)), 0.55)

  want_loss, want = _value_and_grad(ref)
  assert_tree_close(loss, want_loss)
  assert_tree_close(grads, want)

  run = runner("full_backprop", "linear", (("full_bp.truncation", "random"),))
  for start in (0, 3, T - 1):
    loss, grads, aux = run(
      PARAMS["linear"], NOISE, _choice(start_idx=start), KEY
    )

    def ref_trunc(p, start=start):
      x = _rollout(vel, SG(p), NOISE, 0, start)
      return _hinge_mean(reward(_rollout(vel, p, x, start, T)), 0.55)

    want_loss, want = _value_and_grad(ref_trunc)
    assert_tree_close(loss, want_loss)
    assert_tree_close(grads, want)
    assert int(aux["start_idx"]) == start


# ---------------------------------------------------------------------------
# Host-side choices.
# ---------------------------------------------------------------------------


def _draws(name, num_steps, cfg, n=400, **kwargs):
  sample = methods.get(name).sample_choice
  return [
    sample(np.random.default_rng((7, step)), num_steps, cfg, **kwargs)
    for step in range(n)
  ]


def test_sample_choices():
  cfg = methods.default_config()
  pairs = _draws("leapalign", 25, cfg)
  assert all(0 <= c["k_idx"] < c["j_idx"] < 25 for c in pairs)
  assert pairs == _draws("leapalign", 25, cfg)  # reproducible from the seed
  cfg.leap.num_leaps = 3
  cfg.leap.step_range = "late_half_sigma"
  triples = _draws("leapalign", 25, cfg, sigmas=sampling.get_schedule(25, 2025))
  assert all(18 <= c["k_idx"] < c["j_idx"] < c["l_idx"] < 25 for c in triples)

  cfg = methods.default_config()
  assert {c["stop_idx"] for c in _draws("refl", 25, cfg)} == set(range(14, 25))
  assert {c["stop_idx"] for c in _draws("refl", 50, cfg)} == set(range(28, 50))

  drtune = _draws("drtune", 25, cfg)
  assert {c["train_idx_0"] for c in drtune} == set(range(13))
  assert all(c["train_idx_1"] == c["train_idx_0"] + 12 for c in drtune)
  assert {c["stop_idx"] for c in drtune} == set(range(14, 25))

  assert _draws("draft_k", 25, cfg, n=1) == [{}]
  assert _draws("full_backprop", 25, cfg, n=1) == [{}]
  cfg.full_bp.truncation = "random"
  starts = {c["start_idx"] for c in _draws("full_backprop", 25, cfg)}
  assert starts <= set(range(25)) and 24 in starts and len(starts) > 4


# ---------------------------------------------------------------------------
# Memory: constant in T for LeapAlign, growing for full backprop.
# ---------------------------------------------------------------------------


def test_memory_scaling_with_num_steps():
  Lm, Cm, H = 64, 16, 128
  params = {
    "w1": jax.ShapeDtypeStruct((Cm, H), jnp.float32),
    "w2": jax.ShapeDtypeStruct((H, Cm), jnp.float32),
  }

  def vel(p, x, t_B):
    return jnp.tanh(x @ p["w1"] + t_B[:, None, None]) @ p["w2"]

  def temp_bytes(name, num_steps, overrides):
    cfg = _cfg(overrides)
    method = methods.get(name)
    choice = {
      k: np.int32(v)
      for k, v in method.sample_choice(
        np.random.default_rng(0), num_steps, cfg
      ).items()
    }

    def f(p, noise, sigmas, choice):
      problem = methods.Problem(
        vel, lambda x: -jnp.mean(x**2, axis=(1, 2)), sigmas, noise
      )
      return method.loss_and_grad(p, problem, choice, KEY, cfg)

    sigmas = jnp.asarray(sampling.get_schedule(num_steps, 1024))
    noise = jax.ShapeDtypeStruct((B, Lm, Cm), jnp.float32)
    compiled = jax.jit(f).lower(params, noise, sigmas, choice).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  latent_bytes = B * Lm * Cm * 4
  for mode in ("reuse", "recompute"):
    overrides = (("leap.grad_passes", mode),)
    small, big = (temp_bytes("leapalign", t, overrides) for t in (4, 16))
    assert big == small, (mode, small, big)
  small, big = (temp_bytes("full_backprop", t, ()) for t in (4, 16))
  assert big - small >= 12 * latent_bytes, (small, big)
