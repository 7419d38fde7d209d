"""ImageReward (Xu et al. 2023) as a reward: BLIP's image-text preference.

``score = (mlp(T(ids, mask | V(x))[:, 0]) - mean) / std``, the reference's
``score_gard``: ``V`` is BLIP's ViT-L/16 (its image tokens), ``T`` BLIP's
BERT over the prompt attending to them, ``mlp`` the five-linear head and
``mean`` / ``std`` ImageReward's published constants (0.16717362830052426,
1.0333394966054072; ``models.image_reward``). Scores are roughly in
[-2, 2]. The attention mask is rebuilt from the ids (``[PAD]`` is 0), as
the reference passes the tokenizer's mask.

Preprocessing is the reference's ``_transform(224)``: shorter side to the
tower's ``image_size`` with bicubic interpolation, torchvision
``CenterCrop`` (``crop="round"``), OpenAI CLIP mean/std. The default is
its PIL path on uint8 images (``score`` / ``inference_rank``:
``"pil_bicubic"``, ``saturate=True``); ReFL's training loop runs the same
transform on the float tensor (``resample="torch_bicubic_aa"``,
``saturate=False``).

Prompt ids are BLIP's BERT tokens (``rewards.text``, style ``"bert"``): 35
of them, ``[CLS]`` first, zero padded. Config fields: ``path``
(``ImageReward.pt`` or a ``.safetensors`` copy), ``tokenizer`` (the folder
of bert-base-uncased's ``vocab.txt``; "" = beside ``path``; read by
``embed_prompts`` only), ``variant`` (a ``models.image_reward.VARIANTS``
name; "" reads the sizes off the weights, published sizes only; abstract
builds default to ``"imagereward"``), ``dtype`` / ``param_dtype`` /
``remat`` / ``attention`` (the towers) and ``resample`` / ``crop`` /
``saturate``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from flax import nnx

from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.rewards import base, clip_score
from leapalign_jax.rewards import preprocess as pp

PAD_ID = 0  # bert-base-uncased's [PAD]

_DEFAULTS = {
  "path": "",
  "tokenizer": "",  # BERT vocab folder, for embed_prompts (rewards.text)
  "variant": "",
  "dtype": "float32",
  "param_dtype": None,
  "remat": "none",
  "attention": "auto",  # the vision tower's kernel (models/attention.py)
  "resample": "pil_bicubic",
  "crop": "round",  # torchvision CenterCrop
  "saturate": True,  # PIL on uint8 images
}


def _model(name: str, opts: dict, abstract: bool):
  """``(config, model)``: loaded from ``path``, or abstract (``aot``)."""
  from leapalign_jax.convert.image_reward import load_image_reward
  from leapalign_jax.convert.loading import resolve_variant
  from leapalign_jax.models import image_reward as ir

  runtime = dict(remat=opts["remat"], attention=opts["attention"])
  dtype = opts["dtype"]
  param_dtype = opts["param_dtype"] or dtype
  if abstract:
    variant = opts["variant"] or "imagereward"
    config = dataclasses.replace(
      resolve_variant(variant, ir.VARIANTS, "ImageReward"),
      dtype=dtype,
      param_dtype=param_dtype,
      **runtime,
    )
    model = nnx.eval_shape(lambda: ir.ImageReward(config, rngs=nnx.Rngs(0)))
    return config, model
  path = base.require_path(
    name,
    "path",
    opts["path"],
    "point it at ImageReward.pt (huggingface.co/THUDM/ImageReward) or its "
    ".safetensors conversion",
  )
  try:
    return load_image_reward(
      path,
      config=opts["variant"] or None,
      dtype=dtype,
      param_dtype=param_dtype,
      **runtime,
    )
  except ConversionError as e:
    raise ConversionError(f"rewards.{name}.path: {e}") from None


def build(name: str, cfg: dict, abstract: bool = False) -> base.Loaded:
  """Loads ImageReward; returns the reward (reads BLIP's BERT ids)."""
  opts = base.options(name, cfg, _DEFAULTS)
  base.choice(name, "resample", opts["resample"], pp.RESAMPLE_METHODS)
  base.choice(name, "crop", opts["crop"], clip_score.CROPS)
  config, model = _model(name, opts, abstract)
  prep = functools.partial(
    pp.clip_preprocess,
    size=config.vision.image_size,
    resample=opts["resample"],
    crop=opts["crop"],
    saturate=bool(opts["saturate"]),
  )
  graphdef, state = nnx.split(model)

  def score(params, images_BHWC, ids_BL):
    if ids_BL is None:
      raise ValueError(f"reward {name!r} (image_reward) needs the prompt's ids")
    mask_BL = (ids_BL != PAD_ID).astype(jnp.int32)
    model = nnx.merge(graphdef, base.frozen(params))
    return model.score(prep(images_BHWC), ids_BL, mask_BL)

  return base.Loaded(state, score, config.text_length, "bert")
