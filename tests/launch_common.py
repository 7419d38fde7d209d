"""Stubs and helpers shared by the launch/ tests (``launch*_test.py``).

Every script runs in a subprocess with a minimal environment. Stub `gcloud`,
`scontrol`, `scancel` and `srun` executables on PATH record their arguments,
so no cloud or cluster tool is needed. Lines of dry-run output that start
with '+ ' are commands; they are parsed back with shlex. The ``stub_env``
fixture (``make_stub_env``) is defined in each test module.
"""

import contextlib
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu.sh"
WORKER = LAUNCH / "worker.sh"
SLURM = LAUNCH / "slurm.sh"
SBATCH = LAUNCH / "slurm.sbatch"
SCRIPTS = [LAUNCH / "common.sh", TPU, WORKER, SLURM, SBATCH]

NAME_ZONE = ["--name", "my-tpu", "--zone", "us-east5-a"]

STUBS = {
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
FAKE_PYTHON = r"""#!/bin/bash
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


def make_stub_env(tmp_path):
  """Environment with stub tools first on PATH and nothing inherited."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in STUBS.items():
    path = bin_dir / name
    path.write_text(text)
    path.chmod(0o755)
  venv_bin = tmp_path / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(FAKE_PYTHON)
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


def run_script(script, args, env, cwd=REPO):
  return subprocess.run(
    ["bash", str(script), *args],
    env=env,
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=30,
  )


def commands(stdout):
  """The '+ ...' lines of a dry-run, each split back into its argv."""
  return [
    shlex.split(line[2:])
    for line in stdout.splitlines()
    if line.startswith("+ ")
  ]


def flag(argv, name):
  """Value of --name=value in argv."""
  prefix = f"--{name}="
  values = [a[len(prefix) :] for a in argv if a.startswith(prefix)]
  assert len(values) == 1, (name, argv)
  return values[0]


def gcloud_calls(stub_env):
  calls = pathlib.Path(stub_env["STUB_DIR"]) / "calls"
  if not calls.exists():
    return []
  return [
    p.read_bytes().decode().split("\0")[:-1] for p in sorted(calls.iterdir())
  ]


def assert_one_line_error(result, prog, fragment):
  assert result.returncode != 0
  assert result.stdout == ""
  err = result.stderr.strip()
  assert "\n" not in err, err
  assert err.startswith(f"{prog}: error: "), err
  assert fragment in err, err


def wait_for(path, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)


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
