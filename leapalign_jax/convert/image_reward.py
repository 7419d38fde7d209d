"""ImageReward weights: ``ImageReward.pt`` and transformers BLIP names <-> ours.

Layouts:

* ``imagereward``: the published ``ImageReward.pt`` (``ImageReward`` state
  dict: ``blip.visual_encoder.*`` in timm's ViT names, ``blip.text_encoder.*``
  in BLIP ``med.py``'s BERT names, ``mlp.layers.*``), read with
  ``torch.load(weights_only=True)`` or from a ``.safetensors`` copy. BLIP's
  unused projections (``blip.vision_proj``, ``blip.text_proj``) and the
  ``position_ids`` buffer are skipped.
* ``hf``: the same model in transformers' BLIP names (``vision_model.*`` of
  ``BlipVisionModel``, ``text_encoder.*`` of ``BlipTextModel``) plus
  ``mlp.layers.*``.

Ours mirrors the ``imagereward`` names; kernels are transposed, the fused
qkv keeps its ``(3, heads, head_dim)`` structure, the class token and
position table drop their leading 1s, and the patch convolution is a linear
map of ``(ph, pw, c)`` patches.
"""

from __future__ import annotations

import dataclasses
import re

from leapalign_jax.convert import keymap
from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.convert.keymap import Src, reshape
from leapalign_jax.convert.sources import open_weights
from leapalign_jax.models.blip import BertConfig, ViTConfig
from leapalign_jax.models.image_reward import (
  VARIANTS,
  ImageRewardConfig,
)

LAYOUTS = ("imagereward", "hf")
SKIPPED = (
  re.compile(r"blip\.(vision_proj|text_proj)\."),
  re.compile(r".*position_ids$"),
)
VISION_PREFIX = {"imagereward": "blip.visual_encoder.", "hf": "vision_model."}
TEXT_PREFIX = {"imagereward": "blip.text_encoder.", "hf": "text_encoder."}


def _vision_rules(t: keymap.Table, v: ViTConfig, layout: str) -> None:
  D, H, p = v.hidden_size, v.num_heads, v.patch_size
  pre = VISION_PREFIX[layout]
  ours = ("blip", "visual_encoder")
  if layout == "imagereward":
    n = dict(
      patch="patch_embed.proj",
      cls="cls_token",
      pos="pos_embed",
      block="blocks",
      norm1="norm1",
      qkv="attn.qkv",
      proj="attn.proj",
      norm2="norm2",
      norm="norm",
    )
  else:
    n = dict(
      patch="embeddings.patch_embedding",
      cls="embeddings.class_embedding",
      pos="embeddings.position_embedding",
      block="encoder.layers",
      norm1="layer_norm1",
      qkv="self_attn.qkv",
      proj="self_attn.projection",
      norm2="layer_norm2",
      norm="post_layernorm",
    )
  t.add(
    (*ours, "patch_embed", "proj", "kernel"),
    None,
    [Src(f"{pre}{n['patch']}.weight", (D, 3, p, p))],
    keymap.conv2d(),
  )
  t.add(
    (*ours, "patch_embed", "proj", "bias"),
    None,
    [Src(f"{pre}{n['patch']}.bias", (D,))],
    keymap.identity(),
  )
  t.add(
    (*ours, "cls_token"),
    None,
    [Src(f"{pre}{n['cls']}", (1, 1, D))],
    reshape((D,), (1, 1, D)),
  )
  N = v.num_patches + 1
  t.add(
    (*ours, "pos_embed"),
    None,
    [Src(f"{pre}{n['pos']}", (1, N, D))],
    reshape((N, D), (1, N, D)),
  )
  F = int(D * v.mlp_ratio)
  for i in range(v.num_layers):
    b = f"{pre}{n['block']}.{i}"
    blk = (*ours, "blocks")
    _norm(t, (*blk, "norm1"), i, f"{b}.{n['norm1']}", D)
    _norm(t, (*blk, "norm2"), i, f"{b}.{n['norm2']}", D)
    t.lin((*blk, "attn", "qkv"), i, f"{b}.{n['qkv']}", D, (3, H, D // H))
    t.lin((*blk, "attn", "proj"), i, f"{b}.{n['proj']}", (H, D // H), D)
    t.lin((*blk, "mlp", "fc1"), i, f"{b}.mlp.fc1", D, F)
    t.lin((*blk, "mlp", "fc2"), i, f"{b}.mlp.fc2", F, D)
  _norm(t, (*ours, "norm"), None, f"{pre}{n['norm']}", D)


def _norm(t, target, layer, key, dim):
  t.add(
    (*target, "scale"), layer, [Src(f"{key}.weight", (dim,))], keymap.identity()
  )
  t.add(
    (*target, "bias"), layer, [Src(f"{key}.bias", (dim,))], keymap.identity()
  )


def _text_rules(t: keymap.Table, c: BertConfig, layout: str) -> None:
  """BLIP's BERT: the same names in ``med.py`` and transformers."""
  D, H, E = c.hidden_size, c.num_heads, c.encoder_width
  pre = TEXT_PREFIX[layout]
  ours = ("blip", "text_encoder")
  emb = (*ours, "embeddings")
  t.add(
    (*emb, "word_embeddings", "embedding"),
    None,
    [Src(f"{pre}embeddings.word_embeddings.weight", (c.vocab_size, D))],
    keymap.identity(),
  )
  t.add(
    (*emb, "position_embeddings"),
    None,
    [
      Src(
        f"{pre}embeddings.position_embeddings.weight",
        (c.max_position_embeddings, D),
      )
    ],
    keymap.identity(),
  )
  _norm(t, (*emb, "LayerNorm"), None, f"{pre}embeddings.LayerNorm", D)
  for i in range(c.num_layers):
    b = f"{pre}encoder.layer.{i}"
    lyr = (*ours, "encoder", "layer")
    for att, kv_in in (("attention", D), ("crossattention", E)):
      s = (*lyr, att, "self")
      t.lin((*s, "query"), i, f"{b}.{att}.self.query", D, (H, D // H))
      t.lin((*s, "key"), i, f"{b}.{att}.self.key", kv_in, (H, D // H))
      t.lin((*s, "value"), i, f"{b}.{att}.self.value", kv_in, (H, D // H))
      o = (*lyr, att, "output")
      t.lin((*o, "dense"), i, f"{b}.{att}.output.dense", (H, D // H), D)
      _norm(t, (*o, "LayerNorm"), i, f"{b}.{att}.output.LayerNorm", D)
    t.lin(
      (*lyr, "intermediate", "dense"),
      i,
      f"{b}.intermediate.dense",
      D,
      c.intermediate_size,
    )
    t.lin(
      (*lyr, "output", "dense"), i, f"{b}.output.dense", c.intermediate_size, D
    )
    _norm(t, (*lyr, "output", "LayerNorm"), i, f"{b}.output.LayerNorm", D)


def rules(c: ImageRewardConfig, layout: str) -> list[keymap.Rule]:
  """The key table of ``layout`` (see the module docstring)."""
  if layout not in LAYOUTS:
    raise ConversionError(
      f"unknown ImageReward layout {layout!r}; use one of {list(LAYOUTS)}"
    )
  t = keymap.Table()
  _vision_rules(t, c.vision, layout)
  _text_rules(t, c.text, layout)
  dims = (c.text.hidden_size, *c.mlp_dims, 1)
  index = _mlp_indices(len(dims) - 1)
  for i, (a, b) in zip(index, zip(dims[:-1], dims[1:])):
    t.lin(("mlp", "layers", i), None, f"mlp.layers.{i}", a, b)
  return t.rules


def _mlp_indices(n_linear: int) -> list[int]:
  """Sequential positions of the head's linears (0, 2, 4, 6, 7).

  The reference puts a dropout after every linear but the last two.
  """
  out, pos = [], 0
  for i in range(n_linear):
    out.append(pos)
    pos += 2 if i < n_linear - 2 else 1
  return out


# --------------------------------------------------------------------------
# Reading checkpoints.


def open_checkpoint(path: str):
  """``(tensors without the skipped keys, layout)`` of ``path``."""
  source, _ = open_weights(path)
  source = source.renamed(
    lambda k: None if any(r.match(k) for r in SKIPPED) else k
  )
  if any(k.startswith(VISION_PREFIX["imagereward"]) for k in source):
    return source, "imagereward"
  if any(k.startswith(VISION_PREFIX["hf"]) for k in source):
    return source, "hf"
  raise ConversionError(
    f"{source.description}: holds no ImageReward weights (no "
    "'blip.visual_encoder.*' or 'vision_model.*' tensors); pass "
    "ImageReward.pt or its .safetensors conversion"
  )


def _count(keys, pattern: str) -> int:
  idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(idx) + 1 if idx else 0


# Head counts are not stored in the weights: the published sizes'.
KNOWN_HEADS = {"vision": {1024: 16, 768: 12}, "text": {768: 12}}


def _heads(kind: str, width: int, where: str) -> int:
  heads = KNOWN_HEADS[kind].get(width)
  if heads is None:
    raise ConversionError(
      f"{where}: a {width}-wide {kind} tower is not a published ImageReward "
      "size and its head count is not stored in the weights; pass "
      "config=ImageRewardConfig(...) with the model's sizes"
    )
  return heads


def infer_config(source, layout: str) -> ImageRewardConfig:
  """The architecture read off the tensor names and shapes."""
  vp, tp = VISION_PREFIX[layout], TEXT_PREFIX[layout]
  if layout == "imagereward":
    patch, pos, blocks = "patch_embed.proj", "pos_embed", r"blocks\.(\d+)\."
  else:
    patch = "embeddings.patch_embedding"
    pos, blocks = "embeddings.position_embedding", r"encoder\.layers\.(\d+)\."
  try:
    D, _, p, _ = source.shape(f"{vp}{patch}.weight")
    n_pos = source.shape(f"{vp}{pos}")[1]
    vocab, T = source.shape(f"{tp}embeddings.word_embeddings.weight")
    max_pos = source.shape(f"{tp}embeddings.position_embeddings.weight")[0]
    inter = source.shape(f"{tp}encoder.layer.0.intermediate.dense.weight")[0]
  except KeyError as e:
    raise ConversionError(
      f"{source.description}: missing {e}; the checkpoint is incomplete"
    ) from None
  head = sorted(
    int(m.group(1))
    for k in source
    if (m := re.fullmatch(r"mlp\.layers\.(\d+)\.weight", k))
  )
  outs = [source.shape(f"mlp.layers.{i}.weight")[0] for i in head]
  where = source.description
  vision = ViTConfig(
    image_size=int(round((n_pos - 1) ** 0.5)) * p,
    patch_size=p,
    hidden_size=D,
    num_layers=_count(source, re.escape(vp) + blocks),
    num_heads=_heads("vision", D, where),
  )
  text = BertConfig(
    vocab_size=vocab,
    hidden_size=T,
    num_layers=_count(source, re.escape(tp) + r"encoder\.layer\.(\d+)\."),
    num_heads=_heads("text", T, where),
    intermediate_size=inter,
    max_position_embeddings=max_pos,
    encoder_width=D,
  )
  return ImageRewardConfig(vision=vision, text=text, mlp_dims=tuple(outs[:-1]))


def load_image_reward(
  path: str,
  *,
  config: ImageRewardConfig | str | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  **runtime,
):
  """Loads ImageReward; returns ``(config, model)``.

  ``path``: ``ImageReward.pt``, a ``.safetensors`` copy, or the
  transformers-named layout. Without ``config`` the architecture is read off
  the weights (published sizes only: head counts are not stored).
  """
  from flax import nnx

  from leapalign_jax.convert.loading import load_model, resolve_variant
  from leapalign_jax.models.image_reward import ImageReward

  source, layout = open_checkpoint(path)
  config = resolve_variant(config, VARIANTS, "ImageReward")
  base = config if config is not None else infer_config(source, layout)
  cfg = dataclasses.replace(
    base, dtype=dtype, param_dtype=param_dtype or dtype, **runtime
  )
  table = rules(cfg, layout)
  keymap.validate(
    table,
    source,
    f"ImageReward ({layout} layout)",
    "Is this ImageReward.pt (THUDM/ImageReward) or its conversion?",
  )
  model = load_model(
    lambda: ImageReward(cfg, rngs=nnx.Rngs(0)), table, source, cfg.param_dtype
  )
  return cfg, model


def export_image_reward(
  model, path: str, layout: str = "imagereward", dtype: str | None = None
) -> list[str]:
  """Writes ``model`` as one ``.safetensors`` file in ``layout``."""
  from leapalign_jax.convert.loading import export_tensors, write_checkpoint

  tensors = export_tensors(rules(model.config, layout), model, dtype)
  return write_checkpoint(tensors, path, single_file="ImageReward.safetensors")


def convert_image_reward(
  src: str,
  dst: str,
  dtype: str | None = None,
  config: ImageRewardConfig | str | None = None,
) -> list[str]:
  """Rewrites ``src`` (any layout) as ``ImageReward.pt`` names in safetensors.

  One tensor in memory at a time, so a TPU host can then load the reward
  without torch. ``config`` as in ``load_image_reward``.
  """
  from leapalign_jax.convert.loading import resolve_variant, write_checkpoint

  source, layout = open_checkpoint(src)
  config = resolve_variant(config, VARIANTS, "ImageReward")
  config = config if config is not None else infer_config(source, layout)
  table = rules(config, layout)
  keymap.validate(
    table,
    source,
    f"ImageReward ({layout} layout)",
    "Is this ImageReward.pt (THUDM/ImageReward) or its conversion?",
  )
  stored = source[table[0].srcs[0].key].dtype
  lazy = keymap.lazy_params(table, source, dtype or stored)
  tensors = keymap.export(rules(config, "imagereward"), lazy)
  return write_checkpoint(tensors, dst, single_file="ImageReward.safetensors")
