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
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from accel_programs import (  # noqa: E402
  FLAG_VARIANTS,
  FULL,
  HERE,
  PEAK_BF16,
  TINY,
  Arrays,
  Budget,
  Program,
  attention_check,
  cases,
  compile_all,
  cost_model,
  forward_program,
  load_config,
  parts_programs,
  run_parts,
  run_train,
  timed,
  token_grid,
  train_setup,
)

from leapalign_jax import (  # noqa: E402
  sharding,
)
from leapalign_jax.models import flux  # noqa: E402

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
    params = arrays.get(main_setup.run.frozen)["model"]
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
        arrays.get(main_setup.run.frozen)["model"], *inputs
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
