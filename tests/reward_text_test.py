"""Each reward tokenises prompts as it was trained (``rewards.text``)."""

import re

import numpy as np
import pytest
import tiny_tokenizer
from flax import nnx

from leapalign_jax import openclip_tokenizer, tokenizers
from leapalign_jax.convert import export_clip
from leapalign_jax.errors import UserError
from leapalign_jax.models import clip
from leapalign_jax.rewards import text

LENGTH = 16
PROMPTS = ["a \u201ccat\u201d &amp; a dog", "<|endoftext|> a cat", "a cat"]


def tower(vocab: int, layout: str, path) -> str:
  """A text-only tiny CLIP with ``vocab`` embedding rows, saved."""
  cfg = clip.CLIPConfig(
    clip.CLIPTextConfig(
      vocab_size=vocab,
      hidden_size=64,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=1,
      max_position_embeddings=LENGTH,
    ),
    None,
    None,
  )
  export_clip(clip.CLIP(cfg, rngs=nnx.Rngs(0)), str(path), layout=layout)
  return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("reward_text")
  own = tower(tiny_tokenizer.SIZE, "hf", tmp / "own")
  tiny_tokenizer.write(own)  # a transformers folder with its own tokenizer
  return {
    "openclip": tower(49408, "openclip", tmp / "oc.safetensors"),
    "hf": tower(49408, "hf", tmp / "hf"),
    "own": own,
    "small": tower(tiny_tokenizer.SIZE, "hf", tmp / "small"),
  }


def test_each_reward_declares_its_tokenizer(paths):
  specs = text.specs(
    {
      "hpsv2": {"path": paths["openclip"]},
      "pickscore": {"weight": 0.5, "path": paths["hf"]},
      "clip": {"path": paths["own"]},
      "oc": {"kind": "clip", "path": paths["openclip"]},
      "forced": {
        "kind": "pickscore",
        "path": paths["hf"],
        "tokenizer": "openclip",
      },
      "aesthetic": {"path": "unused", "clip_path": "unused"},
    },
    LENGTH,
  )
  got = {n: (s.style, s.folder, s.rows) for n, s in specs.items()}
  assert got == {
    "hpsv2": ("openclip", "", 49408),
    "pickscore": ("hf", "", 49408),
    "clip": ("hf", paths["own"], tiny_tokenizer.SIZE),
    "oc": ("openclip", "", 49408),
    "forced": ("openclip", "", 49408),
  }  # the aesthetic reward reads no text


def test_ids_are_each_rewards_own(paths):
  specs = text.specs(
    {"hpsv2": {"path": paths["openclip"]}, "pickscore": {"path": paths["hf"]}},
    LENGTH,
  )
  hps = specs["hpsv2"].tokenizer()(PROMPTS)
  pick = specs["pickscore"].tokenizer()(PROMPTS)
  oc = openclip_tokenizer.load()
  np.testing.assert_array_equal(hps, oc(PROMPTS, LENGTH))
  hf = tokenizers.load_clip_tokenizer()
  np.testing.assert_array_equal(pick, tokenizers.tokenize_clip(hf, PROMPTS, 16))
  assert not np.array_equal(hps[:2], pick[:2])
  np.testing.assert_array_equal(hps[2, :4], pick[2, :4])  # "a cat": same ids


def test_the_checkpoints_own_tokenizer_is_used(paths):
  spec = text.specs({"clip": {"path": paths["own"]}}, LENGTH)["clip"]
  ids = spec.tokenizer()(["a cat"])[0]
  own = tokenizers.load_clip_tokenizer(paths["own"])
  assert ids[:4].tolist() == own("a cat").input_ids == [514, 320, 513, 515]
  assert ids.max() < tiny_tokenizer.SIZE


@pytest.mark.parametrize(
  "entry,match",
  [
    ({"path": "small"}, "OpenAI BPE (vendored) has 49408 tokens"),
    ({"path": "small", "tokenizer": "openclip"}, "has 49408 tokens"),
  ],
)
def test_a_vocabulary_of_another_size_is_refused(paths, entry, match):
  entry = dict(entry, path=paths[entry["path"]])
  spec = text.specs({"clip": entry}, LENGTH)["clip"]
  with pytest.raises(UserError, match=re.escape(match)) as e:
    spec.tokenizer()
  assert "\n" not in str(e.value) and "516" in str(e.value)


def test_bad_entries_are_one_line_errors(paths):
  cases = [
    ({"clip": {"path": ""}}, "rewards.clip.path is empty"),
    ({"clip": {"path": paths["hf"]}}, "text.reward_max_length=77 but"),
    ({"clip": {"path": paths["hf"], "tokenizer": "bpe"}}, "tokenizer='bpe'"),
    ({"nope": {"path": paths["hf"]}}, "unknown reward 'nope'"),
  ]
  for cfg, match in cases:
    length = 77 if "max_length" in match else LENGTH
    with pytest.raises(UserError, match=match) as e:
      text.specs(cfg, length)
    assert "\n" not in str(e.value)
