"""OpenCLIP's text pipeline, for rewards trained with it (HPSv2).

OpenCLIP models (``open_clip.tokenize``, what HPSv2 was trained and is
scored with) do not tokenise as transformers' ``CLIPTokenizer`` does; on
real prompt sets the ids differ for curly quotes, HTML entities, full-width
forms, mis-encoded text, ligatures, control characters, a final sigma and
special-token spellings. This module reproduces OpenCLIP's behaviour:

1. clean: ``ftfy.fix_text`` (mojibake, curly quotes, ligatures, width,
   control characters, NFC), HTML entities unescaped twice (``&amp;lt;`` ->
   ``<``), whitespace runs collapsed, Python's ``str.lower`` (which knows
   the final sigma);
2. split with the CLIP pattern, case-insensitively, where
   ``<start_of_text>`` / ``<end_of_text>`` are OpenCLIP's spellings of the
   special tokens (a literal ``<|endoftext|>`` is ordinary text there);
3. byte-level BPE over the OpenAI merges (``tokenizers``' vendored asset,
   the vocabulary of every OpenCLIP ViT-H-14 / ViT-L-14 checkpoint);
4. ``[SOT] + ids + [EOT]``, cut to the context length with the EOT kept
   last, padded with id 0 (OpenCLIP's zeros; the EOT is the largest id, so
   the towers pool at the argmax whatever the padding).

Tested id for id against ``open_clip.tokenize`` (``tests/tokenizers_test``).
"""

from __future__ import annotations

import functools
import html
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

from leapalign_jax import tokenizers

SOT = "<start_of_text>"
EOT = "<end_of_text>"
CONTEXT_LENGTH = 77
# The special spellings come first, so they win over the punctuation rule.
_SPLIT = regex.compile(
  rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
  regex.IGNORECASE,
)


def clean(text: str) -> str:
  """OpenCLIP's ``lower`` cleaning: ftfy, HTML twice, whitespace, lower."""
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).lower()


class OpenCLIPTokenizer:
  """``open_clip.tokenize`` over the OpenAI BPE, without torch.

  ``tok(prompts, length)`` gives int32 ids ``[N, length]``; ``len(tok)`` is
  the vocabulary size (49,408), the rows of the text tower's embedding.
  """

  def __init__(self):
    vocab, merges = tokenizers.clip_vocab_and_merges()
    # OpenCLIP names the last two entries by its own spellings.
    ids = {t: i for t, i in vocab.items() if i < len(vocab) - 2}
    ids[SOT], ids[EOT] = len(vocab) - 2, len(vocab) - 1
    self.vocab = ids
    self.sot_id, self.eot_id = ids[SOT], ids[EOT]
    self._ranks = {m: r for r, m in enumerate(merges)}
    self._byte = tokenizers.byte_encoder()

  def __len__(self) -> int:
    return len(self.vocab)

  @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 (one per process)
  def _bpe(self, word: str) -> tuple[int, ...]:
    """Ids of one pre-token: merge the best-ranked pair until none is left."""
    if word in (SOT, EOT):
      return (self.vocab[word],)
    symbols = "".join(self._byte[b] for b in word.encode("utf-8"))
    parts = [*symbols[:-1], symbols[-1] + "</w>"]
    while len(parts) > 1:
      pairs = set(zip(parts, parts[1:]))
      best = min(pairs, key=lambda p: self._ranks.get(p, len(self._ranks)))
      if best not in self._ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return tuple(self.vocab[p] for p in parts)

  def encode(self, text: str) -> list[int]:
    """The ids of ``text`` without the special tokens around it."""
    out = []
    for word in _SPLIT.findall(clean(text)):
      out.extend(self._bpe(word))
    return out

  def __call__(
    self, prompts: Sequence[str], length: int = CONTEXT_LENGTH
  ) -> np.ndarray:
    """``[SOT, ..., EOT, 0...]`` per prompt, int32 ``[N, length]``."""
    if isinstance(prompts, str):
      prompts = [prompts]
    return self.pad([self.with_specials(p) for p in prompts], length)

  def with_specials(self, prompt: str) -> list[int]:
    """``[SOT, ...ids, EOT]`` at full length."""
    return [self.sot_id, *self.encode(prompt), self.eot_id]

  def pad(self, rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """Cuts rows to ``length`` keeping the EOT last; pads with zeros."""
    out = np.zeros((len(rows), length), np.int32)
    for r, ids in enumerate(rows):
      if len(ids) > length:
        ids = [*ids[: length - 1], self.eot_id]
      out[r, : len(ids)] = ids
    return out


@functools.cache
def load() -> OpenCLIPTokenizer:
  """The tokenizer (built once per process: its BPE cache is shared)."""
  return OpenCLIPTokenizer()


def tokenize_openclip(
  tok: OpenCLIPTokenizer, prompts: Sequence[str], max_length: int
) -> np.ndarray:
  """``tok(prompts, max_length)``; one warning if any prompt was cut."""
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  rows = [tok.with_specials(p) for p in prompts]
  tokenizers.warn_truncated(
    "tokenize_openclip", prompts, [len(r) for r in rows], max_length
  )
  return tok.pad(rows, max_length)
