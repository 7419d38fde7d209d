"""launch/tpu.sh: queued resources, setup, runs, staging, resume, errors.

Stubs and helpers: ``launch_common``; worker.sh and SLURM: ``launch_cluster_test``.
"""

import pathlib
import shlex
import tarfile

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


def test_tpu_create_queued_resource(stub_env):
  r = run_script(
    TPU,
    ["create", *NAME_ZONE, "--project", "proj", "--spot", "--dry-run"],
    stub_env,
  )
  assert r.returncode == 0, r.stderr
  (cmd,) = commands(r.stdout)
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
  assert gcloud_calls(stub_env) == []


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
  r = run_script(TPU, ["create", *NAME_ZONE, *extra, "--dry-run"], stub_env)
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  assert cmds[0][: len(head)] == head
  for token in expected:
    assert token in cmds[0]
  if "--wait" in extra:
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "queued-resources"] + [
      "describe"
    ]


def test_tpu_setup_copies_checkout_to_all_workers(stub_env):
  r = run_script(TPU, ["setup", *NAME_ZONE, "--dry-run"], stub_env)
  assert r.returncode == 0, r.stderr
  tar, scp, ssh = commands(r.stdout)
  assert tar[:3] == ["git", "-C", str(REPO)] and "tar" in tar
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5].endswith("leapalign_src.tgz")
  assert scp[6] == "my-tpu:leapalign_src.tgz"
  assert "--worker=all" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in ssh
  remote = flag(ssh, "command")
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
  assert gcloud_calls(stub_env) == []


def test_tpu_setup_clone(stub_env):
  url = "https://github.com/example/leapalign_jax.git"
  r = run_script(
    TPU,
    ["setup", *NAME_ZONE, "--repo", url, "--ref", "v1.0", "--dry-run"],
    stub_env,
  )
  assert r.returncode == 0, r.stderr
  (ssh,) = commands(r.stdout)
  assert "--worker=all" in ssh
  remote = flag(ssh, "command")
  assert f"git clone --quiet {url} leapalign_jax" in remote
  assert "fetch --quiet origin v1.0" in remote
  assert "checkout --quiet --force FETCH_HEAD" in remote


def test_tpu_setup_really_runs_the_printed_commands(stub_env):
  """Without --dry-run the stub gcloud gets the printed argv and a tarball."""
  dry = run_script(TPU, ["setup", *NAME_ZONE, "--dry-run"], stub_env)
  real = run_script(TPU, ["setup", *NAME_ZONE], stub_env)
  assert real.returncode == 0, real.stderr
  scp, ssh = gcloud_calls(stub_env)
  assert ssh == commands(dry.stdout)[2][1:]  # the stub drops "gcloud"
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
  r = run_script(TPU, args, stub_env)
  assert r.returncode == 0, r.stderr
  (ssh,) = commands(r.stdout)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh
  remote = shlex.split(flag(ssh, "command"))
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
  assert gcloud_calls(stub_env) == []


def test_tpu_single_host_accepts_a_local_workdir(stub_env):
  args = ["run", *NAME_ZONE, "--accelerator", "v5p-8", "--dry-run"]
  args += ["--config", "configs/tiny.py", "--workdir", "/tmp/run"]
  r = run_script(TPU, args, stub_env)
  assert r.returncode == 0, r.stderr
  remote = shlex.split(flag(commands(r.stdout)[0], "command"))
  assert remote[-2:] == ["--workdir", "/tmp/run"]


def test_tpu_logs_stop_status_delete(stub_env):
  def one(args):
    r = run_script(TPU, [*args, *NAME_ZONE, "--dry-run"], stub_env)
    assert r.returncode == 0, r.stderr
    return commands(r.stdout)

  (logs,) = one(["logs"])
  assert "--worker=0" in logs
  assert shlex.split(flag(logs, "command")) == [
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
  assert "--worker=3" in logs and "--follow" not in flag(logs, "command")
  (stop,) = one(["stop", "--timeout", "600"])
  assert "--worker=all" in stop
  assert flag(stop, "command").endswith(
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
  r = run_script(TPU, ["delete", "--dry-run"], env)
  assert r.returncode == 0, r.stderr
  (cmd,) = commands(r.stdout)
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
  r = run_script(TPU, [*args, "--dry-run"], stub_env)
  assert_one_line_error(r, "tpu.sh", fragment)
  assert r.returncode == 2
  assert gcloud_calls(stub_env) == []


def test_tpu_multislice_uses_one_queued_resource_for_every_slice(stub_env):
  """--num-slices: --node-count / --node-prefix, then ssh/scp --node=all."""
  two = [*NAME_ZONE, "--num-slices", "2", "--dry-run"]
  r = run_script(TPU, ["create", *two], stub_env)
  assert r.returncode == 0, r.stderr
  (create,) = commands(r.stdout)
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources"] + [
    "create",
    "my-tpu",
  ]
  assert "--node-count=2" in create and "--node-prefix=my-tpu" in create
  assert not any(a.startswith("--node-id") for a in create)
  r = run_script(TPU, ["setup", *two], stub_env)
  assert r.returncode == 0, r.stderr
  _, scp, ssh = commands(r.stdout)
  assert scp[:5] == ["gcloud", "compute", "tpus", "queued-resources", "scp"]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "queued-resources"] + [
    "ssh",
    "my-tpu",
  ]
  for cmd in (scp, ssh):
    assert "--node=all" in cmd and "--worker=all" in cmd
  args = ["run", *two, "--config", "configs/tiny.py", "--workdir", "gs://b/r"]
  r = run_script(TPU, args, stub_env)
  assert r.returncode == 0, r.stderr
  (run,) = commands(r.stdout)
  assert run[3:5] == ["queued-resources", "ssh"] and "--node=all" in run
  # A local workdir is refused: several slices are several hosts.
  r = run_script(TPU, [*args[:-1], "/tmp/r"], stub_env)
  assert_one_line_error(r, "tpu.sh", "--workdir must be gs://")
  r = run_script(TPU, ["logs", *two, "--node", "1", "--worker", "2"], stub_env)
  (logs,) = commands(r.stdout)
  assert "--node=1" in logs and "--worker=2" in logs


def test_tpu_stage_and_embed_run_on_every_worker(stub_env):
  cfg = "configs/leap_hpsv2_flux_dev.py:flux=gs://b/FLUX.1-dev,lora=1"
  r = run_script(
    TPU,
    ["stage", *NAME_ZONE, "--config", cfg, "--config.eval.num_prompts=8"]
    + ["--src", "gs://b/hps.safetensors", "--dry-run"],
    stub_env,
  )
  assert r.returncode == 0, r.stderr
  (ssh,) = commands(r.stdout)
  assert "--worker=all" in ssh
  assert shlex.split(flag(ssh, "command")) == [
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
  r = run_script(
    TPU,
    ["embed", *NAME_ZONE, "--config", cfg, "--prompts", "gs://b/p.txt"]
    + ["--out", "gs://b/cache_train", "--dry-run"],
    stub_env,
  )
  assert r.returncode == 0, r.stderr
  embed, stage = commands(r.stdout)
  assert "--worker=all" in embed and "--worker=all" in stage
  remote = shlex.split(flag(embed, "command"))
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
  remote = shlex.split(flag(stage, "command"))
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
  r = run_script(TPU, RESUME, env)
  assert r.returncode == 0, r.stderr
  calls = gcloud_calls(stub_env)
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
  stage, run = (shlex.split(flag(c, "command")) for c in calls[-2:])
  assert "leapalign_jax.staging" in stage
  assert run[2] == "start" and "leapalign_jax.main" in run


def test_tpu_resume_after_maintenance_only_restarts_the_run(stub_env):
  env = dict(stub_env, STUB_STATES="ACTIVE")
  r = run_script(TPU, RESUME, env)
  assert r.returncode == 0, r.stderr
  assert _verbs(gcloud_calls(stub_env)) == [
    "queued-resources describe",
    "tpu-vm ssh",  # stage (already there: nothing copied)
    "tpu-vm ssh",  # run
  ]


def test_tpu_resume_dry_run_prints_the_whole_sequence(stub_env):
  r = run_script(TPU, [*RESUME, "--dry-run"], stub_env)
  assert r.returncode == 0, r.stderr
  verbs = [" ".join(c[3:5]) for c in commands(r.stdout) if c[0] == "gcloud"]
  assert verbs[:3] == [
    "queued-resources describe",
    "queued-resources delete",
    "queued-resources create",
  ]
  assert verbs[-3:] == ["tpu-vm ssh"] * 3  # setup, stage, run
  assert gcloud_calls(stub_env) == []


def test_tpu_help(stub_env):
  r = run_script(TPU, ["--help"], stub_env)
  assert r.returncode == 0 and "usage: launch/tpu.sh" in r.stdout
