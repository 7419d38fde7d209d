"""OpenCLIP model configs (open_clip's ``model_configs/*.json``) as ours.

OpenCLIP state dicts do not record head counts or the activation; an
OpenCLIP model config does, so a user can name the architecture of any
plain-ViT OpenCLIP checkpoint by giving its config's fields.
"""

from __future__ import annotations

from leapalign_jax.models.clip import (
  CLIPConfig,
  CLIPTextConfig,
  CLIPVisionConfig,
)

# open_clip's CLIPVisionCfg / CLIPTextCfg fields we build, with its defaults.
# Other fields (timm or hf towers, attentional pooling, layer scale...)
# change the architecture and are refused.
_OPENCLIP_VISION = dict(
  width=768, layers=12, head_width=64, mlp_ratio=4.0, patch_size=16,
  image_size=224,
)  # fmt: skip
_OPENCLIP_TEXT = dict(
  width=512, layers=12, heads=8, mlp_ratio=4.0, context_length=77,
  vocab_size=49408,
)  # fmt: skip


def _openclip_fields(cfg: dict, defaults: dict, what: str) -> dict:
  unknown = sorted(set(cfg) - set(defaults))
  if unknown:
    raise ValueError(
      f"OpenCLIP {what} fields {unknown} are not supported; a plain ViT CLIP "
      f"has {sorted(defaults)}"
    )
  return {**defaults, **cfg}


def openclip_config(model_cfg: dict) -> CLIPConfig:
  """The ``CLIPConfig`` of an OpenCLIP model config (its JSON as a dict).

  Fields and defaults are open_clip's: ``embed_dim``, ``quick_gelu``
  (default False: exact GELU), ``vision_cfg`` and ``text_cfg`` (either may
  be left out to describe the other tower alone).
  """
  top = _openclip_fields(
    model_cfg,
    dict(embed_dim=None, quick_gelu=False, vision_cfg=None, text_cfg=None),
    "model",
  )
  act = "quick_gelu" if top["quick_gelu"] else "gelu"
  text = vision = None
  if top["vision_cfg"] is not None:
    v = _openclip_fields(top["vision_cfg"], _OPENCLIP_VISION, "vision_cfg")
    vision = CLIPVisionConfig(
      hidden_size=v["width"],
      intermediate_size=int(v["width"] * v["mlp_ratio"]),
      num_hidden_layers=v["layers"],
      num_attention_heads=v["width"] // v["head_width"],
      image_size=v["image_size"],
      patch_size=v["patch_size"],
      hidden_act=act,
    )
  if top["text_cfg"] is not None:
    t = _openclip_fields(top["text_cfg"], _OPENCLIP_TEXT, "text_cfg")
    text = CLIPTextConfig(
      vocab_size=t["vocab_size"],
      hidden_size=t["width"],
      intermediate_size=int(t["width"] * t["mlp_ratio"]),
      num_hidden_layers=t["layers"],
      num_attention_heads=t["heads"],
      max_position_embeddings=t["context_length"],
      hidden_act=act,
    )
  return CLIPConfig(text, vision, top["embed_dim"])
