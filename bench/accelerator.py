"""One command, one accelerator: Flux-dev forwards and full-size train steps.

  python bench/accelerator.py               # ~8 min on one H100 / H200
  python bench/accelerator.py --tiny        # the same code on a CPU, CI sizes

Random weights of the real architectures (nothing downloaded): FLUX.1-dev,
its autoencoder and the HPSv2.1 ViT-H-14 reward, from the shipped config
``configs/leap_hpsv2_flux_dev.py:lora=1`` (LoRA rank 64 over a bf16 base,
720², N = 25, remat ``full``, attention ``auto``), through the real jitted
train step (``step.jit_train_step``) on one device. Sections, in order;
once ``--budget-s`` is spent the rest are skipped and say so:

0. attention: the padded cuDNN kernel (``models/attention.py``) against XLA
   attention in value and gradient at the DiT, ViT-H and text shapes; a
   failure makes the steps below use ``xla`` (and says so).
1. forward: Flux-dev at 512², 720², 1024², batch 1, T5-512, JAX ``cudnn`` and
   ``xla`` vs diffusers' ``FluxTransformer2DModel`` eager bf16 (its own
   process, ``accel_torch.py``), TFLOP/s from ``flops.dit_forward``; and the
   720² forward under a few XLA GPU options (``FLAG_VARIANTS``).
2. train steps: ``leapalign`` at batch 4 and 1, ``draft_k``, ``drtune``,
   ``full_backprop`` at batch 1: s/step, s/image, peak memory (the
   compiler's plan and the device's ``peak_bytes_in_use``), compile s, model
   and hardware TFLOP/s (``flops.train_step``), MFU against the chip's dense
   bf16 peak.
3. parts of the LeapAlign step at batch 4 (a rollout forward, the
   differentiated call's vjp, decode + reward with its gradient, the
   optimizer update) and the step against their sum, its cost floor:
   ``(N - 2) forwards + 2 vjps + reward vjp + update``.
4. with ``--variants``: the batch-4 LeapAlign step with ``xla`` attention
   and with remat ``dots`` / ``names``; with ``--torch-compile``, diffusers
   under ``torch.compile`` at 720².

Every program is lowered first and compiled in parallel threads (XLA
releases the GIL while compiling; the batch-4 LeapAlign step and the 720²
forward compile alone first, so their GEMM autotuning sees an idle GPU and
the rest mostly hit its cache), then timed one at a time in the order the
results matter: the forwards, the batch-4 LeapAlign step, its parts, the
other steps, the variants. Prints tables and writes JSON
(``bench/results/accelerator[_tiny].json``), rewritten after every section.

Measured on one H200 (2026-12-04, jax 0.11.2 / flax 0.12.10, cuDNN 9.19;
``bench/results/accelerator_h200*.json``): see README, "GPUs".
"""

import os

# Grow the device pool on demand (the diffusers worker shares the GPU while
# JAX lowers), up to most of the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from leapalign_jax import (  # noqa: E402
  abstract_run,
  configs_io,
  flops,
  methods,
  sampling,
  sharding,
)
from leapalign_jax import step as step_lib  # noqa: E402
from leapalign_jax.models import attention, autoencoder, clip, flux  # noqa: E402

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


# ---------------------------------------------------------------------------
# torch worker
# ---------------------------------------------------------------------------


def start_torch(mode, config, out_path: str, compile_: bool, eager: bool):
  cfg = dataclasses.asdict(flux.VARIANTS[config.flux.variant])
  resolutions = {
    k: token_grid(config, hw) for k, hw in mode.resolutions.items()
  }
  spec = {
    "flux": cfg,
    "txt": config.text.t5_max_length,
    "resolutions": resolutions if eager else {},
    "warmup": mode.warmup,
    "repeats": mode.repeats,
    "compile": compile_,
    "compile_at": [mode.step_res],
  }
  cmd = [
    sys.executable,
    os.path.join(HERE, "accel_torch.py"),
    "--spec",
    json.dumps(spec),
    "--out",
    out_path,
  ]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen(cmd, env=env)


def finish_torch(proc, out_path: str, timeout: float) -> dict:
  try:
    proc.wait(timeout=max(timeout, 1))
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  try:
    with open(out_path) as f:
      rec = json.load(f)
  except (OSError, ValueError):
    rec = {"error": "no result (the worker failed before writing)"}
  if not rec.get("done") and "error" not in rec:
    rec["error"] = f"stopped at the deadline ({timeout:.0f} s) or failed"
  rec["returncode"] = proc.returncode
  return rec


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def environment() -> dict:
  import flax
  import jaxlib

  dev = jax.devices()[0]
  info = {
    "date": datetime.date.today().isoformat(),
    "device_kind": dev.device_kind,
    "platform": dev.platform,
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "python": platform.python_version(),
    "host": platform.machine(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    from jax._src.lib import cuda_versions

    if cuda_versions is not None:
      info["cudnn"] = cuda_versions.cudnn_get_version()
  except Exception:  # noqa: BLE001 - private API; informational only
    pass
  return info


def device_peak(kind: str) -> float | None:
  for name, value in PEAK_BF16.items():
    if name in kind:
      return value
  return None


def write(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, default=str)
  os.replace(tmp, path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="CI sizes on a CPU")
  parser.add_argument("--json", default="", help="output JSON path")
  parser.add_argument("--budget-s", type=float, default=480.0)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--torch-compile", action="store_true")
  parser.add_argument(
    "--variants",
    action="store_true",
    help="also time section 4 (about 90 s more on one H200)",
  )
  parser.add_argument(
    "--cases", default="", help="comma-separated train cases (default: all)"
  )
  parser.add_argument(
    "--no-forward", action="store_true", help="skip section 1 (forwards)"
  )
  parser.add_argument(
    "--lower-only",
    action="store_true",
    help="stop after lowering every program (checks the full-size code path "
    "on a host without the accelerator)",
  )
  parser.add_argument(
    "--workers", type=int, default=min(8, os.cpu_count() or 1)
  )
  args = parser.parse_args(argv)
  mode = TINY if args.tiny else FULL
  out_path = args.json or os.path.join(
    HERE,
    "results",
    "accelerator_tiny.json" if args.tiny else "accelerator.json",
  )
  budget = Budget(args.budget_s)
  gpu = jax.default_backend() == "gpu"
  record = {
    "environment": environment(),
    "mode": "tiny" if args.tiny else "full",
  }
  peak_flops = device_peak(record["environment"]["device_kind"])
  record["environment"]["peak_bf16_flops"] = peak_flops
  print(json.dumps(record["environment"]), flush=True)

  # 0. attention: decides the kernels of everything below.
  record["attention_check"] = checks = attention_check(mode, gpu)
  write(out_path, record)
  flux_ok = checks[0]["ok"]
  others_ok = all(c["ok"] for c in checks[1:])
  attn_extra = []
  if gpu and not flux_ok:
    attn_extra.append("flux.attention='xla'")
  if gpu and not others_ok:
    attn_extra.append("rewards.{reward}.attention='xla'")
  record["attention_fallback"] = attn_extra
  print(f"[{budget.elapsed():.0f}s] attention check: {checks}", flush=True)

  base = load_config(mode, extra=attn_extra)
  torch_json = os.path.join(tempfile.mkdtemp(), "torch.json")
  torch_proc = None
  if not (args.no_torch or args.no_forward):
    torch_proc = start_torch(mode, base, torch_json, False, True)

  # Lower everything (host work, beside the torch worker), then compile.
  mesh = sharding.mesh_from_config(base.mesh)
  wanted = set(filter(None, args.cases.split(",")))
  all_cases = [c for c in cases(mode) if args.variants or not c.variant]
  t0 = time.perf_counter()
  # The large-batch LeapAlign step: always lowered (the parts use it).
  main_setup = train_setup(mode, all_cases[0], mesh, attn_extra)
  setups = [main_setup] + [
    train_setup(mode, c, mesh, attn_extra)
    for c in all_cases[1:]
    if not wanted or c.name in wanted
  ]
  if wanted and main_setup.case.name not in wanted:
    setups.remove(main_setup)
  frozen_flux = main_setup.run.frozen["model"]
  fwd_progs = {}
  for res, hw in {} if args.no_forward else mode.resolutions.items():
    for impl in ("cudnn", "xla") if gpu else ("xla",):
      lowered, fargs, fl = forward_program(base, mesh, impl, hw, 1, frozen_flux)
      fwd_progs[(res, impl)] = (
        Program(f"forward {res} {impl}", lowered),
        fargs,
        fl,
      )
  flag_progs = {}
  if gpu and not args.no_forward:
    for label, options in FLAG_VARIANTS.items():
      lowered, fargs, fl = forward_program(
        base, mesh, "cudnn", mode.resolutions[mode.step_res], 1, frozen_flux
      )
      flag_progs[label] = (
        Program(f"forward {mode.step_res} cudnn, {label}", lowered, options),
        fargs,
        fl,
      )
  parts = {
    k: Program(f"part {k}", v)
    for k, v in parts_programs(main_setup, mesh).items()
  }
  base_attn = main_setup.config.flux.attention
  lowered, fargs, fl = forward_program(
    main_setup.config,
    mesh,
    base_attn,
    mode.resolutions[mode.step_res],
    main_setup.case.batch,
    frozen_flux,
  )
  parts_base = (Program("part forward_base", lowered), fargs, fl)
  record["lower_s"] = time.perf_counter() - t0
  print(
    f"[{budget.elapsed():.0f}s] lowered in {record['lower_s']:.0f} s",
    flush=True,
  )

  if args.lower_only:
    write(out_path, record)
    print(f"lowered only; wrote {out_path}")
    return 0
  if torch_proc is not None:
    record["diffusers"] = finish_torch(
      torch_proc, torch_json, min(240.0, budget.left() - 60)
    )
    print(
      f"[{budget.elapsed():.0f}s] diffusers: {record['diffusers']}", flush=True
    )

  programs = (
    [p for p, _, _ in fwd_progs.values()]
    + [s.program for s in setups if not s.case.variant]
    + list(parts.values())
    + [parts_base[0]]
    + [p for p, _, _ in flag_progs.values()]
    + [s.program for s in setups if s.case.variant]
  )
  # XLA autotunes each GEMM on the GPU while compiling and caches the result
  # for the process: the headline programs compile alone first (no other
  # compile's kernels running beside their autotuning), the rest in
  # parallel, mostly hitting that cache.
  first = [main_setup.program] if main_setup in setups else []
  if (mode.step_res, "cudnn") in fwd_progs:
    first.append(fwd_progs[(mode.step_res, "cudnn")][0])
  rest = [p for p in programs if all(p is not f for f in first)]
  record["compile_wall_s"] = compile_all(first, 1) + compile_all(
    rest, args.workers
  )
  record["compile_s"] = {p.name: p.compile_s for p in programs}
  record["compile_errors"] = {p.name: p.error for p in programs if p.error}
  print(
    f"[{budget.elapsed():.0f}s] compiled {len(programs)} programs in "
    f"{record['compile_wall_s']:.0f} s",
    flush=True,
  )
  write(out_path, record)

  arrays = Arrays()
  # 1. forward
  record["forward"] = fwd = []
  labelled = [((res, impl, ""), v) for (res, impl), v in fwd_progs.items()]
  labelled += [
    ((mode.step_res, "cudnn", label), v) for label, v in flag_progs.items()
  ]
  for (res, impl, label), (prog, fargs, fl) in labelled:
    rec = {
      "resolution": res,
      "attention": impl,
      "xla_options": label,
      "compile_s": prog.compile_s,
    }
    if prog.error:
      fwd.append({**rec, "error": prog.error})
      continue
    params = arrays.get(main_setup.run.frozen)["flux"]
    inputs = arrays.get(fargs, seed=5)
    r = timed(
      lambda c=prog.compiled, i=inputs, p=params: c(p, *i),
      mode.warmup,
      mode.repeats,
      budget,
    )
    fwd.append({**rec, **r, "tflops": fl / r["median_s"] / 1e12})
  write(out_path, record)

  # 2. train steps, 3. parts, 4. variants
  record["train"] = train_recs = []

  def train_section(pick) -> None:
    for s in setups:
      if not pick(s):
        continue
      if budget.left() < 30:
        train_recs.append({"case": s.case.name, "skipped": "time budget spent"})
        continue
      rec = run_train(s, arrays, mode, budget, peak_flops)
      train_recs.append(rec)
      print(f"[{budget.elapsed():.0f}s] {json.dumps(rec)}", flush=True)
      write(out_path, record)

  # The headline step, its parts (the cost model), the other methods, then
  # the variants: what a short budget drops comes last.
  train_section(lambda s: s is main_setup)
  prog_base, fargs_base, fl_base = parts_base
  parts_rec = run_parts(main_setup, parts, arrays, mode, budget)
  if not prog_base.error and budget.left() > 15:
    inputs = arrays.get(fargs_base, seed=6)
    parts_rec["forward_base"] = timed(
      lambda: prog_base.compiled(
        arrays.get(main_setup.run.frozen)["flux"], *inputs
      ),
      1,
      mode.repeats,
      budget,
    )
  record["parts"] = parts_rec
  main_rec = [r for r in train_recs if r["case"] == main_setup.case.name]
  record["cost_model"] = cost_model(
    parts_rec, main_rec[0] if main_rec else {}, main_setup.config
  )
  write(out_path, record)
  train_section(lambda s: s is not main_setup and not s.case.variant)
  train_section(lambda s: s.case.variant)

  if args.torch_compile and not (args.no_torch or args.no_forward):
    if budget.left() > 90:
      proc = start_torch(mode, base, torch_json + ".compile", True, False)
      record["torch_compile"] = finish_torch(
        proc, torch_json + ".compile", budget.left() - 10
      )
    else:
      record["torch_compile"] = {"skipped": "time budget spent"}
  record["total_s"] = budget.elapsed()
  write(out_path, record)
  print_tables(record)
  print(f"wrote {out_path}")
  return 0


def print_tables(record: dict) -> None:
  env = record["environment"]
  print(
    f"\n{env['device_kind']} | jax {env['jax']} flax {env['flax']} | "
    f"{env['date']} | total {record.get('total_s', 0):.0f} s"
  )
  eager = {
    r["resolution"]: r["eager_s"]
    for r in record.get("diffusers", {}).get("results", [])
  }
  print(
    "\nforward, batch 1 | attention | ms | TFLOP/s | diffusers eager ms | x"
  )
  for r in record.get("forward", []):
    if "median_s" not in r:
      print(
        f"{r['resolution']} | {r['attention']} {r['xla_options']} | "
        f"{r.get('error', '')}"
      )
      continue
    ms = 1e3 * r["median_s"]
    d = eager.get(r["resolution"])
    ratio = f"{d / r['median_s']:.2f}" if d else "-"
    d_ms = f"{1e3 * d:.1f}" if d else "-"
    attn = r["attention"] + (
      f" ({r['xla_options']})" if r["xla_options"] else ""
    )
    print(
      f"{r['resolution']} | {attn} | {ms:.1f} | "
      f"{r['tflops']:.0f} | {d_ms} | {ratio}"
    )
  print(
    "\ntrain step | s/step | s/image | planned GiB | process peak GiB | "
    "compile s | model TF/s | hw TF/s | MFU"
  )
  for r in record.get("train", []):
    if "s_per_step" not in r:
      print(f"{r['case']} | {r.get('error') or r.get('skipped')}")
      continue
    mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else "-"
    print(
      f"{r['case']} | {r['s_per_step']:.2f} | {r['s_per_image']:.2f} | "
      f"{r['planned_peak_gib']:.1f} | {r['process_peak_gib']:.1f} | "
      f"{r['compile_s']:.0f} | {r['model_tflops']:.0f} | "
      f"{r['hardware_tflops']:.0f} | {mfu}"
    )
  print("\nparts of the first step | ms")
  for name, r in record.get("parts", {}).items():
    value = f"{1e3 * r['median_s']:.1f}" if "median_s" in r else r
    print(f"{name} | {value}")
  print(f"cost model: {record.get('cost_model')}")


if __name__ == "__main__":
  sys.exit(main())
