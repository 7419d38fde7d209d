"""Training curves: a workdir's ``metrics.jsonl`` as one PNG of panels.

``write_curves(workdir)`` draws the reward (with its per-batch std band),
loss, gradient norm, the method's host-side choices (LeapAlign's k and j,
``choice/*``), the leap weight w (mean with its min/max band) and a few
other keys, each panel only when the run logged its key, and writes
``<workdir>/curves.png`` beside ``metrics.jsonl`` and ``tensorboard/``.
matplotlib is an optional dependency (the ``test`` extra): without it
nothing is drawn and ``write_curves`` returns None.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from leapalign_jax import fileio, metrics

FILE = "curves.png"

# A band of mean ± the key's "<key>_std" companion.
STD_BAND = ("-std", "+std")
# (title, main key or key prefix, optional (low, high) band keys). A prefix
# (ending in "/") draws every key under it in one panel.
PANELS: tuple[tuple[str, str, tuple[str, str] | None], ...] = (
  ("reward (mean ± std over the batch)", "train/reward", STD_BAND),
  ("loss", "train/loss", None),
  ("gradient norm", "train/grad_norm", None),
  ("host choices (k, j, ...)", "choice/", None),
  (
    "leap weight w (mean, min-max)",
    "leap/w_mean",
    ("leap/w_min", "leap/w_max"),
  ),
  ("GRPO approx. KL", "grpo/approx_kl", None),
  ("GRPO clip fraction", "grpo/clipfrac", None),
  ("seconds per step", "perf/step_s", None),
)


def have_matplotlib() -> bool:
  """Whether matplotlib can be imported (it is optional)."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return False
  return True


def _series(records: list[dict[str, Any]], key: str):
  """``(steps, values)`` of the records holding a finite number at ``key``."""
  pts = [
    (r["step"], float(r[key]))
    for r in records
    if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
  ]
  pts = [(s, v) for s, v in pts if math.isfinite(v)]
  if not pts:
    return None
  steps, values = zip(*pts)
  return np.asarray(steps), np.asarray(values)


def panels(records: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
  """``(title, keys)`` of the panels these records can fill, in order."""
  keys = {k for r in records for k in r}
  out = []
  for title, main, _ in PANELS:
    if main.endswith("/"):
      found = sorted(k for k in keys if k.startswith(main))
    else:
      found = [main] if main in keys else []
    found = [k for k in found if _series(records, k) is not None]
    if found:
      out.append((title, found))
  return out


def render(records: list[dict[str, Any]]) -> bytes | None:
  """The curves PNG of metric records (None when there is nothing to draw)."""
  import matplotlib

  matplotlib.use("Agg")  # files only; no display
  from matplotlib import pyplot as plt

  todo = panels(records)
  if not todo:
    return None
  bands = {main: band for _, main, band in PANELS if band}
  cols = min(3, len(todo))
  rows = math.ceil(len(todo) / cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False
  )
  for ax, (title, keys) in zip(axes.flat, todo):
    for key in keys:
      steps, values = _series(records, key)
      ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
      band = _band(records, key, bands.get(key))
      if band is not None:
        ax.fill_between(band[0], band[1], band[2], alpha=0.25)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    if len(keys) > 1:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(todo) :]:
    ax.axis("off")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  return buffer.getvalue()


def _band(records, key: str, band: tuple[str, str] | None):
  """``(steps, low, high)`` of a panel's shaded band, when logged."""
  if band is None:
    return None
  lo_key, hi_key = (
    (key, f"{key}_std") if band == STD_BAND else (band[0], band[1])
  )
  rows = [r for r in records if lo_key in r and hi_key in r]
  try:  # non-finite steps are logged as "nan" strings: no band then
    a = np.asarray([r[lo_key] for r in rows], float)
    b = np.asarray([r[hi_key] for r in rows], float)
  except (TypeError, ValueError):
    return None
  if not rows:
    return None
  low, high = (a - b, a + b) if band == STD_BAND else (a, b)
  return np.asarray([r["step"] for r in rows]), low, high


def write_curves(workdir: str) -> str | None:
  """Draws ``<workdir>/metrics.jsonl`` into ``<workdir>/curves.png``.

  Returns:
    The PNG's path, or None without matplotlib or without metrics.
  """
  path = fileio.join(workdir, metrics.JSONL)
  if not have_matplotlib() or not fileio.exists(path):
    return None
  png = render(metrics.read_jsonl(path))
  if png is None:
    return None
  out = fileio.join(workdir, FILE)
  fileio.write_bytes(out, png)
  return out
