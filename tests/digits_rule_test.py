"""The digits world's rule-based reward (``digits_rule``): GenEval's role."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import errors, methods, rewards
from leapalign_jax.rewards import base, nondiff
from leapalign_jax.rewards import digits_rule as rule_lib
from leapalign_jax.worlds import digits, digits_eval, digits_pipeline
from leapalign_jax.worlds import digits_rule as fit_lib

WORLD = digits.DigitsConfig()
# Smaller heads than the world's stage (HEAD_SIZES) to keep the test short.
SIZES = {"digit": (64, 15), "colour": (16, 8), "position": (16, 8)}
IDS_LEN = 6


def _ids(n_records):
  """Stand-in prompt ids: a distinct int row per prompt."""
  rows = np.arange(n_records)[:, None] + 1000 * np.arange(IDS_LEN)[None]
  return rows.astype(np.int32)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  records = digits_pipeline.all_records(WORLD)
  ids = _ids(len(records))
  clf = fit_lib.fit(WORLD, 4, ids, records, sizes=SIZES)
  path = str(tmp_path_factory.mktemp("rule") / "rule.npz")
  clf.save(path)
  return clf, path, records, ids


def _test_batch(records, ids, n=300, seed=7):
  """Clean renders of the test split's writers with their prompts' ids."""
  rng = np.random.default_rng(seed)
  rows = rng.choice(len(records), n)
  ps = digits.PromptSet(
    prompts=tuple(records[i]["prompt"] for i in rows),
    digit=np.array([records[i]["digit"] for i in rows]),
    colour=np.array([WORLD.colours.index(records[i]["colour"]) for i in rows]),
    position=np.array(
      [WORLD.positions.index(records[i]["position"]) for i in rows]
    ),
    template=np.array([records[i]["template"] for i in rows]),
  )
  batch = digits.render_prompt_set(WORLD, ps, rng, split="test")
  return batch, ids[rows], rows


def test_scores_on_clean_renders_match_the_prompts_attributes(fitted):
  clf, path, records, ids = fitted
  batch, ids_b, _ = _test_batch(records, ids)
  ps = batch.prompt_set
  labels = np.stack([ps.digit, ps.colour, ps.position], -1)
  np.testing.assert_array_equal(clf.attributes_of(ids_b), labels)
  acc = fit_lib.accuracy(clf, batch.images, labels)
  assert acc["colour"] >= 0.99 and acc["position"] >= 0.99, acc
  assert acc["digit"] >= 0.7, acc  # held-out writers, small test heads
  frac = clf.score(batch.images, ids_b)
  hits = clf.predict(batch.images) == labels
  np.testing.assert_allclose(frac, hits.mean(-1), rtol=0, atol=1e-7)
  assert set(np.round(frac * 3).astype(int)) <= {0, 1, 2, 3}
  np.testing.assert_array_equal(
    clf.score(batch.images, ids_b, "all"), hits.all(-1).astype(np.float32)
  )
  # Prompts that name another digit (same colour and position) lose 1/3.
  other = np.array(
    [
      digits_pipeline_index(records, (d + 1) % 10, c, p)
      for d, c, p in labels[:20]
    ]
  )
  wrong = clf.score(batch.images[:20], ids[other])
  shifted = labels[:20].copy()
  shifted[:, 0] = (shifted[:, 0] + 1) % 10
  want = clf.predict(batch.images[:20]) == shifted
  np.testing.assert_allclose(wrong, want.mean(-1), atol=1e-7)
  assert wrong.mean() < frac[:20].mean()
  # Saved and loaded: identical scores.
  again = rule_lib.RuleClassifier.load(path)
  np.testing.assert_array_equal(again.score(batch.images, ids_b), frac)


def digits_pipeline_index(records, d, c, p):
  for i, r in enumerate(records):
    if (
      r["digit"] == d
      and WORLD.colours.index(r["colour"]) == c
      and WORLD.positions.index(r["position"]) == p
    ):
      return i
  raise AssertionError((d, c, p))


def test_unknown_prompt_ids_raise(fitted):
  clf, _, records, ids = fitted
  batch, ids_b, _ = _test_batch(records, ids, n=4)
  bad = ids_b.copy()
  bad[0, 0] = -5
  with pytest.raises(ValueError, match="not the world's prompts"):
    clf.score(batch.images, bad)


def test_it_is_not_the_held_out_evaluator(fitted):
  """Another model, other mistakes: it disagrees with the evaluator."""
  clf, _, records, ids = fitted
  batch, _, _ = _test_batch(records, ids, n=400, seed=11)
  evaluator = digits_eval.fit(0, WORLD)
  ev = evaluator.predict(batch.images)["digit"]
  ours = clf.predict(batch.images)[:, 0]
  truth = batch.prompt_set.digit
  assert (ev != ours).mean() > 0.02
  # ...and each is right where the other is wrong, somewhere.
  assert np.any((ours == truth) & (ev != truth)) or (ev == truth).all()
  assert np.any((ev == truth) & (ours != truth))
  # Blurred and noisy images: the two still differ.
  noisy = digits_eval.degrade(batch.images, "noise", 0.4, 3)
  assert (
    evaluator.predict(noisy)["digit"] != clf.predict(noisy)[:, 0]
  ).mean() > 0.02


def _text_reward(params, images, ids):
  del params
  return jnp.mean(images, axis=(1, 2, 3)) + 0.0 * jnp.sum(ids, -1)


def test_registry_kind_reads_the_clip_rewards_ids_inside_jit(fitted):
  clf, path, records, ids = fitted
  loaded = rule_lib.build("rule", {"path": path})
  assert "digits_rule" in rewards.names()
  assert not loaded.differentiable and loaded.ids_from == "clip"
  # A reward that reads another's ids: bundled beside a text reward.
  fn = loaded.fn
  reward = base.Reward(
    names=("clip", "rule"),
    weights=(0.0, 1.0),
    params={"clip": {}, "rule": {}},
    fns={"clip": _text_reward, "rule": fn},
    text_length=IDS_LEN,
    tokenizers={"clip": "hf"},
    differentiable={"clip": True, "rule": False},
    ids_of={"rule": "clip"},
  )
  batch, ids_b, _ = _test_batch(records, ids, n=8)
  got = jax.jit(reward.score)(
    reward.params, jnp.asarray(batch.images), {"clip": jnp.asarray(ids_b)}
  )
  np.testing.assert_allclose(got, clf.score(batch.images, ids_b), atol=1e-7)
  with pytest.raises(errors.UserError, match="not a configured text-reading"):
    rewards.build({"rule": {"kind": "digits_rule", "path": path}})
  with pytest.raises(errors.UserError, match="does not exist"):
    rule_lib.build("rule", {"path": path + ".missing"})


@pytest.mark.parametrize("name", methods.names())
def test_direct_gradient_methods_refuse_it(fitted, name):
  _, path, _, _ = fitted
  fn = rule_lib.build("rule", {"path": path}).fn
  reward = base.Reward(
    names=("clip", "rule"),
    weights=(0.0, 1.0),
    params={"clip": {}, "rule": {}},
    fns={"clip": _text_reward, "rule": fn},
    text_length=IDS_LEN,
    tokenizers={"clip": "hf"},
    differentiable={"clip": True, "rule": False},
    ids_of={"rule": "clip"},
  )
  needs = methods.get(name).make_step is None
  if needs:
    with pytest.raises(errors.UserError, match="rule.*no gradient"):
      nondiff.check_gradient(name, needs, reward)
  else:
    nondiff.check_gradient(name, needs, reward)
