"""CPU-side CLIP (BPE), T5 (sentencepiece) and BLIP (BERT) tokenizers.

The tokenizers are transformers' fast tokenizers (no torch). Prompts are
turned into int32 numpy arrays padded to a fixed length exactly as diffusers'
`FluxPipeline` does (`padding="max_length"`, `truncation=True`): CLIP to 77
tokens padded with `<|endoftext|>`, T5 to 512 (dev) or 256 (schnell) tokens
padded with `<pad>` (id 0) after `</s>` (id 1). No attention masks: Flux
attends to the padding. Rewards trained with OpenCLIP tokenise with
`openclip_tokenizer` instead (`rewards/text.py` picks each reward's).

Sources:
  * CLIP: a local HF folder (the `tokenizer/` folder of a Flux snapshot, or the
    snapshot root; `find_clip_tokenizer` finds the one that belongs to a
    checkpoint), or, only when the checkpoint has none, the vendored OpenAI
    BPE merges file `assets/bpe_simple_vocab_16e6.txt.gz`, from which the
    49,408-token vocabulary is rebuilt in memory. `check_vocab` refuses a
    vocabulary of another size than the encoder's embedding table.
  * T5: a local HF folder (`tokenizer_2/` of a snapshot, or the root), or a
    small sentencepiece unigram model trained with `train_t5_tokenizer` (the
    digits world's T5 vocabulary).
  * BLIP (the ImageReward reward): bert-base-uncased's WordPiece vocabulary
    (`vocab.txt`) from a local folder, plus the two tokens BLIP adds
    (`load_blip_tokenizer`); ids padded with `[PAD]` (id 0) to 35 tokens,
    ImageReward's `max_length` (`tokenize_bert`).
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import transformers

from leapalign_jax.errors import UserError, require_local

_LOG = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
# FluxPipeline's `max_sequence_length` per variant.
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}

_BPE_PATH = (
  pathlib.Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
)
# The OpenAI vocabulary: 256 byte symbols, the same with `</w>`, the merges,
# and the two special tokens: 49,408 entries in all.
_NUM_MERGES = 49152 - 256 - 2
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# BLIP's ``init_tokenizer`` adds a decoder BOS and an encoder token to
# bert-base-uncased (30522 + 2 = the 30524 rows of its text embedding).
BLIP_ADDED = {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}
BLIP_MAX_LENGTH = 35  # ImageReward tokenises with max_length=35


def byte_symbols() -> list[str]:
  """The 256 printable stand-ins of byte-level BPE, in vocabulary order.

  Bytes that are printable Latin-1 characters stand for themselves; the
  others (controls, space, ...) are mapped, in byte order, to the code points
  from 256 upwards. The vocabulary lists the printable ones first.
  """
  printable = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  others = [b for b in range(256) if b not in set(printable)]
  code_points = printable + [256 + i for i in range(len(others))]
  return [chr(c) for c in code_points]


def byte_encoder() -> list[str]:
  """Byte value -> its stand-in symbol (``byte_symbols`` by byte value)."""
  symbols = byte_symbols()
  # The printable bytes stand for themselves; the others, in byte order,
  # take the code points from 256 up (``byte_symbols`` lists them last).
  printable = {s for s in symbols if ord(s) < 256}
  others = iter(s for s in symbols if ord(s) >= 256)
  return [chr(b) if chr(b) in printable else next(others) for b in range(256)]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str]]]:
  """Rebuilds the CLIP vocabulary (token -> id) and merges from the asset."""
  with gzip.open(_BPE_PATH, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  # Line 0 is a version header; the vocabulary uses the next _NUM_MERGES.
  merges = tuple(tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES])
  if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f"{_BPE_PATH}: malformed CLIP BPE merges file.")
  symbols = byte_symbols()
  tokens = [
    *symbols,
    *(s + "</w>" for s in symbols),
    *("".join(m) for m in merges),
    _BOS,
    _EOS,
  ]
  return {t: i for i, t in enumerate(tokens)}, merges


def _has_clip_tokenizer(folder: pathlib.Path) -> bool:
  return (folder / "tokenizer.json").is_file() or (
    (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
  )


def find_clip_tokenizer(path: str | os.PathLike) -> pathlib.Path | None:
  """The tokenizer folder that belongs to a CLIP checkpoint, if it has one.

  Looked for, in order: ``path/tokenizer/`` (a Flux or pipeline snapshot
  root), ``path`` itself (a transformers CLIP folder saved with its
  tokenizer, e.g. PickScore_v1) and, for a snapshot's ``text_encoder/``
  folder, its sibling ``tokenizer/``. None for a single file or a folder
  without one: the caller then uses the vendored OpenAI BPE.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    return None
  candidates = [path / "tokenizer", path]
  if path.name == "text_encoder":
    candidates.append(path.parent / "tokenizer")
  return next((c for c in candidates if _has_clip_tokenizer(c)), None)


def resolve_clip_tokenizer(path: str | os.PathLike) -> pathlib.Path:
  """``path/tokenizer`` for a snapshot root, else ``path`` itself."""
  return _resolve(path, "tokenizer")


def check_vocab(size: int, rows: int, tokenizer: str, encoder: str) -> None:
  """Refuses a tokenizer whose vocabulary is not the encoder's table.

  An id past the table would be clipped silently by the embedding lookup,
  and a table of another size means another vocabulary.

  Raises:
    UserError: one line naming both sides and their sizes.
  """
  if size != rows:
    raise UserError(
      f"the tokenizer {tokenizer} has {size} tokens but the text encoder "
      f"{encoder} embeds {rows}: they do not belong together; give the "
      "checkpoint its own tokenizer files (or set text.clip_tokenizer for "
      "Flux's CLIP)"
    )


def _resolve(path: str | os.PathLike, subfolder: str) -> pathlib.Path:
  """Returns `path/subfolder` for a snapshot root, else `path` itself."""
  require_local(path, "tokenizer")
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"Tokenizer folder not found: {path}")
  sub = path / subfolder
  return sub if sub.is_dir() else path


def load_clip_tokenizer(
  path: str | os.PathLike | None = None,
) -> transformers.CLIPTokenizer:
  """Loads the CLIP tokenizer from a local folder, or builds it offline.

  Args:
    path: a folder with an HF CLIP tokenizer (`vocab.json` + `merges.txt`, or
      `tokenizer.json`), or a Flux snapshot root holding `tokenizer/`. If
      None, the real OpenAI vocabulary is rebuilt from the vendored merges.

  Returns:
    A `CLIPTokenizer` with `model_max_length` 77 and `<|endoftext|>` padding.
  """
  if path is not None:
    folder = resolve_clip_tokenizer(path)
    return transformers.CLIPTokenizer.from_pretrained(
      str(folder), local_files_only=True
    )
  vocab, merges = clip_vocab_and_merges()
  return transformers.CLIPTokenizer(
    vocab=dict(vocab),
    merges=list(merges),
    pad_token=_EOS,
    model_max_length=CLIP_MAX_LENGTH,
  )


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to a temporary sibling of `path`, then renames it."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_clip_vocab_files(out_dir: str | os.PathLike) -> pathlib.Path:
  """Writes the offline CLIP vocabulary as an HF `tokenizer/` folder.

  The layout is that of a Flux snapshot's `tokenizer/` folder (`vocab.json`,
  `merges.txt`, `tokenizer_config.json`), so `load_clip_tokenizer(out_dir)`
  reads it back. Each file is written atomically.

  Args:
    out_dir: the folder to write (created if missing).

  Returns:
    The folder.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  vocab, merges = clip_vocab_and_merges()
  config = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": CLIP_MAX_LENGTH,
    "bos_token": _BOS,
    "eos_token": _EOS,
    "unk_token": _EOS,
    "pad_token": _EOS,
  }
  merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
  _atomic_write(out / "vocab.json", json.dumps(vocab).encode())
  _atomic_write(out / "merges.txt", merges_text.encode())
  _atomic_write(
    out / "tokenizer_config.json", json.dumps(config, indent=2).encode()
  )
  return out


def load_t5_tokenizer(path: str | os.PathLike) -> transformers.T5TokenizerFast:
  """Loads a T5 tokenizer from a local folder.

  Args:
    path: a folder with an HF T5 tokenizer (`tokenizer.json` and/or
      `spiece.model`), or a Flux snapshot root holding `tokenizer_2/`.

  Returns:
    The tokenizer.

  Raises:
    ValueError: if the loaded vocabulary is empty (transformers 5 builds an
      empty unigram model, mapping every word to `<unk>`, when it is handed a
      model file it does not read).
  """
  folder = _resolve(path, "tokenizer_2")
  tok = transformers.T5TokenizerFast.from_pretrained(
    str(folder), local_files_only=True
  )
  _check_t5_vocab(tok, folder)
  return tok


def _check_t5_vocab(tok: transformers.T5TokenizerFast, folder) -> None:
  """Raises if the tokenizer knows no piece besides its special tokens."""
  special = set(tok.all_special_tokens) | {"▁"}
  pieces = [
    t
    for t in tok.get_vocab()
    if t not in special and not t.startswith("<extra_id_")
  ]
  if not pieces:
    raise ValueError(
      f"{folder}: T5 tokenizer has an empty vocabulary (every word maps to"
      " <unk>); load the folder with from_pretrained, never"
      " T5TokenizerFast(vocab_file=...)."
    )


def train_t5_tokenizer(
  texts: Iterable[str],
  out_dir: str | os.PathLike,
  vocab_size: int = 256,
  model_max_length: int = T5_MAX_LENGTH["dev"],
  add_words: bool = True,
) -> transformers.T5TokenizerFast:
  """Trains a small sentencepiece unigram T5 tokenizer and saves it.

  The special ids follow T5: `<pad>` 0, `</s>` 1, `<unk>` 2, no BOS and no
  sentinel (`<extra_id_*>`) tokens. `vocab_size` is an upper bound: a small
  corpus may yield fewer pieces. Training is deterministic for fixed texts.

  Args:
    texts: training sentences (e.g. every prompt of the digits world).
    out_dir: folder to write (`spiece.model`, `tokenizer.json`,
      `tokenizer_config.json`); `load_t5_tokenizer(out_dir)` reads it back.
      Existing files of the same names are replaced atomically.
    vocab_size: maximum number of pieces, special tokens included.
    model_max_length: recorded in the tokenizer config.
    add_words: also train on each distinct word once, as its own sentence.
      On a tiny, repetitive corpus (the digits world's 1,250 prompts) the
      unigram trainer otherwise keeps few whole words ("digit" becomes
      "d ig it"); with them, every word of the corpus is one piece.

  Returns:
    The trained tokenizer, as loaded back from `out_dir`.
  """
  import sentencepiece as spm  # Only needed to train.

  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("train_t5_tokenizer needs at least one non-empty text.")
  if add_words:
    texts += sorted({w for t in texts for w in t.split()})
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=model,
    vocab_size=vocab_size,
    model_type="unigram",
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    hard_vocab_limit=False,
    character_coverage=1.0,
    shuffle_input_sentence=False,
    num_threads=1,
    minloglevel=2,
  )
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out, prefix=".t5tok.") as tmp:
    (pathlib.Path(tmp) / "spiece.model").write_bytes(model.getvalue())
    tok = transformers.T5TokenizerFast.from_pretrained(
      tmp, extra_ids=0, model_max_length=model_max_length
    )
    tok.save_pretrained(tmp)
    for name in sorted(os.listdir(tmp)):
      os.replace(pathlib.Path(tmp) / name, out / name)
  return load_t5_tokenizer(out)


def _tokenize(
  tok: transformers.PreTrainedTokenizerBase,
  prompts: Sequence[str],
  max_length: int,
  name: str,
) -> np.ndarray:
  """Pads/truncates like FluxPipeline; warns once if anything was cut."""
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts:
    return np.zeros((0, max_length), np.int32)
  ids = tok(
    prompts,
    padding="max_length",
    max_length=max_length,
    truncation=True,
  )["input_ids"]
  full = tok(prompts, padding=False, truncation=False, verbose=False)
  warn_truncated(name, prompts, [len(x) for x in full["input_ids"]], max_length)
  return np.asarray(ids, dtype=np.int32).reshape(len(prompts), max_length)


def warn_truncated(
  name: str, prompts: Sequence[str], lengths: Sequence[int], max_length: int
) -> None:
  """One warning for all the prompts of a call that were cut."""
  over = [i for i, n in enumerate(lengths) if n > max_length]
  if over:
    _LOG.warning(
      "%s: %d of %d prompts exceed %d tokens (longest %d) and were truncated;"
      " first: %r",
      name,
      len(over),
      len(prompts),
      max_length,
      max(lengths),
      prompts[over[0]][:80],
    )


def tokenize_clip(
  tok: transformers.PreTrainedTokenizerBase,
  prompts: Sequence[str],
  max_length: int = CLIP_MAX_LENGTH,
) -> np.ndarray:
  """CLIP ids as FluxPipeline computes them: `[BOS, ..., EOS, EOS pad...]`.

  Args:
    tok: a CLIP tokenizer (`load_clip_tokenizer`).
    prompts: the prompts (a single string is treated as one prompt).
    max_length: padded length (77 for Flux, HPSv2 and PickScore).

  Returns:
    int32 array [len(prompts), max_length]. Longer prompts are truncated to
    `BOS + max_length - 2 tokens + EOS`, with one logged warning per call.
  """
  return _tokenize(tok, prompts, max_length, "tokenize_clip")


def tokenize_t5(
  tok: transformers.PreTrainedTokenizerBase,
  prompts: Sequence[str],
  max_length: int,
) -> np.ndarray:
  """T5 ids as FluxPipeline computes them: `[..., </s>, <pad>=0 ...]`.

  Args:
    tok: a T5 tokenizer (`load_t5_tokenizer` / `train_t5_tokenizer`).
    prompts: the prompts (a single string is treated as one prompt).
    max_length: padded length, `T5_MAX_LENGTH[variant]` for real Flux (512 dev,
      256 schnell).

  Returns:
    int32 array [len(prompts), max_length]. Longer prompts are truncated to
    `max_length - 1 tokens + </s>`, with one logged warning per call.
  """
  return _tokenize(tok, prompts, max_length, "tokenize_t5")


def find_bert_tokenizer(path: str | os.PathLike) -> pathlib.Path | None:
  """The BERT vocabulary folder beside a checkpoint (``vocab.txt``), if any.

  Looked for in ``path`` (a folder) or the folder holding ``path`` (a file
  such as ``ImageReward.pt``), then in its ``tokenizer/`` subfolder.
  """
  path = pathlib.Path(path)
  folder = path if path.is_dir() else path.parent
  candidates = (folder, folder / "tokenizer")
  return next((c for c in candidates if (c / "vocab.txt").is_file()), None)


def load_blip_tokenizer(
  folder: str | os.PathLike,
) -> transformers.PreTrainedTokenizerBase:
  """BLIP's tokenizer: BERT WordPiece from ``folder`` plus ``BLIP_ADDED``.

  ``folder`` holds bert-base-uncased's ``vocab.txt`` (and optionally its
  ``tokenizer_config.json``); nothing is downloaded. Tokens already present
  (a saved BLIP tokenizer) are not added twice.
  """
  require_local(folder, "tokenizer")
  folder = pathlib.Path(folder)
  if not (folder / "vocab.txt").is_file():
    raise UserError(
      f"{folder}: no vocab.txt; put bert-base-uncased's vocab.txt (and "
      "tokenizer_config.json) there"
    )
  tok = transformers.BertTokenizer.from_pretrained(
    str(folder), local_files_only=True
  )
  tok.add_special_tokens(BLIP_ADDED)
  if tok.pad_token_id != 0:
    # The ImageReward reward masks the padding where the ids are 0.
    raise UserError(
      f"{folder}: the BERT [PAD] token has id {tok.pad_token_id}, not 0; "
      "use bert-base-uncased's vocab.txt ([PAD] on its first line)"
    )
  return tok


def tokenize_bert(
  tok: transformers.PreTrainedTokenizerBase,
  prompts: Sequence[str],
  max_length: int = BLIP_MAX_LENGTH,
) -> np.ndarray:
  """BERT ids as ImageReward computes them: ``[CLS] ... [SEP] [PAD]=0 ...``.

  Returns:
    int32 array [len(prompts), max_length]; longer prompts are cut to
    ``[CLS] + max_length - 2 tokens + [SEP]``, with one logged warning.
  """
  return _tokenize(tok, prompts, max_length, "tokenize_bert")
