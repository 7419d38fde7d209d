"""CLIP weights: transformers and OpenCLIP layouts <-> ours.

Two layouts, whose key tables (``convert.clip_keys``) run both directions:
- ``hf``: transformers ``CLIPModel`` / ``CLIPTextModel(WithProjection)`` /
  ``CLIPVisionModel(WithProjection)`` (``openai/clip-vit-large-patch14``,
  PickScore, Flux's ``text_encoder/``). Separate q/k/v rows are concatenated
  into our fused qkv kernel.
- ``openclip``: OpenCLIP ``CLIP`` state dicts (HPSv2.1's ViT-H-14 ``.pt``):
  the fused ``in_proj_weight`` maps to our qkv kernel directly, ``c_fc`` /
  ``c_proj`` to ``fc1`` / ``fc2``, and the projections ``text_projection`` /
  ``visual.proj`` are stored ``[width, dim]`` (used as ``x @ proj``), i.e.
  already in our kernel layout.
Sizes are read from the tensor shapes. What the weights do not record comes
from ``config.json`` when there is one, else from ``variant=`` (the
architecture a caller names, checked against the shapes), else from the
released models in ``models.clip.VARIANTS`` whose sizes these are: head
counts, the activation (transformers default quick_gelu, OpenCLIP default
exact GELU) and the pooling rule (argmax of the ids unless a config names
another eos id). Any other size is refused: head widths differ between
models (64 for ViT-L, 80 for ViT-H, 88 for g, 104 for bigG), so a guessed
head count would load without error and compute something else.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from leapalign_jax.convert import keymap
from leapalign_jax.convert.clip_keys import NAMES, RULES
from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.convert.sources import open_weights, strip_prefix
from leapalign_jax.models.clip import (
  VARIANTS,
  CLIPConfig,
  CLIPTextConfig,
  CLIPVisionConfig,
)

LAYOUTS = ("hf", "openclip")
TOWERS = ("text", "vision")
# Non-parameter buffers some writers save; they carry no weights.
_BUFFERS = re.compile(r"(^|\.)(position_ids|attn_mask)$")
_ANCHORS = (
  "text_model.final_layer_norm.weight",
  "vision_model.post_layernorm.weight",
  "visual.ln_post.weight",
  "ln_final.weight",
)
# transformers CLIPTextModel / CLIPVisionModel saved without the tower prefix.
_BARE_TEXT = "embeddings.token_embedding.weight"
_BARE_VISION = "embeddings.patch_embedding.weight"
_TOP_LEVEL = (
  "text_projection.weight",
  "visual_projection.weight",
  "logit_scale",
)


# --------------------------------------------------------------------------
# Reading checkpoints: layout, towers and sizes.


def open_checkpoint(path: str) -> tuple[object, str, dict]:
  """Opens CLIP weights: ``(normalised source, layout, config.json dict)``.

  Accepts a transformers folder (or a Flux pipeline root, via its
  ``text_encoder/``), a ``.safetensors`` file or a PyTorch pickle. Buffers
  (``position_ids``, ``attn_mask``) and a prefix shared by every key are
  dropped; transformers tower models saved without their ``text_model.`` /
  ``vision_model.`` prefix get it back.
  """
  source, cfg = open_weights(path, subfolders=("text_encoder",))
  source = source.renamed(lambda k: None if _BUFFERS.search(k) else k)
  source = strip_prefix(source, _ANCHORS)
  for bare, prefix in (
    (_BARE_TEXT, "text_model."),
    (_BARE_VISION, "vision_model."),
  ):
    if bare in source:
      source = source.renamed(
        lambda k, p=prefix: k if k in _TOP_LEVEL else p + k
      )
      break
  keys = list(source)
  if any(k.startswith(("text_model.", "vision_model.")) for k in keys):
    layout = "hf"
  elif "token_embedding.weight" in source or any(
    k.startswith("visual.") for k in keys
  ):
    layout = "openclip"
  else:
    raise ConversionError(
      f"{source.description}: holds no CLIP weights (no 'text_model.*' / "
      "'vision_model.*' (transformers) nor 'token_embedding.weight' / "
      "'visual.*' (OpenCLIP) keys)"
    )
  return source, layout, cfg


def _owner(key: str, layout: str) -> str:
  """Which part a source key belongs to: text, vision or logit_scale."""
  if key in ("logit_scale", "logit_bias"):
    return "logit_scale"
  if layout == "hf":
    return "vision" if key.startswith(("vision_model.", "visual_")) else "text"
  return "vision" if key.startswith("visual.") else "text"


def _is_projection(key: str) -> bool:
  return key in (
    "text_projection",
    "text_projection.weight",
    "visual_projection.weight",
    "visual.proj",
  )


# Per tower: the names of the tensors whose shapes give the sizes
# (embedding, positions, blocks prefix).
_SIZE_KEYS = {"text": ("token", "text_pos", "text_blocks")}
_SIZE_KEYS["vision"] = ("patch", "vision_pos", "vision_blocks")
# The tower fields the weights determine (compared by ``check_matches``).
_ARCH = {
  "text": (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "max_position_embeddings",
  ),
  "vision": (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "image_size",
    "patch_size",
    "num_channels",
  ),
}
# Released models, not the test sizes. A tower's (width, layers) fixes its
# head count among these (g/14's text tower is H/14's).
_KNOWN = ("vit-l-14", "vit-h-14", "vit-g-14", "vit-bigg-14")
# Where a caller names the architecture (used in the refusal).
_FIX = (
  "name the architecture: config= or variant= (a models.clip.VARIANTS or "
  "OpenCLIP model name such as 'ViT-bigG-14', an OpenCLIP model-config dict, "
  "or a CLIPConfig; a reward's variant option; convert clip --variant)"
)


def _need(source, key: str) -> tuple[int, ...]:
  if key not in source:
    raise ConversionError(
      f"{source.description}: missing {key!r}; the checkpoint is incomplete"
    )
  return tuple(source.shape(key))


def infer_sizes(source, layout: str) -> dict:
  """``{tower: {field: size}}`` for each tower present, plus projection_dim."""
  out = {}
  names = NAMES[layout]
  for kind, size_keys in _SIZE_KEYS.items():
    embed, pos, blocks = (names[k] for k in size_keys)
    if embed not in source:
      continue
    pattern = re.escape(blocks) + r"(\d+)\."
    found = {int(m.group(1)) for k in source if (m := re.match(pattern, k))}
    layers = max(found) + 1 if found else 0
    fc1 = f"{blocks}0.{names['block'][3]}.weight"
    sizes = dict(
      num_hidden_layers=layers,
      intermediate_size=_need(source, fc1)[0] if layers else 0,
    )
    if kind == "text":
      sizes["vocab_size"], sizes["hidden_size"] = source.shape(embed)
      sizes["max_position_embeddings"] = _need(source, pos)[0]
    else:
      D, C, p, _ = source.shape(embed)
      grid = round((_need(source, pos)[0] - 1) ** 0.5)
      sizes.update(hidden_size=D, num_channels=C, patch_size=p)
      sizes["image_size"] = grid * p
    out[kind] = sizes
  if not out:
    raise ConversionError(
      f"{source.description}: has CLIP-like keys but neither a text nor a "
      f"vision tower (no {names['token']!r} nor {names['patch']!r})"
    )
  dims = {
    # transformers: Linear weight [dim, width]; OpenCLIP: [width, dim].
    source.shape(k)[0 if layout == "hf" else -1]
    for k in source
    if _is_projection(k)
  }
  if len(dims) > 1:
    raise ConversionError(
      f"{source.description}: text and image projections have different "
      f"widths {sorted(dims)}"
    )
  out["projection_dim"] = dims.pop() if dims else None
  return out


def _known(kind: str, width: int, layers: int):
  """The tower of a released model with these sizes, if any."""
  for name in _KNOWN:
    tower = getattr(VARIANTS[name], kind)
    if (tower.hidden_size, tower.num_hidden_layers) == (width, layers):
      return tower
  return None


def _heads(sizes: dict, kind: str, known, where: str) -> int:
  if known is not None:
    return known.num_attention_heads
  raise ConversionError(
    f"{where}: the file does not record the {kind} tower's head count and "
    f"its size (width {sizes['hidden_size']}, {sizes['num_hidden_layers']} "
    f"layers) is no known model's; {_FIX}"
  )


def _hf_subconfig(cfg: dict, kind: str) -> dict:
  if cfg.get("model_type") == f"clip_{kind}_model":
    return cfg
  return cfg.get(f"{kind}_config") or {}


def _pool_rule(text_cfg: dict, layout: str) -> int | None:
  if layout != "hf" or not text_cfg:
    return None  # argmax: the eos token has the largest id in CLIP's vocab
  eos = text_cfg.get("eos_token_id", 49407)  # transformers' default
  return None if eos == 2 else int(eos)  # transformers' legacy rule for 2


def infer_config(
  source, layout: str, cfg: dict | None = None, hidden_act: str | None = None
) -> CLIPConfig:
  """The architecture of every tower present in the checkpoint."""
  sizes, where = infer_sizes(source, layout), source.description
  towers = {}
  for kind, cls in (("text", CLIPTextConfig), ("vision", CLIPVisionConfig)):
    if kind not in sizes:
      continue
    s, sub = sizes[kind], _hf_subconfig(cfg or {}, kind)
    known = _known(kind, s["hidden_size"], s["num_hidden_layers"])
    if layout == "openclip":
      act = "gelu"  # open_clip's default (quick_gelu=False)
    else:
      act = known.hidden_act if known else "quick_gelu"
    extra = dict(
      num_attention_heads=sub.get("num_attention_heads")
      or _heads(s, kind, known, where),
      hidden_act=hidden_act or sub.get("hidden_act") or act,
      layer_norm_eps=sub.get("layer_norm_eps", 1e-5),
    )
    if kind == "text":
      extra["eos_token_id"] = _pool_rule(sub, layout)
    try:
      towers[kind] = cls(**s, **extra)
    except ValueError as e:
      raise ConversionError(f"{where}: {e}") from None
  return CLIPConfig(
    towers.get("text"), towers.get("vision"), sizes["projection_dim"]
  )


def check_matches(
  sizes: dict,
  wanted: CLIPConfig,
  where: str,
  fix: str = "pick the matching config or omit config to auto-detect",
) -> None:
  """Fails if the checkpoint lacks a wanted tower or its sizes differ."""
  diffs = []
  for kind in TOWERS:
    w = getattr(wanted, kind)
    if w is None:
      continue
    if kind not in sizes:
      raise ConversionError(
        f"{where}: has no {kind} tower; load it with towers= the ones present"
      )
    diffs += [
      f"{kind}.{n}={sizes[kind][n]!r} (config: {getattr(w, n)!r})"
      for n in _ARCH[kind]
      if sizes[kind][n] != getattr(w, n)
    ]
  P = wanted.projection_dim
  if P is not None and sizes["projection_dim"] != P:
    diffs.append(f"projection_dim={sizes['projection_dim']!r} (config: {P!r})")
  if diffs:
    raise ConversionError(
      f"{where}: the weights do not fit the requested CLIP config: "
      + ", ".join(diffs[:5])
      + f"; {fix}"
    )


def select(source, layout: str, config: CLIPConfig):
  """The view of ``source`` holding only what ``config`` builds.

  Tower(s) not requested, projections when ``projection_dim`` is None and
  ``logit_scale`` without both towers are left out rather than reported.
  """

  def keep(key):
    owner = _owner(key, layout)
    if owner == "logit_scale":
      return key if config.has_logit_scale else None
    if getattr(config, owner) is None:
      return None
    if _is_projection(key) and config.projection_dim is None:
      return None
    return key

  return source.renamed(keep)


# --------------------------------------------------------------------------
# Public entry points.


def architecture(spec) -> CLIPConfig | None:
  """A ``CLIPConfig`` from a name, an OpenCLIP model-config dict or itself.

  Names are ``models.clip.VARIANTS`` keys, which include OpenCLIP's model
  names (``"ViT-g-14"``, ``"ViT-bigG-14-quickgelu"``...); a dict holds an
  OpenCLIP model config's fields (``models.clip_openclip``).
  """
  from leapalign_jax.convert.loading import resolve_variant
  from leapalign_jax.models.clip_openclip import openclip_config

  if spec is None or spec == "":
    return None
  if hasattr(spec, "to_dict"):  # an ml_collections entry
    spec = spec.to_dict()
  if isinstance(spec, dict):
    try:
      return openclip_config(spec)
    except (KeyError, TypeError, ValueError) as e:
      raise ConversionError(f"OpenCLIP model config: {e}") from None
  return resolve_variant(spec, VARIANTS, "CLIP")


def _resolve(
  source, layout, cfg, config, towers, hidden_act, runtime, variant=None
) -> CLIPConfig:
  """The config to build: given or inferred, cut to ``towers``, checked."""
  where = source.description
  config, variant = architecture(config), architecture(variant)
  sizes = infer_sizes(source, layout)
  if towers is not None:
    towers = tuple(towers)
    if set(towers) - set(TOWERS) or not towers:
      raise ConversionError(
        f"towers must be a non-empty subset of {TOWERS}; got {towers}"
      )
    for kind in towers:
      if kind not in sizes:
        raise ConversionError(
          f"{where}: has no {kind} tower; load it with towers= the ones present"
        )
      if config is not None and getattr(config, kind) is None:
        raise ConversionError(f"towers= asks for {kind}, which config lacks")
  fix = "pick the matching config or omit config to auto-detect"
  if config is None and variant is not None and not cfg:
    # No config.json: the named architecture supplies what the file lacks.
    present = towers or tuple(k for k in TOWERS if k in sizes)
    for kind in present:
      if getattr(variant, kind) is None:
        raise ConversionError(
          f"{where}: has a {kind} tower, which variant= lacks; name a variant "
          "with it or pass towers= the ones to load"
        )
    config = variant.with_towers(present)
    if hidden_act:
      config = config.with_activation(hidden_act)
    fix = "name the variant these weights are, or a config"
  if config is None:
    config = infer_config(source, layout, cfg, hidden_act)
  if towers is not None:
    config = config.with_towers(towers)
  check_matches(sizes, config, where, fix)
  return dataclasses.replace(config, **runtime)


def load_clip(
  path: str,
  *,
  towers: Sequence[str] | None = None,
  config: CLIPConfig | str | dict | None = None,
  variant: CLIPConfig | str | dict | None = None,
  hidden_act: str | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  sharding=None,
  **runtime,
):
  """Loads CLIP weights (transformers or OpenCLIP layout, auto-detected).

  Args:
    path: a transformers folder (``CLIPModel``, ``CLIPTextModel``, ...), a
      Flux pipeline root (its ``text_encoder/`` is used), a ``.safetensors``
      file, or a PyTorch pickle (``.pt``/``.bin``, read with
      ``weights_only=True``; needs torch), e.g. HPSv2.1's checkpoint.
    towers: which towers to build, e.g. ``("text",)``; default every tower
      in the file. Weights of other towers are skipped.
    config: the expected architecture (see ``architecture``: a
      ``CLIPConfig``, a ``VARIANTS`` or OpenCLIP model name, or an OpenCLIP
      model-config dict); it also supplies head counts, activation and
      pooling rule, over any ``config.json``. Default: inferred (see the
      module docstring).
    variant: like ``config``, but used only when the checkpoint has no
      ``config.json`` (OpenCLIP files): the architecture of weights that do
      not record their head counts, checked against their shapes. A
      checkpoint of unknown size without either is refused.
    hidden_act: override the activation when inferring or using
      ``variant`` (``"gelu"`` or ``"quick_gelu"``), e.g. for OpenAI weights
      in the OpenCLIP layout.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters (default: ``dtype``).
    sharding: None, a ``Sharding`` for every parameter, or a pytree of them.
    **runtime: ``remat``, ``scan_layers``, ``attention``.

  Returns:
    ``(config, model)``.
  """
  from flax import nnx

  from leapalign_jax.convert.loading import load_model
  from leapalign_jax.models.clip import CLIP

  source, layout, cfg = open_checkpoint(path)
  runtime = dict(runtime, dtype=dtype, param_dtype=param_dtype or dtype)
  config = _resolve(
    source, layout, cfg, config, towers, hidden_act, runtime, variant
  )
  rules = RULES[layout](config)
  keymap.validate(
    rules,
    select(source, layout, config),
    f"CLIP ({layout} layout)",
    "Is this a complete CLIP checkpoint of a supported architecture?",
  )
  model = load_model(
    lambda: CLIP(config, rngs=nnx.Rngs(0)),
    rules,
    source,
    config.param_dtype,
    sharding,
  )
  return config, model


def hf_config_dict(c: CLIPConfig) -> dict:
  """The transformers ``config.json`` for a model with ``c``'s towers."""

  def text(t: CLIPTextConfig) -> dict:
    return {
      "model_type": "clip_text_model",
      "vocab_size": t.vocab_size,
      "hidden_size": t.hidden_size,
      "intermediate_size": t.intermediate_size,
      "num_hidden_layers": t.num_hidden_layers,
      "num_attention_heads": t.num_attention_heads,
      "max_position_embeddings": t.max_position_embeddings,
      "hidden_act": t.hidden_act,
      "layer_norm_eps": t.layer_norm_eps,
      # transformers pools at argmax(ids) when its eos_token_id is 2.
      "eos_token_id": 2 if t.eos_token_id is None else t.eos_token_id,
      "bos_token_id": 0,
      "pad_token_id": 1,
    }

  def vision(v: CLIPVisionConfig) -> dict:
    return {
      "model_type": "clip_vision_model",
      **{n: getattr(v, n) for n in _ARCH["vision"]},
      "num_attention_heads": v.num_attention_heads,
      "hidden_act": v.hidden_act,
      "layer_norm_eps": v.layer_norm_eps,
    }

  P = c.projection_dim
  if c.text is not None and c.vision is not None:
    if P is None:
      raise ConversionError(
        "no transformers class holds both CLIP towers without projections; "
        "export the towers separately"
      )
    return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "projection_dim": P,
      "text_config": text(c.text),
      "vision_config": vision(c.vision),
    }
  kind, sub = ("text", text(c.text)) if c.text else ("vision", vision(c.vision))
  name = "CLIPTextModel" if kind == "text" else "CLIPVisionModel"
  if P is not None:
    sub["projection_dim"] = P
    name += "WithProjection"
  return {"architectures": [name], **sub}


def _write(tensors, path: str, layout: str, config: CLIPConfig) -> list[str]:
  from leapalign_jax.convert.loading import write_checkpoint

  if layout == "openclip":
    return write_checkpoint(
      tensors, path, single_file="open_clip_model.safetensors"
    )
  return write_checkpoint(
    tensors,
    path,
    prefix="model",
    config_json=hf_config_dict(config),
    max_shard_bytes=5 * 1024**3,
  )


def export_clip(
  model,
  path: str,
  layout: str = "hf",
  *,
  config: CLIPConfig | None = None,
  dtype: str | None = None,
) -> list[str]:
  """Writes a CLIP model for PyTorch tools.

  Args:
    model: a ``CLIP`` module, or its Param state / pure dict with ``config``.
    path: ``hf``: a folder (``config.json`` + ``model.safetensors``) that
      transformers' ``from_pretrained`` loads as ``CLIPModel`` /
      ``CLIPTextModel[WithProjection]`` / ``CLIPVisionModel[WithProjection]``;
      ``openclip``: a ``.safetensors`` file (a folder gets
      ``open_clip_model.safetensors``).
    layout: ``"hf"`` or ``"openclip"``.
    config: required when ``model`` is not a module.
    dtype: output dtype (default: the parameters' own).

  Returns:
    The paths written.
  """
  from leapalign_jax.convert.loading import export_tensors

  if layout not in RULES:
    raise ConversionError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
  config = config or getattr(model, "config", None)
  if config is None:
    raise ConversionError("export_clip needs config= when given bare params")
  if layout == "hf":
    hf_config_dict(config)  # fail before writing anything
  tensors = export_tensors(RULES[layout](config), model, dtype)
  return _write(tensors, path, layout, config)


def convert_clip(
  src: str,
  dst: str,
  layout: str = "hf",
  dtype: str | None = None,
  *,
  towers: Sequence[str] | None = None,
  hidden_act: str | None = None,
  variant: CLIPConfig | str | dict | None = None,
) -> list[str]:
  """Converts CLIP weights between layouts, one tensor at a time.

  ``variant``: as in ``load_clip``, for files that do not record their
  architecture.
  """
  if layout not in RULES:
    raise ConversionError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
  source, src_layout, cfg = open_checkpoint(src)
  config = _resolve(
    source, src_layout, cfg, None, towers, hidden_act, {}, variant
  )
  if layout == "hf":
    hf_config_dict(config)
  rules = RULES[src_layout](config)
  view = select(source, src_layout, config)
  keymap.validate(rules, view, f"CLIP ({src_layout} layout)")
  stored = view[rules[0].srcs[0].key].dtype
  lazy = keymap.lazy_params(rules, view, dtype or stored)
  return _write(keymap.export(RULES[layout](config), lazy), dst, layout, config)
