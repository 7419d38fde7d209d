"""The GRPO family through train_and_evaluate: exact resume, metrics.

(``train_test.py`` already runs two steps of every registered method,
these included.)
"""

import os

import jax
import numpy as np
import pytest

from leapalign_jax import checkpoint, configs_io, metrics, train


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


def _config(world_dir, *overrides):
  return configs_io.load_config(
    "configs/tiny.py",
    [
      f"world_options.dir={world_dir!r}",
      "mesh.num_devices=1",
      "method='mix_grpo'",
      # The window moves every step, two PPO updates per rollout.
      "grpo.window_interval=1",
      "grpo.window_size=2",
      "grpo.num_updates=2",
      "grpo.group_size=2",
      "eval.num_prompts=0",
      *overrides,
    ],
  )


def _state(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  restored = ckpt.manager.restore(step)
  ckpt.close()
  return step, restored["state"]


def test_mix_grpo_resumes_exactly(tmp_path):
  world = str(tmp_path / "world")
  straight, split = str(tmp_path / "a"), str(tmp_path / "b")
  train.train_and_evaluate(_config(world, "train.num_steps=3"), straight)
  train.train_and_evaluate(_config(world, "train.num_steps=2"), split)
  train.train_and_evaluate(_config(world, "train.num_steps=3"), split)
  (sa, a), (sb, b) = _state(straight), _state(split)
  assert sa == sb == 3
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  la = metrics.read_jsonl(os.path.join(straight, "metrics.jsonl"))
  lb = metrics.read_jsonl(os.path.join(split, "metrics.jsonl"))
  keys = ("train/loss", "train/reward", "grpo/window_start", "grpo/ratio_dev")
  assert [[d[k] for k in keys] for d in la] == [
    [d[k] for k in keys] for d in lb
  ]
  assert [d["grpo/window_start"] for d in la] == [0, 1, 2]
  assert all(d["grpo/ratio_dev_first"] == 0.0 for d in la)
