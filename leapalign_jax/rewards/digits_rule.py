"""``digits_rule``: the digits world's rule-based reward (GenEval's role).

GenEval scores an image by running a detector and checking its discrete
answers against the prompt's attributes; it has no gradient. This is the
digits world's version: a small classifier, separate from the held-out
evaluator (``worlds/digits_eval.py``, which stays held out), predicts the
digit, colour and position of each image by argmax, and the reward is

- ``score="fraction"`` (default): the fraction of the prompt's three
  attributes it gets right (0, 1/3, 2/3 or 1);
- ``score="all"``: 1 if all three match, else 0.

The classifier (fitted by ``worlds/digits_rule.py``, saved in the world
folder as ``rule.npz``) is three small MLP heads in numpy: the digit from the
2x2-pooled ink map (the brightest channel), the colour from the 4x4-pooled
RGB canvas and the position from the 4x4-pooled ink map, each standardised
and passed through one ReLU layer. It runs on the host through
``jax.pure_callback`` (``nondiff.host_scorer``): the registry marks it
``differentiable=False``, so direct-gradient methods refuse it.

The prompt's attributes come from its prompt ids: the reward reads the ids
of another, text-reading reward (option ``ids``, default ``"clip"``, the
world's CLIP reward; it may have weight 0) and looks each row up in the
table of the world's prompts stored with the classifier. A prompt that is
not in the table raises instead of being scored.

  rewards.rule = {kind: "digits_rule", path: "<world>/rule.npz", ids: "clip"}
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from leapalign_jax.errors import UserError
from leapalign_jax.rewards import base, nondiff

HEADS = ("digit", "colour", "position")
SCORES = ("fraction", "all")
# Average-pooling factor of each head's input (on a 32x32 canvas: 16x16
# ink, 8x8 RGB, 8x8 ink).
POOL = {"digit": 2, "colour": 4, "position": 4}


def _pool(x_NHWC: np.ndarray, k: int) -> np.ndarray:
  n, h, w, c = x_NHWC.shape
  if h % k or w % k:
    raise ValueError(f"images {h}x{w} are not divisible by the pool {k}")
  return x_NHWC.reshape(n, h // k, k, w // k, k, c).mean((2, 4))


def head_inputs(images_NHWC: np.ndarray) -> dict[str, np.ndarray]:
  """Each head's raw input ``[N, F]`` from images in [-1, 1]."""
  x = (np.clip(np.asarray(images_NHWC, np.float32), -1.0, 1.0) + 1.0) / 2.0
  ink = x.max(-1, keepdims=True)
  n = x.shape[0]
  return {
    "digit": _pool(ink, POOL["digit"]).reshape(n, -1),
    "colour": _pool(x, POOL["colour"]).reshape(n, -1),
    "position": _pool(ink, POOL["position"]).reshape(n, -1),
  }


@dataclasses.dataclass(frozen=True)
class Head:
  """One standardised one-hidden-layer ReLU MLP: ``logits = relu(z W1 + b1) W2 + b2``."""

  mean: np.ndarray
  std: np.ndarray
  w1: np.ndarray
  b1: np.ndarray
  w2: np.ndarray
  b2: np.ndarray

  def logits(self, x_NF: np.ndarray) -> np.ndarray:
    z = (x_NF - self.mean) / self.std
    h = np.maximum(z @ self.w1 + self.b1, 0.0)
    return h @ self.w2 + self.b2


@dataclasses.dataclass(frozen=True)
class RuleClassifier:
  """The classifier plus the table of the world's prompts' attributes.

  Attributes:
    heads: ``{"digit" | "colour" | "position": Head}``.
    prompt_ids: ``[P, L]`` int32, the world's prompts as the ``ids``
      reward tokenises them.
    attributes: ``[P, 3]`` int32 (digit, colour id, position id) per row.
  """

  heads: Mapping[str, Head]
  prompt_ids: np.ndarray
  attributes: np.ndarray

  def predict(self, images_NHWC: np.ndarray) -> np.ndarray:
    """The argmax ``[N, 3]`` (digit, colour id, position id)."""
    inputs = head_inputs(images_NHWC)
    return np.stack(
      [self.heads[h].logits(inputs[h]).argmax(-1) for h in HEADS], -1
    ).astype(np.int32)

  @functools.cached_property
  def row_index(self) -> dict[bytes, int]:
    """``{prompt ids row as bytes: table row}``."""
    return {
      r.astype(np.int32).tobytes(): i for i, r in enumerate(self.prompt_ids)
    }

  def attributes_of(self, ids_NL: np.ndarray) -> np.ndarray:
    """Each prompt's ``[N, 3]`` attributes; raises for an unknown prompt."""
    ids_NL = np.asarray(ids_NL).astype(np.int32)
    if ids_NL.ndim != 2 or ids_NL.shape[1] != self.prompt_ids.shape[1]:
      raise ValueError(
        f"digits_rule: prompt ids of shape {ids_NL.shape}; expected "
        f"[N, {self.prompt_ids.shape[1]}]"
      )
    table = self.row_index
    rows = [table.get(r.tobytes(), -1) for r in ids_NL]
    missing = [i for i, r in enumerate(rows) if r < 0]
    if missing:
      raise ValueError(
        f"digits_rule: {len(missing)} of {len(rows)} prompts are not the "
        "world's prompts (unknown prompt ids); the rule reward only scores "
        "the prompts it was built with"
      )
    return self.attributes[np.asarray(rows)]

  def score(
    self, images_NHWC: np.ndarray, ids_NL: np.ndarray, mode: str = "fraction"
  ) -> np.ndarray:
    """``[N]`` float32: the fraction (or all) of the attributes matched."""
    base.choice("digits_rule", "score", mode, SCORES)
    hits = self.predict(images_NHWC) == self.attributes_of(ids_NL)
    out = hits.mean(-1) if mode == "fraction" else hits.all(-1)
    return out.astype(np.float32)

  def save(self, path: str) -> None:
    """Writes an ``.npz`` atomically (no pickles)."""
    arrays = {"prompt_ids": self.prompt_ids, "attributes": self.attributes}
    for h in HEADS:
      for f in dataclasses.fields(Head):
        arrays[f"{h}/{f.name}"] = getattr(self.heads[h], f.name)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> RuleClassifier:
    with np.load(path, allow_pickle=False) as z:
      heads = {
        h: Head(
          **{
            f.name: z[f"{h}/{f.name}"].astype(np.float32)
            for f in dataclasses.fields(Head)
          }
        )
        for h in HEADS
      }
      return cls(heads, z["prompt_ids"], z["attributes"])


def build(name: str, cfg: Mapping[str, Any], abstract: bool = False):
  """The ``digits_rule`` reward kind (no gradient; see the module doc)."""
  cfg = base.options(
    name, cfg, {"path": "", "ids": "clip", "score": "fraction"}
  )
  path = base.require_path(
    name, "path", cfg["path"], "point it at the digits world's rule.npz"
  )
  base.choice(name, "score", cfg["score"], SCORES)
  if not cfg["ids"]:
    raise UserError(
      f"rewards.{name}.ids is empty; name the text-reading reward whose "
      "prompt ids it reads (e.g. 'clip')"
    )
  loaded: list[RuleClassifier] = []

  def classifier() -> RuleClassifier:
    if not loaded:
      if not os.path.exists(path):
        raise UserError(
          f"rewards.{name}.path: {path} does not exist (the digits world "
          "builds it as rule.npz)"
        )
      loaded.append(RuleClassifier.load(path))
    return loaded[0]

  if not abstract:
    classifier()  # fail at load, not inside the compiled step

  def fn(images, ids):
    if ids is None:
      raise ValueError(f"rewards.{name}: no prompt ids to read attributes from")
    return classifier().score(images, ids, cfg["score"])

  return base.Loaded(
    {},
    nondiff.host_scorer(fn),
    0,
    differentiable=False,
    ids_from=str(cfg["ids"]),
  )
