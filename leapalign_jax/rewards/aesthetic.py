"""LAION aesthetic score: the improved-aesthetic-predictor head on CLIP-L/14.

``score = head(unit(E(x)))``: ``E`` is OpenAI CLIP ViT-L/14's projected image
embedding (768-d, ``encode_image``), L2-normalised as the upstream
``normalized`` does, and ``head`` the MLP of ``models.aesthetic`` (no
activations in ``sac+logos+ava1-l14-linearMSE.pth``). Scores are roughly
1–10. Preprocessing is OpenAI CLIP's own ``clip.load`` transform, which the
upstream script uses: PIL bicubic resize of the shorter side, torchvision
``CenterCrop`` (``crop="round"``), OpenAI mean/std. No text is read.

Config fields: ``path`` (the head's ``.pth`` / ``.safetensors``),
``clip_path`` (the ViT-L/14: a transformers ``openai/clip-vit-large-patch14``
folder or an OpenCLIP-layout file; only the vision tower and its projection
are loaded), and the towers' ``dtype`` / ``param_dtype`` / ``remat`` /
``scan_layers`` / ``attention``. ``hidden_act`` defaults to ``quick_gelu``,
OpenAI CLIP's activation, which an OpenCLIP-layout file does not record.
The head always computes in float32.
"""

from __future__ import annotations

import functools

from flax import nnx

from leapalign_jax.convert.aesthetic import load_aesthetic_head
from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.models.aesthetic import AestheticConfig, AestheticHead
from leapalign_jax.rewards import base, clip_score
from leapalign_jax.rewards import preprocess as pp

_DEFAULTS = {
  "path": "",
  "clip_path": "",
  "variant": "vit-l-14",  # the CLIP tower's architecture (abstract builds)
  "dtype": "float32",
  "param_dtype": None,
  "remat": "none",
  "scan_layers": True,
  "attention": "auto",
  "hidden_act": "quick_gelu",
  "resample": "pil_bicubic",
  "crop": "round",  # torchvision CenterCrop, as in clip.load's transform
  "saturate": True,  # PIL on uint8 images
}


def build(name: str, cfg: dict, abstract: bool = False) -> base.Loaded:
  """Loads the head and the ViT-L/14 vision tower; returns the reward.

  With ``abstract`` nothing is read: the head and ``variant``'s vision tower
  are built with abstract parameters (``leapalign_jax.aot``).
  """
  opts = base.options(name, cfg, _DEFAULTS)
  base.choice(name, "resample", opts["resample"], pp.RESAMPLE_METHODS)
  base.choice(name, "crop", opts["crop"], clip_score.CROPS)
  if abstract:
    path = clip_path = "<abstract>"
    head_cfg = AestheticConfig()
    head = nnx.eval_shape(lambda: AestheticHead(head_cfg, rngs=nnx.Rngs(0)))
  else:
    path = base.require_path(
      name,
      "path",
      opts["path"],
      "point it at sac+logos+ava1-l14-linearMSE.pth (LAION "
      "improved-aesthetic-predictor) or its .safetensors conversion",
    )
    clip_path = base.require_path(
      name,
      "clip_path",
      opts["clip_path"],
      "point it at OpenAI CLIP ViT-L/14 (an openai/clip-vit-large-patch14 "
      "snapshot folder)",
    )
    try:
      head_cfg, head = load_aesthetic_head(path)
    except ConversionError as e:
      raise ConversionError(f"rewards.{name}.path: {e}") from None
  config, clip = clip_score.load_clip_model(
    name, clip_path, opts, ("vision",), abstract
  )
  if config.projection_dim != head_cfg.embed_dim:
    got = (
      "no projection"
      if config.projection_dim is None
      else f"{config.projection_dim}-d embeddings"
    )
    raise ConversionError(
      f"rewards.{name}.clip_path: {clip_path} gives {got} but the head "
      f"({path}) takes {head_cfg.embed_dim}-d; the LAION head needs OpenAI "
      "CLIP ViT-L/14 with its visual projection"
    )
  prep = functools.partial(
    pp.clip_preprocess,
    size=config.vision.image_size,
    resample=opts["resample"],
    crop=opts["crop"],
    saturate=bool(opts["saturate"]),
  )
  clip_def, clip_state = nnx.split(clip)
  head_def, head_state = nnx.split(head)

  def score(params, images_BHWC, ids_BL):
    del ids_BL  # image-only
    p = base.frozen(params)
    tower = nnx.merge(clip_def, p["clip"])
    emb_BP = base.unit(tower.image_features(prep(images_BHWC)))
    return nnx.merge(head_def, p["head"])(emb_BP)

  return base.Loaded({"clip": clip_state, "head": head_state}, score, 0)
