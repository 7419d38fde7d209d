"""Staging gs:// weights and caches to the host's disk, against a GCS emulator.

``python -m leapalign_jax.staging`` copies every gs:// path of a config (or
``--src``) once, resumes a copy cut short, recopies a changed source, and
``--push`` uploads; ``resolve_config`` then reads the staged copies, and the
loaders refuse a ``gs://`` path with one line naming the staging command.
"""

import os
import subprocess
import sys

import gcs_emulator as emu
import pytest

from leapalign_jax import errors, staging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = f"gs://{emu.BUCKET}"
FILES = {
  "flux/transformer/config.json": b'{"a": 1}',
  "flux/transformer/diffusion_pytorch_model.safetensors": b"x" * 3000,
  "flux/vae/config.json": b"{}",
  "hps.safetensors": b"h" * 100,
  "cache_train/manifest.json": b"{}",
  "cache_eval/manifest.json": b"{}",
}
SPEC = (
  "configs/leap_hpsv2_flux_dev.py:"
  f"flux={B}/flux,hps={B}/hps.safetensors,train={B}/cache_train,"
  f"eval={B}/cache_eval"
)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  root = tmp_path_factory.mktemp("staging")
  with emu.running(str(root / "emulator.log")) as host:
    for name, data in FILES.items():
      emu.upload_object(host, name, data)
    yield host, root


def _stage(bucket, *args):
  host, root = bucket
  env = dict(os.environ, **emu.env(host))
  env["LEAPALIGN_STAGE_DIR"] = str(root / "stage")
  env["PYTHONPATH"] = REPO
  return subprocess.run(
    [sys.executable, "-m", "leapalign_jax.staging", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def _local(bucket, name):
  return bucket[1] / "stage" / "gs" / emu.BUCKET / name


def test_stage_a_config_once_then_resume_and_refresh(bucket, monkeypatch):
  out = _stage(bucket, "--config", SPEC)
  assert out.returncode == 0, out.stderr
  for name, data in FILES.items():
    assert _local(bucket, name).read_bytes() == data
  assert out.stdout.count("staged at") == 4  # flux, hps, both caches
  assert "(3 files, 0.00 GB; 3 copied, 0 already here)" in out.stdout

  again = _stage(bucket, "--config", SPEC)
  assert again.returncode == 0, again.stderr
  assert again.stdout.count("already staged") == 4

  # A copy cut short: a file missing, a partial one left, no marker.
  big = _local(bucket, "flux/transformer/diffusion_pytorch_model.safetensors")
  big.unlink()
  big.with_name(big.name + ".partial").write_bytes(b"xx")
  _local(bucket, "flux").with_name("flux" + staging.MARKER).unlink()
  resumed = _stage(bucket, "--src", f"{B}/flux")
  assert resumed.returncode == 0, resumed.stderr
  assert "1 copied, 2 already here" in resumed.stdout
  assert (
    big.read_bytes() == FILES[big.relative_to(_local(bucket, "")).as_posix()]
  )

  # A changed source is copied again.
  emu.upload_object(bucket[0], "hps.safetensors", b"new" * 50)
  refreshed = _stage(bucket, "--src", f"{B}/hps.safetensors")
  assert "1 copied" in refreshed.stdout, refreshed.stdout
  assert _local(bucket, "hps.safetensors").read_bytes() == b"new" * 50

  # The loaders' view: every gs:// path of the config, staged here.
  from leapalign_jax import configs_io

  monkeypatch.setenv("LEAPALIGN_STAGE_DIR", str(bucket[1] / "stage"))
  config = staging.resolve_config(configs_io.load_config(SPEC))
  assert config.flux.path == str(_local(bucket, "flux"))
  assert config.rewards.hpsv2.path == str(_local(bucket, "hps.safetensors"))
  assert config.data.eval_cache == str(_local(bucket, "cache_eval"))


def test_push_uploads_and_counts_as_staged_here(bucket, monkeypatch):
  host, root = bucket
  monkeypatch.setenv("LEAPALIGN_STAGE_DIR", str(root / "stage"))
  url = f"{B}/pushed/cache"
  local = staging.local_path(url)
  os.makedirs(os.path.join(local, "sub"))
  for name in ("manifest.json", "shard-00000.safetensors", "sub/x"):
    with open(os.path.join(local, name), "w") as f:
      f.write(name)
  out = _stage(bucket, "--push", local, url)
  assert out.returncode == 0, out.stderr
  assert sorted(emu.list_objects(host, "pushed/cache/")) == [
    "pushed/cache/manifest.json",
    "pushed/cache/shard-00000.safetensors",
    "pushed/cache/sub/x",
  ]
  assert staging.staged_copy(url) == local
  assert staging.staged_copy(url + "/sub") == os.path.join(local, "sub")


def test_unstaged_gs_paths_are_refused_with_the_staging_command(
  tmp_path, monkeypatch
):
  from leapalign_jax import configs_io
  from leapalign_jax.convert import load_flux

  monkeypatch.setenv("LEAPALIGN_STAGE_DIR", str(tmp_path))
  with pytest.raises(errors.UserError) as e:
    staging.resolve_config(configs_io.load_config(SPEC))
  message = str(e.value)
  assert "\n" not in message
  first = "config.data.eval_cache"  # the first gs:// field, by name
  assert message.startswith(f"{first}: {B}/cache_eval is not on this host's")
  assert f"python -m leapalign_jax.staging --src {B}/cache_eval" in message
  # embed_prompts resolves the text encoders only (it makes the caches).
  with pytest.raises(errors.UserError, match="^config.text.clip_path: "):
    staging.resolve_config(configs_io.load_config(SPEC), ("text",))
  with pytest.raises(errors.UserError, match="leapalign_jax.staging"):
    load_flux(f"{B}/flux")
  from leapalign_jax import data

  with pytest.raises(errors.UserError, match="prompt cache: gs://"):
    data.PromptCache(f"{B}/cache_train")


def test_bad_input(bucket):
  out = _stage(bucket)
  assert out.returncode == 2 and out.stderr.startswith("error: nothing to")
  out = _stage(bucket, "--src", f"{B}/missing")
  assert out.returncode == 2, out.stderr
  assert (
    out.stderr.strip()
    == f"error: {B}/missing: no such file or folder in the bucket"
  )
