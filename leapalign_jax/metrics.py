"""Metrics: JSON-lines + TensorBoard event files, clu aggregation, progress.

Only process 0 writes. ``metrics.jsonl`` gets one line per logged step; on
resume, lines past the restored step (and a torn last line) are dropped first,
so an interrupted and resumed run has exactly the lines of an uninterrupted
one (no gaps, no repeats). The training loop calls ``flush`` before each
checkpoint, so every line and TensorBoard event up to a checkpoint is on disk
before it.

On an object store (a ``gs://`` workdir) nothing can be appended: the lines
are kept on the host and ``metrics.jsonl`` is uploaded whole at each logged
step, and the TensorBoard event file is written on the host's disk and
uploaded whole with it (``fileio``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metrics as clu_metrics

from leapalign_jax import fileio

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


def _kept_lines(text: str, last_step: int) -> list[str]:
  """The lines of ``text`` up to ``last_step`` (a torn last line dropped)."""
  kept = []
  for line in text.splitlines(keepends=True):
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError):
      break  # a torn last line from a killed process
  return kept


def truncate_jsonl(path: str, last_step: int) -> list[str]:
  """Drops lines whose ``step`` is greater than ``last_step`` (atomically).

  Returns:
    The lines kept.
  """
  if not fileio.exists(path):
    return []
  kept = _kept_lines(fileio.read_text(path), last_step)
  fileio.write_text(path, "".join(kept))
  return kept


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a JSON-lines file (local or ``gs://``)."""
  text = fileio.read_text(path)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


class _EventFile:
  """A TensorBoard event file written synchronously.

  tensorboardX's ``SummaryWriter`` queues events for a background thread and
  its ``flush`` does not drain that queue, so events logged just before a
  checkpoint could be lost to a SIGKILL after it. Here every event written
  before ``flush`` is on disk when it returns (the loop flushes before each
  checkpoint).
  """

  def __init__(self, logdir: str, resume_step: int):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2

    self._remote = logdir if fileio.is_remote(logdir) else None
    if self._remote:  # written here, uploaded whole by flush()
      logdir = tempfile.mkdtemp(prefix="leapalign-tensorboard-")
    os.makedirs(logdir, exist_ok=True)
    self._local_dir = logdir
    self._pb = event_pb2
    # TensorBoard reads files in name order and tensorboardX names them by
    # the second: a nanosecond suffix keeps restarts in order even within
    # one second (the pid keeps two processes apart).
    self._writer = EventsWriter(
      os.path.join(logdir, "events"), f".{time.time_ns()}.{os.getpid()}"
    )
    # SessionLog.START at step s: TensorBoard hides the events a killed run
    # wrote at steps >= s, i.e. past the restored step.
    self._write(
      step=resume_step + 1,
      session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
    )

  def _write(self, **fields) -> None:
    self._writer.write_event(self._pb.Event(wall_time=time.time(), **fields))

  def scalar(self, tag: str, value: float, step: int) -> None:
    from tensorboardX import summary

    self._write(step=int(step), summary=summary.scalar(tag, value))

  def text(self, tag: str, text: str, step: int) -> None:
    from tensorboardX import summary

    self._write(step=int(step), summary=summary.text(tag, text))

  def flush(self) -> None:
    self._writer.flush()  # also fsyncs
    if self._remote:
      path = self._writer._file_name  # tensorboardX names the file
      fileio.upload(path, fileio.join(self._remote, os.path.basename(path)))

  def close(self) -> None:
    self.flush()
    self._writer.close()
    if self._remote:
      shutil.rmtree(self._local_dir, ignore_errors=True)


class Writer:
  """JSONL + TensorBoard scalars (process 0 only; others are no-ops)."""

  def __init__(
    self, workdir: str, resume_step: int = 0, tensorboard: bool = True
  ):
    self.enabled = jax.process_index() == 0
    self.path = fileio.join(workdir, JSONL)
    self._tb = None
    self._file = None
    if not self.enabled:
      return
    fileio.makedirs(workdir)
    self._lines = truncate_jsonl(self.path, resume_step)
    if not fileio.is_remote(self.path):
      self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
    if tensorboard:
      self._tb = _EventFile(fileio.join(workdir, "tensorboard"), resume_step)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _py(v) for k, v in scalars.items()}}
    line = json.dumps(record, sort_keys=True) + "\n"
    if self._tb is not None:
      for k, v in record.items():
        if (
          k != "step"
          and isinstance(v, (int, float))
          and not isinstance(v, bool)
        ):
          self._tb.scalar(k, v, step)
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:  # an object store: the whole file, and the events, each time
      self._lines.append(line)
      self.flush()

  def flush(self) -> None:
    """Pushes buffered lines and TensorBoard events to the files."""
    if not self.enabled:
      return
    if self._file is not None:
      self._file.flush()
      os.fsync(self._file.fileno())
    else:
      fileio.write_text(self.path, "".join(self._lines))
    if self._tb is not None:
      self._tb.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.text(tag, text, step)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._file is not None:
      self._file.close()
    else:
      self.flush()
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


def log_to_stderr() -> None:
  """The package's INFO lines on stderr as ``[leapalign] <message>``.

  Commands call it; the launchers grep ``[leapalign] progress:``.
  """
  ours = logging.getLogger("leapalign_jax")
  if not ours.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[leapalign] %(message)s"))
    ours.addHandler(handler)
  ours.setLevel(logging.INFO)
  ours.propagate = False


def _duration(seconds: float) -> str:
  """``1h02m``, ``3m05s`` or ``42s``."""
  s = int(round(seconds))
  if s >= 3600:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  if s >= 60:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s}s"


class Progress:
  """``progress: <unit> n of total (rate, ETA)`` lines, at most every ``every_s``.

  The rate is measured from the first ``update`` on, so the first call's
  compilation does not count. Lines go to ``log`` (a ``logging.Logger``),
  on process 0 only; ``update`` returns the line it logged, else None.
  """

  def __init__(
    self,
    total: int,
    start: int = 0,
    unit: str = "step",
    every_s: float = 60.0,
    log=None,
    clock=time.monotonic,
  ):
    self.total, self.unit, self.every_s = int(total), unit, float(every_s)
    self.log, self.clock = log, clock
    self.enabled = jax.process_index() == 0
    self.first = None  # (n, t) of the first update
    self.last_line = None

  def line(self, n: int) -> str | None:
    """The progress line at ``n`` done (None before a rate is known)."""
    now = self.clock()
    if self.first is None or n <= self.first[0] or now <= self.first[1]:
      return None
    per = (now - self.first[1]) / (n - self.first[0])
    rate = (
      f"{per:.2f} s/{self.unit}" if per >= 1 else f"{1 / per:.2f} {self.unit}/s"
    )
    eta = _duration(per * max(self.total - n, 0))
    return f"progress: {self.unit} {n} of {self.total} ({rate}, ETA {eta})"

  def update(self, n: int, force: bool = False) -> str | None:
    """Logs the line when ``every_s`` passed since the last one (or forced)."""
    if not self.enabled:
      return None
    now = self.clock()
    if self.first is None:
      self.first = (int(n), now)
      self.last_line = now
      return None
    if not force and now - self.last_line < self.every_s:
      return None
    text = self.line(int(n))
    if text is not None:
      self.last_line = now
      if self.log is not None:
        self.log.info(text)
    return text
