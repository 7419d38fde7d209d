"""train_and_evaluate on configs/tiny.py: every method, resume, outputs."""

import json
import os

import jax
import numpy as np
import pytest

from leapalign_jax import checkpoint, configs_io, methods, metrics, plots, train

TINY = "configs/tiny.py"


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  """These tests check the loop, not XLA's optimiser: compile 2x faster."""
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  """One random world (models + caches) shared by every run below."""
  return str(tmp_path_factory.mktemp("world"))


def tiny(world_dir, *overrides):
  # One device: sharded steps are tested in sharding_test.py.
  return configs_io.load_config(
    TINY, [f"world_options.dir={world_dir!r}", "mesh.num_devices=1", *overrides]
  )


def load_state(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  restored = ckpt.manager.restore(step)
  ckpt.close()
  return step, restored


@pytest.mark.parametrize("method", methods.names())
def test_two_steps_per_method(world_dir, tmp_path, method):
  config = tiny(world_dir, f"method={method!r}", "eval.num_prompts=0")
  out = train.train_and_evaluate(config, str(tmp_path))
  lines = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [line["step"] for line in lines] == [1, 2]
  for line in lines:
    assert np.isfinite(line["train/loss"]) and np.isfinite(
      line["train/grad_norm"]
    )
    assert line["train/grad_norm"] > 0
  step, _ = load_state(str(tmp_path))
  assert step == 2
  assert out["after"] is None


def test_outputs_and_exact_resume(world_dir, tmp_path):
  straight, split = str(tmp_path / "a"), str(tmp_path / "b")
  record = train.train_and_evaluate(
    tiny(world_dir, "train.num_steps=3", "eval.before=True"), straight
  )
  # Outputs of a finished run.
  for f in (
    "config.json",
    "metrics.jsonl",
    "eval/after/eval.json",
    "eval/after/samples.jsonl",
    "eval/after/grid.png",
    "eval/before/eval.json",
    "eval/summary.md",
    "eval/table.md",
    "eval/table.json",
    "export/transformer/config.json",
    *(["curves.png"] if plots.have_matplotlib() else []),
  ):
    assert os.path.exists(os.path.join(straight, f)), f
  with open(os.path.join(straight, "eval/table.json")) as f:
    assert [r["checkpoint"] for r in json.load(f)["rows"]] == ["base", "ema"]
  assert any(
    f.startswith("events.out.tfevents")
    for f in os.listdir(os.path.join(straight, "tensorboard"))
  )
  assert "reward/clip" in record["after"]
  with open(os.path.join(straight, "eval/after/samples.jsonl")) as f:
    sample = json.loads(f.readline())
  assert {"file", "prompt", "seed", "digit", "colour", "position"} <= set(
    sample
  )
  # Stop after 2 steps, then resume to 3 with the same command.
  first = train.train_and_evaluate(
    tiny(world_dir, "train.num_steps=2", "eval.before=True"), split
  )
  assert first["after"] is not None
  train.train_and_evaluate(
    tiny(world_dir, "train.num_steps=3", "eval.before=True"), split
  )
  (sa, a), (sb, b) = load_state(straight), load_state(split)
  assert sa == sb == 3
  for x, y in zip(jax.tree.leaves(a["state"]), jax.tree.leaves(b["state"])):
    np.testing.assert_array_equal(x, y)
  la = metrics.read_jsonl(os.path.join(straight, "metrics.jsonl"))
  lb = metrics.read_jsonl(os.path.join(split, "metrics.jsonl"))

  def strip(ls):  # timings differ between runs
    return [
      {k: v for k, v in d.items() if not k.startswith("perf/")} for d in ls
    ]

  assert strip(la) == strip(lb)


def test_refuses_a_workdir_of_another_config(world_dir, tmp_path):
  train.train_and_evaluate(
    tiny(world_dir, "train.num_steps=1", "eval.num_prompts=0"), str(tmp_path)
  )
  with pytest.raises(train.UserError, match="different config.*optim.lr"):
    train.train_and_evaluate(
      tiny(
        world_dir, "train.num_steps=1", "optim.lr=0.5", "eval.num_prompts=0"
      ),
      str(tmp_path),
    )
  # Allowed with overwrite; the old run is moved aside, not deleted.
  train.train_and_evaluate(
    tiny(
      world_dir,
      "train.num_steps=1",
      "optim.lr=0.5",
      "eval.num_prompts=0",
      "train.overwrite=True",
    ),
    str(tmp_path),
  )
  assert any(n.startswith("checkpoints.old-") for n in os.listdir(tmp_path))


def test_nonfinite_steps_are_skipped_then_stop(world_dir, tmp_path):
  config = tiny(
    world_dir,
    "train.num_steps=6",
    "debug.nan_at_steps=(1, 2, 3)",
    "train.max_consecutive_nonfinite=3",
    "eval.num_prompts=0",
  )
  with pytest.raises(train.NonFiniteError, match="3 consecutive non-finite"):
    train.train_and_evaluate(config, str(tmp_path))
  lines = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [line["train/finite"] for line in lines] == [True, False, False, False]
  step, restored = load_state(str(tmp_path))
  assert step == 4
  # Parameters are those after step 1 (the last finite one). The reference
  # compiles a different program (no NaN injection), so XLA may round the
  # one update differently by an ulp; a skipped update would move the
  # parameters by ~lr (1e-3), far outside this tolerance.
  ok = tiny(world_dir, "train.num_steps=1", "eval.num_prompts=0")
  ref_dir = str(tmp_path / "ref")
  train.train_and_evaluate(ok, ref_dir)
  _, ref = load_state(ref_dir)
  for x, y in zip(
    jax.tree.leaves(restored["state"]["params"]),
    jax.tree.leaves(ref["state"]["params"]),
  ):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)


def test_metrics_window_summary():
  window = [
    {"train/loss": 1.0, "choice/k_idx": 3, "train/finite": True},
    {"train/loss": 2.0, "choice/k_idx": 5, "train/finite": False},
  ]
  assert metrics.summarize(window) == {
    "train/loss": 1.5,
    "choice/k_idx": 5,
    "train/finite": False,
  }
  assert metrics.summarize(window[:1]) == window[0]


def test_lora_run_trains_only_adapters_and_exports_them(world_dir, tmp_path):
  config = tiny(
    world_dir,
    "lora.enabled=True",
    "lora.rank=4",
    "lora.alpha=4.0",
    "eval.num_prompts=0",
  )
  train.train_and_evaluate(config, str(tmp_path))
  _, restored = load_state(str(tmp_path))
  params = restored["state"]["params"]
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = {jax.tree_util.keystr(p) for p, _ in flat}
  assert names and all("lora_a" in n or "lora_b" in n for n in names)
  # B starts at zero; after two steps the adapters moved.
  assert any(
    np.abs(x).max() > 0 for p, x in flat if "lora_b" in jax.tree_util.keystr(p)
  )
  assert os.path.exists(
    tmp_path / "export" / "pytorch_lora_weights.safetensors"
  )
