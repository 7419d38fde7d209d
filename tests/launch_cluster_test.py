"""launch/worker.sh and the SLURM scripts: lifecycles, requeue, shellcheck.

Stubs and helpers: ``launch_common``; tpu.sh: ``launch_test``.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from launch_common import (  # noqa: F401
  LAUNCH,
  NAME_ZONE,
  REPO,
  SBATCH,
  SCRIPTS,
  SLURM,
  TPU,
  TRAIN,
  WORKER,
  assert_one_line_error,
  commands,
  flag,
  gcloud_calls,
  make_stub_env,
  run_script,
  wait_for,
)


@pytest.fixture
def stub_env(tmp_path):
  yield from make_stub_env(tmp_path)


# ------------------------------------------------------------------ worker.sh


def test_worker_start_stop_lifecycle(stub_env, tmp_path):
  """start detaches with a log and pid per worker; stop SIGTERMs and waits."""
  env = dict(stub_env, LEAPALIGN_WORKER_ID="3")
  common = ["--log-dir", "logs"]
  start = [
    "start",
    "--venv",
    "venv",
    *common,
    "--check-after",
    "0.2",
    "--env",
    "EXTRA_VAR=x y",
    "--",
    *TRAIN,
  ]
  r = run_script(WORKER, start, env, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  pid = int((tmp_path / "logs" / "train.worker3.pid").read_text())
  os.kill(pid, 0)  # alive after start returned: detached
  assert os.getsid(pid) == pid  # its own session: an ssh hangup misses it

  again = run_script(WORKER, start, env, cwd=tmp_path)
  assert_one_line_error(again, "worker.sh", "already going")

  status = run_script(WORKER, ["status", *common], env, cwd=tmp_path)
  assert status.stdout.startswith(f"worker 3: running, pid {pid}")

  stop = run_script(
    WORKER, ["stop", *common, "--timeout", "20"], env, cwd=tmp_path
  )
  assert stop.returncode == 0, stop.stderr
  log = (tmp_path / "logs" / "train.worker3.log").read_text()
  assert "args: -m leapalign_jax.main --config configs/leap" in log
  assert "--config.prompt=a cat's hat" in log
  assert "SIGTERM: checkpoint saved" in log
  status = run_script(WORKER, ["status", *common], env, cwd=tmp_path)
  assert status.stdout.startswith("worker 3: not running")
  logs = run_script(
    WORKER, ["logs", *common, "--lines", "1"], env, cwd=tmp_path
  )
  assert logs.stdout.strip() == "SIGTERM: checkpoint saved"


def test_worker_start_reports_a_run_that_dies(stub_env, tmp_path):
  env = dict(stub_env, LEAPALIGN_WORKER_ID="0")
  args = ["start", "--venv", "venv", "--log-dir", "logs"]
  args += ["--check-after", "0.2", "--", "false"]
  r = run_script(WORKER, args, env, cwd=tmp_path)
  assert r.returncode == 1
  assert "not running 0.2s after start" in r.stderr


def _start(env, cwd, *options, command=TRAIN):
  args = ["start", "--venv", "venv", "--log-dir", "logs"]
  args += ["--check-after", "0.1", *options, "--", *command]
  return run_script(WORKER, args, env, cwd=cwd)


def test_worker_start_waits_for_the_first_progress_line(stub_env, tmp_path):
  env = dict(stub_env, LEAPALIGN_WORKER_ID="1", FAKE_FIRST_STEP="20")
  env["LEAPALIGN_LOG_COPY_SECONDS"] = "1"
  copies = tmp_path / "workdir_logs"
  r = _start(
    env,
    tmp_path,
    "--wait-progress",
    "20",
    "--stage-dir",
    "stage",
    "--copy-log-to",
    str(copies),
  )
  assert r.returncode == 0, r.stderr
  assert "[leapalign] progress: step 1 of 9 done" in r.stderr
  assert (
    r.stderr.strip().splitlines()[-1].startswith("worker.sh: worker 1: started")
  )
  stop = run_script(WORKER, ["stop", "--log-dir", "logs"], env, cwd=tmp_path)
  assert stop.returncode == 0, stop.stderr
  log = (tmp_path / "logs" / "train.worker1.log").read_text()
  assert f"stage={tmp_path / 'stage'}" in log
  # The log copier's last copy, after the run ended, has the whole log.
  copied = copies / f"train.{socket.gethostname()}.log"
  deadline = time.monotonic() + 30
  while "SIGTERM: checkpoint saved" not in (
    copied.read_text() if copied.exists() else ""
  ):
    assert time.monotonic() < deadline, "the log was never copied whole"
    time.sleep(0.1)


def test_worker_start_fails_on_the_programs_error(stub_env, tmp_path):
  env = dict(stub_env, LEAPALIGN_WORKER_ID="0", FAKE_ERROR="1")
  r = _start(env, tmp_path, "--wait-progress", "20", "--check-after", "0")
  assert r.returncode == 1
  assert "error: config.flux.path is empty" in r.stderr
  status = run_script(
    WORKER, ["status", "--log-dir", "logs"], env, cwd=tmp_path
  )
  assert status.returncode == 0, status.stderr
  assert status.stdout.splitlines()[0].startswith("worker 0: not running")
  assert "errors in its log" in status.stdout
  assert "error: config.flux.path is empty" in status.stdout


def test_worker_start_times_out_without_progress(stub_env, tmp_path):
  env = dict(stub_env, LEAPALIGN_WORKER_ID="0", FAKE_FIRST_STEP="100000")
  r = _start(env, tmp_path, "--wait-progress", "1")
  assert r.returncode == 1
  assert "no progress line 1s after start" in r.stderr
  run_script(WORKER, ["stop", "--log-dir", "logs"], env, cwd=tmp_path)


def test_worker_exec_runs_in_the_repository_with_the_venv(stub_env, tmp_path):
  env = dict(stub_env, LEAPALIGN_WORKER_ID="0", FAKE_STEPS="1")
  args = ["exec", "--venv", "venv", "--stage-dir", "st", "--", "python", "x"]
  r = run_script(WORKER, args, env, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert "args: x" in r.stdout and f"stage={tmp_path / 'st'}" in r.stdout


def test_worker_setup_dry_run(stub_env, tmp_path):
  venv = tmp_path / "newvenv"
  args = ["setup", "--venv", str(venv), "--python", shutil.which("python3")]
  r = run_script(WORKER, [*args, "--jax", "jax[cuda12]", "--dry-run"], stub_env)
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  assert cmds[0][1:] == ["-m", "venv", str(venv)]
  pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q"]
  assert cmds[1] == [*pip, "--upgrade", "pip"]
  assert cmds[2] == [
    *pip,
    "-c",
    str(REPO / "constraints.txt"),
    "-e",
    str(REPO),
    "jax[cuda12]",
  ]
  assert cmds[3][:2] == [str(venv / "bin/python"), "-c"]


# ------------------------------------------------------------------- SLURM

SLURM_ARGS = [
  "--config",
  "configs/leap_hpsv2_flux_dev.py",
  "--workdir",
  "/shared/runs/r1",
  "--config.optimizer.lr=1e-5",
  "--config.prompt=a cat's hat",
]


def test_slurm_submit_dry_run(stub_env, tmp_path):
  args = ["submit", "--nodes", "2", "--gpus-per-node", "8", *SLURM_ARGS]
  args += ["--time", "24:00:00", "--partition", "gpu", "--dry-run"]
  r = run_script(SLURM, args, stub_env)
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  assert cmds[0] == ["mkdir", "-p", str(REPO / "logs/slurm")]
  sbatch = cmds[1]
  assert sbatch[0] == "sbatch"
  for token in [
    f"--chdir={REPO}",
    "--nodes=2",
    "--ntasks-per-node=1",
    "--gpus-per-node=8",
    "--signal=B:USR1@300",
    "--requeue",
    "--time=24:00:00",
    "--partition=gpu",
  ]:
    assert token in sbatch
  script = sbatch.index(str(SBATCH))
  assert sbatch[script + 1 :] == [
    "--config",
    "configs/leap_hpsv2_flux_dev.py",
    "--workdir",
    "/shared/runs/r1",
    "--venv",
    str(REPO / ".venv"),
    "--log-dir",
    str(REPO / "logs/slurm"),
    "--config.optimizer.lr=1e-5",
    "--config.prompt=a cat's hat",
  ]
  # Then what the batch script would run, with the node count filled in.
  assert "export JAX_NUM_PROCESSES=2" in r.stdout
  srun = next(c for c in cmds if c[0] == "srun")
  assert "--ntasks=2" in srun


def _sbatch_env(stub_env, **extra):
  env = dict(
    stub_env,
    SLURM_JOB_ID="12345",
    SLURM_JOB_NODELIST="gpu[001-002]",
    SLURM_JOB_NUM_NODES="2",
    SLURM_JOB_NAME="leapalign",
    SLURM_CPUS_ON_NODE="96",
  )
  env.update(extra)
  return env


def test_slurm_sbatch_dry_run_sets_coordinator_env(stub_env, tmp_path):
  env = _sbatch_env(stub_env)
  args = [*SLURM_ARGS, "--log-dir", str(tmp_path / "logs"), "--dry-run"]
  r = run_script(SBATCH, [*args, "--", "--alsologtostderr"], env)
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  assert ["export", "JAX_COORDINATOR_ADDRESS=gpu001:61785"] in cmds
  assert ["export", "JAX_NUM_PROCESSES=2"] in cmds
  log = (tmp_path / "scontrol.log").read_text()
  assert log.splitlines() == ["show hostnames gpu[001-002]"]
  srun = next(c for c in cmds if c[0] == "srun")
  task = srun.index("bash")
  assert srun[1:task] == [
    "--nodes=2",
    "--ntasks=2",
    "--ntasks-per-node=1",
    "--kill-on-bad-exit=1",
    "--open-mode=append",
    f"--output={tmp_path}/logs/leapalign-12345-r0-node%n.log",
    "--cpus-per-task=96",
  ]
  assert srun[task + 1] == "-c"
  assert srun[task + 2].startswith('export JAX_PROCESS_ID="$SLURM_PROCID"')
  assert srun[task + 3] == "leapalign-task"
  assert srun[task + 4 :] == [
    str(REPO / ".venv/bin/python"),
    *TRAIN[1:5],
    "--workdir",
    "/shared/runs/r1",
    *TRAIN[7:],
    "--alsologtostderr",
  ]
  assert ["scancel", "--signal=TERM", "12345"] in cmds
  assert ["scontrol", "requeue", "12345"] in cmds


def _start_sbatch(stub_env, tmp_path, **extra):
  env = _sbatch_env(stub_env, **extra)
  args = [*SLURM_ARGS, "--venv", str(tmp_path / "venv")]
  args += ["--log-dir", str(tmp_path / "logs")]
  proc = subprocess.Popen(
    ["bash", str(SBATCH), *args],
    env=env,
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  return proc


def _node_log(tmp_path):
  return (tmp_path / "logs" / "leapalign-12345-r0-node0.log").read_text()


def test_slurm_time_limit_checkpoints_then_requeues(stub_env, tmp_path):
  proc = _start_sbatch(stub_env, tmp_path)
  wait_for(tmp_path / "started")
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
  out, err = proc.communicate(timeout=20)
  assert proc.returncode == 0, err
  assert (tmp_path / "scancel.log").read_text() == "--signal=TERM 12345\n"
  assert "requeue 12345" in (tmp_path / "scontrol.log").read_text()
  log = _node_log(tmp_path)
  assert "coordinator=gpu001:61785 processes=2 id=0" in log
  assert "SIGTERM: checkpoint saved" in log
  assert "--workdir /shared/runs/r1 --config.optimizer.lr=1e-5" in log


def test_slurm_finished_run_is_not_requeued(stub_env, tmp_path):
  proc = _start_sbatch(stub_env, tmp_path, FAKE_STEPS="2")
  out, err = proc.communicate(timeout=20)
  assert proc.returncode == 0, err
  assert "training finished" in _node_log(tmp_path)
  assert "requeue" not in (tmp_path / "scontrol.log").read_text()


def test_slurm_preemption_waits_for_the_checkpoint(stub_env, tmp_path):
  """SIGTERM to the batch shell must not end it before the program saves."""
  proc = _start_sbatch(stub_env, tmp_path)
  wait_for(tmp_path / "started")
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.3)
  assert proc.poll() is None  # still waiting for the training processes
  # SLURM signals every process of the step (the task's shell too).
  os.killpg(int((tmp_path / "task.pid").read_text()), signal.SIGTERM)
  out, err = proc.communicate(timeout=20)
  assert proc.returncode == 0, err
  assert "SIGTERM: checkpoint saved" in _node_log(tmp_path)
  assert "requeue" not in (tmp_path / "scontrol.log").read_text()


def test_slurm_failing_run_is_not_requeued_after_the_time_limit(
  stub_env, tmp_path
):
  """Only a preemption exit requeues: a run that fails would loop forever."""
  proc = _start_sbatch(stub_env, tmp_path, FAKE_TERM_STATUS="1")
  wait_for(tmp_path / "started")
  proc.send_signal(signal.SIGUSR1)
  out, err = proc.communicate(timeout=20)
  assert proc.returncode == 1, err
  assert "requeue" not in (tmp_path / "scontrol.log").read_text()
  assert "not requeueing" in err
  assert not list((tmp_path / "logs").glob(".preempted-*"))


@pytest.mark.parametrize(
  ("script", "args", "fragment"),
  [
    (SLURM, ["submit", *SLURM_ARGS], "needs --nodes"),
    (SLURM, ["submit", "--nodes", "two", *SLURM_ARGS], "positive integer"),
    (SLURM, ["submit", "--nodes", "0", *SLURM_ARGS], "positive integer"),
    (SLURM, ["submit", "--nodes", "2", "--config", "c.py"], "needs --workdir"),
    (SLURM, ["submit", "--nodes", "2", "--workdir", "/w"], "needs --config"),
    (SLURM, ["launch", "--nodes", "2"], "unknown subcommand 'launch'"),
    (
      SLURM,
      ["submit", "--nodes", "2", *SLURM_ARGS, "--config.x"],
      "--config.key=value",
    ),
    (
      SLURM,
      ["submit", "--nodes", "2", *SLURM_ARGS, "--sbatch-arg", "x"],
      "sbatch option",
    ),
    (SBATCH, SLURM_ARGS, "not inside a SLURM job"),
    (SBATCH, ["--workdir", "/w"], "--config"),
  ],
)
def test_slurm_bad_input(stub_env, script, args, fragment):
  dry = [] if fragment == "not inside a SLURM job" else ["--dry-run"]
  r = run_script(script, [*args, *dry], stub_env)
  assert_one_line_error(r, script.name, fragment)


# --------------------------------------------------------------- shellcheck


def test_shellcheck():
  """CI installs it (apt-get install -y shellcheck); set LEAPALIGN_REQUIRE_SHELLCHECK=1 there."""
  exe = shutil.which("shellcheck")
  if exe is None:
    if os.environ.get("LEAPALIGN_REQUIRE_SHELLCHECK") == "1":
      pytest.fail("shellcheck is not installed")
    pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
  r = subprocess.run(
    [exe, "-x", *map(str, SCRIPTS)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert r.returncode == 0, r.stdout + r.stderr
