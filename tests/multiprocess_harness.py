"""Multi-process runs of the tiny config through ``launch_local``, compared.

Shared by ``tests/multiprocess_test.py`` and ``bench/reliability.py
--processes``. Every run uses the same global mesh (8 CPU devices), split
into ``processes x devices``; its data trace (``$LEAPALIGN_DATA_TRACE``,
``data.trace``) records which prompts each process read at each step.

Tolerance: a multi-process run and the one-process run agree to fp
rounding, not bit for bit (runs with 2 and 4 processes agree bit for bit).
The gradient is summed over the 8 devices by XLA's in-process all-reduce
in one process and through gloo across processes, in another order; the last bits of a few gradient coordinates differ, and
Adam's normalisation turns a last-bit difference on a near-zero coordinate
into an update difference of up to the learning rate. So parameters are
compared by relative L2 distance per leaf (``STATE_RTOL``) and metrics to
``METRIC_RTOL``; integer leaves (step, PRNG key) and the data are exact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import crash_harness as ch
import numpy as np

REPO = ch.REPO
# Measured: 1e-5 (worst leaf) and 4e-6 (worst metric) after 8 steps.
STATE_RTOL = 1e-4  # relative L2 distance of each float leaf
METRIC_RTOL = 1e-4
METRIC_ATOL = 1e-5
# Metrics that are rounding noise by definition (distances ~1e-8 vs 0).
NOISE_METRICS = ("leap/d_0", "leap/d_j")


def launch_command(
  workdir: str,
  world: str,
  processes: int,
  devices: int,
  *overrides: str,
  heartbeat: float = 5.0,
  pid_file: str = "",
  module: str = "",
  program: tuple[str, ...] = (),
) -> list[str]:
  """``launch_local`` running the tiny config (or ``module`` ``program``)."""
  cmd = [
    sys.executable,
    "-m",
    "leapalign_jax.launch_local",
    f"--processes={processes}",
    f"--devices={devices}",
    f"--heartbeat-timeout={heartbeat}",
    "--grace=60",
  ]
  if pid_file:
    cmd.append(f"--pid-file={pid_file}")
  if module:
    return [*cmd, f"--module={module}", "--", *program]
  return [
    *cmd,
    "--",
    "--config",
    str(REPO / "configs" / "tiny.py"),
    "--workdir",
    workdir,
    f"--config.world_options.dir={world}",
    *overrides,
  ]


def env(cache_dir: str, trace: str = "") -> dict[str, str]:
  """``crash_harness.command_env`` plus the data trace folder."""
  out = ch.command_env(cache_dir)
  out.pop("XLA_FLAGS", None)  # launch_local sets the device count
  if trace:
    out["LEAPALIGN_DATA_TRACE"] = trace
  return out


def run(cmd: list[str], environ: dict, timeout: float = 900):
  return subprocess.run(
    cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=timeout
  )


def start(cmd: list[str], environ: dict, log: str) -> subprocess.Popen:
  """Starts ``cmd`` with its output in ``log`` (read it with ``tail``)."""
  f = open(log, "w")  # noqa: SIM115 - closed by the child's exit
  return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=f, stderr=f)


def tail(log: str, n: int = 40) -> str:
  lines = Path(log).read_text(errors="replace").splitlines()
  return "\n".join(lines[-n:])


def wait_for_lines(workdir: str, more_than: int, proc, timeout=600) -> None:
  """Waits until ``metrics.jsonl`` has more than ``more_than`` lines."""
  path = Path(workdir) / "metrics.jsonl"
  t0 = time.monotonic()
  while time.monotonic() - t0 < timeout and proc.poll() is None:
    if path.exists() and path.read_text().count("\n") > more_than:
      return
    time.sleep(0.05)
  raise RuntimeError(f"no metrics line past {more_than} (exit {proc.poll()})")


def pids(pid_file: str, timeout: float = 60) -> list[int]:
  t0 = time.monotonic()
  while not os.path.exists(pid_file):
    if time.monotonic() - t0 > timeout:
      raise RuntimeError(f"{pid_file} never appeared")
    time.sleep(0.05)
  return json.loads(Path(pid_file).read_text())


def wait_gone(pid_list: list[int], timeout: float = 120) -> bool:
  """Waits until none of ``pid_list`` runs (zombies count as gone)."""
  t0 = time.monotonic()
  while time.monotonic() - t0 < timeout:
    alive = []
    for pid in pid_list:
      try:
        with open(f"/proc/{pid}/stat") as f:
          if f.read().split(")")[-1].split()[0] != "Z":
            alive.append(pid)
      except FileNotFoundError:
        pass
    if not alive:
      return True
    time.sleep(0.1)
  return False


def kill_one(pid_file: str, process: int) -> float:
  """SIGKILLs ``process`` of a launch; returns the time it was sent."""
  os.kill(pids(pid_file)[process], signal.SIGKILL)
  return time.monotonic()


# ------------------------------------------------------------ compare --


def read_state(workdir: str) -> tuple[int, dict]:
  """The latest checkpoint's state as host arrays (any saving topology)."""
  import jax
  import orbax.checkpoint as ocp

  ckdir = Path(workdir) / "checkpoints"
  step = max(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  path = ckdir / str(step) / "state"
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta
  )
  state = checkpointer.restore(path, abstract)
  checkpointer.close()
  return step, jax.tree.map(np.asarray, state)


def compare_states(a: dict, b: dict) -> list[str]:
  """Leaves that differ beyond the tolerance (see module doc)."""
  import jax

  problems = []
  la = jax.tree_util.tree_leaves_with_path(a)
  lb = jax.tree.leaves(b)
  if len(la) != len(lb):
    return [f"{len(la)} vs {len(lb)} leaves"]
  for (path, x), y in zip(la, lb):
    name = jax.tree_util.keystr(path)
    if x.shape != y.shape:
      problems.append(f"{name}: shape {x.shape} vs {y.shape}")
    elif x.dtype.kind == "f":
      scale = max(float(np.linalg.norm(x)), 1e-12)
      dist = float(np.linalg.norm(x.astype(np.float64) - y)) / scale
      if dist > STATE_RTOL:
        problems.append(f"{name}: relative distance {dist:.2e}")
    elif not np.array_equal(x, y):
      problems.append(f"{name}: differs")
  return problems


def metrics(workdir: str) -> list[dict]:
  return ch._metrics(workdir)


def compare_metrics(a: list[dict], b: list[dict]) -> list[str]:
  """Metric lines that differ beyond the tolerance (``perf/*`` ignored)."""
  if [d["step"] for d in a] != [d["step"] for d in b]:
    return [f"steps {[d['step'] for d in a]} vs {[d['step'] for d in b]}"]
  problems = []
  for da, db in zip(a, b):
    if set(da) != set(db):
      problems.append(f"step {da['step']}: keys differ")
      continue
    for k, va in da.items():
      vb = db[k]
      if k in NOISE_METRICS:
        continue
      if isinstance(va, float) or isinstance(vb, float):
        if not np.isclose(va, vb, rtol=METRIC_RTOL, atol=METRIC_ATOL):
          problems.append(f"step {da['step']} {k}: {va} vs {vb}")
      elif va != vb:
        problems.append(f"step {da['step']} {k}: {va} vs {vb}")
  return problems


# --------------------------------------------------------------- data --


def read_trace(folder: str) -> list[dict]:
  """Every record of a data trace (a torn last line, from a kill, dropped)."""
  out = []
  for path in sorted(Path(folder).glob("p*.jsonl")):
    for line in path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except ValueError:
        continue
  return out


def effective_reads(records: list[dict]) -> dict[int, dict[int, list[int]]]:
  """``{step: {process: indices}}`` of the start whose step counted.

  A step run by several starts (a kill after it, before its checkpoint)
  counts for the last start that ran it (by parent pid, in file order of
  that start's first record).
  """
  order = {}
  for r in records:
    order.setdefault(r["ppid"], len(order))
  by_step: dict[int, dict[int, dict[int, list[int]]]] = {}
  for r in records:
    by_step.setdefault(r["step"], {}).setdefault(r["ppid"], {})[
      r["process"]
    ] = r["index"]
  return {
    s: starts[max(starts, key=lambda p: order[p])]
    for s, starts in sorted(by_step.items())
  }


def check_data(
  reads: dict[int, dict[int, list[int]]],
  reference: dict[int, dict[int, list[int]]],
) -> list[str]:
  """Per step: the processes' blocks are disjoint and together equal the
  reference run's global batch (as a multiset), for every step."""
  problems = []
  if sorted(reads) != sorted(reference):
    problems.append(f"steps read {sorted(reads)} vs {sorted(reference)}")
  for step, blocks in reads.items():
    if step not in reference:
      continue
    seen = Counter(i for b in blocks.values() for i in b)
    want = Counter(i for b in reference[step].values() for i in b)
    if seen != want:
      problems.append(f"step {step}: read {sorted(seen)} vs {sorted(want)}")
    union = [set(b) for b in blocks.values()]
    if sum(len(u) for u in union) != len(set().union(*union)):
      problems.append(f"step {step}: processes read overlapping prompts")
  return problems


def prompt_counts(reads: dict[int, dict[int, list[int]]]) -> Counter:
  """How often each prompt was trained on, over the whole run."""
  return Counter(
    i for blocks in reads.values() for b in blocks.values() for i in b
  )
