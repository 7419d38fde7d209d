"""The long reliability battery: many random kills, then every bad input.

  python bench/reliability.py [--kills 12] [--sigterms 3] [--steps 40] \
      [--seed N] [--skip-bad-inputs] [--mp-kills 6] [--mp-sigterms 2] \
      [--mp-steps 16] [--skip-multiprocess | --only-multiprocess]

1. A reference run of the tiny config (``--steps`` steps, a checkpoint every
   3, two kept, a small evaluation) builds world A uninterrupted.
2. The same command in another workdir, building world B, is stopped
   ``--kills`` times with SIGKILL and ``--sigterms`` times with SIGTERM (a
   second SIGTERM 50 ms later), at random points of a shuffled plan of
   triggers (``tests/crash_harness.py``: during the world preparation,
   mid-step, during a checkpoint write, between orbax's commit file and its
   rename, right after a metrics line, during the export), restarting the
   same command after each. After each stop the workdir must be consistent
   (the latest checkpoint restorable and not older than before, the metrics
   readable); SIGTERM must exit 0 with a checkpoint at the last logged
   step. At the end the run must equal the reference bit for bit (state,
   metrics, TensorBoard, export, evaluation outputs) and world B must equal
   world A byte for byte.
3. Every case of ``tests/bad_inputs.py`` through its real command line.
4. The multi-process battery (``bench/multiprocess_battery.py``): the same
   command through ``launch_local`` with 1, 2 or 4 processes per start,
   one random process SIGKILLed ``--mp-kills`` times and all SIGTERMed
   ``--mp-sigterms`` times; every stop bounded, every resume exact across
   process counts, the data read as by the uninterrupted run.
   ``--only-multiprocess`` runs this part alone (and keeps the other
   results in the JSON file).

Prints a table and writes ``bench/results/reliability.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bad_inputs  # noqa: E402
import crash_harness as ch  # noqa: E402
import multiprocess_battery  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reliability.json"
SIGKILL_TRIGGERS = ("step", "ckpt_write", "ckpt_commit", "metrics", "final")


def run_flags(steps: int) -> tuple[str, ...]:
  return (
    f"--config.train.num_steps={steps}",
    "--config.train.ckpt_every_steps=3",
    "--config.train.log_every_steps=2",  # windows straddle checkpoints
    "--config.train.keep_checkpoints=2",
    "--config.eval.num_prompts=2",
    "--config.eval.num_steps=2",
    "--config.eval.grid_images=2",
  )


def plan(kills: int, sigterms: int, rng) -> list[tuple[str, int]]:
  """Two world-preparation kills, a shuffled mix, the export kills last."""
  rest = [
    (SIGKILL_TRIGGERS[i % len(SIGKILL_TRIGGERS)], signal.SIGKILL)
    for i in range(max(0, kills - 2))
  ]
  rest += [("step", signal.SIGTERM)] * sigterms
  rng.shuffle(rest)
  # "final" last: once a start reaches it, training is over.
  final = [t for t in rest if t[0] == "final"]
  rest = [t for t in rest if t[0] != "final"]
  return [("world", signal.SIGKILL)] * min(2, kills) + rest + final


def consistent(workdir: str, previous: int | None) -> list[str]:
  """Invariants after a stop: a restorable, non-regressing checkpoint."""
  problems = []
  latest = ch.latest_step(workdir)
  if previous is not None and (latest is None or latest < previous):
    problems.append(f"latest checkpoint went from {previous} to {latest}")
  if latest is not None:
    try:
      step, _ = ch._read_state(workdir)
      if step != latest:
        problems.append(f"restored step {step}, expected {latest}")
    except Exception as e:  # noqa: BLE001 - report any failure
      problems.append(f"checkpoint {latest} unreadable: {e!r}"[:300])
  metrics = Path(workdir) / "metrics.jsonl"
  if metrics.exists():
    lines = metrics.read_text().split("\n")
    for n, line in enumerate(lines[:-1]):  # the last may be torn
      try:
        json.loads(line)
      except ValueError:
        problems.append(f"metrics line {n + 1} unreadable")
  return problems


def kill_battery(args, root: Path, env: dict, rng) -> dict:
  """Steps 1 and 2 of the module doc; returns the results."""
  flags = run_flags(args.steps)
  ref, killed = str(root / "ref"), str(root / "killed")
  world_a, world_b = str(root / "world_a"), str(root / "world_b")
  t0 = time.time()
  out = ch.run(ch.train_command(ref, world_a, *flags), env, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  ref_s = time.time() - t0
  cmd = ch.train_command(killed, world_b, *flags)
  events = []
  t0 = time.time()
  for trigger, sig in plan(args.kills, args.sigterms, rng):
    previous = ch.latest_step(killed)
    repeat = 0.05 if sig == signal.SIGTERM else None
    k = ch.start_and_kill(
      cmd,
      env,
      killed,
      world_b,
      trigger,
      rng,
      num_steps=args.steps,
      sig=sig,
      repeat_after=repeat,
    )
    problems = consistent(killed, previous) if k.landed else []
    if k.landed and sig == signal.SIGTERM:
      if k.exit_status != 0:
        problems.append(f"SIGTERM exit status {k.exit_status}")
      logged = ch._metrics(killed)
      if logged and (ch.latest_step(killed) or 0) < logged[-1]["step"]:
        problems.append("SIGTERM: no checkpoint at the last logged step")
    events.append({**dataclasses.asdict(k), "problems": problems})
    del events[-1]["stderr_tail"]
    print(
      f"  {k.signal:8s} {trigger:12s} at {k.seconds:6.2f}s "
      f"landed={k.landed} mid_write={k.mid_write} "
      f"ckpt={k.latest_before} {problems or 'OK'}",
      flush=True,
    )
  out = ch.run(cmd, env, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  killed_s = time.time() - t0
  final = ch.compare_runs(ref, killed)
  final += [f"left behind: {p}" for p in ch.leftovers(killed)]
  if ch.tree_digest(world_a) != ch.tree_digest(world_b):
    final.append("world B (built under kills) differs from world A")
  landed = [e for e in events if e["landed"]]
  restored = [e["resumed_at"] for e in events if e["resumed_at"] is not None]
  stepped = [
    e["first_step_at"] for e in events if e["first_step_at"] is not None
  ]
  survived = [e for e in landed if not e["problems"] and not final]
  return {
    "steps": args.steps,
    "reference_seconds": round(ref_s, 1),
    "killed_run_seconds": round(killed_s, 1),
    "events": events,
    "final_problems": final,
    "tried": len(landed),
    "survived": len(survived),
    "sigkill_tried": sum(e["signal"] == "SIGKILL" for e in landed),
    "sigterm_tried": sum(e["signal"] == "SIGTERM" for e in landed),
    "mid_write": sum(e["mid_write"] for e in landed),
    # Seconds from a restart to its state restored / its first new step
    # (medians over the restarts that got there before their stop).
    "resume_state_restored_s": _median(restored),
    "resume_first_step_s": _median(stepped),
    "resumes_timed": len(stepped),
    "ref": ref,
    "world": world_a,
  }


def _median(values: list[float]) -> float | None:
  return round(float(np.median(values)), 2) if values else None


def bad_input_battery(kills: dict, root: Path, env: dict) -> dict:
  """Step 3: every bad-input case; returns the results."""
  bad = bad_inputs.make_bad_files(kills["world"], str(root / "bad"))
  cases = []
  for i, name in enumerate(bad_inputs.CASES):
    t0 = time.time()
    problems, line = bad_inputs.check(
      name,
      bad,
      kills["ref"],
      run_flags(kills["steps"]),
      kills["steps"],
      str(root / f"case{i}"),
      env,
    )
    cases.append(
      {
        "case": name,
        "clear": not problems,
        "line": line,
        "problems": problems,
        "seconds": round(time.time() - t0, 1),
      }
    )
    print(f"  {'OK  ' if not problems else 'FAIL'} {name}: {line[:110]}")
  return {
    "tried": len(cases),
    "clear": sum(c["clear"] for c in cases),
    "cases": cases,
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=12)
  parser.add_argument("--sigterms", type=int, default=3)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--seed", type=int, default=None)
  parser.add_argument("--skip-bad-inputs", action="store_true")
  parser.add_argument("--mp-kills", type=int, default=6)
  parser.add_argument("--mp-sigterms", type=int, default=2)
  parser.add_argument("--mp-steps", type=int, default=16)
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--skip-multiprocess", action="store_true")
  which.add_argument("--only-multiprocess", action="store_true")
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args()
  seed = args.seed if args.seed is not None else int(time.time()) % 10**6
  rng = np.random.default_rng(seed)
  root = Path(tempfile.mkdtemp(prefix="leapalign-reliability-"))
  env = ch.command_env(
    os.environ.get("LEAPALIGN_TEST_JAX_CACHE") or str(root / "jax_cache")
  )
  print(f"seed {seed}; runs under {root}")
  t0 = time.time()
  if args.only_multiprocess:
    return only_multiprocess(args, root, env, rng, seed)
  kills = kill_battery(args, root, env, rng)
  bad = None if args.skip_bad_inputs else bad_input_battery(kills, root, env)
  print("\n| battery | tried | passed |\n|---|---|---|")
  print(
    f"| kills (SIGKILL {kills['sigkill_tried']}, SIGTERM "
    f"{kills['sigterm_tried']}; {kills['mid_write']} mid-checkpoint-write) "
    f"| {kills['tried']} | {kills['survived']} survived |"
  )
  if bad is not None:
    print(f"| bad inputs | {bad['tried']} | {bad['clear']} clear errors |")
  print(
    f"time to resume (median of {kills['resumes_timed']} restarts): state "
    f"restored after {kills['resume_state_restored_s']} s, first new step "
    f"after {kills['resume_first_step_s']} s; reference run "
    f"{kills['reference_seconds']} s"
  )
  if kills["final_problems"]:
    print("final comparison:", kills["final_problems"])
  mp = None
  if not args.skip_multiprocess:
    mp = multiprocess(args, root, env, rng)
  result = {
    "seed": seed,
    "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    "config": "configs/tiny.py, 1 CPU device",
    "seconds": round(time.time() - t0, 1),
    "kills": {k: v for k, v in kills.items() if k not in ("ref", "world")},
    "bad_inputs": bad,
    "multiprocess": mp,
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out}")
  ok = (
    kills["survived"] == kills["tried"]
    and (bad is None or bad["clear"] == bad["tried"])
    and (mp is None or mp["survived"] == mp["tried"])
  )
  return 0 if ok else 1


def multiprocess(args, root: Path, env: dict, rng) -> dict:
  """Step 4 (``multiprocess_battery``): runs it, prints its table line."""
  print("multi-process battery:")
  t0 = time.time()
  mp = multiprocess_battery.run(
    root,
    env["JAX_COMPILATION_CACHE_DIR"],
    args.mp_kills,
    args.mp_sigterms,
    args.mp_steps,
    rng,
  )
  mp["seconds"] = round(time.time() - t0, 1)
  print(
    f"| multi-process stops (SIGKILL of one process {mp['sigkill_tried']}, "
    f"{mp['sigkill_process_0']} of them process 0; SIGTERM to all "
    f"{mp['sigterm_tried']}) | {mp['tried']} | {mp['survived']} survived |\n"
    f"| resumes across process counts ({mp['layout_changes']} count "
    f"changes, layouts {mp['layouts']}) | {mp['resumes_tried']} | "
    f"{mp['resumes_exact']} exact |"
  )
  if mp["final_problems"]:
    print("final comparison:", mp["final_problems"])
  return mp


def only_multiprocess(args, root: Path, env: dict, rng, seed: int) -> int:
  """``--only-multiprocess``: step 4 alone, merged into the JSON file."""
  print("\n| battery | tried | passed |\n|---|---|---|")
  mp = multiprocess(args, root, env, rng)
  out = Path(args.out)
  result = json.loads(out.read_text()) if out.exists() else {}
  result["multiprocess"] = {**mp, "seed": seed}
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")
  return 0 if mp["survived"] == mp["tried"] else 1


if __name__ == "__main__":
  sys.exit(main())
