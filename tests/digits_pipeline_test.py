"""The digits world's pipeline: stages, resumption, and the main job (fast)."""

import json
import os

import numpy as np
import pytest

from leapalign_jax import configs_io, data, evaluate, train
from leapalign_jax.worlds import digits, digits_pipeline, digits_stages

DIGITS = os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py")
STAGE_OUTPUTS = (
  "vae",
  "transformer",
  "reward_clip",
  "evaluator.npz",
  "rule.npz",
)


def fast(*overrides):
  return configs_io.load_config(DIGITS + ":fast", list(overrides))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """One fast world, prepared once for the module."""
  workdir = str(tmp_path_factory.mktemp("digits"))
  config = digits_pipeline.prepare(fast(), workdir)
  return workdir, config


def test_prompt_split_is_balanced_and_disjoint():
  config = fast("world_options.num_train_prompts=300")
  opts = digits_pipeline.options(config)
  world = digits_pipeline.world_config(config)
  trains, evals = digits_pipeline.split_prompts(world, opts, seed=0)
  combos = {(r["digit"], r["colour"], r["position"]) for r in evals}
  # Every digit x colour x position exactly once, in held-out phrasings.
  assert len(evals) == len(combos) == 10 * 5 * 5
  assert {r["template"] for r in evals} == {4}
  assert len(trains) == 300 and all(r["template"] != 4 for r in trains)
  assert not {r["prompt"] for r in trains} & {r["prompt"] for r in evals}
  again = digits_pipeline.split_prompts(world, opts, seed=0)
  assert again == (trains, evals)
  # Prompt indices agree with digits.all_prompts.
  every = digits.all_prompts(world)
  for r in evals[:20]:
    idx = digits.prompt_index(
      world,
      r["digit"],
      world.colours.index(r["colour"]),
      world.positions.index(r["position"]),
      r["template"],
    )
    assert every[int(idx)] == r["prompt"]


def test_pretraining_mix_makes_digits_rare():
  config = fast("world_options.pretrain_images=4000")
  config.world_options.update(rare_digits=(5, 6), rare_factor=0.1)
  opts = digits_pipeline.options(config)
  world = digits_pipeline.world_config(config)
  batch = digits_pipeline.pretrain_set(world, opts, seed=0)
  counts = np.bincount(batch.prompt_set.digit, minlength=10)
  assert counts[[5, 6]].max() < 0.25 * counts[[0, 1, 2, 3, 4]].min()


def test_unknown_option_is_refused(tmp_path):
  config = fast()
  config.world_options.unlock()
  config.world_options.flux_stpes = 3
  with pytest.raises(ValueError, match="flux_stpes"):
    digits_pipeline.prepare(config, str(tmp_path))


def test_stages_write_loadable_checkpoints(built):
  from leapalign_jax.convert import load_autoencoder, load_clip, load_flux

  workdir, config = built
  folder = os.path.join(workdir, "world")
  for name in STAGE_OUTPUTS:
    assert os.path.exists(os.path.join(folder, name)), name
  with open(os.path.join(folder, "stages.json")) as f:
    stages = json.load(f)
  assert set(stages) == {"autoencoder", "flux", "reward", "evaluator", "rule"}
  for name in ("autoencoder", "flux", "reward"):
    assert np.isfinite(stages[name]["loss"]) and stages[name]["steps"] == 2
  # The rule reward's classifier (full size even in the fast world): right
  # on clean renders of unseen writers' digits; the config points at it.
  assert stages["rule"]["test_colour_acc"] >= 0.99
  assert stages["rule"]["test_position_acc"] >= 0.99
  assert stages["rule"]["test_digit_acc"] >= 0.8
  assert config.rewards.rule.path == os.path.join(folder, "rule.npz")
  assert config.rewards.clip.path == os.path.join(folder, "reward_clip")
  flux_cfg, _ = load_flux(config.flux.path)
  ae_cfg, _ = load_autoencoder(config.vae.path)
  assert flux_cfg.in_channels == 4 * ae_cfg.z_channels == 16
  # The autoencoder's latent normalisation was measured, not Flux's.
  assert ae_cfg.scale_factor != 0.3611
  clip_cfg, _ = load_clip(config.rewards.clip.path)
  assert clip_cfg.vision.image_size == config.sampling.height
  assert len(data.PromptCache(config.data.eval_cache)) == 250


def test_prepare_resumes_only_missing_stages(built, tmp_path):
  import shutil

  workdir, config = built
  folder = os.path.join(workdir, "world")
  copy = str(tmp_path / "world")
  shutil.copytree(folder, copy)
  mtimes = {n: os.path.getmtime(os.path.join(copy, n)) for n in STAGE_OUTPUTS}
  shutil.rmtree(os.path.join(copy, "reward_clip"))
  cfg = fast(f"world_options.dir={copy!r}")
  digits_pipeline.prepare(cfg, str(tmp_path))
  # Trained alone it is the same reward as trained beside the AE and Flux.
  for name in sorted(os.listdir(os.path.join(folder, "reward_clip"))):
    with open(os.path.join(folder, "reward_clip", name), "rb") as f:
      want = f.read()
    with open(os.path.join(copy, "reward_clip", name), "rb") as f:
      assert f.read() == want, name
  for n in ("vae", "transformer", "evaluator.npz", "rule.npz"):
    assert os.path.getmtime(os.path.join(copy, n)) == mtimes[n], n
  # A different option set must not silently reuse this world.
  other = fast(f"world_options.dir={copy!r}", "world_options.flux_steps=3")
  with pytest.raises(ValueError, match="flux_steps"):
    digits_pipeline.prepare(other, str(tmp_path))


def test_main_job_end_to_end(built, tmp_path):
  workdir, _ = built
  world_dir = os.path.join(workdir, "world")
  config = fast(f"world_options.dir={world_dir!r}")
  out = train.train_and_evaluate(config, str(tmp_path))
  folder = tmp_path / "eval"
  for tag in ("before", "after"):
    with open(folder / tag / "eval.json") as f:
      summary = json.load(f)
    for key in (
      "reward/clip",
      "reward/rule",
      "eval/digit",
      "eval/colour",
      "eval/position",
    ):
      assert np.isfinite(summary[key]), key
    # The rule reward is a fraction of the three attributes.
    thirds = summary["reward/rule"] * 3 * config.eval.num_prompts
    assert abs(thirds - round(thirds)) < 1e-3, summary["reward/rule"]
    text = (folder / tag / "samples.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert len(lines) == config.eval.num_prompts
    for line in lines:
      assert {"file", "prompt", "seed", "digit", "colour", "position"} <= set(
        line
      )
      assert (folder / tag / line["file"]).exists()
    assert (folder / tag / "grid.png").exists()
  assert out["after"]["eval/digit"] == summary["eval/digit"]
  assert "eval/digit" in (folder / "summary.md").read_text()
  # The paper-style table of the run (base and EMA rows) ...
  table = (folder / "table.md").read_text()
  assert "eval/digit" in table and "reward/clip" in table
  # ... and the evaluate command: base vs aligned, one table, side by side.
  status = evaluate.main(
    [
      "--config",
      DIGITS + ":fast",
      "--workdir",
      str(tmp_path),
      "--checkpoint",
      "base",
      "--checkpoint",
      f"aligned={tmp_path}",
      "--compare",
      "--tag",
      "cmp",
      f"world_options.dir={world_dir!r}",
    ]
  )
  assert status == 0
  with open(folder / "cmp" / "table.json") as f:
    rows = json.load(f)
  text = json.dumps(rows)
  assert '"base"' in text and '"aligned"' in text
  assert (folder / "cmp" / "compare.png").stat().st_size > 0
  aligned = json.loads((folder / "cmp" / "aligned" / "eval.json").read_text())
  assert aligned["eval/digit"] == summary["eval/digit"]  # same seeds, EMA


@pytest.mark.parametrize("failing", ["train_autoencoder", "train_reward"])
def test_a_failing_stage_stops_the_concurrent_one(
  failing, tmp_path, monkeypatch
):
  """The reward trains beside the autoencoder/Flux: a failure on either
  thread stops the other within a step and is the error raised."""

  def boom(*args, **kwargs):
    raise RuntimeError(f"boom in {failing}")

  monkeypatch.setattr(digits_stages, failing, boom)
  # The surviving stage alone would take minutes at these step counts.
  cfg = fast(
    "world_options.ae_steps=5000",
    "world_options.flux_steps=5000",
    "world_options.reward_steps=5000",
  )
  with pytest.raises(RuntimeError, match=f"boom in {failing}"):
    digits_pipeline.prepare(cfg, str(tmp_path))
  folder = tmp_path / "world"
  for name in STAGE_OUTPUTS:
    assert not (folder / name).exists(), name
  assert not (folder / "stages.json").exists()
