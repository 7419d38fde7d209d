"""Crash safety and bad input, through the real command lines (subprocesses).

The tiny config trains in a subprocess that is SIGKILLed at random points —
during the world preparation, mid-step, during a checkpoint write and during
the final export — and restarted each time with the same command; the result
must equal an uninterrupted run bit for bit (state, metrics, TensorBoard,
export). SIGTERM must checkpoint and exit 0; non-finite steps must stop with
one clear line; and every bad input must give one ``error:`` line, exit
status 2 and leave existing files untouched. ``bench/reliability.py`` is the
long version (more kills, longer runs).

Set ``LEAPALIGN_RELIABILITY_SEED`` to replay a kill schedule (the seed is in
every failure message).
"""

import os
import signal

import bad_inputs
import crash_harness as ch
import numpy as np
import pytest

from leapalign_jax import errors, rewards

NUM_STEPS = 8
RUN_FLAGS = (
  f"--config.train.num_steps={NUM_STEPS}",
  "--config.train.ckpt_every_steps=2",
  "--config.train.keep_checkpoints=2",
  "--config.eval.num_prompts=0",
)
SEED = int(
  os.environ.get("LEAPALIGN_RELIABILITY_SEED")
  or np.random.SeedSequence().entropy % 10**6
)
KILL_PLAN = ("world", "step", "ckpt_write", "final")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = os.environ.get("LEAPALIGN_TEST_JAX_CACHE") or str(
    tmp_path_factory.mktemp("jax_cache")
  )
  return ch.command_env(cache)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
  """A run killed by ``KILL_PLAN`` (it also builds the world) + a reference."""
  root = tmp_path_factory.mktemp("runs")
  world, killed, ref = (str(root / n) for n in ("world", "killed", "ref"))
  rng = np.random.default_rng(SEED)
  cmd = ch.train_command(killed, world, *RUN_FLAGS)
  kills = [
    ch.start_and_kill(cmd, env, killed, world, t, rng, num_steps=NUM_STEPS)
    for t in KILL_PLAN
  ]
  last = ch.run(cmd, env)
  assert last.returncode == 0, last.stderr[-3000:]
  done = ch.run(ch.train_command(ref, world, *RUN_FLAGS), env)
  assert done.returncode == 0, done.stderr[-3000:]
  return {
    "world": world,
    "killed": killed,
    "ref": ref,
    "kills": kills,
    "world_digest": ch.tree_digest(world),
  }


def test_sigkill_anywhere_then_resume_is_exact(runs):
  kills = runs["kills"]
  why = f"seed {SEED}: {kills}"
  assert all(k.landed and k.exit_status == -signal.SIGKILL for k in kills), why
  # The ckpt_write kill interrupted a checkpoint being written.
  assert kills[KILL_PLAN.index("ckpt_write")].mid_write, why
  assert ch.compare_runs(runs["ref"], runs["killed"]) == [], why
  lines = ch._metrics(runs["killed"])
  assert [d["step"] for d in lines] == list(range(1, NUM_STEPS + 1)), why
  assert ch.leftovers(runs["killed"]) == [], why
  assert ch.latest_step(runs["killed"]) == NUM_STEPS


def test_sigterm_checkpoints_at_a_step_boundary_and_exits_0(
  runs, env, tmp_path
):
  workdir = str(tmp_path / "run")
  cmd = ch.train_command(workdir, runs["world"], *RUN_FLAGS)
  rng = np.random.default_rng(SEED + 1)
  # Two SIGTERMs, the second while the first one's checkpoint is written.
  term = ch.start_and_kill(
    cmd,
    env,
    workdir,
    runs["world"],
    "step",
    rng,
    num_steps=NUM_STEPS,
    sig=signal.SIGTERM,
    repeat_after=0.05,
  )
  assert term.landed and term.exit_status == 0, term
  assert "preempted at step" in term.stderr_tail, term.stderr_tail
  stopped = ch._metrics(workdir)[-1]["step"]
  assert ch.latest_step(workdir) == stopped < NUM_STEPS
  assert not ch.leftovers(workdir)
  done = ch.run(cmd, env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert ch.compare_runs(runs["ref"], workdir) == []


def test_nonfinite_steps_stop_with_one_clear_line(runs, env, tmp_path):
  workdir = str(tmp_path / "run")
  out = ch.run(
    ch.train_command(
      workdir,
      runs["world"],
      "--config.train.num_steps=6",
      "--config.debug.nan_at_steps=(1,2,3)",
      "--config.train.max_consecutive_nonfinite=3",
      "--config.eval.num_prompts=0",
    ),
    env,
  )
  assert out.returncode == errors.EXIT_NONFINITE, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  error = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
  assert len(error) == 1, out.stderr
  for word in (
    "3 consecutive non-finite steps",
    "k_idx=",
    "loss=",
    "saved",
    "lower optim.lr",
    "max_consecutive_nonfinite",
  ):
    assert word in error[0], (word, error[0])
  warnings = [ln for ln in out.stderr.splitlines() if "non-finite loss" in ln]
  assert len(warnings) == 3, out.stderr
  for ln in warnings:
    assert "k_idx=" in ln and "j_idx=" in ln
    assert "loss=" in ln and "reward=" in ln
  assert ch.latest_step(workdir) == 4  # 1 good step + 3 skipped ones


# ------------------------------------------------------------ bad input --


@pytest.fixture(scope="module")
def bad(runs, tmp_path_factory):
  """Damaged copies of the world's files, prompt files, a bad config."""
  return bad_inputs.make_bad_files(
    runs["world"], str(tmp_path_factory.mktemp("bad"))
  )


@pytest.mark.parametrize("case", list(bad_inputs.CASES))
def test_bad_input_gives_one_clear_line(case, bad, runs, env, tmp_path):
  problems, line = bad_inputs.check(
    case, bad, runs["ref"], RUN_FLAGS, NUM_STEPS, str(tmp_path), env
  )
  assert problems == [], line


def test_long_prompts_are_truncated_with_one_warning(bad, env, tmp_path):
  out = ch.run(
    bad_inputs._module(
      "embed_prompts",
      "--config",
      bad_inputs.TINY,
      "--prompts",
      f"{bad['root']}/long.txt",
      "--out",
      str(tmp_path / "cache"),
      *bad_inputs._text(bad["world"]),
    ),
    env,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  warned = [ln for ln in out.stderr.splitlines() if "truncated" in ln]
  # One warning per tokenizer (CLIP, T5, the reward's CLIP), each once.
  assert 1 <= len(warned) <= 3, out.stderr
  assert len({ln.split(":")[0] for ln in warned}) == len(warned)
  assert "1 prompts embedded" in out.stdout


@pytest.mark.parametrize(
  "images, words",
  [
    (np.full((1, 8, 8, 3), 200, np.uint8), ["floats", "127.5"]),
    (np.full((1, 8, 8, 3), 200.0, np.float32), ["[-1, 1]", "127.5"]),
    (np.full((1, 8, 8, 3), np.nan, np.float32), ["non-finite"]),
    (np.zeros((1, 3, 8, 8), np.float32), ["NHWC"]),
  ],
)
def test_images_outside_the_reward_range(images, words, capsys):
  # No command takes images from the user: the API path, as commands
  # report it (one line, exit status 2).
  def score():
    rewards.check_images(images)

  assert errors.run_command(score) == errors.EXIT_USER_ERROR
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("error:")
  for word in words:
    assert word in err, (word, err)


def test_the_shared_world_was_not_changed(runs):
  assert ch.tree_digest(runs["world"]) == runs["world_digest"]


def test_a_killed_world_build_is_completed_not_reused_half(runs):
  # The world the killed run built (with a kill during its preparation)
  # serves a reference run that then matches the killed run exactly, and
  # its caches hold every prompt.
  from leapalign_jax.data import PromptCache

  assert runs["kills"][0].trigger == "world"
  assert len(PromptCache(os.path.join(runs["world"], "cache_train"))) == 16
  assert len(PromptCache(os.path.join(runs["world"], "cache_eval"))) == 4
