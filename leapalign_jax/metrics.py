"""Metrics: JSON-lines + TensorBoard event files, clu aggregation, progress.

Only process 0 writes. ``metrics.jsonl`` gets one line per logged step; on
resume, lines past the restored step (and a torn last line) are dropped first,
so an interrupted and resumed run has exactly the lines of an uninterrupted
one (no gaps, no repeats). The training loop calls ``flush`` before each
checkpoint, so every line and TensorBoard event up to a checkpoint is on disk
before it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metrics as clu_metrics

JSONL = "metrics.jsonl"


def _py(v: Any) -> Any:
  """A JSON-friendly scalar."""
  v = np.asarray(v)
  if v.dtype == np.bool_:
    return bool(v)
  if np.issubdtype(v.dtype, np.integer):
    return int(v)
  f = float(v)
  return f if math.isfinite(f) else str(f)


def truncate_jsonl(path: str, last_step: int) -> None:
  """Drops lines whose ``step`` is greater than ``last_step`` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line)
    except (ValueError, KeyError):
      break  # a torn last line from a killed process
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a JSON-lines file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Writer:
  """JSONL + TensorBoard scalars (process 0 only; others are no-ops)."""

  def __init__(
    self, workdir: str, resume_step: int = 0, tensorboard: bool = True
  ):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, JSONL)
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_jsonl(self.path, resume_step)
    self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
    if tensorboard:
      from tensorboardX import SummaryWriter

      # purge_step: TensorBoard hides the events a killed run wrote past
      # the restored step. The pid suffix keeps two runs started within the
      # same second (tensorboardX names files by the second) from
      # truncating each other's file.
      self._tb = SummaryWriter(
        os.path.join(workdir, "tensorboard"),
        purge_step=resume_step + 1,
        filename_suffix=f".{os.getpid()}",
      )

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _py(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if (
          k != "step"
          and isinstance(v, (int, float))
          and not isinstance(v, bool)
        ):
          self._tb.add_scalar(k, v, step)

  def flush(self) -> None:
    """Pushes buffered lines and TensorBoard events to the files."""
    if not self.enabled:
      return
    self._file.flush()
    os.fsync(self._file.fileno())
    if self._tb is not None:
      self._tb.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, step)

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def window_to_json(window: list[Mapping[str, Any]]) -> list[dict]:
  """An unfinished logging window as JSON (for the checkpoint's meta)."""
  return [{k: _py(v) for k, v in r.items()} for r in window]


def window_from_json(window: list[Mapping[str, Any]]) -> list[dict]:
  """Inverse of ``window_to_json`` (``_py`` writes NaN / Inf as strings)."""
  return [
    {k: float(v) if isinstance(v, str) else v for k, v in r.items()}
    for r in window
  ]


def summarize(window: list[Mapping[str, Any]]) -> dict[str, Any]:
  """One record for a logging window of per-step records.

  Float metrics are averaged over the window with ``clu.metrics.Average``;
  integers and booleans (the method's choices, counters, the finite flag) are
  those of the last step. With ``train.log_every_steps=1`` this is the step's
  own record.
  """
  out: dict[str, Any] = {}
  for key, last in window[-1].items():
    value = np.asarray(last)
    if not np.issubdtype(value.dtype, np.floating):
      out[key] = last
      continue
    avg = None
    for r in window:
      if key in r:
        m = clu_metrics.Average.from_model_output(
          np.asarray(r[key], np.float32)
        )
        avg = m if avg is None else avg.merge(m)
    out[key] = float(avg.compute())
  return out


class StepTimer:
  """Wall time per step and images/s, excluding the first (compile) step."""

  def __init__(self, global_batch: int):
    self.global_batch = global_batch
    self.last = None

  def tick(self) -> dict[str, float]:
    now = time.perf_counter()
    out = {}
    if self.last is not None:
      dt = now - self.last
      out = {"perf/step_s": dt, "perf/images_per_s": self.global_batch / dt}
    self.last = now
    return out
