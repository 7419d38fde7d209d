"""The prompt-embedding cache job: sources, resume, duplicates, refusals."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tiny_tokenizer
from flax import nnx

from leapalign_jax import data, defaults, prompts, tokenizers
from leapalign_jax.convert import export_clip, export_t5
from leapalign_jax.errors import UserError
from leapalign_jax.families import flux_text
from leapalign_jax.models import clip, t5
from leapalign_jax.openclip_tokenizer import load as load_openclip
from leapalign_jax.rewards.text import RewardText
from leapalign_jax.worlds import random_world

PROMPTS = [
  f"a {c} digit {d} on the left"
  for c in ("red", "blue")
  for d in ("one", "two", "three", "four")
]


# Two rewards that read text: transformers' tokenizer and OpenCLIP's.
REWARDS = {
  "clip": RewardText("clip", "hf", "", 16, 49408, "test"),
  "hps": RewardText("hps", "openclip", "", 16, 49408, "test"),
}


def clip_text(vocab, path):
  """A tiny CLIP-L-like text encoder with ``vocab`` rows, saved."""
  text = clip.CLIPConfig(
    clip.CLIPTextConfig(
      vocab_size=vocab,
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      max_position_embeddings=16,
    ),
    None,
    None,
  )
  export_clip(clip.CLIP(text, rngs=nnx.Rngs(0)), str(path))
  return str(path)


@pytest.fixture(scope="module")
def text_cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp("encoders")
  tokenizers.train_t5_tokenizer(
    PROMPTS, str(root / "tokenizer_2"), vocab_size=64
  )
  clip_text(49408, root / "text_encoder")
  t5_cfg = t5.T5EncoderConfig(
    vocab_size=128, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4
  )
  export_t5(
    t5.T5Encoder(t5_cfg, rngs=nnx.Rngs(1)), str(root / "text_encoder_2")
  )
  c = defaults.base().text
  c.update(
    clip_path=str(root / "text_encoder"),
    t5_path=str(root / "text_encoder_2"),
    t5_tokenizer=str(root / "tokenizer_2"),
    clip_max_length=16,
    t5_max_length=12,
    reward_max_length=16,
    batch_size=4,
    dtype="float32",
    cache_dtype="float32",
  )
  return c


@pytest.fixture(scope="module")
def encoders(text_cfg):
  return flux_text.TextEncoders(text_cfg, REWARDS)


def cache_arrays(folder):
  cache = data.PromptCache(folder)
  rows = [cache[i] for i in range(len(cache))]
  return cache.manifest, {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_embeddings_have_the_manifest_shapes(encoders, tmp_path):
  out = str(tmp_path / "c")
  counts = prompts.embed(
    encoders,
    [{"prompt": p} for p in PROMPTS],
    out,
    shard_size=3,
    progress=False,
  )
  assert counts == {"total": 8, "skipped": 0, "written": 8}
  manifest, arrays = cache_arrays(out)
  assert arrays["t5"].shape == (8, 12, 16)
  assert arrays["clip_pooled"].shape == (8, 16)
  assert arrays["reward_ids/clip"].shape == (8, 16)
  assert arrays["reward_ids/clip"][0, 0] == 49406  # real CLIP ids
  # Each reward's own tokenizer: OpenCLIP's pads with zeros.
  np.testing.assert_array_equal(
    arrays["reward_ids/hps"], load_openclip()(PROMPTS, 16)
  )
  assert manifest["encoders"]["rewards"]["hps"]["style"] == "openclip"
  assert [r["prompt"] for r in manifest["records"]] == PROMPTS
  assert [s["count"] for s in manifest["shards"]] == [3, 3, 2]
  # Batching does not change the numbers (padding to the fixed batch).
  one = encoders([PROMPTS[5]])
  np.testing.assert_allclose(
    one["t5"][0], arrays["t5"][5], rtol=1e-6, atol=1e-6
  )


def test_resume_after_interruption_equals_uninterrupted(
  encoders, tmp_path, monkeypatch
):
  records = [{"prompt": p, "i": i} for i, p in enumerate(PROMPTS)]
  full = str(tmp_path / "full")
  prompts.embed(encoders, records, full, shard_size=3, progress=False)
  part = str(tmp_path / "part")
  original = data.CacheWriter.append
  calls = {"n": 0}

  def flaky(self, recs, arrays):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt  # killed while embedding the second shard
    return original(self, recs, arrays)

  monkeypatch.setattr(data.CacheWriter, "append", flaky)
  with pytest.raises(KeyboardInterrupt):
    prompts.embed(encoders, records, part, shard_size=3, progress=False)
  monkeypatch.setattr(data.CacheWriter, "append", original)
  assert len(data.PromptCache(part)) == 3  # one whole shard survived
  counts = prompts.embed(encoders, records, part, shard_size=3, progress=False)
  assert counts["skipped"] == 3 and counts["written"] == 5
  m_full, a_full = cache_arrays(full)
  m_part, a_part = cache_arrays(part)
  assert m_full == m_part
  for k in a_full:
    np.testing.assert_array_equal(a_full[k], a_part[k])
  assert sorted(os.listdir(full)) == sorted(os.listdir(part))


def test_duplicates_are_embedded_once(encoders, tmp_path):
  recs = [{"prompt": p} for p in PROMPTS[:3] + PROMPTS[:2]]
  counts = prompts.embed(encoders, recs, str(tmp_path / "d"), progress=False)
  assert counts == {"total": 3, "skipped": 0, "written": 3}


def test_refuses_other_encoders(encoders, tmp_path):
  out = str(tmp_path / "x")
  prompts.embed(encoders, [{"prompt": "a"}], out, progress=False)
  other = dict(encoders.identity(), t5_max_length=99)
  with pytest.raises(data.CacheError, match="other encoders"):
    data.CacheWriter(out, other)


def test_old_cache_format_is_refused_in_one_line(encoders, tmp_path):
  out = str(tmp_path / "old")
  prompts.embed(encoders, [{"prompt": "a"}], out, progress=False)
  path = os.path.join(out, data.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  manifest["version"] = 1
  with open(path, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(data.CacheError, match="re-embed the prompts") as e:
    data.PromptCache(out)
  assert "\n" not in str(e.value)
  # A world's own cache is rebuilt instead (it derives from the world).
  assert not random_world._complete(out, [{"prompt": "a"}])
  assert not os.path.exists(out)


def test_the_clip_checkpoints_own_tokenizer_is_used(text_cfg, tmp_path):
  # A snapshot whose CLIP has another vocabulary, with its tokenizer/.
  snap = tmp_path / "snap"
  tiny_tokenizer.write(snap / "tokenizer")
  cfg = defaults.base().text
  cfg.update(dict(text_cfg))
  cfg.clip_path = clip_text(tiny_tokenizer.SIZE, snap / "text_encoder")
  enc = flux_text.TextEncoders(cfg)
  assert enc.clip_tokenizer_folder == str(snap / "tokenizer")
  ids = tokenizers.tokenize_clip(enc.clip_tok, ["a cat"], 16)
  assert ids[0, :4].tolist() == [514, 320, 513, 515]
  assert enc(["a cat"])["clip_pooled"].shape == (1, 16)
  # Without its tokenizer, the vendored BPE does not fit that table.
  cfg.clip_path = clip_text(tiny_tokenizer.SIZE, tmp_path / "bare")
  with pytest.raises(UserError, match="49408 tokens .* embeds 516") as e:
    flux_text.TextEncoders(cfg)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "content,match",
  [
    ("", "holds no prompts"),
    ("\n  \n", "holds no prompts"),
  ],
)
def test_empty_prompt_files(tmp_path, content, match):
  p = tmp_path / "p.txt"
  p.write_text(content)
  with pytest.raises(prompts.PromptError, match=match):
    prompts.read_prompts(str(p))


def test_bad_prompt_sources(tmp_path):
  with pytest.raises(prompts.PromptError, match="no such prompt file"):
    prompts.read_prompts(str(tmp_path / "missing.txt"))
  binary = tmp_path / "b.txt"
  binary.write_bytes(b"\xff\xfe\x00bad")
  with pytest.raises(prompts.PromptError, match="not UTF-8"):
    prompts.read_prompts(str(binary))
  bad = tmp_path / "p.jsonl"
  bad.write_text('{"prompt": "ok"}\n{not json}\n')
  with pytest.raises(prompts.PromptError, match=r"p.jsonl:2: not valid JSON"):
    prompts.read_prompts(str(bad))
  nofield = tmp_path / "q.jsonl"
  nofield.write_text('{"digit": 3}\n')
  with pytest.raises(prompts.PromptError, match="no 'prompt'"):
    prompts.read_prompts(str(nofield))
  with pytest.raises(prompts.PromptError, match="tfds:<name>/<split>"):
    prompts.read_prompts("tfds:only_a_name")


def test_jsonl_keeps_attributes(tmp_path):
  p = tmp_path / "p.jsonl"
  p.write_text(
    '{"prompt": "a red seven", "digit": 7, "colour": "red"}\n'
    '{"text": "a blue two", "digit": 2}\n'
  )
  recs = prompts.read_prompts(str(p))
  assert recs == [
    {"prompt": "a red seven", "digit": 7, "colour": "red"},
    {"prompt": "a blue two", "digit": 2},
  ]


def test_cli_with_tfds_source(text_cfg, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class LeapPrompts(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"prompt": tfds.features.Text()}),
      )

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples(PROMPTS[:5])}

    def _generate_examples(self, prompts):
      for i, p in enumerate(prompts):
        yield i, {"prompt": p}

  data_dir = str(tmp_path / "tfds")
  LeapPrompts(
    data_dir=data_dir, file_format="array_record"
  ).download_and_prepare()
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
    textwrap.dedent(f"""
    from leapalign_jax import defaults

    def get_config():
      c = defaults.base()
      c.text.update({dict(text_cfg)!r})
      # Any checkpoint with a text tower of the right size names the
      # reward's vocabulary (embed reads no reward weights).
      c.rewards.hpsv2.path = {text_cfg.clip_path!r}
      return c
  """)
  )
  env = dict(os.environ, PYTHONPATH=os.getcwd(), TFDS_DATA_DIR=data_dir)
  out = tmp_path / "cache"
  cmd = [
    sys.executable,
    "-m",
    "leapalign_jax.embed_prompts",
    "--config",
    str(cfg),
    "--prompts",
    "tfds:leap_prompts/test",
    "--out",
    str(out),
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  with open(out / "manifest.json") as f:
    # tfds stores examples in key-hash order.
    assert sorted(x["prompt"] for x in json.load(f)["records"]) == sorted(
      PROMPTS[:5]
    )
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  cmd[cmd.index("tfds:leap_prompts/test")] = str(empty)
  r = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert r.returncode == 2 and "holds no prompts" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
