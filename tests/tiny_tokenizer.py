"""Tiny tokenizer folders: a CLIP BPE and a BERT WordPiece vocabulary.

``write``: byte-level symbols (256, and 256 with ``</w>``), two merges and
the two special tokens: 514 ids, laid out like a checkpoint's ``tokenizer/``
folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``), so a
test can tell whether a checkpoint's own tokenizer or the vendored BPE was
used.

``write_bert``: a ``vocab.txt`` in bert-base-uncased's layout (``[PAD]`` 0,
``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, then words and ``##`` pieces)
of ``BERT_SIZE`` entries; with BLIP's two added tokens it fills the tiny
ImageReward's 64 embedding rows.
"""

import json
import pathlib

from leapalign_jax import tokenizers

MERGES = (("c", "a"), ("ca", "t</w>"))
SIZE = 2 * 256 + len(MERGES) + 2


def write(folder) -> pathlib.Path:
  """Writes the folder; returns it."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  symbols = tokenizers.byte_symbols()
  tokens = [*symbols, *(s + "</w>" for s in symbols)]
  tokens += ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
  (folder / "vocab.json").write_text(
    json.dumps({t: i for i, t in enumerate(tokens)})
  )
  (folder / "merges.txt").write_text(
    "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
  )
  config = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
  }
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return folder


BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Its words; then ``##`` pieces and single letters, 62 entries in all.
BERT_WORDS = (
  *("a", "photo", "of", "the", "cat", "dog", "red", "blue", "green"),
  *("digit", "one", "two", "three", "on", "left", "right", "sitting"),
  *("in", "front", "house", "tree", "car", "small", "big", "with"),
  *("and", "at", "under", "over"),
)
BERT_SIZE = 62  # + [DEC] + [ENC] = 64 rows


def write_bert(folder) -> pathlib.Path:
  """Writes ``vocab.txt`` (``BERT_SIZE`` lines) into ``folder``; returns it."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tokens = [*BERT_SPECIAL, *BERT_WORDS, *(f"##{c}" for c in "sedlyr")]
  tokens += list("bcdefghijklmnopqrstuvwxyz")[: BERT_SIZE - len(tokens)]
  assert len(tokens) == len(set(tokens)) == BERT_SIZE, len(tokens)
  (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
  return folder
