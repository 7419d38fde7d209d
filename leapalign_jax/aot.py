"""Pod-fit check: compile the full training step for a TPU topology on a CPU.

  python -m leapalign_jax.aot --config configs/leap_hpsv2_flux_dev.py \
      --topology v5p-64 [key=value ...]

Builds the run's models abstractly from their ``variant`` fields (no weights:
``abstract_run.build``), the mesh from ``config.mesh`` over the compile-only
devices of the topology (libtpu's topology description, as MaxText's
``train_compile`` does), and compiles the real jitted step
(``step.jit_train_step``) with the real TPU compiler. Prints per-chip memory
(``memory_analysis()``), compile time and the step's model FLOPs (counted
analytically: ``flops``), and exits 1 when the step does not fit (the
compiler's ``RESOURCE_EXHAUSTED``, or a peak above the chip's HBM or the
``--budget-gib`` given).

Needs ``pip install "jax[tpu]"`` (its pinned libtpu); no TPU. ``--topology
cpu`` compiles for this machine's devices instead (tests; no libtpu).
Topologies: Cloud TPU names (``v4-8``, ``v5p-64``, ``v5e-16``,
``v6e-256``, ...) or ``<gen>:<AxBxC>`` (e.g. ``v5p:2x2x1``); ``--num-slices``
for multi-slice (set ``mesh.dcn_shape`` to match).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

# Cloud TPU names: chips = N / 2 on v4 / v5p (N counts TensorCores, two per
# megacore chip), N on v5e / v6e. The 3-D torus shapes of v4 / v5p slices.
_CUBES = {
  1: (1, 1, 1),
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
  1024: (8, 8, 16),
  2048: (8, 16, 16),
  4096: (16, 16, 16),
}
_PLANES = {
  1: (1, 1),
  4: (2, 2),
  8: (2, 4),
  16: (4, 4),
  32: (4, 8),
  64: (8, 8),
  128: (8, 16),
  256: (16, 16),
}
# HBM per device as the TPU compiler states it (its OOM message).
HBM_BYTES = {
  "TPU v4": 30.75 * 2**30,
  "TPU v5 lite": 15.75 * 2**30,
  "TPU v5": 95.74 * 2**30,
  "TPU v6 lite": 31.25 * 2**30,
  "TPU7x": 94.75 * 2**30,
}


def topology_kwargs(name: str) -> dict:
  """``get_topology_desc`` arguments for a Cloud TPU name or ``gen:AxBxC``."""
  if ":" in name:
    gen, shape = name.split(":", 1)
    dims = tuple(int(d) for d in shape.split("x"))
  else:
    gen, _, count = name.partition("-")
    if not count.isdigit():
      raise ValueError(
        f"topology {name!r}: use a Cloud TPU name (v5p-64, v5e-16, ...) "
        "or gen:AxBxC (v5p:2x4x4)"
      )
    n = int(count)
    if gen in ("v4", "v5p"):
      dims = _CUBES.get(n // 2)
    elif gen in ("v5e", "v5litepod", "v6e"):
      gen = "v5e" if gen == "v5litepod" else gen
      dims = _PLANES.get(n)
    else:
      raise ValueError(f"topology {name!r}: unknown TPU generation {gen!r}")
    if dims is None:
      raise ValueError(f"topology {name!r}: no standard slice of that size")
  kw = {"topology_name": f"{gen}:{'x'.join(map(str, dims))}"}
  if gen in ("v4", "v5p", "v5"):
    kw["chip_config_name"] = "megacore"
  chips = math.prod(dims)
  if gen in ("v5e", "v6e") and chips <= 8:
    kw["chips_per_host_bounds"] = (*dims, 1)[:3]  # one host (v5e-8: 2x4)
  else:  # hosts of 2x2x1 chips, or fewer chips on a one-host slice
    kw["chips_per_host_bounds"] = tuple(
      min(d, b) for d, b in zip((*dims, 1)[:3], (2, 2, 1))
    )
  return kw


def topology_devices(name: str, num_slices: int = 1) -> list:
  """Compile-only devices of a TPU topology (or this host's, for ``cpu``)."""
  import jax

  if name == "cpu":
    return list(jax.devices())
  # libtpu takes an exclusive lockfile; compiling needs no chip, so let
  # several compile-only processes (CI, other jobs) load it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  desc = topologies.get_topology_desc(
    platform="tpu", num_slices=num_slices, **topology_kwargs(name)
  )
  return list(desc.devices)


@dataclasses.dataclass
class Report:
  """What one compile found (bytes per device; FLOPs per global step)."""

  topology: str
  devices: int
  device_kind: str
  mesh: dict
  fits: bool
  compile_s: float
  argument: int = 0
  output: int = 0
  alias: int = 0
  temp: int = 0
  peak: int = 0
  hbm: int = 0
  flops: float = 0.0  # model FLOPs (flops.StepFlops.total)
  flops_parts: dict = dataclasses.field(default_factory=dict)
  flops_hardware: float = 0.0  # plus rematerialisation
  error: str = ""

  def lines(self) -> list[str]:
    gib = 2.0**30
    head = (
      f"{self.topology}: {self.devices} x {self.device_kind}, mesh "
      f"{self.mesh}, compiled in {self.compile_s:.0f} s"
    )
    if self.error:
      return [head, f"DOES NOT FIT: {self.error}"]
    hbm = f" (budget {self.hbm / gib:.2f})" if self.hbm else ""
    parts = ", ".join(f"{k} {_si(v)}" for k, v in self.flops_parts.items())
    return [
      head,
      f"per device: arguments {self.argument / gib:.2f} GiB, outputs "
      f"{self.output / gib:.2f} (aliased {self.alias / gib:.2f}), temporaries "
      f"{self.temp / gib:.2f}, peak {self.peak / gib:.2f}{hbm} GiB",
      f"model FLOPs per step: {_si(self.flops)} ({parts}); per device "
      f"{_si(self.flops / max(self.devices, 1))}; with rematerialisation "
      f"{_si(self.flops_hardware)}",
      "FITS" if self.fits else "DOES NOT FIT: peak above the budget",
    ]


def _si(flops: float) -> str:
  """``flops`` with a decimal prefix (``69.9 PFLOP``)."""
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
    if flops >= scale:
      return f"{flops / scale:.1f} {unit}FLOP"
  return f"{flops:.0f} FLOP"


def _compact(error: Exception) -> str:
  text = str(error)
  for line in text.splitlines():
    if "RESOURCE_EXHAUSTED" in line or "Ran out of memory" in line:
      return line.strip()
  return text.splitlines()[0][:400] if text else type(error).__name__


def compile_step(
  config, devices, topology: str = "", budget_bytes: int = 0
) -> Report:
  """Compiles ``config``'s jitted train step over ``devices``; a ``Report``.

  ``budget_bytes`` (default: the chip's HBM) is the per-device peak the step
  must stay under to fit.
  """
  import jax

  from leapalign_jax import abstract_run, flops, methods, sharding
  from leapalign_jax import step as step_lib

  mesh = sharding.mesh_from_config(config.mesh, devices)
  sharding.check_batch(config.data.global_batch, mesh)
  run = abstract_run.build(config, mesh)
  tx = step_lib.make_optimizer(config.optim)
  state = run.abstract_state(tx)
  rep = sharding.replicated(mesh)
  method = methods.get(config.method)
  drawn = method.sample_choice(
    np.random.default_rng(0), len(run.sigmas) - 1, config, run.sigmas
  )
  choice = {k: jax.ShapeDtypeStruct((), np.int32, sharding=rep) for k in drawn}
  step = step_lib.jit_train_step(
    config,
    run.step_fns,
    tx,
    run.sigmas,
    jax.tree.map(lambda x: x.sharding, state),
    jax.tree.map(lambda x: x.sharding, run.frozen),
    mesh,
  )
  kind = devices[0].device_kind
  report = Report(
    topology or kind, len(devices), kind, dict(mesh.shape), False, 0.0
  )
  geo = run.geometry
  f = flops.train_step(
    config,
    run.family,
    run.model_config,
    run.autoencoder_config,
    (geo.latent_h, geo.latent_w),
  )
  report.flops, report.flops_hardware = f.total, f.hardware
  report.flops_parts = {"dit": f.dit, "vae": f.vae, "reward": f.reward}
  start = time.perf_counter()
  try:
    compiled = step.lower(state, run.frozen, run.batch, choice).compile()
  except Exception as e:  # noqa: BLE001 - XLA raises a bare runtime error
    report.compile_s = time.perf_counter() - start
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report.error = _compact(e)
    return report
  report.compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  report.argument = int(mem.argument_size_in_bytes)
  report.output = int(mem.output_size_in_bytes)
  report.alias = int(mem.alias_size_in_bytes)
  report.temp = int(mem.temp_size_in_bytes)
  report.peak = int(getattr(mem, "peak_memory_in_bytes", 0)) or (
    report.argument + report.output - report.alias + report.temp
  )
  report.hbm = int(budget_bytes or HBM_BYTES.get(kind, 0))
  report.fits = not report.hbm or report.peak <= report.hbm
  return report


def main(argv: list[str] | None = None) -> int:
  """Command line: prints the report; 0 if the step fits, 1 otherwise."""
  parser = argparse.ArgumentParser(prog="python -m leapalign_jax.aot")
  parser.add_argument("--config", required=True, help="configs/<run>.py[:arg]")
  parser.add_argument(
    "--topology", required=True, help="v5p-64, v5e-16, v5p:2x2x1, ... or cpu"
  )
  parser.add_argument("--num-slices", type=int, default=1)
  parser.add_argument(
    "--budget-gib",
    type=float,
    default=0.0,
    help="fit threshold per device instead of the chip's HBM (e.g. 74.5 "
    "for an 80 GB GPU's budget, compiled for one v5p chip: a proxy)",
  )
  parser.add_argument("--json", default="", help="also write the report here")
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args(argv)
  if args.topology != "cpu":
    # Compile-only TPU devices: JAX itself runs on the CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  from leapalign_jax import configs_io

  try:
    config = configs_io.load_config(args.config, args.overrides)
    devices = topology_devices(args.topology, args.num_slices)
    budget = int(args.budget_gib * 2**30)
    report = compile_step(config, devices, args.topology, budget)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(report.lines()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dataclasses.asdict(report), f, indent=2)
  return 0 if report.fits else 1


if __name__ == "__main__":
  sys.exit(main())
