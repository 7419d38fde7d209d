"""``bench/accelerator.py --tiny``: the accelerator benchmark's code on a CPU.

The same sections, programs and JSON as the full-size GPU run, at the tiny
config's sizes; every section must produce numbers (no errors, no skips).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_mode_runs_every_section(tmp_path):
  out = tmp_path / "accelerator_tiny.json"
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "bench", "accelerator.py"),
      "--tiny",
      "--budget-s",
      "1200",
      "--workers",
      "2",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=900,
    cwd=ROOT,
    # The benchmark's code is under test, not XLA's optimiser: compile 2x
    # faster (as crash_harness.command_env does).
    env=dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1"),
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rec = json.loads(out.read_text())
  assert all(c["ok"] for c in rec["attention_check"])
  assert not rec["compile_errors"]
  assert {r["resolution"] for r in rec["forward"]} == {"32", "64"}
  assert all(r["median_s"] > 0 and r["tflops"] > 0 for r in rec["forward"])
  steps = {r["case"]: r for r in rec["train"]}
  assert set(steps) == {
    "leapalign b2",
    "leapalign b1",
    "draft_k b1",
    "drtune b1",
    "full_backprop b1",
  }
  for r in steps.values():
    assert r["s_per_step"] > 0 and r["finite"], r
    assert r["model_tflop"] > 0 and r["hardware_tflop"] >= r["model_tflop"]
    assert r["planned_peak_gib"] > 0
  assert steps["leapalign b2"]["s_per_image"] == (
    steps["leapalign b2"]["s_per_step"] / 2
  )
  for part in ("forward", "vjp", "reward_vjp", "update", "forward_base"):
    assert rec["parts"][part]["median_s"] > 0
  cost = rec["cost_model"]
  assert cost["floor_s"] > 0 and cost["step_over_floor"] > 0
  # The diffusers reference ran in its own process (torch is a test extra).
  assert rec["diffusers"].get("done"), rec["diffusers"]
  assert len(rec["diffusers"]["results"]) == 2
  assert "train step" in proc.stdout  # the printed tables
