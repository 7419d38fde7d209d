"""Runs the real training command in subprocesses, kills it, compares runs.

Shared by ``tests/reliability_test.py`` (a few kills, CI-sized) and
``bench/reliability.py`` (many). A *kill plan* is a list of triggers; each
starts the command, waits for its trigger, sends the signal, and the next
start resumes; after the plan the command runs to completion. Triggers:

- ``world``: a random time into the world preparation (models, caches);
- ``step``: a random time after the first metrics line (mid-step), at the
  latest once the checkpoint four steps before the end is written;
- ``ckpt_write``: as soon as a checkpoint's temporary folder appears;
- ``ckpt_commit``: as soon as it holds ``commit_success.txt`` (orbax's
  last act before the rename), or else right after the rename;
- ``metrics``: right after a new metrics line (before its checkpoint);
- ``final``: right after the last checkpoint (during the export).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"
TRIGGERS = ("world", "step", "ckpt_write", "ckpt_commit", "metrics", "final")


def command_env(cache_dir: str) -> dict[str, str]:
  """Environment of the subprocesses: CPU, shared compile cache, fast XLA."""
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    # The loop is under test, not XLA's optimiser: compile 2x faster.
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    PYTHONUNBUFFERED="1",
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
  )
  env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  return env


def train_command(workdir: str, world: str, *overrides: str) -> list[str]:
  """``python -m leapalign_jax.main`` on ``configs/tiny.py`` (one device)."""
  return [
    sys.executable,
    "-m",
    "leapalign_jax.main",
    "--config",
    str(REPO / "configs" / "tiny.py"),
    "--workdir",
    workdir,
    f"--config.world_options.dir={world}",
    "--config.mesh.num_devices=1",
    *overrides,
  ]


def run(cmd: list[str], env: dict, timeout: float = 600):
  """Runs ``cmd`` in the repository; returns the ``CompletedProcess``."""
  return subprocess.run(
    cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )


# ----------------------------------------------------------------- kills --


@dataclasses.dataclass
class Kill:
  """What one attempted kill found."""

  trigger: str
  signal: str
  seconds: float  # since the process started
  landed: bool  # the process was still running when signalled
  exit_status: int | None
  mid_write: bool  # a checkpoint temporary folder was left behind
  latest_before: int | None  # latest checkpoint step at the signal
  # Seconds from the start to "resumed from step N" (state restored) and
  # to the first step past N (the step recompiled or loaded from the
  # cache); None when it did not get there.
  resumed_at: float | None = None
  first_step_at: float | None = None
  stderr_tail: str = dataclasses.field(default="", repr=False)


def _lines(path: Path) -> int:
  try:
    with open(path, "rb") as f:
      return f.read().count(b"\n")
  except FileNotFoundError:
    return 0


def _tmp_dirs(ckpt: Path) -> list[Path]:
  try:
    return [p for p in ckpt.iterdir() if TMP_SUFFIX in p.name]
  except FileNotFoundError:
    return []


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint step in ``workdir`` (by folder name)."""
  ckpt = Path(workdir) / "checkpoints"
  steps = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()]
  return max(steps) if steps else None


def _trigger_ready(trigger, proc_start, state, workdir, world, rng) -> bool:
  """Polled every few ms; True when the kill should be sent now."""
  wd = Path(workdir)
  ckpt = wd / "checkpoints"
  now = time.monotonic() - proc_start
  if trigger == "world":
    if "at" not in state and (Path(world) / "world.json").exists():
      state["at"] = now + rng.uniform(0.0, 20.0)
    # Never later than the world's last artefact (the eval cache): on a
    # fast or warm machine the build ends well within 20 s, and a kill
    # landing mid-training would leave the later triggers too few steps.
    done = (Path(world) / "cache_eval" / "manifest.json").exists()
    return "at" in state and (now >= state["at"] or done)
  if trigger == "step":
    if "at" not in state and _lines(wd / "metrics.jsonl") > state["lines0"]:
      state["at"] = now + rng.uniform(0.0, 2.0)
    # Never later than four steps before the end: a SIGTERM during the last
    # step ends the run normally (it exports), and the later triggers need
    # checkpoint writes still to come.
    late = (latest_step(workdir) or 0) >= state["num_steps"] - 4
    return "at" in state and (now >= state["at"] or late)
  if trigger == "ckpt_write":
    return bool(_tmp_dirs(ckpt))
  if trigger == "ckpt_commit":
    # Between orbax's commit file and its rename (a window of microseconds
    # that polling rarely hits), else right after the rename.
    return (
      any((t / "commit_success.txt").exists() for t in _tmp_dirs(ckpt))
      or (latest_step(workdir) or 0) > state["latest0"]
    )
  if trigger == "metrics":
    return _lines(wd / "metrics.jsonl") > state["lines0"]
  if trigger == "final":
    return latest_step(workdir) == state["num_steps"]
  raise ValueError(f"unknown trigger {trigger!r}; use one of {TRIGGERS}")


_RESUMED = re.compile(r"resumed from step (\d+)")
_BAR = re.compile(r"(\d+)/\d+ \[")


def _watch_progress(log_path: str, t0: float, progress: dict) -> None:
  """Records when the run restored its state and when it passed a step."""
  now = time.monotonic()
  if "first_step_at" in progress or now < progress.get("next", 0.0):
    return
  progress["next"] = now + 0.05  # read the log every 50 ms
  text = Path(log_path).read_text(errors="replace")
  m = _RESUMED.search(text)
  if m is None:
    return
  progress.setdefault("resumed_at", round(now - t0, 3))
  start = int(m.group(1))
  if any(int(n) > start for n in _BAR.findall(text[m.end() :])):
    progress["first_step_at"] = round(now - t0, 3)


def start_and_kill(
  cmd: list[str],
  env: dict,
  workdir: str,
  world: str,
  trigger: str,
  rng: np.random.Generator,
  *,
  num_steps: int,
  sig: int = signal.SIGKILL,
  repeat_after: float | None = None,
  timeout: float = 300,
) -> Kill:
  """Starts ``cmd``, signals it when ``trigger`` fires, waits for it.

  ``repeat_after``: send the signal a second time after this many seconds
  (if the process is still running).
  """
  state = {"lines0": _lines(Path(workdir) / "metrics.jsonl")}
  state["num_steps"] = num_steps
  state["latest0"] = latest_step(workdir) or 0
  if trigger == "metrics":  # a line beyond the next checkpoint's
    state["lines0"] += int(rng.integers(0, 2))
  fd, log_path = tempfile.mkstemp(prefix="leapalign-stderr-", suffix=".txt")
  log = os.fdopen(fd, "w")
  proc = subprocess.Popen(
    cmd,
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=log,
    text=True,
  )
  t0 = time.monotonic()
  progress = {}
  try:
    while proc.poll() is None and time.monotonic() - t0 < timeout:
      if _trigger_ready(trigger, t0, state, workdir, world, rng):
        break
      time.sleep(0.002)
      _watch_progress(log_path, t0, progress)
    landed = proc.poll() is None
    latest = latest_step(workdir)
    if landed:
      proc.send_signal(sig)
    seconds = time.monotonic() - t0
    if landed and repeat_after is not None:
      time.sleep(repeat_after)
      if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=timeout)
    log.close()
    err = Path(log_path).read_text(errors="replace")
    os.remove(log_path)
  finally:
    if proc.poll() is None:  # only the process this function started
      proc.kill()
      proc.wait()
  if not landed and proc.returncode != 0:
    raise RuntimeError(f"run failed before its kill:\n{err[-3000:]}")
  return Kill(
    trigger=trigger,
    signal=signal.Signals(sig).name,
    seconds=round(seconds, 3),
    landed=landed,
    exit_status=proc.returncode,
    mid_write=bool(_tmp_dirs(Path(workdir) / "checkpoints")),
    latest_before=latest,
    resumed_at=progress.get("resumed_at"),
    first_step_at=progress.get("first_step_at"),
    stderr_tail=err[-3000:],
  )


# ------------------------------------------------------------- compare --


def _read_state(workdir: str):
  sys.path.insert(0, str(REPO))
  from leapalign_jax import checkpoint

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ckpt.latest_step()
    import orbax.checkpoint as ocp

    restored = ckpt.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
      ),
    )
  finally:
    ckpt.close()
  return step, restored


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return [
    {k: v for k, v in d.items() if not k.startswith("perf/")} for d in lines
  ]


def _records(path: Path):
  """The records of a TFRecord file (TensorBoard events)."""
  data = path.read_bytes()
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[pos : pos + 8])
    if pos + 12 + n + 4 > len(data):
      return  # a torn last record
    yield data[pos + 12 : pos + 12 + n]
    pos += 12 + n + 4


def tensorboard_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """``{tag: {step: value}}`` as TensorBoard shows it (purges applied).

  Files are read in name order (TensorBoard's); a ``SessionLog.START`` at
  step s hides every earlier event at a step >= s.
  """
  from tensorboardX.proto import event_pb2

  out: dict[str, dict[int, float]] = {}
  for path in sorted((Path(workdir) / "tensorboard").glob("events.*")):
    for raw in _records(path):
      event = event_pb2.Event.FromString(raw)
      if event.HasField("session_log") and event.session_log.status == 1:
        for steps in out.values():
          for s in [s for s in steps if s >= event.step]:
            del steps[s]
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return {k: v for k, v in out.items() if not k.startswith("perf/")}


def _file_digests(folder: Path) -> dict[str, str]:
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def compare_runs(reference: str, other: str) -> list[str]:
  """What differs between two finished runs (empty: identical).

  Compares the final checkpoint's state leaf by leaf (bit-equal) and its
  meta, every metrics line (minus ``perf/*``), the TensorBoard scalars as
  TensorBoard shows them, and the export and evaluation files byte for
  byte.
  """
  import jax

  problems = []
  (sa, a), (sb, b) = _read_state(reference), _read_state(other)
  if sa != sb:
    problems.append(f"latest checkpoint step {sa} vs {sb}")
  la = jax.tree_util.tree_leaves_with_path(a["state"])
  lb = jax.tree.leaves(b["state"])
  if len(la) != len(lb):
    problems.append(f"state has {len(la)} vs {len(lb)} leaves")
  for (path, x), y in zip(la, lb):
    if not np.array_equal(np.asarray(x), np.asarray(y)):
      problems.append(f"state{jax.tree_util.keystr(path)} differs")
  if dict(a["meta"]) != dict(b["meta"]):
    problems.append(f"meta {dict(a['meta'])} vs {dict(b['meta'])}")
  ma, mb = _metrics(reference), _metrics(other)
  if ma != mb:
    steps = [d["step"] for d in mb]
    problems.append(f"metrics.jsonl differs (steps {steps})")
  ta, tb = tensorboard_scalars(reference), tensorboard_scalars(other)
  if ta != tb:
    bad = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
    problems.append(f"TensorBoard scalars differ: {bad[:5]}")
  for folder in ("export", "eval/after", "eval/before"):
    da = _file_digests(Path(reference) / folder)
    db = _file_digests(Path(other) / folder)
    if da != db:
      problems.append(f"{folder} files differ")
  return problems


def leftovers(workdir: str) -> list[str]:
  """Temporary files and folders a finished run should not have left."""
  wd = Path(workdir)
  found = [str(p) for p in _tmp_dirs(wd / "checkpoints")]
  found += [
    str(p)
    for p in wd.rglob("*")
    if p.name.startswith((".tmp-", ".old-")) or p.name.endswith(".tmp")
  ]
  return found


def tree_digest(folder: str) -> dict[str, str]:
  """``{relative path: sha256}`` of every file under ``folder``."""
  return _file_digests(Path(folder))
