"""CLIP-family rewards: HPSv2.1, PickScore and the CLIP score.

All three score an image against its prompt with a CLIP model (both towers
and their projections): the cosine of the L2-normalised image and text
features, optionally scaled. They differ in checkpoint, preprocessing and
default scale (method.md §8.3):

- ``hpsv2``: OpenCLIP ViT-H-14 fine-tuned on HPDv2 (HPS v2.1);
  ``hps_preprocess`` (longer side, zero pad); default ``scale="cosine"``.
- ``pickscore``: transformers ``CLIPModel`` ViT-H/14 (PickScore_v1);
  ``clip_preprocess`` (shorter side, centre crop); default ``"logit"``.
- ``clip``: any CLIP in either layout (e.g. openai/clip-vit-large-patch14);
  ``clip_preprocess`` with PickScore's defaults; default ``"cosine"``.

``scale`` (any of the three):

- ``"cosine"``: the raw cosine in [-1, 1]. HPSv2.1 is exactly this (its
  model normalises the features and applies no logit scale; Flux ≈ 0.31).
- ``"logit"``: ``exp(logit_scale) * cosine`` with the checkpoint's own
  ``logit_scale`` (≈ 100 for PickScore_v1): PickScore as its authors compute
  it and as the paper's tables report it (Flux ≈ 22.8).
- ``"clipscore"``: ``100 * max(cosine, 0)``, the CLIP score of torchmetrics
  and most T2I papers (Hessel et al.'s CLIP-S uses the factor 2.5
  instead). The clamp zeroes the gradient of negatively aligned samples.

PickScore's training scale is an open point (method.md §8.1, §14.6). The
paper's λ = 0.4 only makes sense against the raw cosine: at the ×100 scale
(Flux ≈ 22.8) ``λ - r < 0`` for every sample, so the hinge
``max(0, λ - r)`` would be zero and nothing would train; with the raw cosine
(≈ 0.22–0.26) λ = 0.4 lies above every sample, the same always-active
regime as HPSv2.1's λ = 0.55 against ≈ 0.31. The tables report the ×100
scale. The default here is the reference's ``"logit"`` (evaluation, the
paper's numbers); a LeapAlign PickScore training run with λ = 0.4 must set
``scale="cosine"`` (and may evaluate with a second, weight-0 entry of kind
``pickscore`` at the default scale).

Preprocessing is resized to the vision tower's ``image_size`` (224 for the
released models, e.g. 32 for the digits world's tiny CLIP), so any CLIP
works. Text ids are pooled at the EOS position: the argmax of the ids
(OpenAI / OpenCLIP) or the first ``eos_token_id`` (transformers configs whose
``eos_token_id`` is not 2). With the OpenAI BPE the EOS (49407) is the
largest id and the first EOS ends the prompt, so both rules pick the same
token whatever the padding id, and the causal text tower makes the pooled
state independent of the padding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from leapalign_jax.convert import clip as convert_clip
from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.rewards import base, text
from leapalign_jax.rewards import preprocess as pp

SCALES = ("cosine", "logit", "clipscore")
CROPS = ("floor", "round")

# Options every CLIP-family reward accepts (a reward adds its own defaults).
_COMMON = {
  "path": "",
  # The architecture: a ``models.clip.VARIANTS`` or OpenCLIP model name
  # ("ViT-H-14"), or an OpenCLIP model-config dict. Abstract builds
  # (``aot``) use it; a load uses it when the file has no config.json
  # (OpenCLIP state dicts record no head counts), checked against the
  # weights. "": the file's config.json or a known size, else refused.
  "variant": "",
  "dtype": "float32",  # compute dtype of the towers
  "param_dtype": None,  # storage dtype; None: ``dtype``
  "remat": "none",  # per block: none | full | dots | names
  "scan_layers": True,
  "attention": "auto",  # auto | xla | cudnn | splash (models/attention.py)
  "hidden_act": None,  # None: from the checkpoint (see convert.clip)
  "resample": pp.PICKSCORE_RESAMPLE,
  "saturate": pp.PICKSCORE_SATURATE,
  # "" tokenises as the reward was trained (``rewards.text``); "openclip"
  # or "hf" overrides.
  "tokenizer": "",
}

_HINTS = {
  "hpsv2": "point it at HPS_v2.1_compressed.pt (huggingface.co/xswu/HPSv2) "
  "or its .safetensors conversion",
  "pickscore": "point it at a yuvalkirstain/PickScore_v1 snapshot folder",
  "clip": "point it at a CLIP checkpoint (a transformers CLIPModel folder or "
  "an OpenCLIP state dict)",
}


def apply_scale(cos_B: jnp.ndarray, scale: str, logit_scale) -> jnp.ndarray:
  """Maps cosines to the configured scale (see the module docstring)."""
  if scale == "cosine":
    return cos_B
  if scale == "logit":
    return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * cos_B
  if scale == "clipscore":
    return 100.0 * jnp.maximum(cos_B, 0.0)
  raise base.UserError(f"unknown scale {scale!r}; use one of {SCALES}")


def abstract_clip_model(name: str, opts: dict[str, Any], towers):
  """``(config, model)`` of ``opts["variant"]`` with abstract parameters.

  For ahead-of-time compiles (``leapalign_jax.aot``): shapes and dtypes
  only, nothing read or allocated.
  """
  from leapalign_jax.models import clip

  variant = opts["variant"]
  if not variant:
    raise ValueError(
      f"rewards.{name}.variant is empty: an abstract build needs one of "
      f"{sorted(clip.VARIANTS)} or an OpenCLIP model-config dict"
    )
  try:
    config = convert_clip.architecture(variant).with_towers(towers)
  except ConversionError as e:
    raise ConversionError(f"rewards.{name}.variant: {e}") from None
  if opts["hidden_act"]:
    config = config.with_activation(opts["hidden_act"])
  config = dataclasses.replace(
    config,
    dtype=opts["dtype"],
    param_dtype=opts["param_dtype"] or opts["dtype"],
    remat=opts["remat"],
    scan_layers=bool(opts["scan_layers"]),
    attention=opts["attention"],
  )
  return config, nnx.eval_shape(lambda: clip.CLIP(config, rngs=nnx.Rngs(0)))


def load_clip_model(
  name: str, path: str, opts: dict[str, Any], towers, abstract: bool = False
):
  """Loads the CLIP of a reward; conversion errors name the config field.

  With ``abstract`` the model of ``opts["variant"]`` is built without
  weights (``abstract_clip_model``) and ``path`` is not read.
  """
  if abstract:
    return abstract_clip_model(name, opts, towers)
  dtype = opts["dtype"]
  try:
    return convert_clip.load_clip(
      path,
      towers=towers,
      variant=opts["variant"] or None,
      hidden_act=opts["hidden_act"],
      dtype=dtype,
      param_dtype=opts["param_dtype"] or dtype,
      remat=opts["remat"],
      scan_layers=bool(opts["scan_layers"]),
      attention=opts["attention"],
    )
  except ConversionError as e:
    field = "clip_path" if towers == ("vision",) else "path"
    raise ConversionError(f"rewards.{name}.{field}: {e}") from None


def _fp32_logit_scale(name: str, path: str) -> np.ndarray:
  """The checkpoint's ``logit_scale`` in float32, read from the file.

  The towers may be stored in bf16, which would round ``logit_scale`` (4.6052
  for PickScore) to 4.59375: 1.2% off every logit-scaled score.
  """
  source, _, _ = convert_clip.open_checkpoint(path)
  if "logit_scale" not in source:
    raise ConversionError(
      f"rewards.{name}.path: {path} has no 'logit_scale'; use "
      "scale='cosine' or 'clipscore'"
    )
  return np.asarray(source["logit_scale"], np.float32)


def _build(
  name: str, cfg: dict, kind: str, defaults: dict, abstract: bool = False
) -> base.Loaded:
  opts = base.options(name, cfg, {**_COMMON, **defaults})
  path = (
    opts["path"]
    if abstract
    else base.require_path(name, "path", opts["path"], _HINTS[kind])
  )
  scale = opts["scale"]
  base.choice(name, "scale", scale, SCALES)
  base.choice(name, "resample", opts["resample"], pp.RESAMPLE_METHODS)
  if "crop" in opts:
    base.choice(name, "crop", opts["crop"], CROPS)
  text.check_option(name, opts["tokenizer"])
  config, model = load_clip_model(
    name, path, opts, ("text", "vision"), abstract
  )
  declared = text.TOKENIZERS[kind]
  # Only a ``clip`` reward's style depends on the file (its layout).
  needs_layout = declared == "checkpoint" and not opts["tokenizer"]
  layout = _layout(path) if needs_layout and not abstract else "hf"
  style = text.style_of(declared, opts["tokenizer"], layout)
  if config.projection_dim is None:
    raise ConversionError(
      f"rewards.{name}.path: {path} holds CLIP towers without projections "
      f"(bare text/vision encoders); {kind} needs a full CLIP model"
    )
  if scale == "logit" and not abstract:
    model.logit_scale.set_value(jnp.asarray(_fp32_logit_scale(name, path)))
  size = config.vision.image_size
  if kind == "hpsv2":
    prep = functools.partial(
      pp.hps_preprocess,
      size=size,
      resample=opts["resample"],
      saturate=bool(opts["saturate"]),
    )
  else:
    prep = functools.partial(
      pp.clip_preprocess,
      size=size,
      resample=opts["resample"],
      crop=opts["crop"],
      saturate=bool(opts["saturate"]),
    )
  graphdef, state = nnx.split(model)

  def embed(params, images_BHWC, ids_BL):
    """Unit image and text embeddings ``[B, P]`` (float32)."""
    if ids_BL is None:
      raise ValueError(f"reward {name!r} ({kind}) needs the prompt's ids")
    clip = nnx.merge(graphdef, base.frozen(params))
    img_BP = base.unit(clip.image_features(prep(images_BHWC)))
    return img_BP, base.unit(clip.text_features(ids_BL))

  def score(params, images_BHWC, ids_BL):
    img_BP, txt_BP = embed(params, images_BHWC, ids_BL)
    logit_scale = None
    if scale == "logit":
      clip = nnx.merge(graphdef, base.frozen(params))
      logit_scale = clip.logit_scale[...]
    return apply_scale(jnp.sum(img_BP * txt_BP, axis=-1), scale, logit_scale)

  return base.Loaded(
    state,
    score,
    config.text.max_position_embeddings,
    style,
    embed=embed,
  )


def _layout(path: str) -> str:
  """The checkpoint's layout ("hf" / "openclip"), read from its header."""
  return convert_clip.open_checkpoint(path)[1]


def build_hpsv2(name: str, cfg: dict, abstract: bool = False) -> base.Loaded:
  """HPSv2.1: OpenCLIP ViT-H-14, ``hps_preprocess``, the plain cosine."""
  return _build(
    name,
    cfg,
    "hpsv2",
    {
      "scale": "cosine",
      "resample": pp.HPS_RESAMPLE,
      "saturate": pp.HPS_SATURATE,
    },
    abstract,
  )


def build_pickscore(
  name: str, cfg: dict, abstract: bool = False
) -> base.Loaded:
  """PickScore: CLIPModel ViT-H/14, ``clip_preprocess``, logit-scaled."""
  return _build(
    name,
    cfg,
    "pickscore",
    {
      "scale": "logit",
      "crop": "floor",  # transformers' CLIPImageProcessor
      "resample": pp.PICKSCORE_RESAMPLE,
      "saturate": pp.PICKSCORE_SATURATE,
    },
    abstract,
  )


def build_clip(name: str, cfg: dict, abstract: bool = False) -> base.Loaded:
  """CLIP score of any CLIP, preprocessed as PickScore is."""
  return _build(
    name,
    cfg,
    "clip",
    {
      "scale": "cosine",
      "crop": "floor",
      "resample": pp.PICKSCORE_RESAMPLE,
      "saturate": pp.PICKSCORE_SATURATE,
    },
    abstract,
  )
