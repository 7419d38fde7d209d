"""Each reward's prompt tokenizer: the one its model was trained with.

A reward that reads text declares a tokenizer *style* (``TOKENIZERS``):

- ``"openclip"``: OpenCLIP's own pipeline (``openclip_tokenizer``: ftfy,
  HTML unescaping, Python lower-casing, ``<start_of_text>`` /
  ``<end_of_text>``, zero padding). HPSv2 was trained and is scored with it.
- ``"hf"``: transformers' ``CLIPTokenizer`` (PickScore, transformers CLIP
  folders): the checkpoint folder's own tokenizer when it has one
  (``tokenizers.find_clip_tokenizer``), the vendored OpenAI BPE otherwise;
  padded with ``<|endoftext|>``.
- ``"checkpoint"`` (the ``clip`` reward): ``"openclip"`` for a checkpoint in
  the OpenCLIP layout, ``"hf"`` for a transformers one.
- ``"bert"`` (``image_reward``): BLIP's BERT WordPiece
  (``tokenizers.load_blip_tokenizer``) from the entry's ``tokenizer`` folder,
  or the folder holding its ``path`` (``ImageReward.pt``); always 35 ids,
  ImageReward's ``max_length``, padded with 0, whatever
  ``text.reward_max_length`` says.

For the CLIP family a config entry's ``tokenizer`` option (``"openclip"`` /
``"hf"``) overrides the declaration. ``embed_prompts`` stores each reward's
ids under ``reward_ids/<name>`` in the prompt cache, and a weighted sum of
rewards feeds each its own. Every tokenizer's vocabulary must be the size of
the reward's text embedding table, and CLIP ids are padded to
``text.reward_max_length``, which must be the tower's context length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from leapalign_jax.errors import UserError

STYLES = ("openclip", "hf")
VENDORED = "vendored-openai-bpe"
# Reward kind -> the tokenizer it was trained with; None reads no text.
TOKENIZERS = {
  "aesthetic": None,
  "clip": "checkpoint",
  "digits_rule": None,  # reads another reward's ids (its ``ids`` option)
  "hpsv2": "openclip",
  "image_reward": "bert",
  "pickscore": "hf",
  "python": None,  # host scorers (rewards.nondiff) read no prompt ids
}


@dataclasses.dataclass(frozen=True)
class RewardText:
  """How one reward's prompts become ids.

  Attributes:
    name: the reward's config name.
    style: ``"openclip"``, ``"hf"`` or ``"bert"``.
    folder: the HF tokenizer folder; "" for the vendored OpenAI BPE.
    length: padded length (``text.reward_max_length``; 35 for ``"bert"``).
    rows: the reward text tower's embedding rows (its vocabulary size).
    where: the checkpoint, for messages.
  """

  name: str
  style: str
  folder: str
  length: int
  rows: int
  where: str

  def tokenizer(self) -> Callable[[Sequence[str]], np.ndarray]:
    """Loads the tokenizer, checks its vocabulary; ``prompts -> ids``."""
    from leapalign_jax import openclip_tokenizer, tokenizers

    if self.style == "openclip":
      tok = openclip_tokenizer.load()
      label = "OpenCLIP BPE (vendored)"
    elif self.style == "bert":
      tok = tokenizers.load_blip_tokenizer(self.folder)
      label = self.folder
    else:
      tok = tokenizers.load_clip_tokenizer(self.folder or None)
      label = self.folder or "OpenAI BPE (vendored)"
    tokenizers.check_vocab(
      len(tok), self.rows, label, f"of rewards.{self.name} ({self.where})"
    )
    if self.style == "openclip":
      return lambda p: openclip_tokenizer.tokenize_openclip(tok, p, self.length)
    if self.style == "bert":
      return lambda p: tokenizers.tokenize_bert(tok, p, self.length)
    return lambda p: tokenizers.tokenize_clip(tok, p, self.length)


def style_of(kind_style: str, option: str, layout: str) -> str:
  """The style a reward tokenises with (see the module docstring)."""
  if option:
    return option
  if kind_style == "checkpoint":
    return "openclip" if layout == "openclip" else "hf"
  return kind_style


def check_option(name: str, option: Any) -> None:
  """Refuses a ``tokenizer`` option that names no style."""
  if option not in ("", *STYLES):
    raise UserError(
      f"rewards.{name}.tokenizer={option!r}; use '' (the reward's own), "
      f"{', '.join(map(repr, STYLES))}"
    )


def specs(rewards_cfg: Mapping[str, Any], length: int) -> dict[str, RewardText]:
  """``{name: RewardText}`` of every configured reward that reads text.

  Reads only the checkpoints' headers (tensor names and shapes), never the
  weights.

  Raises:
    UserError: an unknown reward, an empty or unreadable checkpoint path, a
      tower whose context length is not ``length``.
  """
  from leapalign_jax import tokenizers
  from leapalign_jax.convert import clip as convert_clip

  out = {}
  for name, entry in rewards_cfg.items():
    cfg = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
    kind = cfg.get("kind") or name
    if kind not in TOKENIZERS:
      raise UserError(
        f"unknown reward {kind!r} (rewards.{name}); registered: "
        f"{', '.join(sorted(TOKENIZERS))}"
      )
    declared = TOKENIZERS[kind]
    if declared is None:
      continue  # reads no text
    if declared == "bert":
      out[str(name)] = bert_spec(str(name), cfg)
      continue
    option = cfg.get("tokenizer", "")
    check_option(name, option)
    path = cfg.get("path", "")
    if not path:
      raise UserError(
        f"rewards.{name}.path is empty; the prompts' {name} ids depend on "
        "that checkpoint (its tokenizer and vocabulary): set it"
      )
    source, layout, _ = convert_clip.open_checkpoint(str(path))
    tower = convert_clip.infer_sizes(source, layout).get("text")
    if tower is None:
      raise UserError(f"rewards.{name}.path: {path} holds no text tower")
    if tower["max_position_embeddings"] != length:
      raise UserError(
        f"text.reward_max_length={length} but rewards.{name}'s text tower "
        f"takes {tower['max_position_embeddings']} tokens; set "
        f"text.reward_max_length={tower['max_position_embeddings']}"
      )
    style = style_of(declared, option, layout)
    folder = tokenizers.find_clip_tokenizer(path) if style == "hf" else None
    out[str(name)] = RewardText(
      name=str(name),
      style=style,
      folder=str(folder or ""),
      length=int(length),
      rows=int(tower["vocab_size"]),
      where=str(path),
    )
  return out


def bert_spec(name: str, cfg: Mapping[str, Any]) -> RewardText:
  """The ``image_reward`` entry's tokenizer: BLIP's BERT, 35 ids.

  Reads only the checkpoint's tensor names and shapes.

  Raises:
    UserError: an empty path, no ``vocab.txt`` where it is looked for, a
      text tower shorter than 35 positions.
  """
  from leapalign_jax import tokenizers
  from leapalign_jax.convert import image_reward as convert_ir

  path = str(cfg.get("path", ""))
  if not path:
    raise UserError(
      f"rewards.{name}.path is empty; the prompts' {name} ids depend on "
      "that checkpoint (its tokenizer and vocabulary): set it"
    )
  folder = cfg.get("tokenizer", "") or tokenizers.find_bert_tokenizer(path)
  if not folder:
    raise UserError(
      f"rewards.{name}: no BERT vocab.txt beside {path}; put "
      "bert-base-uncased's vocab.txt there or set "
      f"rewards.{name}.tokenizer to its folder"
    )
  source, layout = convert_ir.open_checkpoint(path)
  key = f"{convert_ir.TEXT_PREFIX[layout]}embeddings."
  try:
    rows = source.shape(key + "word_embeddings.weight")[0]
    positions = source.shape(key + "position_embeddings.weight")[0]
  except KeyError as e:
    raise UserError(
      f"rewards.{name}.path: {path} has no {e}; the checkpoint is incomplete"
    ) from None
  length = tokenizers.BLIP_MAX_LENGTH
  if positions < length:
    raise UserError(
      f"rewards.{name}.path: {path}'s text tower takes {positions} tokens, "
      f"fewer than ImageReward's {length}"
    )
  return RewardText(
    name=name,
    style="bert",
    folder=str(folder),
    length=length,
    rows=int(rows),
    where=path,
  )
