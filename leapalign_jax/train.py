"""``train_and_evaluate``: the whole run, resumable from its workdir.

Order: workdir checks and ``config.json`` → world preparation (digits /
random worlds build their artefacts first) → mesh → frozen models and the
Flux state, created sharded → resume (latest checkpoint in the workdir) →
the jitted step in a loop with metrics, checkpoints, sample grids, SIGTERM
handling → final checkpoint, export, evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from leapalign_jax import checkpoint as ckpt_lib
from leapalign_jax import metrics as metrics_lib
from leapalign_jax import sharding
from leapalign_jax import step as step_lib

_LOG = logging.getLogger(__name__)


class UserError(ValueError):
  """Bad input from the user: reported as one line, exit status 2."""


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps; the last good state is saved."""


# Config fields that may differ between two runs sharing a workdir (a resume
# with a longer schedule, more logging, ...).
RESUMABLE_FIELDS = (
  "train.num_steps",
  "train.overwrite",
  "train.log_every_steps",
  "train.ckpt_every_steps",
  "train.sample_every_steps",
  "train.keep_checkpoints",
  "debug",
  "eval",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON, minus fields a resume may change."""
  flat = _flatten(json.loads(config.to_json_best_effort()))
  return {
    k: v
    for k, v in flat.items()
    if not any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)
  }


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir holding a run of a different config.

  Writes ``config.json`` (process 0). With ``train.overwrite`` the old run's
  checkpoints and metrics are moved aside, not deleted.
  """
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new = config_fingerprint(config)
    old_fp = {
      k: v
      for k, v in _flatten(old).items()
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
      if jax.process_index() == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (
          "checkpoints",
          "metrics.jsonl",
          "tensorboard",
          "config.json",
        ):
          p = os.path.join(workdir, name)
          if os.path.exists(p):
            os.replace(p, f"{p}.old-{stamp}")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


class Preemption:
  """Turns SIGTERM into a flag read at step boundaries."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
      _LOG.warning("SIGTERM: checkpointing at the next step boundary")

    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some notebooks)
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def host_choice(
  config, method, step: int, sigmas: np.ndarray
) -> dict[str, int]:
  """The method's host-side draws for ``step``: a pure function of the seed."""
  rng = np.random.default_rng((config.seed, 114, step))
  return method.sample_choice(rng, len(sigmas) - 1, config, sigmas)


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


def jit_train_step(
  config, step_fns, tx, sigmas, state_shardings, frozen_shardings, mesh
):
  """The jitted train step: the one program both training and ``aot`` build.

  Explicit state shardings keep the state's placement from step to step, so
  one program serves the whole run and a resumed run (restored with the
  same shardings) executes exactly the same program. The batch keeps the
  shardings it arrives with (``sharding.put_batch``); the state is donated.
  """
  step = step_lib.make_train_step(config, step_fns, tx, sigmas)
  return jax.jit(
    sharding.under_rules(step, mesh, config.mesh.rules),
    in_shardings=(state_shardings, frozen_shardings, None, None),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training, then evaluation; returns the final record."""
  from leapalign_jax import components, evaluate, methods

  try:
    methods.get(config.method)
  except ValueError as e:
    raise UserError(str(e)) from None
  check_workdir(config, workdir)
  config = components.prepare_world(config, workdir)
  mesh = sharding.mesh_from_config(config.mesh)
  try:
    sharding.check_batch(config.data.global_batch, mesh)
  except ValueError as e:
    raise UserError(str(e)) from None
  _LOG.info(batch_arithmetic(config.data.global_batch, mesh))

  comps = components.load(config, mesh)
  method = methods.get(config.method)
  tx = step_lib.make_optimizer(config.optim)
  state = comps.init_state(tx)
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints
  )
  start, meta = 0, {"nonfinite_total": 0, "nonfinite_run": 0}
  latest = checkpointer.latest_step()
  if latest is not None:
    state, meta = checkpointer.restore(latest, ckpt_lib.abstract_like(state))
    start = int(meta["step"])
    _LOG.info("resumed from step %d", start)
  elif jax.process_index() == 0:
    comps.log_parameter_overview(state)

  writer = metrics_lib.Writer(workdir, resume_step=start)
  train_step = jit_train_step(
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
  window: list[dict] = []  # records since the last log line

  saved = {"step": start}

  def save(step_now):
    if checkpointer.latest_step() == step_now:
      return
    checkpointer.save(
      step_now, state, {**meta, "step": step_now, "data_position": step_now}
    )
    saved["step"] = step_now

  with Preemption() as preempt:
    while step < num_steps:
      choice = host_choice(config, method, step, comps.sigmas)
      batch = sharding.put_batch(comps.batch_to_arrays(dataset[step]), mesh)
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
          "step %d: non-finite loss/gradient (loss=%s, reward=%s, choice=%s);"
          " update skipped (%d in a row)",
          step,
          m["train/loss"],
          m["train/reward"],
          choice,
          meta["nonfinite_run"],
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
      if meta["nonfinite_run"] >= config.train.max_consecutive_nonfinite:
        stopped_early = (
          f"{meta['nonfinite_run']} consecutive non-finite steps (last at "
          f"step {step}); parameters are those of step "
          f"{step - meta['nonfinite_run']}. Lower optim.lr or check the reward"
        )
        break
      if preempt.requested:
        break
      if step % config.train.ckpt_every_steps == 0 or step == num_steps:
        save(step)
      if (
        config.train.sample_every_steps
        and step % config.train.sample_every_steps == 0
      ):
        comps.sample_grid(state, step, workdir)
  progress.close()
  save(step)
  writer.close()
  if stopped_early:
    checkpointer.close()
    raise NonFiniteError(stopped_early)
  if preempt.requested and step < num_steps:
    _LOG.warning("preempted at step %d; checkpoint written, exiting", step)
    checkpointer.close()
    return {"step": step, "preempted": True}
  checkpointer.close()
  comps.export(state, workdir)
  return evaluate.after_training(config, workdir, comps, state)


def _progress(start: int, total: int):
  """A tqdm bar with ETA on process 0; a no-op elsewhere."""

  class _Bar:
    def __init__(self):
      self.bar = None
      if jax.process_index() == 0:
        from tqdm import tqdm

        self.bar = tqdm(
          total=total, initial=start, unit="step", dynamic_ncols=True
        )

    def update(self, step, record):
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
