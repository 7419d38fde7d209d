"""Tests of the CLIP / T5 tokenizers and their Flux-style padding."""

import functools
import gzip
import logging

import numpy as np
import pytest
import regex
import sentencepiece as spm
import transformers

from leapalign_jax import tokenizers
from leapalign_jax.worlds import digits

PROMPTS = [
  "a photo of a cat",
  "a red digit seven on the left",
  "A Handwritten  7, in the top-left corner!",
  "it's a cat's toy",
  "the number nine written in yellow, at the bottom",
]
_LOGGER = "leapalign_jax.tokenizers"


@pytest.fixture(scope="module")
def clip_tok():
  return tokenizers.load_clip_tokenizer()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("t5tok")
  tokenizers.train_t5_tokenizer(
    digits.all_prompts(digits.DigitsConfig()), out, vocab_size=256
  )
  return out


@pytest.fixture(scope="module")
def t5_tok(t5_dir):
  return tokenizers.load_t5_tokenizer(t5_dir)


# A plain re-implementation of OpenAI's CLIP BPE (lower-casing, regex split,
# byte symbols, greedy lowest-rank merges), independent of HF `tokenizers`.
@functools.cache
def _reference_tables():
  with gzip.open(tokenizers._BPE_PATH, "rt", encoding="utf-8") as f:
    merges = [tuple(x.split()) for x in f.read().split("\n")[1:48895]]
  symbols = tokenizers._byte_symbols()
  vocab = symbols + [s + "</w>" for s in symbols]
  vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  return {m: i for i, m in enumerate(merges)}, {
    t: i for i, t in enumerate(vocab)
  }


def _reference_bpe(word, ranks):
  parts = list(word[:-1]) + [word[-1] + "</w>"]
  while len(parts) > 1:
    pairs = [
      (ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(parts, parts[1:]))
    ]
    rank, i = min(pairs)
    if rank == 1 << 30:
      break
    parts[i : i + 2] = [parts[i] + parts[i + 1]]
  return parts


def _reference_clip_ids(text):
  ranks, vocab = _reference_tables()
  byte_sym = dict(zip(range(256), _byte_order()))
  text = " ".join(text.split()).lower()
  pattern = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
  ids = [vocab["<|startoftext|>"]]
  for word in regex.findall(pattern, text):
    chars = "".join(byte_sym[b] for b in word.encode("utf-8"))
    ids += [vocab[p] for p in _reference_bpe(chars, ranks)]
  return ids + [vocab["<|endoftext|>"]]


def _byte_order():
  """Byte value -> printable stand-in, listed by byte value."""
  printable = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return [table[b] for b in range(256)]


def test_clip_real_ids(clip_tok):
  assert clip_tok("a photo of a cat")["input_ids"] == [
    49406,
    320,
    1125,
    539,
    320,
    2368,
    49407,
  ]
  assert clip_tok("a photo of a dog")["input_ids"][-2] == 1929
  assert len(clip_tok) == 49408
  assert clip_tok.model_max_length == 77
  assert clip_tok.pad_token_id == clip_tok.eos_token_id == 49407


def test_clip_matches_reference_bpe(clip_tok):
  for prompt in PROMPTS + digits.all_prompts(digits.DigitsConfig())[::97]:
    assert clip_tok(prompt)["input_ids"] == _reference_clip_ids(prompt), prompt


def test_tokenize_clip_matches_flux_pipeline_settings(clip_tok, caplog):
  with caplog.at_level(logging.WARNING, logger=_LOGGER):
    ids = tokenizers.tokenize_clip(clip_tok, PROMPTS)
  # FluxPipeline._get_clip_prompt_embeds: max_length=tokenizer.model_max_length.
  want = clip_tok(
    PROMPTS,
    padding="max_length",
    max_length=clip_tok.model_max_length,
    truncation=True,
    return_tensors="np",
  ).input_ids
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
  np.testing.assert_array_equal(ids, want)
  assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] + [
    49407
  ]
  assert (ids[:, -1] == 49407).all()
  assert not [r for r in caplog.records if r.name == _LOGGER]


def test_tokenize_clip_truncates_with_one_warning(clip_tok, caplog):
  prompts = ["cat " * 100, "a dog", "dog " * 80]
  with caplog.at_level(logging.WARNING, logger=_LOGGER):
    ids = tokenizers.tokenize_clip(clip_tok, prompts)
  records = [r for r in caplog.records if r.name == _LOGGER]
  assert len(records) == 1
  message = records[0].getMessage()
  assert "2 of 3 prompts" in message and "77" in message
  assert ids.shape == (3, 77)
  assert ids[0].tolist() == [49406] + [2368] * 75 + [49407]
  assert ids[1, :4].tolist() == [49406, 320, 1929, 49407]


def test_clip_hf_folder_round_trips(clip_tok, tmp_path):
  # A Flux snapshot's tokenizer/ layout (vocab.json + merges.txt), read from
  # the folder itself and from the snapshot root.
  tokenizers.write_clip_vocab_files(tmp_path / "snap" / "tokenizer")
  for path in (tmp_path / "snap", tmp_path / "snap" / "tokenizer"):
    loaded = tokenizers.load_clip_tokenizer(path)
    np.testing.assert_array_equal(
      tokenizers.tokenize_clip(loaded, PROMPTS),
      tokenizers.tokenize_clip(clip_tok, PROMPTS),
    )
  clip_tok.save_pretrained(tmp_path / "saved")
  again = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
  assert again.model_max_length == 77
  np.testing.assert_array_equal(
    tokenizers.tokenize_clip(again, PROMPTS),
    tokenizers.tokenize_clip(clip_tok, PROMPTS),
  )


def test_t5_special_ids_and_no_unk_collapse(t5_tok, t5_dir):
  assert (t5_tok.pad_token_id, t5_tok.eos_token_id, t5_tok.unk_token_id) == (
    0,
    1,
    2,
  )
  assert t5_tok.bos_token_id is None
  assert t5_tok.model_max_length == 512
  assert tokenizers.tokenize_t5(t5_tok, [], 8).shape == (0, 8)
  prompt = "a red digit seven on the left"
  ids = t5_tok(prompt)["input_ids"]
  assert ids[-1] == 1 and 2 not in ids
  # Same ids as sentencepiece itself, plus </s>.
  sp = spm.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
  assert ids == sp.encode(prompt) + [1]
  # Every word of the digits world is a single piece.
  words = {
    w for p in digits.all_prompts(digits.DigitsConfig()) for w in p.split()
  }
  for word in sorted(words):
    pieces = t5_tok(word, add_special_tokens=False)["input_ids"]
    assert 2 not in pieces and len(pieces) <= 2, (word, pieces)
  assert len(ids) == 8  # a red digit seven on the left + </s>


def test_tokenize_t5_pads_like_flux(t5_tok, caplog):
  prompts = ["a red digit seven on the left", "a blue 3 at the top"]
  with caplog.at_level(logging.WARNING, logger=_LOGGER):
    ids = tokenizers.tokenize_t5(
      t5_tok, prompts, tokenizers.T5_MAX_LENGTH["dev"]
    )
  # FluxPipeline._get_t5_prompt_embeds settings.
  want = t5_tok(
    prompts,
    padding="max_length",
    max_length=512,
    truncation=True,
    return_tensors="np",
  ).input_ids
  assert ids.dtype == np.int32 and ids.shape == (2, 512)
  np.testing.assert_array_equal(ids, want)
  n = len(t5_tok(prompts[0])["input_ids"])
  assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all()
  assert not [r for r in caplog.records if r.name == _LOGGER]
  assert tokenizers.T5_MAX_LENGTH == {"dev": 512, "schnell": 256}


def test_tokenize_t5_truncates_with_one_warning(t5_tok, caplog):
  prompts = ["a red digit seven on the left " * 10, "a red 7"]
  with caplog.at_level(logging.WARNING, logger=_LOGGER):
    ids = tokenizers.tokenize_t5(t5_tok, prompts, 16)
  records = [r for r in caplog.records if r.name == _LOGGER]
  assert len(records) == 1 and "1 of 2 prompts" in records[0].getMessage()
  full = t5_tok(prompts[0])["input_ids"]
  assert ids[0].tolist() == full[:15] + [1]


def test_t5_folder_round_trip_and_determinism(t5_tok, t5_dir, tmp_path):
  t5_tok.save_pretrained(tmp_path / "saved")
  again = tokenizers.load_t5_tokenizer(tmp_path / "saved")
  prompts = digits.all_prompts(digits.DigitsConfig())[::37]
  np.testing.assert_array_equal(
    tokenizers.tokenize_t5(again, prompts, 32),
    tokenizers.tokenize_t5(t5_tok, prompts, 32),
  )
  # A Flux snapshot root with tokenizer_2/ resolves too; training is
  # deterministic.
  retrained = tokenizers.train_t5_tokenizer(
    digits.all_prompts(digits.DigitsConfig()),
    tmp_path / "snap" / "tokenizer_2",
    vocab_size=256,
  )
  assert retrained.get_vocab() == t5_tok.get_vocab()
  from_root = tokenizers.load_t5_tokenizer(tmp_path / "snap")
  assert from_root.get_vocab() == t5_tok.get_vocab()


def test_t5_empty_vocabulary_is_refused(tmp_path):
  # What transformers 5 builds when handed a model file it ignores.
  transformers.T5TokenizerFast(extra_ids=0).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="empty vocabulary"):
    tokenizers.load_t5_tokenizer(tmp_path)
