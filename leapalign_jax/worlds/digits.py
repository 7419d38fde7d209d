"""The digits world: coloured, placed handwritten digits with text prompts.

A tiny, real text-to-image world for running the whole method on a CPU. Each
image is one of scikit-learn's 1,797 real 8x8 handwritten digits
(`sklearn.datasets.load_digits`), upsampled smoothly (cubic interpolation, 2x
by default), coloured with one palette colour and placed at one of a few
positions on a black RGB canvas (32x32 by default). Its prompt names the three
attributes, e.g. "a red digit seven on the left", in one of a few phrasings.

Split (fixed, documented, RNG-free): for each digit, its samples in
`load_digits()` order are ranked 0, 1, 2, ...; ranks 4, 9, 14, ... (every
fifth) form `"test"` (355 samples, 34-36 per digit), the rest `"train"`
(1,442). Writers are therefore shared between the splits. (A contiguous split,
the last 360 samples, is probably writer-disjoint: classic classifiers drop
from ~99% to ~96% on it, too low for a reliable evaluator.) The base model and
the reward train on `"train"`; the held-out evaluator is fit on `"train"` and
checked on `"test"`.

Images are float32 in [-1, 1], NHWC; background -1. Attribute ids index
`DIGIT_WORDS`, `config.colours` and `config.positions`. Every random choice
comes from a `numpy.random.Generator` (or a seed: an int, or ints such as
`(seed, step)`), so a seed reproduces images and prompts bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DIGIT_WORDS = (
  "zero",
  "one",
  "two",
  "three",
  "four",
  "five",
  "six",
  "seven",
  "eight",
  "nine",
)
NUM_DIGITS = 10

# Palette in [0, 1] RGB. Every entry has a channel at 1 (so the stroke
# intensity is the channel maximum) and the default five are far apart in
# chroma direction (largest cosine 0.82, yellow vs white).
PALETTE = {
  "red": (1.0, 0.0, 0.0),
  "green": (0.0, 1.0, 0.0),
  "blue": (0.0, 0.0, 1.0),
  "yellow": (1.0, 1.0, 0.0),
  "white": (1.0, 1.0, 1.0),
  "cyan": (0.0, 1.0, 1.0),
  "magenta": (1.0, 0.0, 1.0),
}

# Position name -> (prompt phrase, (row, col) direction). The ink centre of
# mass is placed at canvas_centre + direction * position_offset * image_size.
LAYOUT = {
  "center": ("in the center", (0, 0)),
  "left": ("on the left", (0, -1)),
  "right": ("on the right", (0, 1)),
  "top": ("at the top", (-1, 0)),
  "bottom": ("at the bottom", (1, 0)),
  "top left": ("in the top left corner", (-1, -1)),
  "top right": ("in the top right corner", (-1, 1)),
  "bottom left": ("in the bottom left corner", (1, -1)),
  "bottom right": ("in the bottom right corner", (1, 1)),
}

# Phrasings; fields: {colour}, {digit} (word), {numeral}, {position} (phrase).
TEMPLATES = (
  "a {colour} digit {digit} {position}",
  "a {colour} {digit} {position}",
  "a handwritten {colour} {numeral} {position}",
  "the number {digit} written in {colour}, {position}",
  "{position}, a {colour} handwritten {digit}",
)

# The fixed split: within each digit class, every TEST_EVERY-th sample
# (by load_digits() order) is test.
TEST_EVERY = 5
NUM_SAMPLES = 1797
SPLITS = ("train", "test", "all")

# A Generator, or a seed for one: an int or a sequence of ints.
RngLike = np.random.Generator | int | Sequence[int]


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
  """What the world draws.

  Attributes:
    image_size: canvas side in pixels.
    digit_size: side of the upsampled 8x8 digit box in pixels (16 = 2x).
    scale_jitter: the box side is drawn uniformly in
      `digit_size * [1 - scale_jitter, 1 + scale_jitter]` (0 = fixed size).
    jitter_px: the placement is shifted by a uniform integer in
      `[-jitter_px, jitter_px]` along each axis.
    colours: palette names (keys of `PALETTE`); ids index this tuple.
    positions: position names (keys of `LAYOUT`); ids index this tuple.
    position_offset: distance of the off-centre positions from the canvas
      centre, as a fraction of `image_size`.
    templates: prompt phrasings (see `TEMPLATES`).
  """

  image_size: int = 32
  digit_size: int = 16
  scale_jitter: float = 0.0
  jitter_px: int = 1
  colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "white")
  positions: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
  position_offset: float = 0.25
  templates: tuple[str, ...] = TEMPLATES

  def __post_init__(self):
    unknown = [c for c in self.colours if c not in PALETTE]
    unknown += [p for p in self.positions if p not in LAYOUT]
    if unknown:
      raise ValueError(f"Unknown colours/positions {unknown}.")
    largest = round(self.digit_size * (1 + self.scale_jitter))
    if largest > self.image_size or self.digit_size < 4:
      raise ValueError(
        f"digit_size {self.digit_size} (+{self.scale_jitter:.0%}) does not"
        f" fit image_size {self.image_size}."
      )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DigitsConfig:
    """Builds a config from a plain mapping (e.g. an ml_collections dict)."""
    d = dict(d)
    for key in ("colours", "positions", "templates"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly form (lists for tuples)."""
    return {
      k: list(v) if isinstance(v, tuple) else v
      for k, v in dataclasses.asdict(self).items()
    }


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """Prompts and the attribute ids they name (int32 arrays [N])."""

  prompts: tuple[str, ...]
  digit: np.ndarray
  colour: np.ndarray
  position: np.ndarray
  template: np.ndarray

  def __len__(self) -> int:
    return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class Batch:
  """Rendered images with their prompts.

  Attributes:
    images: float32 [N, H, W, 3] in [-1, 1].
    prompt_set: prompts and attribute ids.
    source: int32 [N] index of the sklearn sample drawn.
  """

  images: np.ndarray
  prompt_set: PromptSet
  source: np.ndarray


def as_rng(rng: RngLike) -> np.random.Generator:
  """Returns `rng` itself, or a fresh Generator seeded with it.

  Seeds may be ints or int sequences, e.g. `(config.seed, step)`.
  """
  if isinstance(rng, np.random.Generator):
    return rng
  return np.random.default_rng(rng)


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # Slow import: load lazily.

  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)
  labels = data.target.astype(np.int32)
  if len(labels) != NUM_SAMPLES:
    raise ValueError(f"load_digits() returned {len(labels)} samples.")
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


@functools.lru_cache(maxsize=1)
def _test_mask() -> np.ndarray:
  labels = _load_all()[1]
  rank = np.zeros(NUM_SAMPLES, np.int64)
  for d in range(NUM_DIGITS):
    (where,) = np.nonzero(labels == d)
    rank[where] = np.arange(len(where))
  mask = rank % TEST_EVERY == TEST_EVERY - 1
  mask.flags.writeable = False
  return mask


def split_indices(split: str) -> np.ndarray:
  """Indices into `load_digits()` of a split ("train", "test" or "all")."""
  if split == "train":
    return np.nonzero(~_test_mask())[0]
  if split == "test":
    return np.nonzero(_test_mask())[0]
  if split == "all":
    return np.arange(NUM_SAMPLES)
  raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The real digits of a split: 8x8 float32 in [0, 1] and int32 labels."""
  images, labels = _load_all()
  idx = split_indices(split)
  return images[idx], labels[idx]


def position_centres(config: DigitsConfig) -> np.ndarray:
  """Target ink centres of mass [P, 2] (row, col) in pixel coordinates."""
  centre = (config.image_size - 1) / 2.0
  step = config.position_offset * config.image_size
  dirs = np.array([LAYOUT[p][1] for p in config.positions], np.float64)
  return centre + step * dirs


def palette(config: DigitsConfig) -> np.ndarray:
  """The config's colours as float32 [C, 3] in [0, 1]."""
  return np.array([PALETTE[c] for c in config.colours], np.float32)


def make_prompt(
  config: DigitsConfig, digit: int, colour: int, position: int, template: int
) -> str:
  """The prompt for one combination of attribute ids."""
  return config.templates[template].format(
    colour=config.colours[colour],
    digit=DIGIT_WORDS[digit],
    numeral=str(digit),
    position=LAYOUT[config.positions[position]][0],
  )


def _axis_index(value: Any, names: Sequence[str]) -> int:
  """Id of an attribute value: an int or digit string, or a name in `names`."""
  if isinstance(value, str) and value in names:
    return names.index(value)
  if isinstance(value, str) and value.isdigit():
    value = int(value)
  if isinstance(value, int | np.integer) and 0 <= value < len(names):
    return int(value)
  raise ValueError(f"Unknown attribute value {value!r}; known: {names}.")


def _weights(
  spec: Sequence[float] | Mapping[Any, float] | None, names: Sequence[str]
) -> np.ndarray:
  """Weight vector over `names` from a sequence, a value->weight map, or None."""
  w = np.ones(len(names))
  if spec is None:
    return w
  if isinstance(spec, Mapping):
    for value, weight in spec.items():
      w[_axis_index(value, names)] = float(weight)
    return w
  w = np.asarray(spec, np.float64)
  if w.shape != (len(names),):
    raise ValueError(f"Expected {len(names)} weights, got shape {w.shape}.")
  return w


def mixture_probs(
  config: DigitsConfig,
  digit_weights: Sequence[float] | Mapping[Any, float] | None = None,
  colour_weights: Sequence[float] | Mapping[Any, float] | None = None,
  position_weights: Sequence[float] | Mapping[Any, float] | None = None,
  rules: Sequence[tuple[Any, Any, Any, float]] = (),
) -> np.ndarray:
  """Joint probabilities over (digit, colour, position) combinations.

  p(d, c, p) is proportional to `digit_weights[d] * colour_weights[c] *
  position_weights[p]`, times the factor of every matching rule. Weights are
  sequences in id order or mappings from attribute value to weight (missing
  values weigh 1). A value is an id (int or digit string, so string-keyed
  ml_collections dicts work) or a name: "seven", "red", "left".

  Args:
    config: the world.
    digit_weights: per digit 0-9.
    colour_weights: per colour of `config.colours`.
    position_weights: per position of `config.positions`.
    rules: `(digit, colour, position, factor)` tuples; None matches any value,
      e.g. `(7, "red", None, 0.05)` makes red sevens 20x rarer, and
      `(None, None, "top", 0.0)` removes the top position.

  Returns:
    float64 [10, C, P], summing to 1.
  """
  axes = (DIGIT_WORDS, config.colours, config.positions)
  table = (
    _weights(digit_weights, axes[0])[:, None, None]
    * _weights(colour_weights, axes[1])[None, :, None]
    * _weights(position_weights, axes[2])[None, None, :]
  )
  for *values, factor in rules:
    key = tuple(
      slice(None) if v is None else _axis_index(v, names)
      for v, names in zip(values, axes, strict=True)
    )
    table[key] *= float(factor)
  if (table < 0).any() or table.sum() <= 0:
    raise ValueError("Mixture weights must be >= 0 with a positive total.")
  return table / table.sum()


def draw_prompt_set(
  config: DigitsConfig,
  n: int,
  rng: RngLike,
  probs: np.ndarray | None = None,
  templates: Sequence[int] | None = None,
) -> PromptSet:
  """Draws `n` prompts i.i.d. from a mixture over attribute combinations.

  Args:
    config: the world.
    n: number of prompts.
    rng: Generator or seed.
    probs: [10, C, P] joint probabilities (`mixture_probs`); None = uniform.
    templates: template ids to draw from uniformly; None = all.

  Returns:
    The prompt set.
  """
  rng = as_rng(rng)
  shape = (NUM_DIGITS, len(config.colours), len(config.positions))
  if probs is None:
    probs = np.full(shape, 1.0 / np.prod(shape))
  probs = np.asarray(probs, np.float64)
  if probs.shape != shape:
    raise ValueError(f"probs has shape {probs.shape}, expected {shape}.")
  flat = rng.choice(probs.size, size=n, p=probs.ravel() / probs.sum())
  digit, colour, position = np.unravel_index(flat, shape)
  pool = np.arange(len(config.templates)) if templates is None else templates
  template = rng.choice(np.asarray(pool), size=n)
  prompts = tuple(
    make_prompt(config, *ids)
    for ids in zip(digit, colour, position, template, strict=True)
  )
  return PromptSet(
    prompts=prompts,
    digit=digit.astype(np.int32),
    colour=colour.astype(np.int32),
    position=position.astype(np.int32),
    template=np.asarray(template, np.int32),
  )


def prompt_records(
  config: DigitsConfig, prompt_set: PromptSet
) -> list[dict[str, Any]]:
  """One JSON-ready record per prompt, e.g. for `samples.jsonl`.

  Records hold `prompt`, `digit` (int), `colour` and `position` (names) and
  `template` (int).
  """
  return [
    {
      "prompt": prompt,
      "digit": int(d),
      "colour": config.colours[c],
      "position": config.positions[p],
      "template": int(t),
    }
    for prompt, d, c, p, t in zip(
      prompt_set.prompts,
      prompt_set.digit,
      prompt_set.colour,
      prompt_set.position,
      prompt_set.template,
      strict=True,
    )
  ]


def record_ids(
  config: DigitsConfig, records: Sequence[Mapping[str, Any]] | PromptSet
) -> dict[str, np.ndarray]:
  """Attribute ids (int32 arrays) of records or of a prompt set."""
  if isinstance(records, PromptSet):
    return {
      "digit": records.digit,
      "colour": records.colour,
      "position": records.position,
    }

  def ids(key: str, names: Sequence[str]) -> np.ndarray:
    return np.array([_axis_index(r[key], names) for r in records], np.int32)

  return {
    "digit": ids("digit", DIGIT_WORDS),
    "colour": ids("colour", config.colours),
    "position": ids("position", config.positions),
  }


def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] cubic (Keys, a=-0.5) resampling; zero outside the input.

  Pixel centres are aligned (half-pixel convention), so the ink stays
  centred in the box whatever the scale.
  """
  pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  taps = np.floor(pos)[:, None] + np.arange(-1, 3)[None, :]
  t = np.abs(pos[:, None] - taps)
  a = -0.5
  w = np.where(
    t <= 1,
    (a + 2) * t**3 - (a + 3) * t**2 + 1,
    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0),
  )
  mat = np.zeros((n_out, n_in))
  valid = (taps >= 0) & (taps < n_in)
  rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
  np.add.at(mat, (rows[valid], taps[valid].astype(int)), w[valid])
  return mat


def upsample(digits_N88: np.ndarray, size: int) -> np.ndarray:
  """Smoothly resizes [N, 8, 8] ink in [0, 1] to [N, size, size]."""
  mat = _cubic_matrix(digits_N88.shape[-1], size)
  out = np.einsum("sh,nhw,tw->nst", mat, digits_N88, mat)
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def _centre_of_mass(ink_NHW: np.ndarray) -> np.ndarray:
  """[N, 2] (row, col) ink centres of mass."""
  h, w = ink_NHW.shape[1:]
  mass = ink_NHW.sum((1, 2)) + 1e-9
  rows = (ink_NHW.sum(2) * np.arange(h)).sum(1) / mass
  cols = (ink_NHW.sum(1) * np.arange(w)).sum(1) / mass
  return np.stack([rows, cols], axis=1)


def render(
  config: DigitsConfig,
  source: np.ndarray,
  colour: np.ndarray,
  position: np.ndarray,
  rng: RngLike,
) -> np.ndarray:
  """Renders given sklearn samples with given colour and position ids.

  The digit box (side `digit_size`, scale-jittered) is placed so that its ink
  centre of mass lands on the position's centre plus an integer jitter,
  clamped so the whole box stays on the canvas.

  Args:
    config: the world.
    source: int [N] indices into `load_digits()`.
    colour: int [N] colour ids.
    position: int [N] position ids.
    rng: Generator or seed (scale and placement jitter).

  Returns:
    float32 [N, H, W, 3] in [-1, 1].
  """
  rng = as_rng(rng)
  source = np.asarray(source)
  n, hw = len(source), config.image_size
  low = config.digit_size * (1 - config.scale_jitter)
  high = config.digit_size * (1 + config.scale_jitter)
  sizes = np.rint(rng.uniform(low, high, size=n)).astype(int)
  jitter = rng.integers(-config.jitter_px, config.jitter_px + 1, size=(n, 2))
  targets = position_centres(config)[np.asarray(position)] + jitter
  digits = _load_all()[0][source]
  alpha = np.zeros((n, hw, hw), np.float32)
  for size in np.unique(sizes):
    (idx,) = np.nonzero(sizes == size)
    boxes = upsample(digits[idx], int(size))
    corners = np.rint(targets[idx] - _centre_of_mass(boxes)).astype(int)
    corners = np.clip(corners, 0, hw - size)
    for box, i, (top, left) in zip(boxes, idx, corners, strict=True):
      alpha[i, top : top + size, left : left + size] = box
  rgb = palette(config)[np.asarray(colour)]
  return alpha[..., None] * rgb[:, None, None, :] * 2.0 - 1.0


def draw_sources(
  digit: np.ndarray, rng: RngLike, split: str = "train"
) -> np.ndarray:
  """Picks, for each digit id, a random sklearn sample of it from `split`."""
  rng = as_rng(rng)
  digit = np.asarray(digit)
  idx = split_indices(split)
  labels = _load_all()[1][idx]
  source = np.empty(len(digit), np.int32)
  for d in np.unique(digit):
    (where,) = np.nonzero(digit == d)
    pool = idx[labels == d]
    source[where] = rng.choice(pool, size=len(where))
  return source


def render_prompt_set(
  config: DigitsConfig,
  prompt_set: PromptSet,
  rng: RngLike,
  split: str = "train",
) -> Batch:
  """Real images that match a prompt set (one random writer's digit each)."""
  rng = as_rng(rng)
  source = draw_sources(prompt_set.digit, rng, split)
  images = render(config, source, prompt_set.colour, prompt_set.position, rng)
  return Batch(images=images, prompt_set=prompt_set, source=source)


def sample_batch(
  config: DigitsConfig,
  n: int,
  rng: RngLike,
  split: str = "train",
  probs: np.ndarray | None = None,
  templates: Sequence[int] | None = None,
) -> Batch:
  """Draws `n` (image, prompt, attributes) triples (`draw_prompt_set` + render).

  Args:
    config: the world.
    n: batch size.
    rng: Generator or seed.
    split: which sklearn samples to draw ("train" or "test").
    probs: [10, C, P] mixture (`mixture_probs`); None = uniform.
    templates: template ids to use; None = all.

  Returns:
    The batch.
  """
  rng = as_rng(rng)
  prompt_set = draw_prompt_set(config, n, rng, probs, templates)
  return render_prompt_set(config, prompt_set, rng, split)


def prompt_index(world: DigitsConfig, d, c, p, t) -> np.ndarray:
  """Index of a prompt in ``all_prompts(world)`` (d, c, p, t nested)."""
  C, P, T = len(world.colours), len(world.positions), len(world.templates)
  return ((np.asarray(d) * C + c) * P + p) * T + t


def all_prompts(config: DigitsConfig) -> list[str]:
  """Every prompt the world can produce (e.g. to train its T5 vocabulary)."""
  return [
    make_prompt(config, d, c, p, t)
    for d in range(NUM_DIGITS)
    for c in range(len(config.colours))
    for p in range(len(config.positions))
    for t in range(len(config.templates))
  ]
