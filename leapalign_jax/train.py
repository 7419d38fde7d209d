"""``train_and_evaluate``: the whole run, resumable from its workdir.

Order: workdir lock and config check → world preparation (digits / random
worlds build their artefacts first) → mesh → frozen models and the Flux
state, created sharded → ``config.json`` → resume (latest checkpoint in the
workdir) → the jitted step in a loop with metrics, checkpoints, sample
grids, SIGTERM handling → final checkpoint, export, evaluation.

Crash safety (SIGKILL at any moment, then the same command): the checkpoint
holds the params, EMA, optimizer state, step and PRNG key, plus the metrics
of the unfinished logging window; the data position and the host-side
choices are pure functions of (seed, step). So the resumed run repeats the
uninterrupted one bit for bit. Checkpoints are renamed into place when
complete, ``metrics.jsonl`` is cut back to the restored step, exports and
evaluation folders are swapped in whole. Nothing is written to the workdir
before the setup has succeeded, so a start with bad input leaves an
existing run untouched. SIGTERM: see ``preemption``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from leapalign_jax import checkpoint as ckpt_lib
from leapalign_jax import data as data_lib
from leapalign_jax import errors, fileio, locks, sharding, utils
from leapalign_jax import metrics as metrics_lib
from leapalign_jax import step as step_lib
from leapalign_jax.preemption import Preemption
from leapalign_jax.rewards import nondiff as rewards_nondiff

_LOG = logging.getLogger(__name__)

UserError = errors.UserError
NonFiniteError = errors.NonFiniteError


# Config fields that may differ between two runs sharing a workdir (a resume
# with a longer schedule, more logging, ...).
RESUMABLE_FIELDS = (
  "train.num_steps",
  "train.overwrite",
  "train.log_every_steps",
  "train.ckpt_every_steps",
  "train.ckpt_every_secs",
  "train.sample_every_steps",
  "train.keep_checkpoints",
  "train.max_consecutive_nonfinite",
  "debug",
  "eval",
)


def config_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON, minus fields a resume may change."""
  flat = utils.flatten_dict(json.loads(config.to_json_best_effort()))
  return {
    k: v
    for k, v in flat.items()
    if not any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)
  }


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Refuses a workdir holding a run of a different config.

  Writes nothing (``write_config`` does, once the setup has succeeded).

  Returns:
    True when the workdir holds another config's run and
    ``train.overwrite`` allows replacing it.
  """
  path = fileio.join(workdir, "config.json")
  if fileio.exists(path):
    try:
      old = json.loads(fileio.read_text(path))
    except ValueError:
      raise UserError(
        f"{path} is not valid JSON (edited by hand?); restore it, or move "
        "the workdir aside and start a new run"
      ) from None
    new = config_fingerprint(config)
    old_fp = {
      k: v
      for k, v in utils.flatten_dict(old).items()
      if not any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)
    }
    diff = sorted(
      k for k in set(new) | set(old_fp) if new.get(k) != old_fp.get(k)
    )
    if diff:
      if not config.train.overwrite:
        shown = ", ".join(
          f"{k}: {old_fp.get(k)!r} -> {new.get(k)!r}" for k in diff[:4]
        )
        raise UserError(
          f"workdir {workdir} holds a run with a different config ({shown}"
          f"{', ...' if len(diff) > 4 else ''}); use a new --workdir, or pass "
          "--config.train.overwrite=True to start over there"
        )
      return True
  return False


def write_config(
  config: ml_collections.ConfigDict, workdir: str, move_aside: bool
) -> None:
  """Writes ``config.json`` (process 0), first moving an old run aside.

  With ``move_aside`` (``train.overwrite`` over another config's run) the
  old run's checkpoints, metrics and outputs are renamed, not deleted.
  """
  if jax.process_index() != 0:
    return
  if move_aside:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (
      "checkpoints",
      "metrics.jsonl",
      "tensorboard",
      "export",
      "eval",
      "samples",
      "config.json",
    ):
      p = fileio.join(workdir, name)
      if fileio.exists(p):
        fileio.move(p, f"{p}.old-{stamp}")
  fileio.makedirs(workdir)
  fileio.write_text(
    fileio.join(workdir, "config.json"),
    config.to_json_best_effort(indent=2, sort_keys=True),
  )


def batch_arithmetic(global_batch: int, mesh) -> str:
  """One line: the batch per host, per device group, per device; the mesh."""
  blocks = sharding.num_batch_blocks(
    mesh, sharding.batch_size_per_device_group(mesh)
  )
  groups = sharding.batch_size_per_device_group(mesh)
  slices = sharding.num_slices(list(mesh.devices.flat))
  return (
    f"global batch {global_batch} = {blocks} host block(s) x "
    f"{global_batch // blocks} ({jax.process_count()} process(es)); "
    f"{groups} data x fsdp groups x {global_batch // groups} per group "
    f"(replicated over tensor={mesh.shape['tensor']}); mesh "
    f"{dict(mesh.shape)} over {mesh.devices.size} devices"
    + (f", {slices} slices" if slices > 1 else "")
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training, then evaluation; returns the final record.

  Raises:
    UserError: bad input; nothing in the workdir was changed.
    NonFiniteError: too many consecutive non-finite steps (state saved).
  """
  from leapalign_jax import methods

  # Checked before the workdir is touched (the lock creates it).
  errors.as_user_error("config.method", methods.get, config.method)
  with Preemption() as preempt, locks.workdir_lock(workdir):
    return _train_and_evaluate(config, workdir, preempt)


def _train_and_evaluate(config, workdir: str, preempt: Preemption) -> dict:
  from leapalign_jax import components, eval_table, evaluation, methods, worlds
  from leapalign_jax import export as export_lib

  started = time.monotonic()

  move_aside = check_workdir(config, workdir)
  given = config  # config.json records the config as given
  config = worlds.prepare(config, workdir)
  mesh = errors.as_user_error(
    "config.mesh", sharding.mesh_from_config, config.mesh
  )
  try:
    sharding.check_batch(config.data.global_batch, mesh)
  except ValueError as e:
    raise UserError(f"data.global_batch: {e}") from None
  _LOG.info(batch_arithmetic(config.data.global_batch, mesh))

  comps = components.load(config, mesh)
  method = methods.get(config.method)
  # Direct-gradient methods refuse a reward without a gradient.
  rewards_nondiff.check_gradient(
    config.method, method.make_step is None, comps.reward
  )
  # The method's host-side options (draft.k, leap.step_range, ...).
  errors.as_user_error(
    f"method {config.method}",
    step_lib.host_choice,
    config,
    method,
    0,
    comps.sigmas,
  )
  write_config(given, workdir, move_aside)
  tx = step_lib.make_optimizer(config.optim)
  state = comps.init_state(tx)
  checkpointer = ckpt_lib.Checkpointer(
    fileio.join(workdir, "checkpoints"),
    config.train.keep_checkpoints,
    cleanup_tmp=True,
  )
  state, meta = ckpt_lib.resume(checkpointer, state)
  start = int(meta["step"])
  if start == 0 and jax.process_index() == 0:
    comps.log_parameter_overview(state)

  writer = metrics_lib.Writer(workdir, resume_step=start)
  train_step = step_lib.jit_train_step(
    config,
    comps.step_fns,
    tx,
    comps.sigmas,
    jax.tree.map(lambda x: x.sharding, state),
    jax.tree.map(lambda x: x.sharding, comps.frozen),
    mesh,
  )
  dataset = comps.train_batches()
  timer = metrics_lib.StepTimer(config.data.global_batch)
  num_steps = config.train.num_steps
  step = start
  stopped_early = None
  progress = _progress(start, num_steps)
  # Records since the last log line; saved with the checkpoints so that a
  # resumed run averages the same steps into its next line.
  window = metrics_lib.window_from_json(meta.pop("window", []))

  last_save = [time.monotonic()]

  def save(step_now):
    last_save[0] = time.monotonic()
    if checkpointer.latest_step() == step_now:
      return
    # Metric lines up to ``step_now`` are on disk before the checkpoint.
    writer.flush()
    checkpointer.save(
      step_now,
      state,
      {
        **meta,
        "step": step_now,
        "data_position": step_now,
        "window": metrics_lib.window_to_json(window),
      },
    )

  every_s = config.train.get("ckpt_every_secs", 0) or 0
  if start >= num_steps:
    _LOG.info(
      "progress: the run is complete (step %d of %d); export and evaluation",
      start,
      num_steps,
    )
  with preempt.deferred():
    while step < num_steps:
      choice = step_lib.host_choice(config, method, step, comps.sigmas)
      element = dataset[step]
      data_lib.trace(step, element)
      batch = sharding.put_batch(comps.batch_to_arrays(element), mesh)
      choice_arr = {k: np.int32(v) for k, v in choice.items()}
      state, m = train_step(state, comps.frozen, batch, choice_arr)
      step += 1
      m = jax.device_get(m)
      finite = bool(m.pop("train/finite"))
      if finite:
        meta["nonfinite_run"] = 0
      else:
        meta["nonfinite_run"] += 1
        meta["nonfinite_total"] += 1
        _LOG.warning(
          "step %d: non-finite loss/gradient (%s, loss=%s, reward=%s); "
          "update skipped, %d in a row (stop at %d)",
          step,
          _format_choice(choice),
          m["train/loss"],
          m["train/reward"],
          meta["nonfinite_run"],
          config.train.max_consecutive_nonfinite,
        )
      record = {
        **m,
        **timer.tick(),
        **{f"choice/{k}": v for k, v in choice.items()},
        "train/finite": finite,
      }
      record["train/nonfinite_total"] = meta["nonfinite_total"]
      window.append(record)
      if step % config.train.log_every_steps == 0 or step == num_steps:
        writer.write(step, metrics_lib.summarize(window))
        window.clear()
      progress.update(step, record)
      if step == start + 1:
        # Every process: what launch/worker.sh waits for before "started".
        _LOG.info(
          "progress: step %d of %d done (the first of this start, %.0f s "
          "after it)",
          step,
          num_steps,
          time.monotonic() - started,
        )
      if meta["nonfinite_run"] >= config.train.max_consecutive_nonfinite:
        stopped_early = _nonfinite_message(config, meta, step, record, workdir)
        break
      # Time-based checkpoints bound the work a preemption with no warning
      # (or a Spot VM's ~30 s one, too short for a save) can lose.
      stop, due = preempt.at_boundary(
        every_s > 0 and time.monotonic() - last_save[0] >= every_s
      )
      if stop:
        break
      if due or step % config.train.ckpt_every_steps == 0 or step == num_steps:
        save(step)
      if (
        config.train.sample_every_steps
        and step % config.train.sample_every_steps == 0
      ):
        evaluation.sample_grid(comps, state, step, workdir)
    progress.close()
    save(step)
    writer.close()
    checkpointer.close()
  if stopped_early:
    raise NonFiniteError(stopped_early)
  if preempt.requested and step < num_steps:
    _LOG.warning("preempted at step %d; checkpoint written, exiting", step)
    return {"step": step, "preempted": True}
  if config.export.enabled:
    export_lib.export_run(comps, state["ema"], fileio.join(workdir, "export"))
  _write_curves(workdir)
  record = evaluation.after_training(config, workdir, comps, state)
  if record["after"] is not None:
    # eval/table.md: the paper's table, base (when evaluated) and EMA rows.
    rows = [("base", "base", record["before"])] if record["before"] else []
    rows.append(("ema", workdir, record["after"]))
    eval_table.write_table(rows, config, fileio.join(workdir, "eval"))
  return record


def _write_curves(workdir: str) -> None:
  """``curves.png`` beside ``metrics.jsonl`` (process 0; needs matplotlib)."""
  from leapalign_jax import plots

  if jax.process_index() != 0:
    return
  if not plots.have_matplotlib():
    _LOG.info("no curves.png: matplotlib is not installed")
    return
  path = plots.write_curves(workdir)
  if path:
    _LOG.info("training curves: %s", path)


def _format_choice(choice: dict[str, int]) -> str:
  return " ".join(f"{k}={v}" for k, v in choice.items())


def _nonfinite_message(config, meta: dict, step: int, record, workdir) -> str:
  """The one line a run stopped by non-finite steps ends with."""
  n = meta["nonfinite_run"]
  choice = {
    k.removeprefix("choice/"): v
    for k, v in record.items()
    if k.startswith("choice/")
  }
  return (
    f"{n} consecutive non-finite steps ({step - n + 1}..{step}; last: "
    f"{_format_choice(choice)}, loss={record['train/loss']}, "
    f"reward={record['train/reward']}); the parameters of step {step - n} "
    f"(the last finite update) are saved in {workdir}/checkpoints as step "
    f"{step}. To fix: lower optim.lr (now {config.optim.lr}) or "
    f"optim.clip_norm (now {config.optim.clip_norm}) and start in a new "
    "--workdir, or check the reward model and prompts for NaNs; rerunning "
    "the same command continues with the next batches (raise "
    "train.max_consecutive_nonfinite, now "
    f"{config.train.max_consecutive_nonfinite}, to tolerate more)"
  )


def _progress(start: int, total: int):
  """Rate and ETA on process 0: a tqdm bar, or ``progress:`` log lines.

  A terminal gets the bar; a log file (not a terminal) gets a line a
  minute instead of the bar's redraws. A no-op on other processes.
  """

  class _Bar:
    def __init__(self):
      self.bar = None
      self.lines = None
      if jax.process_index() != 0:
        return
      if sys.stderr.isatty():
        from tqdm import tqdm

        self.bar = tqdm(
          total=total, initial=start, unit="step", dynamic_ncols=True
        )
      else:
        self.lines = metrics_lib.Progress(total, start, "step", log=_LOG)

    def update(self, step, record):
      if self.lines is not None:
        self.lines.update(step)
      if self.bar is None:
        return
      self.bar.n = step
      self.bar.set_postfix(
        loss=f"{record['train/loss']:.4f}",
        reward=f"{record['train/reward']:.4f}",
        refresh=False,
      )
      self.bar.refresh()

    def close(self):
      if self.bar is not None:
        self.bar.close()

  return _Bar()
