"""``python -m leapalign_jax.export``: any checkpoint of a tiny run, exported."""

import os

import jax
import numpy as np
import pytest

from leapalign_jax import configs_io, train
from leapalign_jax.convert.lora import LORA_WEIGHT_NAME
from leapalign_jax.convert.safetensors_io import TensorSource
from leapalign_jax.export.__main__ import main
from leapalign_jax.families.flux import BFL_FILE


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


def run(tmp, name, *overrides):
  """A finished two-step tiny run (checkpoints at steps 1 and 2)."""
  workdir = str(tmp / name)
  config = configs_io.load_config(
    "configs/tiny.py",
    [
      f"world_options.dir={str(tmp / 'world')!r}",
      "mesh.num_devices=1",
      "eval.num_prompts=0",
      *overrides,
    ],
  )
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("export")
  lora = run(tmp, "lora", "lora.enabled=True", "lora.rank=4", "lora.alpha=4.0")
  return {"lora": lora, "full": run(tmp, "full")}


def read(path):
  src = TensorSource.from_files([path])
  return {k: np.array(src[k]) for k in src}


def export(capsys, *argv):
  """``(status, paths printed, stderr)`` of the command."""
  status = main(list(argv))
  out, err = capsys.readouterr()
  return status, out.split(), err


def test_lora_file_of_any_step(runs, tmp_path, capsys):
  w = runs["lora"]
  status, paths, _ = export(
    capsys, "--workdir", w, "--lora", "--out", str(tmp_path)
  )
  assert status == 0
  assert sorted(os.path.basename(p) for p in paths) == [
    "README.md",
    "lora_info.json",
    LORA_WEIGHT_NAME,
  ]
  # The latest step is what the run exported at its end, bit for bit, in
  # the adapters' training precision.
  got = read(str(tmp_path / LORA_WEIGHT_NAME))
  want = read(os.path.join(w, "export", LORA_WEIGHT_NAME))
  assert got.keys() == want.keys()
  assert all(np.array_equal(got[k], want[k]) for k in want)
  assert {v.dtype for v in got.values()} == {np.dtype("float32")}
  status, paths, _ = export(capsys, "--workdir", w, "--lora", "--step", "1")
  assert status == 0
  assert paths[0] == os.path.join(w, "exports", "step_1", LORA_WEIGHT_NAME)
  older = read(paths[0])
  assert not all(np.array_equal(older[k], got[k]) for k in got)


def test_merged_and_full_exports(runs, tmp_path, capsys):
  out = str(tmp_path / "merged")
  status, paths, _ = export(
    capsys,
    "--workdir",
    runs["lora"],
    "--merged",
    "--layout",
    "bfl",
    "--out",
    out,
  )
  assert status == 0 and paths == [os.path.join(out, BFL_FILE)]
  w = runs["full"]
  status, paths, _ = export(
    capsys, "--workdir", w, "--out", str(tmp_path / "f")
  )
  assert status == 0
  got = read(
    str(tmp_path / "f" / "transformer" / "diffusion_pytorch_model.safetensors")
  )
  want = read(
    os.path.join(
      w, "export", "transformer", "diffusion_pytorch_model.safetensors"
    )
  )
  assert got.keys() == want.keys()
  assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
  "which,args,match",
  [
    ("lora", ["--step", "7"], "no checkpoint at step 7; saved steps: [1, 2]"),
    ("full", ["--lora"], "has no adapters"),
    ("lora", ["--layout", "x", "--merged"], "unknown layout 'x'"),
  ],
)
def test_refusals_are_one_line(runs, tmp_path, capsys, which, args, match):
  out = str(tmp_path / "x")
  status, _, err = export(capsys, "--workdir", runs[which], "--out", out, *args)
  assert status == 2
  assert match in err and len(err.strip().splitlines()) == 1, err
  assert not os.path.exists(out)
