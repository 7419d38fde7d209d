r"""Rehearse a multi-host job on one machine: N JAX processes over CPU devices.

  python -m leapalign_jax.launch_local --processes 2 --devices 4 -- \\
      --config configs/tiny.py --workdir /tmp/tiny2

starts ``--processes`` copies of ``python -m leapalign_jax.main <args>``,
each with ``--devices`` fake CPU devices, joined by JAX's distributed
runtime through the environment that ``launch/slurm.sbatch`` exports
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
CPU collectives go through gloo). The global mesh is the same as one
process with ``processes * devices`` devices, so a config runs unchanged.

Every line a process prints is passed on with a ``[p<i>]`` prefix.
SIGTERM and SIGINT are forwarded to every process (a preemption rehearsal:
they checkpoint at the same step and exit 0); if the launcher itself dies,
even by SIGKILL, its processes get SIGTERM (Linux). When a process dies, the
others stop by themselves within ``--heartbeat-timeout`` seconds
(``distributed.Watchdog``); the launcher names the lost process in one
line, kills any process still alive ``--grace`` seconds later, and exits
with the first failed process's status (128 + signal for a signal).
Rerunning the command, with any process count, resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

_PROG = "launch_local"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(
  base: dict[str, str],
  process_id: int,
  processes: int,
  devices: int,
  port: int,
  heartbeat_timeout: float,
) -> dict[str, str]:
  """The environment of process ``process_id`` (see module doc)."""
  env = dict(base)
  flags = [
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  env.update(
    XLA_FLAGS=" ".join(flags),
    JAX_PLATFORMS="cpu",
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_NUM_PROCESSES=str(processes),
    JAX_PROCESS_ID=str(process_id),
    LEAPALIGN_HEARTBEAT_TIMEOUT_S=str(heartbeat_timeout),
    PYTHONUNBUFFERED="1",
  )
  if processes == 1:  # one process: no distributed runtime, like SLURM's
    env["LEAPALIGN_DISTRIBUTED"] = "0"
  return env


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, b""):
    out.write(prefix + line.decode(errors="replace"))
    out.flush()


def _describe(rc: int) -> str:
  if rc < 0:
    return f"was killed by {signal.Signals(-rc).name}"
  return f"exited with status {rc}"


def _die_with_parent():
  """A ``preexec_fn``: the child gets SIGTERM when the launcher dies (Linux).

  Even a SIGKILLed launcher leaves no orphans running: its processes
  checkpoint and exit. None where ``prctl`` is not available.
  """
  try:
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  pr_set_pdeathsig = 1
  return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def run(args: argparse.Namespace) -> int:
  """Starts the processes and waits for them; returns the exit status."""
  port = args.port or _free_port()
  command = [sys.executable, "-m", args.module, *args.program_args]
  procs = []
  pumps = []

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  preexec = _die_with_parent()  # resolved here: the child only calls it
  for i in range(args.processes):
    env = process_env(
      dict(os.environ),
      i,
      args.processes,
      args.devices,
      port,
      args.heartbeat_timeout,
    )
    p = subprocess.Popen(
      command,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      preexec_fn=preexec,  # no threads yet: the pumps start below
    )
    procs.append(p)
  for i, p in enumerate(procs):
    t = threading.Thread(
      target=_pump, args=(p.stdout, f"[p{i}] ", sys.stderr), daemon=True
    )
    t.start()
    pumps.append(t)

  if args.pid_file:  # for tests and scripts that signal one process
    tmp = args.pid_file + ".tmp"
    with open(tmp, "w") as f:
      json.dump([p.pid for p in procs], f)
    os.replace(tmp, args.pid_file)
  first_failure = None  # (process, rc)
  deadline = None
  while any(p.poll() is None for p in procs):
    for i, p in enumerate(procs):
      rc = p.poll()
      if rc not in (None, 0) and first_failure is None:
        first_failure = (i, rc)
        deadline = time.monotonic() + args.grace
        others = any(q.poll() is None for q in procs)
        print(
          f"{_PROG}: error: process {i} (pid {p.pid}) {_describe(rc)}"
          + (
            f"; the others stop within {args.heartbeat_timeout:g} s"
            if others
            else ""
          ),
          file=sys.stderr,
          flush=True,
        )
    if deadline is not None and time.monotonic() > deadline:
      alive = [i for i, p in enumerate(procs) if p.poll() is None]
      print(
        f"{_PROG}: error: process(es) {alive} still running {args.grace:g} s "
        "after the failure; killing them",
        file=sys.stderr,
        flush=True,
      )
      for i in alive:
        procs[i].kill()
      deadline = None
    time.sleep(0.1)
  for t in pumps:
    t.join(timeout=5)
  if first_failure is None:
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    first_failure = failed[0] if failed else None
  if first_failure is None:
    return 0
  rc = first_failure[1]
  return 128 - rc if rc < 0 else rc


def parse(argv: list[str]) -> argparse.Namespace:
  """The launcher's options; what follows ``--`` goes to the program."""
  parser = argparse.ArgumentParser(
    prog=f"python -m leapalign_jax.{_PROG}",
    description=(__doc__ or "").split("\n\n")[0],
    usage="%(prog)s [options] -- <arguments of leapalign_jax.main>",
  )
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument(
    "--devices", type=int, default=4, help="fake CPU devices per process"
  )
  parser.add_argument(
    "--heartbeat-timeout",
    type=float,
    default=10.0,
    help="seconds after which a silent process counts as lost",
  )
  parser.add_argument(
    "--grace",
    type=float,
    default=60.0,
    help="seconds after a failure before the launcher kills the rest",
  )
  parser.add_argument("--port", type=int, default=0, help="0: a free port")
  parser.add_argument(
    "--pid-file", default="", help="write the processes' pids (JSON) here"
  )
  parser.add_argument(
    "--module",
    default="leapalign_jax.main",
    help="the program each process runs (also leapalign_jax.evaluate, "
    "leapalign_jax.export)",
  )
  if "--" in argv:
    split = argv.index("--")
    own, program = argv[:split], argv[split + 1 :]
  else:
    own, program = argv, []
  args = parser.parse_args(own)
  args.program_args = program
  if args.processes < 1 or args.devices < 1:
    parser.error("--processes and --devices must be at least 1")
  if not program:
    parser.error(
      "give the program's arguments after --, e.g. -- --config "
      "configs/tiny.py --workdir /tmp/run"
    )
  return args


def main(argv: list[str] | None = None) -> int:
  """Command line entry point; returns the exit status."""
  return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  sys.exit(main())
