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

import concurrent.futures
import os
import re
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
  # Logging windows that straddle checkpoints: a resume must average the
  # same steps into its next line.
  "--config.train.log_every_steps=3",
  "--config.eval.num_prompts=0",
)
LOGGED = [3, 6, 8]
SEED = int(
  os.environ.get("LEAPALIGN_RELIABILITY_SEED")
  or np.random.SeedSequence().entropy % 10**6
)
# One run stopped four times, each start resuming the previous one: SIGKILL
# during the world build, SIGTERM mid-step (twice, the second while the
# first one's checkpoint is written), SIGKILL during a checkpoint write and
# during the final export.
KILL_PLAN = (
  ("world", signal.SIGKILL),
  ("step", signal.SIGTERM),
  ("ckpt_write", signal.SIGKILL),
  ("final", signal.SIGKILL),
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = os.environ.get("LEAPALIGN_TEST_JAX_CACHE") or str(
    tmp_path_factory.mktemp("jax_cache")
  )
  return ch.command_env(cache)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
  """A run stopped by ``KILL_PLAN`` (it also builds the world) + a reference."""
  root = tmp_path_factory.mktemp("runs")
  world, killed, ref = (str(root / n) for n in ("world", "killed", "ref"))
  rng = np.random.default_rng(SEED)
  cmd = ch.train_command(killed, world, *RUN_FLAGS)
  kills, after = [], []
  # The reference and the non-finite run start once the world is complete
  # and use the second core while the stopped run goes on.
  side = concurrent.futures.ThreadPoolExecutor(1)
  jobs = []
  for trigger, sig in KILL_PLAN:
    kills.append(
      ch.start_and_kill(
        cmd,
        env,
        killed,
        world,
        trigger,
        rng,
        num_steps=NUM_STEPS,
        sig=sig,
        repeat_after=0.05 if sig == signal.SIGTERM else None,
      )
    )
    after.append({"latest": ch.latest_step(killed), "lines": _steps(killed)})
    if trigger == "step":  # past the first step: the world is complete
      jobs.append(
        side.submit(ch.run, ch.train_command(ref, world, *RUN_FLAGS), env)
      )
      jobs.append(side.submit(ch.run, _nonfinite_command(root, world), env))
  last = ch.run(cmd, env)
  assert last.returncode == 0, last.stderr[-3000:]
  done, nonfinite = (j.result() for j in jobs)
  side.shutdown()
  assert done.returncode == 0, done.stderr[-3000:]
  return {
    "nonfinite": nonfinite,
    "nonfinite_workdir": str(root / "nonfinite"),
    "world": world,
    "killed": killed,
    "ref": ref,
    "kills": kills,
    "after": after,
    "world_digest": ch.tree_digest(world),
  }


def _nonfinite_command(root, world: str) -> list[str]:
  return ch.train_command(
    str(root / "nonfinite"),
    world,
    "--config.train.num_steps=6",
    "--config.debug.nan_at_steps=(1,2,3)",
    "--config.train.max_consecutive_nonfinite=3",
    "--config.eval.num_prompts=0",
  )


def _steps(workdir: str) -> list[int]:
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return []
  return [d["step"] for d in ch._metrics(workdir)]


def test_sigkill_anywhere_then_resume_is_exact(runs):
  kills = runs["kills"]
  why = f"seed {SEED}: {kills}"
  for k in kills:
    if k.signal == "SIGKILL" and (k.landed or k.trigger != "final"):
      # (The export of the tiny model may finish before "final" fires.)
      assert k.landed and k.exit_status == -signal.SIGKILL, why
  # The ckpt_write kill interrupted a checkpoint being written.
  assert kills[2].mid_write, why
  assert ch.compare_runs(runs["ref"], runs["killed"]) == [], why
  assert _steps(runs["killed"]) == LOGGED, why
  assert ch.leftovers(runs["killed"]) == [], why
  assert ch.latest_step(runs["killed"]) == NUM_STEPS


def test_sigterm_checkpoints_at_a_step_boundary_and_exits_0(runs):
  term, after = runs["kills"][1], runs["after"][1]
  assert term.landed and term.exit_status == 0, term
  assert "preempted at step" in term.stderr_tail, term.stderr_tail
  stopped = int(term.stderr_tail.split("preempted at step ")[1].split(";")[0])
  # The checkpoint is at the step it stopped after, past the last line.
  assert after["latest"] == stopped < NUM_STEPS, (after, term.stderr_tail)
  assert after["lines"] == [s for s in LOGGED if s <= stopped], after


def test_nonfinite_steps_stop_with_one_clear_line(runs):
  out, workdir = runs["nonfinite"], runs["nonfinite_workdir"]
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


@pytest.fixture(scope="module")
def bad_results(bad, runs, env, tmp_path_factory):
  """Every case of the table, two subprocesses at a time."""
  root = tmp_path_factory.mktemp("cases")

  def check(i_name):
    i, name = i_name
    return name, bad_inputs.check(
      name, bad, runs["ref"], RUN_FLAGS, NUM_STEPS, str(root / str(i)), env
    )

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(pool.map(check, enumerate(bad_inputs.CASES)))


@pytest.mark.parametrize("case", list(bad_inputs.CASES))
def test_bad_input_gives_one_clear_line(case, bad_results):
  problems, line = bad_results[case]
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
  # At most one warning per encoder (Flux CLIP, T5, the reward's CLIP;
  # the two CLIPs share the function name).
  warned = re.findall(r"(tokenize_\w+): [^\n]* truncated", out.stderr)
  assert {"tokenize_clip", "tokenize_t5"} <= set(warned), out.stderr
  assert warned.count("tokenize_t5") == 1, out.stderr
  assert warned.count("tokenize_clip") <= 2, out.stderr
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
