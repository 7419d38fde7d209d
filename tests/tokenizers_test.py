"""Tests of the CLIP / T5 tokenizers and their Flux-style padding.

The reward tokenizers are checked id for id on a varied prompt set
(``tokenizer_prompts``: curly quotes, HTML entities, width forms,
mis-encoded text, ligatures, control characters, scripts, special-token
spellings, prompts over 77 tokens) against the references the rewards were
trained with: ``open_clip.tokenize`` (HPSv2) and transformers'
``CLIPTokenizer`` (PickScore, Flux's CLIP-L).
"""

import functools
import gzip
import importlib.util
import logging
import os

import numpy as np
import pytest
import regex
import sentencepiece as spm
import tiny_tokenizer
import tokenizer_prompts
import transformers

from leapalign_jax import errors, openclip_tokenizer, tokenizers
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
  symbols = tokenizers.byte_symbols()
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


# ------------------------------------------------ rewards' own tokenizers --


def _open_clip_tokenize():
  """``open_clip.tokenize``, imported without the package.

  open_clip's ``__init__`` needs torchvision, which cannot be installed
  beside torch here; its tokenizer module needs only torch, ftfy, regex.
  """
  pytest.importorskip("torch")
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    pytest.skip("pip install --no-deps open-clip-torch==3.3.0")
  path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
  module_spec = importlib.util.spec_from_file_location("_oc_tok", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.tokenize


def _mismatches(ours, want):
  return [
    tokenizer_prompts.PROMPTS[i]
    for i in range(len(want))
    if not np.array_equal(ours[i], want[i])
  ]


@pytest.mark.torch
@pytest.mark.parametrize("length", [77, 16])
def test_openclip_ids_match_open_clip(length):
  tokenize = _open_clip_tokenize()
  prompts = tokenizer_prompts.PROMPTS
  want = tokenize(prompts, context_length=length).numpy()
  ours = openclip_tokenizer.tokenize_openclip(
    openclip_tokenizer.load(), prompts, length
  )
  assert ours.dtype == np.int32 and ours.shape == want.shape
  assert _mismatches(ours, want) == []
  # Over-length prompts keep the end-of-text token last.
  eot = openclip_tokenizer.load().eot_id
  long = [i for i, p in enumerate(prompts) if (ours[i] != 0).all()]
  assert long and all(ours[i, -1] == eot for i in long)


@pytest.mark.torch
def test_transformers_ids_differ_from_open_clip_on_this_set():
  """Why HPSv2 needs its own tokenizer: the HF ids differ on many prompts."""
  tokenize = _open_clip_tokenize()
  prompts = tokenizer_prompts.PROMPTS
  hf = tokenizers.tokenize_clip(tokenizers.load_clip_tokenizer(), prompts)
  # Compare up to the EOS only: the paddings differ by design (0 vs EOS).
  want = tokenize(prompts).numpy()
  hf = np.where(want == 0, 0, hf)
  assert len(_mismatches(hf, want)) >= 100  # 129 of 215 when written


def test_transformers_ids_match_clip_tokenizer(tmp_path):
  """The hf style (PickScore, Flux's CLIP-L) is transformers' tokenizer as
  a checkpoint folder loads it (``AutoTokenizer``), EOS last when cut."""
  prompts = tokenizer_prompts.PROMPTS
  folder = tokenizers.write_clip_vocab_files(tmp_path / "tokenizer")
  ref = transformers.AutoTokenizer.from_pretrained(folder)
  want = ref(
    prompts, padding="max_length", max_length=77, truncation=True
  ).input_ids
  ours = tokenizers.tokenize_clip(tokenizers.load_clip_tokenizer(), prompts)
  assert _mismatches(ours, np.asarray(want)) == []
  cut = [
    i
    for i, p in enumerate(prompts)
    if len(ref(p).input_ids) > 77  # over-length prompts
  ]
  assert len(cut) >= 8 and all(ours[i, -1] == 49407 for i in cut)


def test_openclip_cleaning_and_special_tokens():
  clean = openclip_tokenizer.clean
  assert clean("salt &amp;amp; pepper") == "salt & pepper"
  assert clean("it\u2019s a \u201ccat\u201d") == 'it\'s a "cat"'
  assert clean("\ufb01sh \uff54\uff45\uff58\uff54") == "fish text"
  assert clean("\u039f\u0394\u039f\u03a3") == "\u03bf\u03b4\u03bf\u03c2"
  assert clean("caf\u00c3\u00a9  \n bar\x07") == "caf\u00e9 bar"
  tok = openclip_tokenizer.load()
  assert len(tok) == 49408 and (tok.sot_id, tok.eot_id) == (49406, 49407)
  ids = tok(["a photo of a cat"], 10)[0].tolist()
  assert ids == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]
  # OpenCLIP spells its specials <start_of_text> / <end_of_text>; a literal
  # <|endoftext|> is text there (transformers ends the prompt at it).
  assert tok(["<end_of_text>"], 4)[0].tolist() == [49406, 49407, 49407, 0]
  text_eos = tok(["<|endoftext|>"], 8)[0]
  assert text_eos[1] != 49407 and 49407 in text_eos[2:]


def test_tokenizer_found_next_to_a_checkpoint(tmp_path):
  snap = tmp_path / "snap"
  (snap / "text_encoder").mkdir(parents=True)
  assert tokenizers.find_clip_tokenizer(snap) is None
  assert tokenizers.find_clip_tokenizer(tmp_path / "missing") is None
  tiny_tokenizer.write(snap / "tokenizer")
  for path in (snap, snap / "text_encoder", snap / "tokenizer"):
    assert tokenizers.find_clip_tokenizer(path) == snap / "tokenizer"
  folder = tmp_path / "pickscore"  # a transformers folder with its own
  tiny_tokenizer.write(folder)
  assert tokenizers.find_clip_tokenizer(folder) == folder
  with pytest.raises(errors.UserError, match="514 tokens .* embeds 49408"):
    tokenizers.check_vocab(514, 49408, str(folder), "x")
