"""One tiny run, then what is read off it: the evaluation table of several
checkpoints and their side-by-side grid (``evaluate``), GenEval's folder
layout (``sample --geneval``) and the training curves (``curves.png``)."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from leapalign_jax import configs_io, evaluate, plots, sample, train

TINY = "configs/tiny.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A two-step tiny run (no end-of-run evaluation): ``(workdir, overrides)``."""
  jax.config.update("jax_disable_most_optimizations", True)  # as train_test
  root = tmp_path_factory.mktemp("evaluate")
  overrides = [
    f"world_options.dir={str(root / 'world')!r}",
    "mesh.num_devices=1",
  ]
  workdir = str(root / "run")
  config = configs_io.load_config(TINY, [*overrides, "eval.num_prompts=0"])
  train.train_and_evaluate(config, workdir)
  yield workdir, overrides
  jax.config.update("jax_disable_most_optimizations", False)


def test_a_run_ends_with_its_curves(run):
  workdir, _ = run
  if not plots.have_matplotlib():
    pytest.skip("matplotlib is not installed")
  with Image.open(os.path.join(workdir, plots.FILE)) as img:
    assert img.width > 400 and img.height > 200


def test_table_and_compare_grid_of_three_checkpoints(run):
  workdir, overrides = run
  status = evaluate.main(
    [
      "--config",
      TINY,
      "--workdir",
      workdir,
      "--tag",
      "cmp",
      "--checkpoint",
      "base",
      "--checkpoint",
      f"aligned={workdir}",
      "--checkpoint",
      os.path.join(workdir, "export"),  # float32 export of the EMA weights
      "--compare",
      *overrides,
      "eval.num_prompts=3",
      "eval.images_per_prompt=2",
      "eval.grid_images=4",
    ]
  )
  assert status == 0
  folder = os.path.join(workdir, "eval", "cmp")
  with open(os.path.join(folder, "table.json")) as f:
    table = json.load(f)
  names = [row["checkpoint"] for row in table["rows"]]
  assert names == ["base", "aligned", "run-export"]
  assert table["num_prompts"] == 3 and table["images_per_prompt"] == 2
  assert "reward/clip" in table["metrics"]
  for row in table["rows"]:
    assert row["num_images"] == 6
    for key in table["metrics"]:
      assert np.isfinite(row[key]["mean"]) and row[key]["std"] >= 0
  # The export holds the EMA weights: the same images, the same scores.
  aligned, exported = table["rows"][1], table["rows"][2]
  for key in table["metrics"]:
    np.testing.assert_allclose(
      exported[key]["mean"], aligned[key]["mean"], rtol=1e-4, atol=1e-6
    )
  with open(os.path.join(folder, "table.md")) as f:
    md = f.read().splitlines()
  assert md[0].startswith("| checkpoint | reward/clip")
  assert [line.split(" | ")[0] for line in md[2:5]] == [
    "| base",
    "| aligned",
    "| run-export",
  ]
  assert " ± " in md[2]
  # Same prompts and seeds for every checkpoint.
  seeds = {}
  for name in names:
    with open(os.path.join(folder, name, "samples.jsonl")) as f:
      lines = [json.loads(x) for x in f]
    seeds[name] = [(x["prompt"], x["seed"]) for x in lines]
    assert os.path.exists(os.path.join(folder, name, "grid.png"))
  assert seeds["base"] == seeds["aligned"] == seeds["run-export"]
  with Image.open(os.path.join(folder, "compare.png")) as img:
    # 3 columns of >= 128 px tiles, 4 rows with captions and a header.
    assert img.width >= 3 * 128 and img.height >= 4 * 128


def test_one_checkpoint_keeps_the_single_evaluation_layout(run):
  workdir, overrides = run
  args = ["--config", TINY, "--workdir", workdir, "--tag", "one", *overrides]
  assert evaluate.main([*args, "eval.num_prompts=2"]) == 0
  folder = os.path.join(workdir, "eval", "one")
  for name in ("eval.json", "samples.jsonl", "grid.png", "table.md"):
    assert os.path.exists(os.path.join(folder, name)), name
  with open(os.path.join(folder, "table.json")) as f:
    assert [r["checkpoint"] for r in json.load(f)["rows"]] == ["ema"]
  assert evaluate.main([*args, "--compare"]) == 2  # one line, no models
  missing = ["--checkpoint", "base", "--checkpoint", "/no/such/run"]
  assert evaluate.main([*args, *missing]) == 2
  twice = ["--checkpoint", "base", "--checkpoint", "base=" + workdir]
  assert evaluate.main([*args, *twice]) == 2


def test_geneval_layout(run, tmp_path):
  workdir, overrides = run
  meta = [
    {
      "tag": "single_object",
      "include": [{"class": "bench", "count": 1}],
      "prompt": "a photo of a bench",
    },
    {
      "tag": "two_object",
      "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
      "prompt": "a photo of a cat and a dog",
    },
    {
      "tag": "colors",
      "include": [{"class": "car", "count": 1, "color": "red"}],
      "prompt": "a photo of a red car",
    },
  ]
  path = tmp_path / "evaluation_metadata.jsonl"
  path.write_text("".join(json.dumps(m) + "\n" for m in meta))
  out = tmp_path / "geneval"
  status = sample.main(
    [
      "--config",
      TINY,
      "--geneval",
      str(path),
      "--out",
      str(out),
      "--images-per-prompt",
      "2",
      "--seed",
      "10",
      "--checkpoint",
      workdir,
      *overrides,
    ]
  )
  assert status == 0
  assert sorted(os.listdir(out)) == ["00000", "00001", "00002", "samples.jsonl"]
  for i, m in enumerate(meta):
    sub = out / f"{i:05d}"
    assert sorted(os.listdir(sub)) == ["metadata.jsonl", "samples"]
    with open(sub / "metadata.jsonl") as f:
      assert json.load(f) == m  # as GenEval's evaluator reads it
    assert sorted(os.listdir(sub / "samples")) == ["0000.png", "0001.png"]
    with Image.open(sub / "samples" / "0000.png") as img:
      assert img.size == (32, 32) and img.mode == "RGB"
  with open(out / "samples.jsonl") as f:
    index = [json.loads(x) for x in f]
  assert [x["seed"] for x in index] == [10, 11, 12, 13, 14, 15]
  assert index[3]["file"] == "00001/samples/0001.png"
  assert index[3]["prompt"] == meta[1]["prompt"]
