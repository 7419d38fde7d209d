"""Several JAX processes on one machine (``launch_local``), for real.

The tiny config runs over one global mesh of 8 CPU devices as 1 process x 8
devices (the reference), 2 x 4 and 4 x 2, through the real command line
and JAX's distributed runtime (gloo collectives). Checked: the runs agree
(2 and 4 processes bit for bit; one process to fp rounding:
``multiprocess_harness`` says why), each process reads only
its block of every global batch and together they read the reference's,
only process 0 writes, the exports are byte-equal whatever the process
count; a run killed in one process stops everywhere with one line and
resumes with another process count, SIGTERM checkpoints everywhere and
exits 0, and a process started with another config or code is refused.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import crash_harness as ch
import jax
import multiprocess_harness as mh
import numpy as np
import pytest

from leapalign_jax import distributed, errors, launch_local

NUM_STEPS = 8
FLAGS = (
  f"--config.train.num_steps={NUM_STEPS}",
  "--config.train.ckpt_every_steps=2",
  "--config.train.log_every_steps=1",
  "--config.train.keep_checkpoints=2",
  "--config.eval.num_prompts=2",
  "--config.eval.num_steps=2",
  "--config.eval.grid_images=2",
)
HEARTBEAT = 5.0


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("mp")


@pytest.fixture(scope="module")
def cache(root):
  return os.environ.get("LEAPALIGN_TEST_JAX_CACHE") or str(root / "jax_cache")


@pytest.fixture(scope="module")
def runs(root, cache):
  """Uninterrupted runs: 1 x 8 (builds the world), 2 x 4, 4 x 2."""
  world = str(root / "world")
  out = {"world": world}
  for processes, devices in ((1, 8), (2, 4), (4, 2)):
    name = f"{processes}x{devices}"
    workdir, trace = str(root / name), str(root / f"trace_{name}")
    done = mh.run(
      mh.launch_command(workdir, world, processes, devices, *FLAGS),
      mh.env(cache, trace),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out[name] = workdir
    out[f"trace_{name}"] = trace
  return out


def _reads(trace: str):
  return mh.effective_reads(mh.read_trace(trace))


@pytest.mark.parametrize("layout", ["2x4", "4x2"])
def test_process_counts_give_the_same_run(runs, layout):
  ref, other = runs["1x8"], runs[layout]
  assert mh.compare_metrics(mh.metrics(ref), mh.metrics(other)) == []
  (sa, a), (sb, b) = mh.read_state(ref), mh.read_state(other)
  assert sa == sb == NUM_STEPS
  assert mh.compare_states(a, b) == []
  ea = json.loads((Path(ref) / "eval/after/eval.json").read_text())
  eb = json.loads((Path(other) / "eval/after/eval.json").read_text())
  assert ea["num_images"] == eb["num_images"] == 2
  assert eb["reward/clip"] == pytest.approx(ea["reward/clip"], rel=1e-4)


def test_two_and_four_processes_agree_bit_for_bit(runs):
  # The cross-process reduction does not depend on the process count.
  assert mh.metrics(runs["2x4"]) == mh.metrics(runs["4x2"])
  a, b = mh.read_state(runs["2x4"])[1], mh.read_state(runs["4x2"])[1]
  assert all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.parametrize("layout", ["2x4", "4x2"])
def test_each_process_reads_only_its_block(runs, layout):
  ref = _reads(runs["trace_1x8"])
  reads = _reads(runs[f"trace_{layout}"])
  processes = int(layout[0])
  assert sorted(ref) == list(range(NUM_STEPS))
  assert all(len(b) == processes for b in reads.values())
  # Each process's block: 8 / processes prompts, disjoint, covering the
  # reference's global batch (check_data).
  assert all(
    len(i) == 8 // processes for b in reads.values() for i in b.values()
  )
  assert mh.check_data(reads, ref) == []
  assert mh.prompt_counts(reads) == mh.prompt_counts(ref)


def test_only_process_0_writes_evaluate_and_export_agree(runs, cache, root):
  workdir = Path(runs["2x4"])
  assert [d["step"] for d in mh.metrics(str(workdir))] == list(
    range(1, NUM_STEPS + 1)
  )
  assert len(list((workdir / "tensorboard").glob("events.*"))) == 1
  assert ch.leftovers(str(workdir)) == []
  assert (workdir / "eval/after/grid.png").exists()
  trained = ch.tree_digest(str(workdir / "export"))
  assert trained  # written by process 0 of the 2-process training
  environ = mh.env(cache)
  for processes, devices in ((1, 8), (2, 4)):
    out = root / f"export_{processes}"
    done = mh.run(
      mh.launch_command(
        "",
        "",
        processes,
        devices,
        module="leapalign_jax.export",
        program=("--workdir", str(workdir), "--out", str(out)),
      ),
      environ,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ch.tree_digest(str(out)) == trained, processes
  # The evaluate command with 2 processes: the training's evaluation again.
  done = mh.run(
    mh.launch_command(
      "",
      "",
      2,
      4,
      module="leapalign_jax.evaluate",
      program=(
        "--config",
        str(mh.REPO / "configs/tiny.py"),
        "--workdir",
        str(workdir),
        "--tag=mp",
        f"world_options.dir={runs['world']}",
        *(f.removeprefix("--config.") for f in FLAGS),
      ),
    ),
    environ,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stderr.count("table: ") == 1  # process 0 reports
  after = json.loads((workdir / "eval/after/eval.json").read_text())
  again = json.loads((workdir / "eval/mp/eval.json").read_text())
  assert again["reward/clip"] == pytest.approx(after["reward/clip"], rel=1e-6)


def test_kill_term_and_resume_across_process_counts(runs, cache, root):
  """2 processes (one SIGKILLed) -> 4 (SIGTERM) -> 1 (launcher SIGKILLed)
  -> 2."""
  workdir, trace = str(root / "chain"), str(root / "trace_chain")
  environ = mh.env(cache, trace)
  flags = (*FLAGS, "--config.eval.num_prompts=0")

  # 1. Two processes; process 1 is SIGKILLed mid-run.
  pid_file, log = str(root / "chain.pids"), str(root / "chain1.log")
  cmd = mh.launch_command(
    workdir, runs["world"], 2, 4, *flags, pid_file=pid_file, heartbeat=HEARTBEAT
  )
  launcher = mh.start(cmd, environ, log)
  mh.wait_for_lines(workdir, 2, launcher)
  sent = mh.kill_one(pid_file, 1)
  rc = launcher.wait(timeout=120)
  stopped_after = time.monotonic() - sent
  text = mh.tail(log, 200)
  assert rc == 128 + signal.SIGKILL, text
  assert "process 1 (pid" in text and "was killed by SIGKILL" in text, text
  lost = [
    ln for ln in text.splitlines() if "error: process 1 of 2 is lost" in ln
  ]
  assert len(lost) == 1 and lost[0].startswith("[p0] "), text
  assert "Traceback" not in text, text
  assert stopped_after < 3 * HEARTBEAT + 10, stopped_after
  killed_at = ch.latest_step(workdir)

  # 2. Four processes resume; SIGTERM to all (a preemption). 3. One
  # process resumes; its launcher is SIGKILLed: the process gets SIGTERM.
  for processes, devices, name in ((4, 2, "chain2"), (1, 8, "chain3")):
    lines = len(mh.metrics(workdir))
    log, pid_file = str(root / f"{name}.log"), str(root / f"{name}.pids")
    launcher = mh.start(
      mh.launch_command(
        workdir, runs["world"], processes, devices, *flags, pid_file=pid_file
      ),
      environ,
      log,
    )
    mh.wait_for_lines(workdir, lines, launcher)
    text = mh.tail(log, 400)
    if name == "chain2":
      launcher.send_signal(signal.SIGTERM)
      assert launcher.wait(timeout=300) == 0, mh.tail(log)
      text = mh.tail(log, 400)
      # Every process stopped at the same step (one checkpoint, exit 0).
      assert text.count("preempted at step") == processes, text
    else:
      launcher.kill()
      launcher.wait()
      assert mh.wait_gone(mh.pids(pid_file), timeout=300), text
    assert f"resumed from step {killed_at}" in text, text
    logged = mh.metrics(workdir)[-1]["step"]
    assert ch.latest_step(workdir) == logged < NUM_STEPS, text
    killed_at = logged

  # 4. Two processes run to the end.
  done = mh.run(
    mh.launch_command(workdir, runs["world"], 2, 4, *flags), environ
  )
  assert done.returncode == 0, done.stderr[-3000:]
  ref = runs["1x8"]
  assert mh.compare_metrics(mh.metrics(ref), mh.metrics(workdir)) == []
  assert (
    mh.compare_states(mh.read_state(ref)[1], mh.read_state(workdir)[1]) == []
  )
  reads = _reads(trace)
  assert mh.check_data(reads, _reads(runs["trace_1x8"])) == []
  assert ch.leftovers(workdir) == []


def _start_two(tmp_path, extra_1, pythonpath_1=""):
  """Processes 0 and 1 of a 2-process job, process 1 given ``extra_1``."""
  port = launch_local._free_port()
  base = ["--config", str(mh.REPO / "configs/tiny.py")]
  base += ["--workdir", str(tmp_path / "run")]
  procs = []
  for i, extra in enumerate(([], extra_1)):
    environ = launch_local.process_env(dict(os.environ), i, 2, 4, port, 5)
    if i == 1 and pythonpath_1:
      environ["PYTHONPATH"] = pythonpath_1
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", "leapalign_jax.main", *base, *extra],
        cwd=tmp_path,
        env=environ,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  return [(p.wait(timeout=120), p.stderr.read()) for p in procs]


def _errors(text: str) -> list[str]:
  return [ln for ln in text.splitlines() if ln.startswith("error:")]


def test_process_with_another_config_is_refused(tmp_path):
  results = _start_two(tmp_path, ["--config.optim.lr=0.5"])
  for rc, err in results:
    assert rc == errors.EXIT_USER_ERROR, err
    (line,) = _errors(err)
    assert "process 1 was started with another config than process 0" in line
    assert "optim.lr" in line
  assert not (tmp_path / "run").exists()


def test_process_with_another_code_version_is_refused(tmp_path):
  copy = tmp_path / "other"
  shutil.copytree(
    mh.REPO / "leapalign_jax",
    copy / "leapalign_jax",
    ignore=shutil.ignore_patterns("__pycache__"),
  )
  with open(copy / "leapalign_jax/train.py", "a") as f:
    f.write("\n# a local edit on one host\n")
  results = _start_two(tmp_path, [], pythonpath_1=str(copy))
  for rc, err in results:
    assert rc == errors.EXIT_USER_ERROR, err
    (line,) = _errors(err)
    assert "process 1 runs another version of leapalign_jax" in line


def test_launcher_environment_matches_the_slurm_path():
  environ = launch_local.process_env(
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"},
    1,
    2,
    4,
    1234,
    7.0,
  )
  assert (
    environ["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
  )
  assert environ["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  assert (environ["JAX_NUM_PROCESSES"], environ["JAX_PROCESS_ID"]) == ("2", "1")
  kwargs = distributed.distributed_kwargs(environ)
  assert kwargs["num_processes"] == 2 and kwargs["process_id"] == 1
  one = launch_local.process_env({}, 0, 1, 8, 1234, 7.0)
  assert distributed.distributed_kwargs(one) is None


def test_launcher_and_timeout_refuse_bad_input(capsys, monkeypatch):
  with pytest.raises(SystemExit):
    launch_local.parse(["--processes=2"])
  assert "give the program's arguments after --" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    launch_local.parse(["--processes=0", "--", "--config", "x"])
  monkeypatch.setenv("LEAPALIGN_HEARTBEAT_TIMEOUT_S", "soon")
  with pytest.raises(errors.UserError, match="positive number of seconds"):
    distributed.heartbeat_timeout()
