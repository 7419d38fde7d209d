"""Fits the digits world's rule-based reward (``rewards/digits_rule.py``).

The classifier behind the ``digits_rule`` reward, GenEval's role in
training. It is deliberately not the held-out evaluator
(``digits_eval.py``): another model family (three small MLPs on pooled
pixels, by scikit-learn, instead of ink cropping, geometric features and a
nearest-neighbour vote), other renders (its own seed, three renders of each
training-split digit: clean, blurred and noisy) and no speck removal. It is
therefore wrong more often than the evaluator, and differently (the tests
check both), as a real detector is: a method can be rewarded by it for
images the evaluator rejects.

Built as the world's ``rule`` stage (``rule.npz``, skipped when present);
fitting takes about a minute on an idle 2-core CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from leapalign_jax.rewards import digits_rule
from leapalign_jax.worlds import digits

# (hidden units, epochs) per head.
HEAD_SIZES = {"digit": (128, 40), "colour": (16, 15), "position": (16, 15)}
_BLUR = (0.4, 1.2)  # px, on a 16-px digit
_NOISE = (0.05, 0.3)  # std, on [-1, 1] images


def training_set(
  world: digits.DigitsConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Renders ``[N, H, W, 3]`` and labels ``[N, 3]`` (digit, colour, position).

  Every training-split digit three times, with random colour, position and
  jitter: clean, Gaussian-blurred, and with additive Gaussian noise.
  """
  rng = np.random.default_rng([seed, 41])
  source = np.tile(digits.split_indices("train"), 3)
  colour = rng.integers(0, len(world.colours), size=len(source))
  position = rng.integers(0, len(world.positions), size=len(source))
  images = digits.render(world, source, colour, position, rng)
  n = len(source) // 3
  sigmas = rng.uniform(*_BLUR, size=n) * world.digit_size / 16
  images[n : 2 * n] = np.stack(
    [
      ndimage.gaussian_filter(x, sigma=(s, s, 0))
      for x, s in zip(images[n : 2 * n], sigmas, strict=True)
    ]
  )
  noise = rng.uniform(*_NOISE, size=(len(source) - 2 * n, 1, 1, 1))
  images[2 * n :] = np.clip(
    images[2 * n :] + noise * rng.standard_normal(images[2 * n :].shape),
    -1.0,
    1.0,
  )
  labels = np.stack(
    [digits.load_split("all")[1][source], colour, position], -1
  ).astype(np.int32)
  return images, labels


def fit_head(x_NF: np.ndarray, y_N: np.ndarray, hidden: int, epochs: int, seed):
  """One standardised one-hidden-layer MLP (scikit-learn's Adam)."""
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.neural_network import MLPClassifier

  mean = x_NF.mean(0)
  std = x_NF.std(0) + 1e-3
  model = MLPClassifier(
    (hidden,),
    alpha=1e-3,
    batch_size=128,
    max_iter=epochs,
    random_state=seed,
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    model.fit((x_NF - mean) / std, y_N)
  classes = model.classes_
  if not np.array_equal(classes, np.arange(len(classes))):
    raise ValueError(f"training labels {classes} are not 0..K-1")
  (w1, w2), (b1, b2) = model.coefs_, model.intercepts_
  return digits_rule.Head(
    *(np.asarray(a, np.float32) for a in (mean, std, w1, b1, w2, b2))
  )


def fit(
  world: digits.DigitsConfig,
  seed: int,
  prompt_ids: np.ndarray,
  records: Sequence[Mapping[str, Any]],
  sizes: Mapping[str, tuple[int, int]] = HEAD_SIZES,
) -> digits_rule.RuleClassifier:
  """Fits the three heads and stores the prompts' attribute table.

  Args:
    world: the world.
    seed: seeds the renders and the heads' initialisation.
    prompt_ids: ``[P, L]`` the world's prompts as the reward whose ids the
      rule reads tokenises them, in ``records`` order.
    records: the world's prompt records (``digit``, ``colour``,
      ``position`` names).
    sizes: ``{head: (hidden units, epochs)}`` (tests fit smaller heads).

  Returns:
    The classifier.
  """
  images, labels = training_set(world, seed)
  inputs = digits_rule.head_inputs(images)
  heads = {
    h: fit_head(inputs[h], labels[:, i], *sizes[h], seed=seed + i)
    for i, h in enumerate(digits_rule.HEADS)
  }
  attributes = np.array(
    [
      [
        int(r["digit"]),
        world.colours.index(r["colour"]),
        world.positions.index(r["position"]),
      ]
      for r in records
    ],
    np.int32,
  )
  prompt_ids = np.asarray(prompt_ids).astype(np.int32)
  if len(prompt_ids) != len(attributes):
    raise ValueError(
      f"{len(prompt_ids)} prompt id rows for {len(attributes)} records"
    )
  # Two prompts with the same ids must name the same attributes.
  seen: dict[bytes, int] = {}
  for i, row in enumerate(prompt_ids):
    j = seen.setdefault(row.tobytes(), i)
    if not np.array_equal(attributes[i], attributes[j]):
      raise ValueError(
        f"prompts {records[j]['prompt']!r} and {records[i]['prompt']!r} "
        "tokenise alike but name different attributes"
      )
  return digits_rule.RuleClassifier(heads, prompt_ids, attributes)


def accuracy(
  classifier: digits_rule.RuleClassifier, images: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
  """Per-attribute argmax accuracy against ``labels`` ``[N, 3]``."""
  hits = classifier.predict(images) == np.asarray(labels)
  return {h: float(hits[:, i].mean()) for i, h in enumerate(digits_rule.HEADS)}
