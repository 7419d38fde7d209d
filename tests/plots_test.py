"""Training curves (plots, the curves command) and progress lines."""

import json

import pytest
from PIL import Image

from leapalign_jax import curves, metrics, plots

pytest.importorskip("matplotlib")


def _metrics(workdir, n=5):
  with open(workdir / metrics.JSONL, "w") as f:
    for s in range(1, n + 1):
      line = {
        "step": s,
        "train/reward": 0.1 * s,
        "train/reward_std": 0.01,
        "train/loss": 1.0 / s,
        "train/grad_norm": 2.0,
        "choice/k_idx": s % 3,
        "choice/j_idx": s % 2,
        "leap/w_mean": 0.5,
        "leap/w_min": 0.2,
        "leap/w_max": 0.9,
        "train/finite": True,
      }
      if s == 3:  # a non-finite step is logged as a string
        line["train/loss"] = "nan"
      f.write(json.dumps(line) + "\n")


def test_panels_follow_the_logged_keys(tmp_path):
  _metrics(tmp_path)
  records = metrics.read_jsonl(str(tmp_path / metrics.JSONL))
  got = dict((keys[0], keys) for _, keys in plots.panels(records))
  assert set(got) == {
    "train/reward",
    "train/loss",
    "train/grad_norm",
    "choice/j_idx",
    "leap/w_mean",
  }
  assert got["choice/j_idx"] == ["choice/j_idx", "choice/k_idx"]
  assert plots.panels([{"step": 1, "train/finite": True}]) == []


def test_curves_command_writes_a_png(tmp_path, capsys):
  _metrics(tmp_path)
  assert curves.main(["--workdir", str(tmp_path)]) == 0
  path = tmp_path / plots.FILE
  assert capsys.readouterr().out.strip() == str(path)
  with Image.open(path) as img:
    assert img.width > 400 and img.height > 200


def test_curves_command_without_metrics_says_so(tmp_path, capsys):
  assert curves.main(["--workdir", str(tmp_path)]) == 2
  assert "no metrics.jsonl" in capsys.readouterr().err


def test_progress_lines_give_rate_and_eta():
  now = [0.0]
  p = metrics.Progress(100, 0, "step", every_s=60, clock=lambda: now[0])
  assert p.update(1) is None  # the first update (compile) sets the origin
  now[0] = 30.0
  assert p.update(11) is None  # less than every_s since the last line
  now[0] = 61.0
  assert p.update(21) == "progress: step 21 of 100 (3.05 s/step, ETA 4m01s)"
  now[0] = 62.0
  fast = p.update(51, force=True)
  assert fast == "progress: step 51 of 100 (1.24 s/step, ETA 1m01s)"
  q = metrics.Progress(10, 0, "image", clock=lambda: now[0])
  q.update(0)
  now[0] += 1.0
  assert q.update(8, force=True) == (
    "progress: image 8 of 10 (8.00 image/s, ETA 0s)"
  )
