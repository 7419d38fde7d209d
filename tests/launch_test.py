"""Tests for launch/: dry-runs, input errors, process handling, shellcheck.

Every script runs in a subprocess with a minimal environment. Stub `gcloud`,
`scontrol`, `scancel` and `srun` executables on PATH record their arguments,
so no cloud or cluster tool is needed. Lines of dry-run output that start
with '+ ' are commands; they are parsed back with shlex.
"""

import contextlib
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu.sh"
WORKER = LAUNCH / "worker.sh"
SLURM = LAUNCH / "slurm.sh"
SBATCH = LAUNCH / "slurm.sbatch"
SCRIPTS = [LAUNCH / "common.sh", TPU, WORKER, SLURM, SBATCH]

NAME_ZONE = ["--name", "my-tpu", "--zone", "us-east5-a"]

_STUBS = {
  # Records each call's argv (NUL-separated) in calls/<n>; keeps scp'd files.
  # A describe prints the next of $STUB_STATES (one per call, the last
  # repeated): what tpu.sh resume and create --wait read.
  "gcloud": r"""#!/bin/bash
mkdir -p "$STUB_DIR/calls"
n=$(find "$STUB_DIR/calls" -type f | wc -l)
printf '%s\0' "$@" > "$STUB_DIR/calls/$(printf '%03d' "$n")"
if [[ "$3 $4" == "tpu-vm scp" ]]; then cp "$5" "$STUB_DIR/scp.tgz"; fi
if [[ " $* " == *" describe "* ]]; then
  read -r -a states <<<"${STUB_STATES:-ACTIVE}"
  k=$(cat "$STUB_DIR/describes" 2>/dev/null || echo 0)
  echo $((k + 1)) > "$STUB_DIR/describes"
  ((k < ${#states[@]})) || k=$((${#states[@]} - 1))
  echo "${states[$k]}"
fi
""",
  "scontrol": r"""#!/bin/bash
echo "$*" >> "$STUB_DIR/scontrol.log"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu001\ngpu002\n'; fi
""",
  # Signals every process of the task the srun stub started, as SLURM
  # signals every process of a job step.
  "scancel": r"""#!/bin/bash
echo "$*" >> "$STUB_DIR/scancel.log"
kill -TERM -- "-$(cat "$STUB_DIR/task.pid")"
""",
  # Runs the task once as SLURM_PROCID=0 in a process group of its own,
  # output to --output (%n -> 0); exits with its status, as srun does.
  "srun": r"""#!/bin/bash
out=/dev/null
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in --output=*) out="${1#--output=}"; out="${out//%n/0}" ;; esac
  shift
done
SLURM_PROCID=0 setsid "$@" >> "$out" 2>&1 &
echo $! > "$STUB_DIR/task.pid"
wait $!
""",
}

# Stands in for the venv's python (the real one runs leapalign_jax.staging,
# which copies logs): prints its arguments and JAX env, then
# the program's first progress line after FAKE_FIRST_STEP steps; on SIGTERM
# writes a "checkpoint" and exits with $FAKE_TERM_STATUS, else the
# preempted status (LEAPALIGN_EXIT_PREEMPTED, or 0); finishes after
# FAKE_STEPS steps. FAKE_ERROR=1: one error line, exit 2, as on bad input.
_FAKE_PYTHON = r"""#!/bin/bash
if [[ "$1 $2" == "-m leapalign_jax.staging" ]]; then  # the real one
  exec "$REAL_PYTHON" "$@"
fi
echo "args: $*"
echo "coordinator=${JAX_COORDINATOR_ADDRESS-} processes=${JAX_NUM_PROCESSES-} id=${JAX_PROCESS_ID-}"
echo "stage=${LEAPALIGN_STAGE_DIR-}"
if [[ "${FAKE_ERROR:-0}" == 1 ]]; then
  echo "error: config.flux.path is empty; point it at your checkpoint/cache" >&2
  exit 2
fi
trap 'echo "SIGTERM: checkpoint saved"; exit "${FAKE_TERM_STATUS:-${LEAPALIGN_EXIT_PREEMPTED:-0}}"' TERM
touch "${STUB_DIR:-/nonexistent}/started" 2>/dev/null || true
n=0
while ((n < ${FAKE_STEPS:-600})); do
  sleep 0.05 & wait $!
  n=$((n + 1))
  if ((n == ${FAKE_FIRST_STEP:-1})); then
    echo "[leapalign] progress: step 1 of 9 done (the first of this start, 3 s after it)" >&2
  fi
done
echo "training finished"
"""


@pytest.fixture
def stub_env(tmp_path):
  """Environment with stub tools first on PATH and nothing inherited."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in _STUBS.items():
    path = bin_dir / name
    path.write_text(text)
    path.chmod(0o755)
  venv_bin = tmp_path / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(_FAKE_PYTHON)
  (venv_bin / "python").chmod(0o755)
  home = tmp_path / "home"
  home.mkdir()
  yield {
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "HOME": str(home),
    "LANG": "C.UTF-8",
    "STUB_DIR": str(tmp_path),
    "TMPDIR": str(tmp_path),
    "REAL_PYTHON": sys.executable,
    "PYTHONPATH": str(REPO),
  }
  # A failed test may leave a fake training process behind: end it, checking
  # its command line first so that a recycled pid is left alone.
  for pid_file in [tmp_path / "task.pid", *tmp_path.glob("logs/*.pid")]:
    with contextlib.suppress(OSError, ValueError):
      pid = int(pid_file.read_text())
      cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
      if str(tmp_path).encode() in cmdline:
        os.kill(pid, signal.SIGKILL)


def _run(script, args, env, cwd=REPO):
  return subprocess.run(
    ["bash", str(script), *args],
    env=env,
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=30,
  )


def _commands(stdout):
  """The '+ ...' lines of a dry-run, each split back into its argv."""
  return [
    shlex.split(line[2:])
    for line in stdout.splitlines()
    if line.startswith("+ ")
  ]


def _flag(argv, name):
  """Value of --name=value in argv."""
  prefix = f"--{name}="
  values = [a[len(prefix) :] for a in argv if a.startswith(prefix)]
  assert len(values) == 1, (name, argv)
  return values[0]


def _gcloud_calls(stub_env):
  calls = pathlib.Path(stub_env["STUB_DIR"]) / "calls"
  if not calls.exists():
    return []
  return [
    p.read_bytes().decode().split("\0")[:-1] for p in sorted(calls.iterdir())
  ]


def _assert_one_line_error(result, prog, fragment):
  assert result.returncode != 0
  assert result.stdout == ""
  err = result.stderr.strip()
  assert "\n" not in err, err
  assert err.startswith(f"{prog}: error: "), err
  assert fragment in err, err


def _wait_for(path, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)


# --------------------------------------------------------------------- tpu.sh

TRAIN = [
  "python",
  "-m",
  "leapalign_jax.main",
  "--config",
  "configs/leap_hpsv2_flux_dev.py",
  "--workdir",
  "gs://my-bucket/runs/r1",
  "--config.optimizer.lr=1e-5",
  "--config.prompt=a cat's hat",
]


def test_tpu_create_queued_resource(stub_env):
  r = _run(
    TPU,
    ["create", *NAME_ZONE, "--project", "proj", "--spot", "--dry-run"],
    stub_env,
  )
  assert r.returncode == 0, r.stderr
  (cmd,) = _commands(r.stdout)
  assert cmd == [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "create",
    "my-tpu",
    "--node-id=my-tpu",
    "--zone=us-east5-a",
    "--project=proj",
    "--accelerator-type=v5p-32",
    "--runtime-version=v2-alpha-tpuv5",
    "--spot",
  ]
  assert _gcloud_calls(stub_env) == []


@pytest.mark.parametrize(
  ("extra", "head", "expected"),
  [
    (
      ["--best-effort", "--wait"],
      ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"],
      ["--best-effort", "--runtime-version=v2-alpha-tpuv5"],
    ),
    (
      ["--vm", "--accelerator", "v5p-8"],
      ["gcloud", "compute", "tpus", "tpu-vm", "create"],
      ["--version=v2-alpha-tpuv5", "--accelerator-type=v5p-8"],
    ),
    (
      ["--accelerator=v5litepod-16", "--runtime=custom-rt"],
      ["gcloud", "compute", "tpus", "queued-resources", "create"],
      ["--runtime-version=custom-rt", "--accelerator-type=v5litepod-16"],
    ),
    (
      ["--accelerator", "v6e-8"],
      ["gcloud", "compute", "tpus", "queued-resources", "create"],
      ["--runtime-version=v2-alpha-tpuv6e"],
    ),
  ],
)
def test_tpu_create_variants(stub_env, extra, head, expected):
  r = _run(TPU, ["create", *NAME_ZONE, *extra, "--dry-run"], stub_env)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  assert cmds[0][: len(head)] == head
  for token in expected:
    assert token in cmds[0]
  if "--wait" in extra:
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "queued-resources"] + [
      "describe"
    ]


def test_tpu_setup_copies_checkout_to_all_workers(stub_env):
  r = _run(TPU, ["setup", *NAME_ZONE, "--dry-run"], stub_env)
  assert r.returncode == 0, r.stderr
  tar, scp, ssh = _commands(r.stdout)
  assert tar[:3] == ["git", "-C", str(REPO)] and "tar" in tar
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5].endswith("leapalign_src.tgz")
  assert scp[6] == "my-tpu:leapalign_src.tgz"
  assert "--worker=all" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in ssh
  remote = _flag(ssh, "command")
  assert "tar -xzf leapalign_src.tgz -C leapalign_jax" in remote
  install = shlex.split(remote.split("; ")[-1])
  assert install == [
    "bash",
    "leapalign_jax/launch/worker.sh",
    "setup",
    "--venv",
    "leapalign_venv",
    "--python",
    "python3.11",
    "--jax",
    "jax[tpu]",
  ]
  assert _gcloud_calls(stub_env) == []


def test_tpu_setup_clone(stub_env):
  url = "https://github.com/example/leapalign_jax.git"
  r = _run(
    TPU,
    ["setup", *NAME_ZONE, "--repo", url, "--ref", "v1.0", "--dry-run"],
    stub_env,
  )
  assert r.returncode == 0, r.stderr
  (ssh,) = _commands(r.stdout)
  assert "--worker=all" in ssh
  remote = _flag(ssh, "command")
  assert f"git clone --quiet {url} leapalign_jax" in remote
  assert "fetch --quiet origin v1.0" in remote
  assert "checkout --quiet --force FETCH_HEAD" in remote


def test_tpu_setup_really_runs_the_printed_commands(stub_env):
  """Without --dry-run the stub gcloud gets the printed argv and a tarball."""
  dry = _run(TPU, ["setup", *NAME_ZONE, "--dry-run"], stub_env)
  real = _run(TPU, ["setup", *NAME_ZONE], stub_env)
  assert real.returncode == 0, real.stderr
  scp, ssh = _gcloud_calls(stub_env)
  assert ssh == _commands(dry.stdout)[2][1:]  # the stub drops "gcloud"
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  with tarfile.open(pathlib.Path(stub_env["STUB_DIR"]) / "scp.tgz") as tar:
    names = set(tar.getnames())
  assert {"setup.py", "constraints.txt", "launch/worker.sh"} <= names
  assert not any(n.startswith(".git/") for n in names)
  assert not pathlib.Path(scp[4]).exists()  # the temporary tarball is gone


def test_tpu_run_starts_the_training_command_on_all_workers(stub_env):
  args = [
    "run",
    *NAME_ZONE,
    "--config",
    "configs/leap_hpsv2_flux_dev.py",
    "--workdir=gs://my-bucket/runs/r1",
    "--config.optimizer.lr=1e-5",
    "--config.prompt=a cat's hat",
    "--env",
    "LIBTPU_INIT_ARGS=--xla_tpu_x=true",
    "--dry-run",
    "--",
    "--alsologtostderr",
  ]
  r = _run(TPU, args, stub_env)
  assert r.returncode == 0, r.stderr
  (ssh,) = _commands(r.stdout)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh
  remote = shlex.split(_flag(ssh, "command"))
  sep = remote.index("--")
  assert remote[:sep] == [
    "bash",
    "leapalign_jax/launch/worker.sh",
    "start",
    "--venv",
    "leapalign_venv",
    "--log-dir",
    "leapalign_logs",
    "--stage-dir",
    "leapalign_stage",
    "--wait-progress",
    "3600",
    "--copy-log-to",
    "gs://my-bucket/runs/r1/logs",
    "--env",
    "LIBTPU_INIT_ARGS=--xla_tpu_x=true",
  ]
  assert remote[sep + 1 :] == [*TRAIN, "--alsologtostderr"]
  assert _gcloud_calls(stub_env) == []


def test_tpu_single_host_accepts_a_local_workdir(stub_env):
  args = ["run", *NAME_ZONE, "--accelerator", "v5p-8", "--dry-run"]
  args += ["--config", "configs/tiny.py", "--workdir", "/tmp/run"]
  r = _run(TPU, args, stub_env)
  assert r.returncode == 0, r.stderr
  remote = shlex.split(_flag(_commands(r.stdout)[0], "command"))
  assert remote[-2:] == ["--workdir", "/tmp/run"]


def test_tpu_logs_stop_status_delete(stub_env):
  def one(args):
    r = _run(TPU, [*args, *NAME_ZONE, "--dry-run"], stub_env)
    assert r.returncode == 0, r.stderr
    return _commands(r.stdout)

  (logs,) = one(["logs"])
  assert "--worker=0" in logs
  assert shlex.split(_flag(logs, "command")) == [
    "bash",
    "leapalign_jax/launch/worker.sh",
    "logs",
    "--log-dir",
    "leapalign_logs",
    "--lines",
    "100",
    "--follow",
  ]
  (logs,) = one(["logs", "--worker", "3", "--no-follow"])
  assert "--worker=3" in logs and "--follow" not in _flag(logs, "command")
  (stop,) = one(["stop", "--timeout", "600"])
  assert "--worker=all" in stop
  assert _flag(stop, "command").endswith(
    "stop --log-dir leapalign_logs --timeout 600"
  )
  describe, workers = one(["status"])
  assert describe[3:5] == ["queued-resources", "describe"]
  assert "--worker=all" in workers
  (delete,) = one(["delete", "--yes"])
  assert delete == [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "delete",
    "my-tpu",
    "--zone=us-east5-a",
    "--force",
    "--quiet",
  ]
  (delete,) = one(["delete", "--vm"])
  assert delete[3:5] == ["tpu-vm", "delete"] and "--quiet" not in delete


def test_tpu_zone_project_name_from_environment(stub_env):
  env = dict(stub_env, TPU_NAME="env-tpu", TPU_ZONE="europe-west4-b")
  env["CLOUDSDK_CORE_PROJECT"] = "env-proj"
  r = _run(TPU, ["delete", "--dry-run"], env)
  assert r.returncode == 0, r.stderr
  (cmd,) = _commands(r.stdout)
  assert cmd[5:8] == ["env-tpu", "--zone=europe-west4-b", "--project=env-proj"]


@pytest.mark.parametrize(
  ("args", "fragment"),
  [
    (["frobnicate", *NAME_ZONE], "unknown subcommand 'frobnicate'"),
    ([], "missing subcommand"),
    (["run", *NAME_ZONE, "--config", "configs/x.py"], "needs --workdir"),
    (["run", *NAME_ZONE, "--workdir", "gs://b/r"], "needs --config"),
    (
      ["run", *NAME_ZONE, "--config", "configs/x.py", "--workdir", "/data/r"],
      "--workdir must be gs://",
    ),
    (
      ["run", *NAME_ZONE, "--config", "configs/x.py", "--workdir", "gs://"],
      "--workdir must be gs://",
    ),
    (
      ["run", *NAME_ZONE, "--config", "x.yaml", "--workdir", "gs://b"],
      "python config",
    ),
    (["create", "--zone", "z"], "--name is required"),
    (["create", "--name", "t"], "--zone is required"),
    (["create", "--name", "My_TPU", "--zone", "z"], "--name must be"),
    (["create", *NAME_ZONE, "--accelerator", "v5p"], "--accelerator must"),
    (["create", *NAME_ZONE, "--spot", "--best-effort"], "at most one"),
    (["create", *NAME_ZONE, "--vm", "--best-effort"], "needs a queued"),
    (
      ["create", *NAME_ZONE, "--accelerator", "tpu7x-8"],
      "TPU7x (Ironwood) is not supported",
    ),
    (
      ["run", *NAME_ZONE, "--accelerator", "tpu7x-4", "--config", "c.py"],
      "TPU7x (Ironwood) is not supported",
    ),
    (["create", *NAME_ZONE, "--num-slices", "2", "--vm"], "needs a queued"),
    (["create", *NAME_ZONE, "--num-slices", "0"], "positive integer"),
    (["stage", *NAME_ZONE], "stage needs --config"),
    (["stage", *NAME_ZONE, "--src", "/local/x"], "--src must be gs://"),
    (["embed", *NAME_ZONE, "--config", "c.py"], "embed needs --prompts"),
    (
      ["embed", *NAME_ZONE, "--config", "c.py", "--prompts", "p.txt"],
      "--out gs://",
    ),
    (["resume", *NAME_ZONE, "--workdir", "gs://b/r"], "resume needs --config"),
    (["create", *NAME_ZONE, "--frob"], "unknown option '--frob'"),
    (["create", *NAME_ZONE, "--zone"], "--zone needs a value"),
    (
      ["run", *NAME_ZONE, "--workdir", "--config", "c.py"],
      "--workdir needs a value",
    ),
    (["run", *NAME_ZONE, "--config.lr"], "--config.key=value"),
    (["create", *NAME_ZONE, "--config.lr=1"], "only apply to 'run'"),
    (["stage", *NAME_ZONE, "--env", "A=1"], "only apply to 'run'"),
    (["run", *NAME_ZONE, "--env", "1BAD"], "KEY=VALUE"),
    (["setup", *NAME_ZONE, "--remote-dir", "."], "--remote-dir must be"),
    (["setup", *NAME_ZONE, "--remote-dir", "/opt/x"], "--remote-dir must be"),
    (["setup", *NAME_ZONE, "--remote-dir", "a/../.."], "--remote-dir must be"),
    (["logs", *NAME_ZONE, "--worker", "x"], "--worker must be"),
  ],
)
def test_tpu_bad_input(stub_env, args, fragment):
  r = _run(TPU, [*args, "--dry-run"], stub_env)
  _assert_one_line_error(r, "tpu.sh", fragment)
  assert r.returncode == 2
  assert _gcloud_calls(stub_env) == []


def test_tpu_multislice_uses_one_queued_resource_for_every_slice(stub_env):
  """--num-slices: --node-count / --node-prefix, then ssh/scp --node=all."""
  two = [*NAME_ZONE, "--num-slices", "2", "--dry-run"]
  r = _run(TPU, ["create", *two], stub_env)
  assert r.returncode == 0, r.stderr
  (create,) = _commands(r.stdout)
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources"] + [
    "create",
    "my-tpu",
  ]
  assert "--node-count=2" in create and "--node-prefix=my-tpu" in create
  assert not any(a.startswith("--node-id") for a in create)
  r = _run(TPU, ["setup", *two], stub_env)
  assert r.returncode == 0, r.stderr
  _, scp, ssh = _commands(r.stdout)
  assert scp[:5] == ["gcloud", "compute", "tpus", "queued-resources", "scp"]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "queued-resources"] + [
    "ssh",
    "my-tpu",
  ]
  for cmd in (scp, ssh):
    assert "--node=all" in cmd and "--worker=all" in cmd
  args = ["run", *two, "--config", "configs/tiny.py", "--workdir", "gs://b/r"]
  r = _run(TPU, args, stub_env)
  assert r.returncode == 0, r.stderr
  (run,) = _commands(r.stdout)
  assert run[3:5] == ["queued-resources", "ssh"] and "--node=all" in run
  # A local workdir is refused: several slices are several hosts.
  r = _run(TPU, [*args[:-1], "/tmp/r"], stub_env)
  _assert_one_line_error(r, "tpu.sh", "--workdir must be gs://")
  r = _run(TPU, ["logs", *two, "--node", "1", "--worker", "2"], stub_env)
  (logs,) = _commands(r.stdout)
  assert "--node=1" in logs and "--worker=2" in logs


def test_tpu_stage_and_embed_run_on_every_worker(stub_env):
  cfg = "configs/leap_hpsv2_flux_dev.py:flux=gs://b/FLUX.1-dev,lora=1"
  r = _run(
    TPU,
    ["stage", *NAME_ZONE, "--config", cfg, "--config.eval.num_prompts=8"]
    + ["--src", "gs://b/hps.safetensors", "--dry-run"],
    stub_env,
  )
  assert r.returncode == 0, r.stderr
  (ssh,) = _commands(r.stdout)
  assert "--worker=all" in ssh
  assert shlex.split(_flag(ssh, "command")) == [
    "bash",
    "leapalign_jax/launch/worker.sh",
    "exec",
    "--venv",
    "leapalign_venv",
    "--stage-dir",
    "leapalign_stage",
    "--",
    "python",
    "-m",
    "leapalign_jax.staging",
    "--config",
    cfg,
    "eval.num_prompts=8",
    "--src",
    "gs://b/hps.safetensors",
  ]
  r = _run(
    TPU,
    ["embed", *NAME_ZONE, "--config", cfg, "--prompts", "gs://b/p.txt"]
    + ["--out", "gs://b/cache_train", "--dry-run"],
    stub_env,
  )
  assert r.returncode == 0, r.stderr
  embed, stage = _commands(r.stdout)
  assert "--worker=all" in embed and "--worker=all" in stage
  remote = shlex.split(_flag(embed, "command"))
  assert remote[remote.index("--") + 1 :] == [
    "python",
    "-m",
    "leapalign_jax.embed_prompts",
    "--config",
    cfg,
    "--prompts",
    "gs://b/p.txt",
    "--out",
    "gs://b/cache_train",
  ]
  remote = shlex.split(_flag(stage, "command"))
  assert remote[-2:] == ["--src", "gs://b/cache_train"]


RESUME = [
  "resume",
  *NAME_ZONE,
  "--spot",
  "--config",
  "configs/leap_hpsv2_flux_dev.py:flux=gs://b/FLUX.1-dev",
  "--workdir",
  "gs://b/runs/r1",
]


def _verbs(calls):
  """Each gcloud call as "<resource> <verb>" (tpu-vm ssh, ...)."""
  return [" ".join(c[2:4]) for c in calls]


def test_tpu_resume_after_a_preemption_recreates_then_runs(stub_env):
  env = dict(stub_env, STUB_STATES="SUSPENDED ACTIVE")
  r = _run(TPU, RESUME, env)
  assert r.returncode == 0, r.stderr
  calls = _gcloud_calls(stub_env)
  assert _verbs(calls) == [
    "queued-resources describe",  # SUSPENDED: the Spot slice was preempted
    "queued-resources delete",
    "queued-resources create",
    "queued-resources describe",  # --wait: ACTIVE
    "tpu-vm scp",  # setup
    "tpu-vm ssh",
    "tpu-vm ssh",  # stage
    "tpu-vm ssh",  # run
  ]
  assert "--spot" in calls[2] and "--quiet" in calls[1]
  stage, run = (shlex.split(_flag(c, "command")) for c in calls[-2:])
  assert "leapalign_jax.staging" in stage
  assert run[2] == "start" and "leapalign_jax.main" in run


def test_tpu_resume_after_maintenance_only_restarts_the_run(stub_env):
  env = dict(stub_env, STUB_STATES="ACTIVE")
  r = _run(TPU, RESUME, env)
  assert r.returncode == 0, r.stderr
  assert _verbs(_gcloud_calls(stub_env)) == [
    "queued-resources describe",
    "tpu-vm ssh",  # stage (already there: nothing copied)
    "tpu-vm ssh",  # run
  ]


def test_tpu_resume_dry_run_prints_the_whole_sequence(stub_env):
  r = _run(TPU, [*RESUME, "--dry-run"], stub_env)
  assert r.returncode == 0, r.stderr
  verbs = [" ".join(c[3:5]) for c in _commands(r.stdout) if c[0] == "gcloud"]
  assert verbs[:3] == [
    "queued-resources describe",
    "queued-resources delete",
    "queued-resources create",
  ]
  assert verbs[-3:] == ["tpu-vm ssh"] * 3  # setup, stage, run
  assert _gcloud_calls(stub_env) == []


def test_tpu_help(stub_env):
  r = _run(TPU, ["--help"], stub_env)
  assert r.returncode == 0 and "usage: launch/tpu.sh" in r.stdout


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
  r = _run(WORKER, start, env, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  pid = int((tmp_path / "logs" / "train.worker3.pid").read_text())
  os.kill(pid, 0)  # alive after start returned: detached
  assert os.getsid(pid) == pid  # its own session: an ssh hangup misses it

  again = _run(WORKER, start, env, cwd=tmp_path)
  _assert_one_line_error(again, "worker.sh", "already going")

  status = _run(WORKER, ["status", *common], env, cwd=tmp_path)
  assert status.stdout.startswith(f"worker 3: running, pid {pid}")

  stop = _run(WORKER, ["stop", *common, "--timeout", "20"], env, cwd=tmp_path)
  assert stop.returncode == 0, stop.stderr
  log = (tmp_path / "logs" / "train.worker3.log").read_text()
  assert "args: -m leapalign_jax.main --config configs/leap" in log
  assert "--config.prompt=a cat's hat" in log
  assert "SIGTERM: checkpoint saved" in log
  status = _run(WORKER, ["status", *common], env, cwd=tmp_path)
  assert status.stdout.startswith("worker 3: not running")
  logs = _run(WORKER, ["logs", *common, "--lines", "1"], env, cwd=tmp_path)
  assert logs.stdout.strip() == "SIGTERM: checkpoint saved"


def test_worker_start_reports_a_run_that_dies(stub_env, tmp_path):
  env = dict(stub_env, LEAPALIGN_WORKER_ID="0")
  args = ["start", "--venv", "venv", "--log-dir", "logs"]
  args += ["--check-after", "0.2", "--", "false"]
  r = _run(WORKER, args, env, cwd=tmp_path)
  assert r.returncode == 1
  assert "not running 0.2s after start" in r.stderr


def _start(env, cwd, *options, command=TRAIN):
  args = ["start", "--venv", "venv", "--log-dir", "logs"]
  args += ["--check-after", "0.1", *options, "--", *command]
  return _run(WORKER, args, env, cwd=cwd)


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
  stop = _run(WORKER, ["stop", "--log-dir", "logs"], env, cwd=tmp_path)
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
  status = _run(WORKER, ["status", "--log-dir", "logs"], env, cwd=tmp_path)
  assert status.returncode == 0, status.stderr
  assert status.stdout.splitlines()[0].startswith("worker 0: not running")
  assert "errors in its log" in status.stdout
  assert "error: config.flux.path is empty" in status.stdout


def test_worker_start_times_out_without_progress(stub_env, tmp_path):
  env = dict(stub_env, LEAPALIGN_WORKER_ID="0", FAKE_FIRST_STEP="100000")
  r = _start(env, tmp_path, "--wait-progress", "1")
  assert r.returncode == 1
  assert "no progress line 1s after start" in r.stderr
  _run(WORKER, ["stop", "--log-dir", "logs"], env, cwd=tmp_path)


def test_worker_exec_runs_in_the_repository_with_the_venv(stub_env, tmp_path):
  env = dict(stub_env, LEAPALIGN_WORKER_ID="0", FAKE_STEPS="1")
  args = ["exec", "--venv", "venv", "--stage-dir", "st", "--", "python", "x"]
  r = _run(WORKER, args, env, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert "args: x" in r.stdout and f"stage={tmp_path / 'st'}" in r.stdout


def test_worker_setup_dry_run(stub_env, tmp_path):
  venv = tmp_path / "newvenv"
  args = ["setup", "--venv", str(venv), "--python", shutil.which("python3")]
  r = _run(WORKER, [*args, "--jax", "jax[cuda12]", "--dry-run"], stub_env)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
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
  r = _run(SLURM, args, stub_env)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
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
  r = _run(SBATCH, [*args, "--", "--alsologtostderr"], env)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
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
  _wait_for(tmp_path / "started")
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
  _wait_for(tmp_path / "started")
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
  _wait_for(tmp_path / "started")
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
  r = _run(script, [*args, *dry], stub_env)
  _assert_one_line_error(r, script.name, fragment)


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
