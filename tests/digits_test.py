"""Tests of the digits world generator and its held-out evaluator."""

import json

import numpy as np
import pytest

from leapalign_jax.worlds import digits, digits_eval

CONFIG = digits.DigitsConfig()


@pytest.fixture(scope="module")
def evaluator():
  return digits_eval.fit(seed=0, config=CONFIG)


@pytest.fixture(scope="module")
def test_batch():
  return digits.sample_batch(CONFIG, 600, rng=11, split="test")


def test_generator_is_deterministic():
  a = digits.sample_batch(CONFIG, 32, rng=3)
  b = digits.sample_batch(CONFIG, 32, rng=np.random.default_rng(3))
  c = digits.sample_batch(CONFIG, 32, rng=4)
  assert a.images.tobytes() == b.images.tobytes()
  assert a.prompt_set.prompts == b.prompt_set.prompts
  np.testing.assert_array_equal(a.source, b.source)
  assert a.images.tobytes() != c.images.tobytes()
  # (seed, step) seeds, as the training loop uses them.
  d = digits.sample_batch(CONFIG, 8, rng=(3, 5))
  e = digits.sample_batch(CONFIG, 8, rng=(3, 5))
  assert d.images.tobytes() == e.images.tobytes()


def test_image_format(test_batch):
  images = test_batch.images
  assert images.dtype == np.float32 and images.shape == (600, 32, 32, 3)
  assert images.min() == -1.0 and images.max() <= 1.0
  # Black background: corners are blank unless a digit sits there.
  assert (images[:, 0, 0] == -1.0).mean() > 0.9


def test_split_is_fixed_disjoint_and_balanced():
  train, test = digits.split_indices("train"), digits.split_indices("test")
  assert len(train) == 1442 and len(test) == 355
  assert not set(train) & set(test)
  assert sorted([*train, *test]) == list(range(digits.NUM_SAMPLES))
  counts = np.bincount(digits.load_split("test")[1], minlength=10)
  assert counts.min() >= 34 and counts.max() <= 36
  # Sources of a test batch come from the test split only.
  batch = digits.sample_batch(CONFIG, 50, rng=0, split="test")
  assert set(batch.source) <= set(test)


def test_attributes_are_in_the_pixels(test_batch):
  ps = test_batch.prompt_set
  rgb = (test_batch.images + 1) / 2
  ink = rgb.max(-1)
  # The strongest pixel of each image has exactly its palette colour.
  flat = ink.reshape(len(ink), -1).argmax(1)
  brightest = rgb.reshape(len(ink), -1, 3)[np.arange(len(ink)), flat]
  np.testing.assert_allclose(
    brightest / brightest.max(1, keepdims=True),
    digits.palette(CONFIG)[ps.colour],
    atol=1e-6,
  )
  # The ink centre of mass is within jitter + clamping of the layout centre.
  com = digits._centre_of_mass(ink)
  err = np.abs(com - digits.position_centres(CONFIG)[ps.position]).max(1)
  assert np.percentile(err, 95) <= CONFIG.jitter_px + 0.5
  assert err.max() < 4.0
  # The digit drawn is the digit named.
  np.testing.assert_array_equal(
    digits.load_split("all")[1][test_batch.source], ps.digit
  )


def test_prompts_name_the_attributes():
  assert digits.make_prompt(CONFIG, 7, 0, 1, 0) == (
    "a red digit seven on the left"
  )
  assert digits.make_prompt(CONFIG, 3, 2, 3, 2) == (
    "a handwritten blue 3 at the top"
  )
  ps = digits.draw_prompt_set(CONFIG, 200, rng=0)
  assert set(ps.template) == set(range(len(CONFIG.templates)))
  for prompt, d, c, p in zip(ps.prompts, ps.digit, ps.colour, ps.position):
    word_or_numeral = (digits.DIGIT_WORDS[d], str(d))
    assert any(w in prompt.split() for w in word_or_numeral)
    assert CONFIG.colours[c] in prompt
    assert digits.LAYOUT[CONFIG.positions[p]][0] in prompt
  # Every prompt is one of the world's prompts.
  assert set(ps.prompts) <= set(digits.all_prompts(CONFIG))


def test_mixture_respects_weights():
  probs = digits.mixture_probs(
    CONFIG,
    digit_weights={7: 3.0},
    colour_weights=[1, 1, 1, 1, 0],
    rules=[(7, "red", "left", 0.0), (None, None, "top", 2.0)],
  )
  assert probs.shape == (10, 5, 5)
  np.testing.assert_allclose(probs.sum(), 1.0)
  assert probs[:, 4].sum() == 0 and probs[7, 0, 1] == 0
  np.testing.assert_allclose(probs[7, 1, 0] / probs[6, 1, 0], 3.0)
  np.testing.assert_allclose(probs[2, 1, 3] / probs[2, 1, 0], 2.0)
  n = 40_000
  ps = digits.draw_prompt_set(CONFIG, n, rng=1, probs=probs)
  counts = np.zeros_like(probs)
  np.add.at(counts, (ps.digit, ps.colour, ps.position), 1)
  freq = counts / n
  assert counts[:, 4].sum() == 0 and counts[7, 0, 1] == 0
  # Marginals within 4 standard errors.
  for axis in [(1, 2), (0, 2), (0, 1)]:
    p, f = probs.sum(axis), freq.sum(axis)
    assert (np.abs(f - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9).all()
  # Names, ids and digit strings (ml_collections keys) are interchangeable.
  same = digits.mixture_probs(
    CONFIG,
    digit_weights={"seven": 3.0},
    colour_weights={"white": 0},
    rules=[("7", 0, "left", 0.0), (None, None, 3, 2.0)],
  )
  np.testing.assert_array_equal(same, probs)
  with pytest.raises(ValueError):
    digits.mixture_probs(CONFIG, colour_weights={"purple": 1.0})
  with pytest.raises(ValueError):
    digits.mixture_probs(CONFIG, digit_weights={10: 1.0})
  with pytest.raises(ValueError):
    digits.mixture_probs(CONFIG, rules=[(None, None, "middle", 1.0)])


def test_records_round_trip():
  ps = digits.draw_prompt_set(CONFIG, 20, rng=2, templates=[0])
  records = digits.prompt_records(CONFIG, ps)
  assert json.loads(json.dumps(records)) == records
  assert set(records[0]) == {
    "prompt",
    "digit",
    "colour",
    "position",
    "template",
  }
  assert all(r["template"] == 0 for r in records)
  ids = digits.record_ids(CONFIG, records)
  for key in ("digit", "colour", "position"):
    np.testing.assert_array_equal(ids[key], getattr(ps, key))


def test_config_round_trip_and_validation():
  config = digits.DigitsConfig(
    image_size=48, digit_size=24, colours=("red", "cyan"), scale_jitter=0.1
  )
  assert digits.DigitsConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError):
    digits.DigitsConfig(colours=("red", "purple"))
  with pytest.raises(ValueError):
    digits.DigitsConfig(image_size=16, digit_size=16, scale_jitter=0.2)


def test_evaluator_accuracy_on_clean_held_out_renders(evaluator, test_batch):
  acc = evaluator.accuracy(test_batch.images, test_batch.prompt_set)
  assert acc["digit"] >= 0.97
  assert acc["colour"] >= 0.995 and acc["position"] >= 0.995
  assert acc["found"] == 1.0 and acc["stray"] < 0.01
  records = digits.prompt_records(CONFIG, test_batch.prompt_set)
  assert evaluator.accuracy(test_batch.images, records) == acc


def test_judge_gives_per_image_hits_and_caption_verdicts(evaluator, test_batch):
  images, ps = test_batch.images[:20], test_batch.prompt_set
  records = digits.prompt_records(CONFIG, ps)[:20]
  per = evaluator.judge(images, records)
  acc = evaluator.accuracy(images, records)
  assert {k: float(np.mean(v)) for k, v in per.items() if k != "verdict"} == acc
  assert len(per["verdict"]) == 20 and per["all"].shape == (20,)
  for hit, verdict, rec in zip(per["all"], per["verdict"], records):
    assert verdict.startswith("ok: saw " if hit else "no: ")
    if hit:  # what it saw is what the prompt asked for
      assert verdict == f"ok: saw {rec['digit']} {rec['colour']} " + (
        f"{rec['position']}"
      )
  blank = evaluator.judge(-np.ones_like(images[:2]), records[:2])
  assert blank["verdict"] == ["no: no digit found"] * 2


def test_evaluator_not_fooled_by_blank_noise_or_speckle(evaluator, test_batch):
  ps = test_batch.prompt_set
  blank = -np.ones_like(test_batch.images)
  rng = np.random.default_rng(0)
  fakes = {
    "blank": blank,
    "uniform noise": rng.uniform(-1, 1, blank.shape).astype(np.float32),
    "speckle": digits_eval.degrade(blank, "speckle", 0.05, rng),
  }
  for name, images in fakes.items():
    acc = evaluator.accuracy(images, ps)
    scores = [acc[k] for k in ("digit", "colour", "position", "all", "found")]
    assert max(scores) <= 0.02, (name, acc)
  # Right images, wrong prompts: chance level.
  perm = rng.permutation(len(ps))
  shuffled = digits.record_ids(CONFIG, ps)
  shuffled = {k: v[perm] for k, v in shuffled.items()}
  pred = evaluator.predict(test_batch.images)
  assert (pred["digit"] == shuffled["digit"]).mean() < 0.2
  assert (pred["position"] == shuffled["position"]).mean() < 0.3


def test_evaluator_under_degradations(evaluator, test_batch):
  ps = test_batch.prompt_set
  for kind, level, min_digit in [
    ("blur", 1.0, 0.95),
    ("noise", 0.2, 0.95),
    ("speckle", 0.03, 0.95),
  ]:
    images = digits_eval.degrade(test_batch.images, kind, level, rng=1)
    acc = evaluator.accuracy(images, ps)
    assert acc["digit"] >= min_digit, (kind, acc)
    assert acc["colour"] >= 0.99 and acc["position"] >= 0.99, (kind, acc)
  speckled = digits_eval.degrade(test_batch.images, "speckle", 0.03, rng=1)
  assert evaluator.accuracy(speckled, ps)["stray"] > 0.1


def test_evaluator_fit_is_deterministic_and_saves(
  evaluator, test_batch, tmp_path
):
  again = digits_eval.fit(seed=0, config=CONFIG)
  np.testing.assert_array_equal(again.ref_features, evaluator.ref_features)
  np.testing.assert_array_equal(again.mass_range, evaluator.mass_range)
  path = tmp_path / "evaluator.npz"
  evaluator.save(path)
  loaded = digits_eval.Evaluator.load(path)
  assert loaded.config == CONFIG and loaded.k == evaluator.k
  images = test_batch.images[:100]
  want, got = evaluator.predict(images), loaded.predict(images)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
