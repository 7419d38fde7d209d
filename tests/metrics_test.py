"""The metrics writer: what a killed and resumed run leaves on disk."""

import json
import os

import crash_harness as ch

from leapalign_jax import metrics


def _write(workdir, resume_step, steps, value):
  w = metrics.Writer(str(workdir), resume_step=resume_step)
  for s in steps:
    w.write(s, {"train/loss": value + s, "flag": True})
  w.flush()
  return w  # not closed: as if the process were killed now


def test_flushed_events_survive_a_kill_and_a_resume_hides_later_ones(
  tmp_path,
):
  killed = _write(tmp_path, 0, [1, 2, 3, 4], 0.0)
  # Killed after step 4; the checkpoint it resumes from is step 2.
  assert ch.tensorboard_scalars(str(tmp_path)) == {
    "train/loss": {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
  }
  resumed = _write(tmp_path, 2, [3, 4, 5], 10.0)
  assert ch.tensorboard_scalars(str(tmp_path)) == {
    "train/loss": {1: 1.0, 2: 2.0, 3: 13.0, 4: 14.0, 5: 15.0}
  }
  with open(tmp_path / metrics.JSONL) as f:
    lines = [json.loads(line) for line in f]
  assert [d["step"] for d in lines] == [1, 2, 3, 4, 5]
  assert [d["train/loss"] for d in lines] == [1.0, 2.0, 13.0, 14.0, 15.0]
  assert len(os.listdir(tmp_path / "tensorboard")) == 2
  killed.close()
  resumed.close()


def test_a_torn_jsonl_line_is_dropped_on_resume(tmp_path):
  path = tmp_path / metrics.JSONL
  path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
  metrics.truncate_jsonl(str(path), last_step=5)
  assert metrics.read_jsonl(str(path)) == [
    {"step": 1, "a": 1},
    {"step": 2, "a": 2},
  ]
