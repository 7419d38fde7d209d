"""A ``gs://`` workdir end to end, against a local GCS emulator.

The real ``python -m leapalign_jax.main`` trains the tiny config with its
workdir in a bucket of ``gcp-storage-emulator`` (started and stopped here):
a second start on the same workdir is refused by the lock, the run is
SIGKILLed after a checkpoint, the same command resumes it (on a
compilation cache in the bucket, as the README's pod sequence has it), and
it must then equal an uninterrupted run in the bucket bit for bit: state,
metrics lines, TensorBoard scalars, export and evaluation files (both
workdirs are downloaded and compared with the reliability harness).
``python -m leapalign_jax.evaluate`` then evaluates the bucket's run.
Nothing may be written to a local folder named after the workdir.
"""

import os
import signal
import subprocess
import sys
import time

import crash_harness as ch
import gcs_emulator as emu
import pytest

from leapalign_jax import fileio

NUM_STEPS = 4
FLAGS = (
  f"--config.train.num_steps={NUM_STEPS}",
  "--config.train.ckpt_every_steps=1",
  "--config.train.keep_checkpoints=2",
  "--config.train.log_every_steps=3",
  # Evaluation through gs:// is the evaluate command's test below.
  "--config.eval.num_prompts=0",
)


def _command(workdir: str, *extra: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "leapalign_jax.main",
    "--config",
    str(ch.REPO / "configs" / "tiny.py"),
    "--workdir",
    workdir,
    "--config.mesh.num_devices=1",
    *FLAGS,
    *extra,
  ]


def _wait_for_object(host, name, proc, timeout=300.0):
  deadline = time.monotonic() + timeout
  while name not in emu.list_objects(host, name):
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"the run ended before {name}:\n{err[-3000:]}")
    assert time.monotonic() < deadline, f"{name} never appeared"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  root = tmp_path_factory.mktemp("gcs")
  with emu.running(str(root / "emulator.log")) as host:
    yield host, root


@pytest.fixture(scope="module")
def runs(bucket, tmp_path_factory):
  host, root = bucket
  cwd = root / "cwd"  # every command runs here: no "gs:" folder may appear
  cwd.mkdir()
  cache = os.environ.get("LEAPALIGN_TEST_JAX_CACHE") or str(root / "jax")
  env = ch.command_env(cache)
  env.update(emu.env(host))
  env["LEAPALIGN_LOCAL_DIR"] = str(root / "local")
  env["PYTHONPATH"] = str(ch.REPO)
  killed = f"gs://{emu.BUCKET}/runs/killed"
  ref = f"gs://{emu.BUCKET}/runs/ref"
  os.environ["LEAPALIGN_LOCAL_DIR"] = env["LEAPALIGN_LOCAL_DIR"]
  world = fileio.local_scratch(killed, "world")
  del os.environ["LEAPALIGN_LOCAL_DIR"]

  def popen(cmd, run_env=env):
    return subprocess.Popen(
      cmd,
      cwd=cwd,
      env=run_env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )

  first = popen(_command(killed))
  _wait_for_object(host, "runs/killed/checkpoints/1/commit_success.txt", first)
  # The lock: a second start on a workdir in use is refused.
  second = popen(_command(killed))
  second_out = second.communicate(timeout=300)
  _wait_for_object(host, "runs/killed/checkpoints/2/commit_success.txt", first)
  first.send_signal(signal.SIGKILL)
  first.communicate(timeout=60)
  killed_at = emu.list_objects(host, "runs/killed/")
  # The world is complete: the reference reads it, on the second core.
  reference = popen(_command(ref, f"--config.world_options.dir={world}"))
  resume_env = dict(env, JAX_COMPILATION_CACHE_DIR=f"gs://{emu.BUCKET}/jax")
  resumed = subprocess.run(
    _command(killed),
    cwd=cwd,
    env=resume_env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  ref_out = reference.communicate(timeout=600)
  evaluated = subprocess.run(
    [
      sys.executable,
      "-m",
      "leapalign_jax.evaluate",
      "--config",
      str(ch.REPO / "configs" / "tiny.py"),
      "--workdir",
      killed,
      "--tag",
      "again",
      "mesh.num_devices=1",
      "eval.num_prompts=2",
    ],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  local = {}
  for name in ("killed", "ref"):
    local[name] = str(root / "download" / name)
    emu.download_tree(host, f"runs/{name}", local[name])
  return {
    "host": host,
    "cwd": cwd,
    "world": world,
    "first_status": first.returncode,
    "second": (second.returncode, *second_out),
    "killed_at": killed_at,
    "resumed": resumed,
    "reference": (reference.returncode, *ref_out),
    "evaluated": evaluated,
    "local": local,
  }


def test_a_second_start_is_refused_while_the_run_holds_the_lock(runs):
  status, _, err = runs["second"]
  assert status == 2, err[-3000:]
  assert "in use by another run" in err and "Traceback" not in err, err


def test_sigkill_then_resume_through_gs_is_exact(runs):
  assert runs["first_status"] == -signal.SIGKILL
  assert "runs/killed/checkpoints/2/commit_success.txt" in runs["killed_at"]
  assert "runs/killed/export/" not in " ".join(runs["killed_at"])
  resumed = runs["resumed"]
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 2" in resumed.stderr, resumed.stderr[-3000:]
  status, _, err = runs["reference"]
  assert status == 0, err[-3000:]
  local = runs["local"]
  assert ch.compare_runs(local["ref"], local["killed"]) == []
  assert [d["step"] for d in ch._metrics(local["killed"])] == [3, 4]
  assert ch.leftovers(local["killed"]) == []
  names = emu.list_objects(runs["host"], "runs/killed/")
  assert "runs/killed/.lock" not in names  # released at the end
  for name in ("config.json", "export/transformer/config.json"):
    assert f"runs/killed/{name}" in names, names
  assert any(n.startswith("runs/killed/tensorboard/events.") for n in names)
  # The compilation cache went to the bucket too.
  assert emu.list_objects(runs["host"], "jax/")


def test_evaluate_reads_and_writes_the_bucket(runs):
  out = runs["evaluated"]
  assert out.returncode == 0, out.stderr[-3000:]
  names = emu.list_objects(runs["host"], "runs/killed/eval/again/")
  for name in ("eval.json", "samples.jsonl", "grid.png", "images/00000_0.png"):
    assert f"runs/killed/eval/again/{name}" in names, names


def test_nothing_is_written_locally_under_the_workdir_name(runs):
  for folder in (runs["cwd"], ch.REPO):
    assert not (folder / "gs:").exists()
  assert os.listdir(runs["cwd"]) == []
  # The world (memory-mapped models) was built on the host's disk.
  assert os.path.isfile(os.path.join(runs["world"], "world.json"))
