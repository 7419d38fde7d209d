"""A tiny CLIP tokenizer folder of another vocabulary than OpenAI's.

Byte-level symbols (256, and 256 with ``</w>``), two merges and the two
special tokens: 514 ids, laid out like a checkpoint's ``tokenizer/`` folder
(``vocab.json``, ``merges.txt``, ``tokenizer_config.json``), so a test can
tell whether a checkpoint's own tokenizer or the vendored BPE was used.
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
