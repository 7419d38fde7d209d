"""SIGTERM during start-up, the preempted exit status, time-based checkpoints.

``jax.distributed.initialize`` installs a SIGTERM handler of its own (JAX's
preemption service, which only records the notice): a SIGTERM between it
and the training loop would be swallowed. ``distributed.initialize`` puts
the program's handler back at once. These tests start JAX's distributed
runtime for real, as one process with a local coordinator.
"""

import os
import socket
import subprocess
import sys
import time

import crash_harness as ch

_AFTER_INIT = """
import os, signal, sys, time
from leapalign_jax import distributed, errors
if sys.argv[1] == "ours":
  signal.signal(signal.SIGTERM, lambda *_: errors.exit_preempted())
  distributed.initialize()
else:  # JAX alone: what the program did before
  import jax
  jax.distributed.initialize(**distributed.distributed_kwargs(os.environ))
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("still running 5 s after SIGTERM")
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _distributed_env(**extra) -> dict:
  env = ch.command_env(os.environ.get("LEAPALIGN_TEST_JAX_CACHE", ""))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.update(
    LEAPALIGN_DISTRIBUTED="1",
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
    JAX_NUM_PROCESSES="1",
    JAX_PROCESS_ID="0",
    PYTHONPATH=str(ch.REPO),
    XLA_FLAGS="",
  )
  env.update(extra)
  return env


def test_sigterm_right_after_distributed_initialize_ends_the_program():
  def run(which):
    return subprocess.run(
      [sys.executable, "-c", _AFTER_INIT, which],
      env=_distributed_env(),
      capture_output=True,
      text=True,
      timeout=120,
    )

  jax_only = run("jax")  # the defect: JAX's handler swallows it
  assert "still running 5 s after SIGTERM" in jax_only.stdout, jax_only.stderr
  ours = run("ours")
  assert ours.returncode == 0, ours.stderr[-3000:]
  assert "still running" not in ours.stdout
  assert "preempted (SIGTERM)" in ours.stderr, ours.stderr[-3000:]


def test_sigterm_during_startup_of_the_real_command(tmp_path):
  """Right after the distributed start-up: exit cleanly, nothing written.

  With LEAPALIGN_EXIT_PREEMPTED set (as launch/slurm.sbatch does), the
  status is that value.
  """
  workdir = tmp_path / "run"
  cmd = ch.train_command(str(workdir), str(tmp_path / "world"))
  proc = subprocess.Popen(
    cmd,
    cwd=ch.REPO,
    env=_distributed_env(LEAPALIGN_EXIT_PREEMPTED="75"),
    stderr=subprocess.PIPE,
    text=True,
  )
  lines = []
  deadline = time.monotonic() + 120
  for line in proc.stderr:  # "process 0/1, ..." follows the initialize
    lines.append(line)
    if "[leapalign] process 0/1" in line:
      proc.terminate()
      break
    assert time.monotonic() < deadline, "".join(lines)
  rest = proc.stderr.read()
  proc.wait(timeout=60)
  err = "".join(lines) + rest
  assert proc.returncode == 75, err[-3000:]
  assert "preempted (SIGTERM)" in err and "Traceback" not in err, err
  assert not (workdir / "checkpoints").exists()


def test_time_based_checkpoints(tmp_path):
  """``train.ckpt_every_secs`` saves between step-based checkpoints.

  A period shorter than any step saves after every step, whatever the
  machine's speed; 0 turns them off.
  """
  world = str(tmp_path / "world")
  flags = (
    "--config.train.num_steps=3",
    "--config.train.ckpt_every_steps=100",
    "--config.train.keep_checkpoints=5",
    "--config.eval.num_prompts=0",
    "--config.export.enabled=False",
  )
  steps = {}
  for secs in ("1e-6", "0"):
    workdir = str(tmp_path / f"run_{secs}")
    cmd = ch.train_command(
      workdir, world, *flags, f"--config.train.ckpt_every_secs={secs}"
    )
    env = ch.command_env(
      os.environ.get("LEAPALIGN_TEST_JAX_CACHE") or str(tmp_path / "jax")
    )
    out = ch.run(cmd, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "progress: step 1 of 3 done" in out.stderr
    steps[secs] = sorted(
      int(p) for p in os.listdir(os.path.join(workdir, "checkpoints"))
    )
  assert steps == {"1e-6": [1, 2, 3], "0": [3]}
