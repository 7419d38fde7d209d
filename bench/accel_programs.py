"""The programs ``bench/accelerator.py`` times: cases, configs, timing.

Modes (full size / ``--tiny``), the cases (methods x batch), compiling in
parallel threads, timing with a time budget, memory readings, the attention
check, the forward programs, the train-step setups, the LeapAlign step's
parts and its cost floor. Imported by ``accelerator.py`` after it has set the
XLA client options (before JAX starts).
"""

import concurrent.futures
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leapalign_jax import (
  abstract_run,
  configs_io,
  flops,
  methods,
  sampling,
  sharding,
)
from leapalign_jax import step as step_lib
from leapalign_jax.models import attention, autoencoder, clip, flux

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Dense bf16 peak by device kind (vendor datasheets; MFU's denominator).
PEAK_BF16 = {
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "TPU v5p": 459e12,
  "TPU v5 lite": 197e12,
  "TPU v6 lite": 918e12,
}


@dataclasses.dataclass(frozen=True)
class Mode:
  """Sizes of a benchmark mode (full size on an accelerator, or tiny)."""

  config: str
  overrides: tuple[str, ...]
  resolutions: dict  # name -> (height, width) in pixels
  step_res: str  # the resolution the train steps use
  batches: tuple[int, int]  # (small, large)
  attn_shapes: tuple  # (name, [B, L, H, D], causal)
  warmup: int
  repeats: int
  train_repeats: int


FULL = Mode(
  config="configs/leap_hpsv2_flux_dev.py:lora=1",
  overrides=("mesh.num_devices=1",),
  resolutions={"512": (512, 512), "720": (720, 720), "1024": (1024, 1024)},
  step_res="720",
  batches=(1, 4),
  attn_shapes=(
    ("flux 720²", (1, 2537, 24, 128), False),
    ("vit-h-14 vision", (4, 257, 16, 80), False),
    ("clip-h text", (4, 77, 16, 64), True),
  ),
  warmup=3,
  repeats=10,
  train_repeats=2,
)
TINY = Mode(
  config="configs/tiny.py",
  overrides=(
    "mesh.num_devices=1",
    "lora.enabled=True",
    "lora.rank=4",
    "flux.remat='full'",
    "sampling.num_steps=4",
  ),
  resolutions={"32": (32, 32), "64": (64, 64)},
  step_res="32",
  batches=(1, 2),
  attn_shapes=(("odd", (1, 37, 2, 16), False), ("text", (2, 9, 2, 8), True)),
  warmup=1,
  repeats=2,
  train_repeats=2,
)


# XLA GPU options tried on the 720² forward (section 1): each its own compile
# of the same program; an option this XLA does not know is reported.
FLAG_VARIANTS = {
  "cublaslt": {"xla_gpu_enable_cublaslt": True},
  "no triton gemm": {"xla_gpu_enable_triton_gemm": False},
  "no command buffers": {"xla_gpu_enable_command_buffer": ""},
}


@dataclasses.dataclass
class Case:
  """One train-step configuration."""

  name: str
  method: str
  batch: int
  overrides: tuple[str, ...] = ()
  variant: bool = False  # section 4 (after the parts)


def cases(mode: Mode) -> list[Case]:
  small, large = mode.batches
  return [
    Case(f"leapalign b{large}", "leapalign", large),
    Case(f"leapalign b{small}", "leapalign", small),
    Case(f"draft_k b{small}", "draft_k", small),
    Case(f"drtune b{small}", "drtune", small),
    Case(f"full_backprop b{small}", "full_backprop", small),
    Case(
      f"leapalign b{large}, attention xla",
      "leapalign",
      large,
      ("flux.attention='xla'", "rewards.{reward}.attention='xla'"),
      True,
    ),
    Case(
      f"leapalign b{large}, remat dots",
      "leapalign",
      large,
      ("flux.remat='dots'",),
      True,
    ),
    Case(
      f"leapalign b{large}, remat names",
      "leapalign",
      large,
      ("flux.remat='names'",),
      True,
    ),
  ]


class Budget:
  """Wall-clock budget of the whole benchmark."""

  def __init__(self, seconds: float):
    self.start, self.seconds = time.perf_counter(), seconds

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.start)

  def elapsed(self) -> float:
    return time.perf_counter() - self.start


@dataclasses.dataclass
class Program:
  """A lowered program, compiled later (in a thread)."""

  name: str
  lowered: object
  options: dict | None = None  # XLA compiler options (flag variants)
  compiled: object = None
  compile_s: float = 0.0
  error: str = ""


def compile_all(programs: list[Program], workers: int) -> float:
  """Compiles every program in parallel threads; returns the wall seconds."""

  def one(p: Program) -> None:
    t0 = time.perf_counter()
    try:
      p.compiled = p.lowered.compile(compiler_options=p.options)
    except Exception as e:  # noqa: BLE001 - recorded, the rest goes on
      p.error = _short(e)
    p.compile_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(one, programs))
  return time.perf_counter() - t0


def _short(e: Exception) -> str:
  text = f"{type(e).__name__}: {e}"
  return text.splitlines()[0][:300] if text else type(e).__name__


def timed(fn, warmup: int, repeats: int, budget: Budget) -> dict:
  """First call, then the median of up to ``repeats`` calls in the budget."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    if times and budget.left() < 2 * statistics.median(times):
      break
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return {
    "first_call_s": first,
    "median_s": statistics.median(times) if times else first,
    "repeats": len(times),
  }


def peak_bytes() -> int:
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get("peak_bytes_in_use", 0))


def planned_bytes(compiled) -> int:
  """The compiler's peak: arguments + outputs - aliased + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return int(
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.temp_size_in_bytes
  )


def load_config(mode: Mode, case: Case | None = None, extra=()):
  reward = "hpsv2" if mode is FULL else "clip"
  overrides = [o.format(reward=reward) for o in (*mode.overrides, *extra)]
  if case is not None:
    overrides += [
      f"method='{case.method}'",
      f"data.global_batch={case.batch}",
      *(o.format(reward=reward) for o in case.overrides),
    ]
  h, w = mode.resolutions[mode.step_res]
  overrides += [f"sampling.height={h}", f"sampling.width={w}"]
  return configs_io.load_config(os.path.join(ROOT, mode.config), overrides)


def shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def token_grid(config, hw) -> tuple[int, int]:
  """The packed-token grid of an image of ``hw`` pixels (the run's VAE)."""
  lh, lw, _ = autoencoder.VARIANTS[config.vae.variant].latent_shape(*hw)
  return lh // 2, lw // 2


# ---------------------------------------------------------------------------
# 0. attention check
# ---------------------------------------------------------------------------


def attention_check(mode: Mode, gpu: bool) -> list[dict]:
  """The padded kernel vs XLA attention, value and gradients."""
  impl = "cudnn" if gpu else "xla"  # on a CPU: the same padded code path
  dtype = jnp.bfloat16 if gpu else jnp.float32
  out = []
  for i, (name, shape, causal) in enumerate(mode.attn_shapes):
    record = {"name": name, "shape": list(shape), "causal": causal}
    try:
      record.update(check_one(shape, causal, impl, dtype, seed=i))
    except Exception as e:  # noqa: BLE001 - the fallback is the point
      record.update(impl=impl, ok=False, error=_short(e))
    out.append(record)
  return out


def check_one(shape, causal: bool, impl: str, dtype, seed: int) -> dict:
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(kk, shape, dtype) for kk in keys[:3])
  w = jax.random.normal(keys[3], shape, jnp.float32)

  def ref(q, k, v):
    if causal:
      return clip.causal_attention(q, k, v, impl="xla")
    return attention.xla_attention(q, k, v)

  def fast(q, k, v):
    return attention.padded_attention(
      q, k, v, implementation=impl, is_causal=causal
    )

  def value_and_grads(fn):
    def loss(q, k, v):
      return jnp.sum(w * fn(q, k, v).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  def rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  (_, g_ref), (_, g_fast) = value_and_grads(ref), value_and_grads(fast)
  out_fast = jax.jit(fast)(q, k, v)
  errs = [rel(a, b) for a, b in zip(g_fast, g_ref)]
  value_err = rel(out_fast, jax.jit(ref)(q, k, v))
  finite = all(bool(jnp.isfinite(x).all()) for x in (out_fast, *g_fast))
  return {
    "impl": impl,
    "value_rel_err": value_err,
    "grad_rel_err": errs,
    "ok": finite and max(errs) < 3e-2 and value_err < 3e-2,
  }


# ---------------------------------------------------------------------------
# 1. forward
# ---------------------------------------------------------------------------


def flux_config(config, attn: str):
  f = config.flux
  return dataclasses.replace(
    flux.VARIANTS[f.variant],
    dtype=f.dtype,
    param_dtype=f.param_dtype,
    remat=f.remat,
    attention=attn,
  )


def forward_program(config, mesh, attn: str, hw, batch: int, frozen_flux):
  """The plain (no LoRA) Flux forward on the run's frozen base weights."""
  cfg = flux_config(config, attn)
  graphdef = nnx.graphdef(
    nnx.eval_shape(lambda: flux.Flux(cfg, rngs=nnx.Rngs(0)))
  )
  h_tok, w_tok = token_grid(config, hw)
  n_txt = config.text.t5_max_length
  cache = jnp.dtype(config.text.cache_dtype)

  def fwd(params, x, txt, y, t):
    model = nnx.merge(graphdef, params)
    g = jnp.full((batch,), config.sampling.guidance, jnp.float32)
    return model(
      img=x,
      img_ids=sampling.img_ids(batch, h_tok, w_tok),
      txt=txt,
      txt_ids=sampling.txt_ids(batch, n_txt),
      timesteps=t,
      y=y,
      guidance=g if cfg.guidance_embed else None,
    )

  rep = sharding.replicated(mesh)
  args = (
    jax.ShapeDtypeStruct((batch, h_tok * w_tok, cfg.in_channels), jnp.float32),
    jax.ShapeDtypeStruct((batch, n_txt, cfg.context_in_dim), cache),
    jax.ShapeDtypeStruct((batch, cfg.vec_in_dim), cache),
    jax.ShapeDtypeStruct((batch,), jnp.float32),
  )
  args = tuple(
    jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in args
  )
  fn = jax.jit(sharding.under_rules(fwd, mesh, config.mesh.rules))
  lowered = fn.lower(frozen_flux, *args)
  fl = flops.dit_forward(cfg, h_tok * w_tok, n_txt) * batch
  return lowered, args, fl


# ---------------------------------------------------------------------------
# 2.-4. train steps and parts
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class TrainSetup:
  case: Case
  config: object
  run: object
  tx: object
  state_abs: object
  choice: dict
  program: Program
  step_flops: object


def train_setup(mode: Mode, case: Case, mesh, attn_extra) -> TrainSetup:
  config = load_config(mode, case, attn_extra)
  run = abstract_run.build(config, mesh)
  tx = step_lib.make_optimizer(config.optim)
  state_abs = run.abstract_state(tx)
  method = methods.get(config.method)
  choice = step_lib.host_choice(config, method, 0, run.sigmas)
  rep = sharding.replicated(mesh)
  choice_abs = {
    k: jax.ShapeDtypeStruct((), np.int32, sharding=rep) for k in choice
  }
  step = step_lib.jit_train_step(
    config,
    run.step_fns,
    tx,
    run.sigmas,
    shardings(state_abs),
    shardings(run.frozen),
    mesh,
  )
  lowered = step.lower(state_abs, run.frozen, run.batch, choice_abs)
  geo = run.geometry
  f = flops.train_step(
    config,
    run.family,
    run.model_config,
    run.autoencoder_config,
    (geo.latent_h, geo.latent_w),
  )
  return TrainSetup(
    case, config, run, tx, state_abs, choice, Program(case.name, lowered), f
  )


def parts_programs(setup: TrainSetup, mesh) -> dict:
  """The LeapAlign step's pieces at the step's batch and shapes."""
  config, run = setup.config, setup.run
  rules = config.mesh.rules
  vel, reward = run.step_fns.velocity, run.step_fns.reward
  B = config.data.global_batch
  rep = sharding.replicated(mesh)
  geo = run.geometry
  x_abs = jax.ShapeDtypeStruct(
    (B, geo.seq_len, 4 * geo.channels), jnp.float32, sharding=rep
  )
  t_abs = jax.ShapeDtypeStruct((B,), jnp.float32, sharding=rep)
  fz = run.frozen

  def fwd(p, frozen, x, t, batch):
    return vel(p, frozen["model"], x, t, batch)

  def vjp(p, frozen, x, t, batch):
    v, pull = jax.vjp(lambda p, x: vel(p, frozen["model"], x, t, batch), p, x)
    return pull(v)  # any cotangent of the right shape

  def reward_vjp(frozen, x0, batch):
    r, pull = jax.vjp(lambda x: reward(frozen, x, batch), x0)
    return r, pull(jnp.ones_like(r))

  tx, ema_decay = setup.tx, float(config.optim.ema_decay)

  def update(state, grads):
    import optax

    upd, opt = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], upd)
    ema = jax.tree.map(
      lambda e, p: e + (1.0 - ema_decay) * (p - e), state["ema"], params
    )
    return params, ema, opt

  def jit(fn):
    return jax.jit(sharding.under_rules(fn, mesh, rules))

  p_abs = setup.state_abs["params"]
  # Cheapest first: a short budget still leaves the cost model whole.
  return {
    "update": jit(update).lower(setup.state_abs, p_abs),
    "reward_vjp": jit(reward_vjp).lower(fz, x_abs, run.batch),
    "forward": jit(fwd).lower(p_abs, fz, x_abs, t_abs, run.batch),
    "vjp": jit(vjp).lower(p_abs, fz, x_abs, t_abs, run.batch),
  }


def init_state_fn(setup: TrainSetup):
  """A fresh train state over (copies of) random params, placed."""
  return jax.jit(
    lambda p: step_lib.init_state(
      jax.tree.map(jnp.copy, p), setup.tx, setup.config.seed
    ),
    out_shardings=shardings(setup.state_abs),
  )


class Arrays:
  """Random device arrays, shared by every program of the same shapes."""

  def __init__(self):
    self._cache = {}

  def get(self, tree, seed: int = 0):
    leaves, treedef = jax.tree.flatten(tree)
    key = (
      str(treedef),
      tuple((tuple(x.shape), str(x.dtype)) for x in leaves),
      seed,
    )
    if key not in self._cache:
      self._cache[key] = abstract_run.random_arrays(tree, seed)
    return self._cache[key]


def run_train(setup: TrainSetup, arrays: Arrays, mode, budget, peak_flops):
  p = setup.program
  rec = {
    "case": setup.case.name,
    "method": setup.case.method,
    "batch": setup.case.batch,
    "overrides": list(setup.case.overrides),
    "attention": setup.config.flux.attention,
    "remat": setup.config.flux.remat,
    "compile_s": p.compile_s,
    "choice": {k: int(v) for k, v in setup.choice.items()},
    "model_tflop": setup.step_flops.total / 1e12,
    "hardware_tflop": setup.step_flops.hardware / 1e12,
  }
  if p.error:
    return {**rec, "error": p.error}
  rec["planned_peak_gib"] = planned_bytes(p.compiled) / 2**30
  run = setup.run
  frozen = arrays.get(run.frozen)
  batch = arrays.get(run.batch, seed=1)
  params = arrays.get(setup.state_abs["params"], seed=2)
  choice = {k: np.int32(v) for k, v in setup.choice.items()}
  holder = {"state": init_state_fn(setup)(params)}
  metrics = {}

  def call():
    holder["state"], m = p.compiled(holder["state"], frozen, batch, choice)
    metrics.update(m)
    return m

  try:
    t = timed(call, 1, mode.train_repeats, budget)
  except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded
    return {**rec, "error": _short(e)}
  finally:
    holder.clear()
  sec = t["median_s"]
  rec.update(t)
  rec.update(
    s_per_step=sec,
    s_per_image=sec / setup.case.batch,
    process_peak_gib=peak_bytes() / 2**30,
    model_tflops=setup.step_flops.total / sec / 1e12,
    hardware_tflops=setup.step_flops.hardware / sec / 1e12,
    loss=float(metrics["train/loss"]),
    finite=bool(metrics["train/finite"]),
  )
  if peak_flops:
    rec["mfu"] = setup.step_flops.total / sec / peak_flops
  return rec


def run_parts(setup, progs: dict, arrays: Arrays, mode, budget) -> dict:
  run = setup.run
  frozen = arrays.get(run.frozen)
  batch = arrays.get(run.batch, seed=1)
  params = arrays.get(setup.state_abs["params"], seed=2)
  state = init_state_fn(setup)(params)
  B = setup.config.data.global_batch
  geo = run.geometry
  x = jax.random.normal(jax.random.key(4), (B, geo.seq_len, 4 * geo.channels))
  t = jnp.full((B,), 0.5, jnp.float32)
  args = {
    "forward": (params, frozen, x, t, batch),
    "vjp": (params, frozen, x, t, batch),
    "reward_vjp": (frozen, x, batch),
    "update": (state, params),
  }
  out = {}
  for name, prog in progs.items():
    if prog.error:
      out[name] = {"error": prog.error, "compile_s": prog.compile_s}
      continue
    if budget.left() < 15:
      out[name] = {"skipped": "time budget spent"}
      continue
    a = args[name]
    r = timed(lambda c=prog.compiled, a=a: c(*a), 1, mode.repeats, budget)
    out[name] = {**r, "compile_s": prog.compile_s}
  return out


def cost_model(parts: dict, step: dict, config) -> dict:
  """The step against the sum of its parts (its cost floor)."""
  need = ("forward", "vjp", "reward_vjp", "update")
  if any("median_s" not in parts.get(n, {}) for n in need):
    return {"skipped": "a part was not measured"}
  if "s_per_step" not in step:
    return {"skipped": "the step was not measured"}
  T, n = config.sampling.num_steps, config.leap.num_leaps
  s = {k: parts[k]["median_s"] for k in need}
  floor = (T - n) * s["forward"] + n * s["vjp"] + s["reward_vjp"] + s["update"]
  return {
    "formula": f"({T} - {n}) forward + {n} vjp + reward_vjp + update",
    "floor_s": floor,
    "step_s": step["s_per_step"],
    "step_over_floor": step["s_per_step"] / floor,
    "rollout_share": (T - n) * s["forward"] / floor,
  }
