"""Held-out evaluator of the digits world (its GenEval): digit, colour, place.

A geometric, non-neural model family, deliberately unlike the CLIP reward, so
that reward hacking shows up as a gap between the two. It is never a training
reward.

  1. Ink: the channel maximum in [0, 1], thresholded softly
     (`clip((v - t) / (1 - t), 0, 1)`), which drops faint background noise;
     then connected specks lighter than a few pixels are erased. The share of
     the ink so discarded, or lying outside the digit window, is reported as
     `stray` (an artefact measure beside the accuracies).
  2. Found: an image counts as showing a digit only if its ink mass is within
     a range learnt from clean renders and most of the ink lies in one
     digit-sized window around the ink centre of mass. Blank canvases, noise
     and scattered speckle are rejected: every attribute is then wrong (-1).
  3. Position: the layout centre nearest the ink centre of mass.
  4. Colour: the palette colour whose RGB direction is closest (cosine) to the
     ink-weighted mean RGB.
  5. Digit: the ink in a window around the centre of mass, deskewed (second
     moments) and pooled to a 10x10 map, L2-normalised; a k-nearest-neighbour
     vote over the same features of renders of the training split (one clean
     and one slightly blurred render per sample).

Its state is a few numpy arrays (reference features and labels, thresholds)
plus the world config, saved as one `.npz` without pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from leapalign_jax.worlds import digits

ATTRIBUTES = ("digit", "colour", "position")
# Ink threshold on the [0, 1] channel maximum.
_INK_THRESHOLD = 0.25
# Digit features: the window (in digit boxes) pooled to _GRID x _GRID cells.
_WINDOW = 1.25
_GRID = 10
# Rejection: accepted ink mass is [_MASS_LOW, _MASS_HIGH] x the clean
# renders' [1st, 99th] percentiles, and at least _MIN_CONCENTRATION of the
# ink must lie in the window around its centre of mass.
_MASS_LOW, _MASS_HIGH = 0.15, 2.0
_MIN_CONCENTRATION = 0.75
# Connected ink components lighter than this (in full-ink pixels at a 16 px
# digit; scaled with the digit area) are specks, not strokes.
_SPECK_MASS = 3.0
# Blur (sigma in px at a 16 px digit) of the second reference render.
_REF_BLUR = (0.5, 1.2)


def ink_map(images_NHWC: np.ndarray) -> np.ndarray:
  """Soft-thresholded ink [N, H, W] in [0, 1] of images in [-1, 1]."""
  value = np.clip((np.asarray(images_NHWC) + 1.0) / 2.0, 0.0, 1.0).max(-1)
  return np.clip((value - _INK_THRESHOLD) / (1.0 - _INK_THRESHOLD), 0.0, 1.0)


def remove_specks(ink_NHW: np.ndarray, min_mass: float) -> np.ndarray:
  """Erases 8-connected ink components of total ink below `min_mass`."""
  out = np.array(ink_NHW, copy=True)
  structure = np.ones((3, 3), bool)
  for i, ink in enumerate(ink_NHW):
    labels, count = ndimage.label(ink > 0, structure=structure)
    if count == 0:
      continue
    mass = ndimage.sum_labels(ink, labels, np.arange(1, count + 1))
    small = np.concatenate([[False], mass < min_mass])
    out[i][small[labels]] = 0.0
  return out


def _speck_mass(config: digits.DigitsConfig) -> float:
  return _SPECK_MASS * (config.digit_size / 16) ** 2


def _moments(ink_NHW: np.ndarray) -> tuple[np.ndarray, ...]:
  """Mass [N], centre of mass [N, 2] and skew (mu11 / mu02) [N]."""
  h, w = ink_NHW.shape[1:]
  mass = ink_NHW.sum((1, 2))
  safe = np.maximum(mass, 1e-6)
  rows = np.arange(h, dtype=np.float64)[None, :, None]
  cols = np.arange(w, dtype=np.float64)[None, None, :]
  cy = (ink_NHW * rows).sum((1, 2)) / safe
  cx = (ink_NHW * cols).sum((1, 2)) / safe
  dy = rows - cy[:, None, None]
  dx = cols - cx[:, None, None]
  mu02 = (ink_NHW * dy**2).sum((1, 2)) / safe
  mu11 = (ink_NHW * dy * dx).sum((1, 2)) / safe
  skew = np.clip(mu11 / np.maximum(mu02, 1e-6), -1.0, 1.0)
  return mass, np.stack([cy, cx], axis=1), skew


def _bilinear(img_NHW: np.ndarray, rows: np.ndarray, cols: np.ndarray):
  """Samples img at [N, G, G] coordinates; zero outside the image."""
  n, h, w = img_NHW.shape
  r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
  fr, fc = rows - r0, cols - c0
  batch = np.arange(n)[:, None, None]
  out = np.zeros(rows.shape)
  for dr, wr in ((0, 1 - fr), (1, fr)):
    for dc, wc in ((0, 1 - fc), (1, fc)):
      r, c = r0 + dr, c0 + dc
      inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
      vals = img_NHW[batch, np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)]
      out += vals * inside * wr * wc
  return out


def _window_side(config: digits.DigitsConfig) -> float:
  return _WINDOW * config.digit_size * (1 + config.scale_jitter)


def digit_features(
  config: digits.DigitsConfig, ink_NHW: np.ndarray
) -> np.ndarray:
  """Deskewed, centred, pooled ink maps [N, _GRID**2], unit L2 norm."""
  _, com, skew = _moments(ink_NHW)
  n, side = len(ink_NHW), 2 * _GRID
  offsets = (np.arange(side) - (side - 1) / 2) * _window_side(config) / side
  dy = offsets[None, :, None]
  dx = offsets[None, None, :]
  rows = com[:, 0, None, None] + dy + 0.0 * dx
  cols = com[:, 1, None, None] + dx + skew[:, None, None] * dy
  pooled = _bilinear(ink_NHW, rows, cols)
  pooled = pooled.reshape(n, _GRID, 2, _GRID, 2).mean((2, 4)).reshape(n, -1)
  norm = np.linalg.norm(pooled, axis=1, keepdims=True)
  return (pooled / np.maximum(norm, 1e-6)).astype(np.float32)


def _concentration(
  config: digits.DigitsConfig, ink_NHW: np.ndarray, com: np.ndarray
) -> np.ndarray:
  """Fraction of the ink inside the digit window around its centre."""
  half = _window_side(config) / 2
  h, w = ink_NHW.shape[1:]
  in_rows = np.abs(np.arange(h)[None, :] - com[:, :1]) <= half
  in_cols = np.abs(np.arange(w)[None, :] - com[:, 1:]) <= half
  inside = (ink_NHW * in_rows[:, :, None] * in_cols[:, None, :]).sum((1, 2))
  return inside / np.maximum(ink_NHW.sum((1, 2)), 1e-6)


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluator:
  """Fitted evaluator; build it with `fit` or `Evaluator.load`.

  Attributes:
    config: the world it judges.
    ref_features: float32 [M, _GRID**2] digit features of the training
      renders (clean and blurred).
    ref_labels: int32 [M] their digits.
    mass_range: float [2] accepted ink mass.
    k: neighbours in the digit vote.
  """

  config: digits.DigitsConfig
  ref_features: np.ndarray
  ref_labels: np.ndarray
  mass_range: np.ndarray
  k: int = 3

  def _knn_digit(self, feats: np.ndarray) -> np.ndarray:
    """Majority vote of the k most similar references (ties: nearest)."""
    sims = feats @ self.ref_features.T
    top = np.argpartition(-sims, self.k - 1, axis=1)[:, : self.k]
    order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, 1)
    votes = np.zeros((len(feats), digits.NUM_DIGITS))
    for j in range(self.k):
      # Slightly larger weight for nearer neighbours breaks ties.
      votes[np.arange(len(feats)), self.ref_labels[top[:, j]]] += 1 - 1e-3 * j
    return votes.argmax(1).astype(np.int32)

  def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Classifies images [N, H, W, 3] in [-1, 1].

    Returns:
      int32 arrays [N] `digit`, `colour`, `position` (ids of the config; -1
      where no digit was found), bool `found`, and float32 `stray`: the share
      of the ink that is specks or lies outside the digit window (0 for
      clean renders and for blank images).
    """
    images = np.asarray(images, np.float32)
    size = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"Expected [N, {size}, {size}, 3], got {images.shape}.")
    raw = ink_map(images)
    ink = remove_specks(raw, _speck_mass(self.config))
    mass, com, _ = _moments(ink)
    inside = _concentration(self.config, ink, com)
    found = (
      (mass >= self.mass_range[0])
      & (mass <= self.mass_range[1])
      & (inside >= _MIN_CONCENTRATION)
    )
    stray = 1.0 - inside * mass / np.maximum(raw.sum((1, 2)), 1e-6)
    centres = digits.position_centres(self.config)
    dist = np.linalg.norm(com[:, None, :] - centres[None], axis=-1)
    rgb = np.clip((images + 1.0) / 2.0, 0.0, 1.0)
    mean_rgb = (rgb * ink[..., None]).sum((1, 2))
    pal = digits.palette(self.config)
    pal = pal / np.linalg.norm(pal, axis=1, keepdims=True)
    out = {
      "digit": self._knn_digit(digit_features(self.config, ink)),
      "colour": (mean_rgb @ pal.T).argmax(1).astype(np.int32),
      "position": dist.argmin(1).astype(np.int32),
    }
    out = {k: np.where(found, v, -1).astype(np.int32) for k, v in out.items()}
    out["found"] = found
    out["stray"] = np.where(raw.sum((1, 2)) > 0, stray, 0.0).astype(np.float32)
    return out

  def accuracy(
    self,
    images: np.ndarray,
    records: Sequence[Mapping[str, Any]] | digits.PromptSet,
  ) -> dict[str, float]:
    """Accuracy of images against the attributes their prompts asked for.

    Args:
      images: [N, H, W, 3] in [-1, 1].
      records: `prompt_records` dicts (or a `PromptSet`) in image order.

    Returns:
      `digit`, `colour`, `position`, `all` (every attribute right), `found`
      (fraction with a digit found) and `stray` (mean stray-ink share).
    """
    per = self.judge(images, records)
    return {k: float(v.mean()) for k, v in per.items() if k != "verdict"}

  def judge(
    self,
    images: np.ndarray,
    records: Sequence[Mapping[str, Any]] | digits.PromptSet,
  ) -> dict[str, Any]:
    """Per-image verdicts: `accuracy` 's keys as [N] arrays, plus `verdict`.

    `verdict` is one short line per image for image captions: "ok" or
    "no", then what the evaluator saw (e.g. "no: saw 3 red left"), or
    "no: no digit found".
    """
    pred = self.predict(images)
    want = digits.record_ids(self.config, records)
    hits = {a: pred[a] == want[a] for a in ATTRIBUTES}
    hits["all"] = np.logical_and.reduce([hits[a] for a in ATTRIBUTES])
    out: dict[str, Any] = {k: v.astype(np.float64) for k, v in hits.items()}
    out["found"] = pred["found"].astype(np.float64)
    out["stray"] = pred["stray"]
    names = {
      "digit": [str(d) for d in range(digits.NUM_DIGITS)],  # short: "7"
      "colour": self.config.colours,
      "position": self.config.positions,
    }
    verdicts = []
    for i in range(len(pred["found"])):
      mark = "ok" if hits["all"][i] else "no"
      if not pred["found"][i]:
        verdicts.append(f"{mark}: no digit found")
        continue
      seen = " ".join(names[a][pred[a][i]] for a in ATTRIBUTES)
      verdicts.append(f"{mark}: saw {seen}")
    out["verdict"] = verdicts
    return out

  def save(self, path: str | os.PathLike) -> None:
    """Writes the evaluator as one `.npz` (no pickle)."""
    meta = {"config": self.config.to_dict(), "k": self.k}
    tmp = f"{os.fspath(path)}.tmp.npz"
    np.savez(
      tmp,
      meta=np.array(json.dumps(meta)),
      ref_features=self.ref_features,
      ref_labels=self.ref_labels,
      mass_range=self.mass_range,
    )
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> Evaluator:
    """Reads an evaluator written by `save`."""
    with np.load(path, allow_pickle=False) as f:
      meta = json.loads(str(f["meta"]))
      return cls(
        config=digits.DigitsConfig.from_dict(meta["config"]),
        ref_features=f["ref_features"],
        ref_labels=f["ref_labels"],
        mass_range=f["mass_range"],
        k=int(meta["k"]),
      )


def fit(
  seed: int = 0,
  config: digits.DigitsConfig | None = None,
  k: int = 3,
) -> Evaluator:
  """Fits the evaluator on renders of the training split.

  Each training digit is rendered twice (random colour, position, jitter):
  once clean, once with a slight Gaussian blur, so that smooth generator
  output is not mistaken for another digit. Deterministic for a given seed
  and config; takes under a second.

  Args:
    seed: seeds the renders.
    config: the world; default `DigitsConfig()`.
    k: neighbours in the digit vote.

  Returns:
    The evaluator.
  """
  config = config or digits.DigitsConfig()
  rng = np.random.default_rng(seed)
  source = np.tile(digits.split_indices("train"), 2)
  colour = rng.integers(0, len(config.colours), size=len(source))
  position = rng.integers(0, len(config.positions), size=len(source))
  images = digits.render(config, source, colour, position, rng)
  half = len(source) // 2
  clean_ink = ink_map(images[:half])
  sigmas = rng.uniform(*_REF_BLUR, size=half) * config.digit_size / 16
  blurred = np.stack(
    [
      ndimage.gaussian_filter(im, sigma=(s, s, 0))
      for im, s in zip(images[half:], sigmas, strict=True)
    ]
  )
  ink = np.concatenate([clean_ink, ink_map(blurred)])
  ink = remove_specks(ink, _speck_mass(config))
  low, high = np.percentile(ink[:half].sum((1, 2)), [1, 99])
  return Evaluator(
    config=config,
    ref_features=digit_features(config, ink),
    ref_labels=digits.load_split("all")[1][source].astype(np.int32),
    mass_range=np.array([_MASS_LOW * low, _MASS_HIGH * high]),
    k=k,
  )


def degrade(
  images: np.ndarray,
  kind: str,
  level: float,
  rng: digits.RngLike,
) -> np.ndarray:
  """Applies a generator-like artefact to images in [-1, 1].

  Args:
    images: [N, H, W, 3] in [-1, 1].
    kind: "blur" (Gaussian, sigma = level px), "noise" (additive Gaussian,
      sigma = level), "speckle" (a fraction `level` of pixels set to random
      colours) or "fade" (ink contrast scaled by `level`).
    level: strength, as above.
    rng: Generator or seed.

  Returns:
    float32 images in [-1, 1].
  """
  rng = digits.as_rng(rng)
  x = np.asarray(images, np.float32)
  if kind == "blur":
    out = ndimage.gaussian_filter(x, sigma=(0, level, level, 0))
  elif kind == "noise":
    out = x + level * rng.standard_normal(x.shape)
  elif kind == "speckle":
    hit = rng.random(x.shape[:3]) < level
    out = np.where(hit[..., None], rng.uniform(-1, 1, x.shape), x)
  elif kind == "fade":
    out = (x + 1.0) * level - 1.0
  else:
    raise ValueError(f"Unknown degradation {kind!r}.")
  return np.clip(out, -1.0, 1.0).astype(np.float32)


# (kind, level) pairs of `degradation_report`.
REPORT_DEGRADATIONS = (
  ("blur", 0.5),
  ("blur", 1.0),
  ("blur", 1.5),
  ("noise", 0.1),
  ("noise", 0.2),
  ("noise", 0.3),
  ("speckle", 0.01),
  ("speckle", 0.03),
  ("speckle", 0.1),
  ("fade", 0.7),
  ("fade", 0.5),
)


def degradation_report(
  evaluator: Evaluator, n: int = 3000, seed: int = 7
) -> dict[str, dict[str, float]]:
  """Accuracies on clean and degraded held-out renders and on fakes.

  Args:
    evaluator: the evaluator to check.
    n: number of test-split renders (uniform attribute mixture).
    seed: seeds the renders and the degradations.

  Returns:
    Condition name (e.g. "clean", "blur 1.0", "blank") -> `accuracy` dict.
  """
  rng = np.random.default_rng(seed)
  batch = digits.sample_batch(evaluator.config, n, rng, split="test")
  ps, images = batch.prompt_set, batch.images
  blank = -np.ones_like(images)
  conditions = {"clean": images}
  for kind, level in REPORT_DEGRADATIONS:
    conditions[f"{kind} {level}"] = degrade(images, kind, level, rng)
  conditions["blank"] = blank
  conditions["uniform noise"] = rng.uniform(-1, 1, images.shape)
  conditions["speckle 0.05 on blank"] = degrade(blank, "speckle", 0.05, rng)
  return {k: evaluator.accuracy(v, ps) for k, v in conditions.items()}
