"""The multi-process kill/resume battery of ``bench/reliability.py``.

A reference run of the tiny config (1 process x 8 CPU devices), then the
same command through ``launch_local`` stopped ``kills`` times: each start
takes a random process count (1, 2 or 4 processes over the same 8-device
mesh) and, after a random number of new steps, either SIGKILLs one random
process (process 0 included) or SIGTERMs them all (a preemption). After
each stop every process must be gone within the bound (3 heartbeat
timeouts + 10 s), the workdir consistent (latest checkpoint restorable,
metrics readable), a SIGTERM must exit 0 with a checkpoint at the last
logged step, and the next start (another process count, often) must
resume from the latest checkpoint. At the end the run must match the
reference (``multiprocess_harness`` tolerances) and every step must have
read the reference's prompts, each process its own block.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import crash_harness as ch
import multiprocess_harness as mh

LAYOUTS = ((1, 8), (2, 4), (4, 2))
HEARTBEAT = 5.0


def flags(steps: int) -> tuple[str, ...]:
  return (
    f"--config.train.num_steps={steps}",
    "--config.train.ckpt_every_steps=2",
    "--config.train.log_every_steps=1",
    "--config.train.keep_checkpoints=2",
    "--config.eval.num_prompts=0",
  )


def _consistent(workdir: str) -> list[str]:
  problems = []
  if ch.latest_step(workdir) is not None:
    try:
      mh.read_state(workdir)
    except Exception as e:  # noqa: BLE001 - report any failure
      problems.append(f"latest checkpoint unreadable: {e!r}"[:300])
  try:
    mh.metrics(workdir)
  except ValueError as e:
    problems.append(f"metrics unreadable: {e}")
  return problems


def _one_stop(workdir, world, environ, root, n, rng, steps, kind) -> dict:
  """One start with a random layout, stopped by ``kind``; its record."""
  processes, devices = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
  pid_file, log = str(root / f"pids{n}"), str(root / f"start{n}.log")
  before = ch.latest_step(workdir)
  lines = (
    len(mh.metrics(workdir)) if Path(workdir, "metrics.jsonl").exists() else 0
  )
  cmd = mh.launch_command(
    workdir, world, processes, devices, *flags(steps),
    pid_file=pid_file, heartbeat=HEARTBEAT,
  )  # fmt: skip
  launcher = mh.start(cmd, environ, log)
  target = int(rng.integers(0, processes)) if kind == "SIGKILL" else None
  record = {
    "layout": f"{processes}x{devices}",
    "signal": kind,
    "process": target,
    "resumed_from": None,
    "expected_resume": before,
    "problems": [],
  }
  try:
    mh.wait_for_lines(workdir, lines + int(rng.integers(0, 3)), launcher)
  except RuntimeError:
    record["problems"].append("ended before its stop: " + mh.tail(log, 5))
    launcher.wait()
    return record
  if kind == "SIGKILL":
    sent = mh.kill_one(pid_file, target)
  else:
    launcher.send_signal(signal.SIGTERM)
    sent = time.monotonic()
  rc = launcher.wait(timeout=600)
  record["stopped_after_s"] = round(time.monotonic() - sent, 2)
  text = mh.tail(log, 2000)
  for line in text.splitlines():
    if "resumed from step" in line:
      record["resumed_from"] = int(line.rsplit(" ", 1)[-1])
      break
  problems = record["problems"]
  if before is not None and record["resumed_from"] != before:
    problems.append(f"resumed from {record['resumed_from']}, not {before}")
  if record["stopped_after_s"] > 3 * HEARTBEAT + 10:
    problems.append(f"processes took {record['stopped_after_s']} s to stop")
  if kind == "SIGTERM":
    logged = mh.metrics(workdir)[-1]["step"]
    if rc != 0:
      problems.append(f"SIGTERM: exit status {rc}")
    if ch.latest_step(workdir) != logged and logged < steps:
      problems.append("SIGTERM: no checkpoint at the last logged step")
  elif (
    processes > 1
    and target != 0
    and f"error: process {target} of {processes} is lost" not in text
  ):
    # The survivors name the lost process (process 0 takes JAX's
    # coordination service with it: JAX's own report there).
    problems.append("no line naming the lost process")
  problems += _consistent(workdir)
  return record


def run(root: Path, cache: str, kills: int, sigterms: int, steps: int, rng):
  """The battery; returns its results (see module doc)."""
  world = str(root / "mp_world")
  ref, workdir = str(root / "mp_ref"), str(root / "mp_killed")
  t0 = time.time()
  done = mh.run(
    mh.launch_command(ref, world, 1, 8, *flags(steps)),
    mh.env(cache, str(root / "mp_trace_ref")),
  )
  assert done.returncode == 0, done.stderr[-3000:]
  ref_s = time.time() - t0
  environ = mh.env(cache, str(root / "mp_trace"))
  kinds = ["SIGKILL"] * kills + ["SIGTERM"] * sigterms
  rng.shuffle(kinds)
  events = []
  for n, kind in enumerate(kinds):
    e = _one_stop(workdir, world, environ, root, n, rng, steps, kind)
    print(
      f"  {e['layout']} {kind:7s} process={e['process']} stopped in "
      f"{e.get('stopped_after_s')} s, resumed from {e['resumed_from']} "
      f"{e['problems'] or 'OK'}",
      flush=True,
    )
    events.append(e)
  last = mh.run(mh.launch_command(workdir, world, 2, 4, *flags(steps)), environ)
  assert last.returncode == 0, last.stderr[-3000:]
  final = mh.compare_metrics(mh.metrics(ref), mh.metrics(workdir))
  final += mh.compare_states(mh.read_state(ref)[1], mh.read_state(workdir)[1])
  ref_reads = mh.effective_reads(mh.read_trace(str(root / "mp_trace_ref")))
  reads = mh.effective_reads(mh.read_trace(str(root / "mp_trace")))
  final += mh.check_data(reads, ref_reads)
  final += [f"left behind: {p}" for p in ch.leftovers(workdir)]
  resumes = [e for e in events[1:] if e["expected_resume"] is not None]
  layouts = [e["layout"] for e in events] + ["2x4"]
  return {
    "steps": steps,
    "reference_seconds": round(ref_s, 1),
    "events": events,
    "final_problems": final,
    "tried": len(events),
    "survived": sum(not e["problems"] for e in events) if not final else 0,
    "sigkill_tried": kinds.count("SIGKILL"),
    "sigkill_process_0": sum(e["process"] == 0 for e in events),
    "sigterm_tried": kinds.count("SIGTERM"),
    "resumes_tried": len(resumes) + 1,
    "resumes_exact": 0
    if final
    else sum(not e["problems"] for e in resumes) + 1,
    "layout_changes": sum(a != b for a, b in zip(layouts, layouts[1:])),
    "layouts": dict(Counter(layouts)),
    "prompt_reads_equal_reference": not mh.check_data(reads, ref_reads),
  }
