"""Flux autoencoder weights: BFL ``ae.safetensors`` / diffusers ``vae/`` <-> ours.

``modules(config)`` lists every parameterised module of the autoencoder by
our path (which is BFL's key, ``decoder.up.{i}`` in resolution order) with
its PyTorch weight shape; ``bfl_key`` and ``diffusers_key`` name it in each
layout (flux.md §9.3), and ``_rules`` turns that into the two-way table.
Layout differences:
- conv kernels ``[out, in, kh, kw]`` <-> ours ``[kh, kw, in, out]``;
- the mid-block attention's q/k/v/proj_out are 1×1 convs ``[C, C, 1, 1]`` in
  BFL, Linear ``[C, C]`` in diffusers, dense ``[in, out]`` kernels in ours;
- diffusers numbers the decoder's ``up_blocks`` deepest first (reversed),
  and renames ``nin_shortcut``, ``norm_out`` and the attention parts.
The scale/shift constants are not tensors: diffusers keeps them in
``config.json`` (read and written here), BFL in code (Flux's defaults).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from leapalign_jax.convert import keymap
from leapalign_jax.convert.errors import ConversionError, name_some
from leapalign_jax.convert.keymap import Rule, Src
from leapalign_jax.convert.safetensors_io import TensorSource, open_folder
from leapalign_jax.errors import require_local
from leapalign_jax.models.autoencoder import VARIANTS, AutoEncoderConfig

# ldm-style single files nest the VAE under one of these.
BFL_PREFIXES = ("first_stage_model.", "vae.")
ARCH_FIELDS = (
  "in_channels",
  "ch",
  "out_ch",
  "ch_mult",
  "num_res_blocks",
  "z_channels",
)
# Fields only a diffusers config.json records (BFL keeps them in code).
CONFIG_FIELDS = ("norm_groups", "scale_factor", "shift_factor")
QUANT_KEYS = ("quant_conv.weight", "post_quant_conv.weight")

Module = tuple[tuple[str | int, ...], str, tuple[int, ...]]


def modules(c: AutoEncoderConfig) -> list[Module]:
  """Every parameterised module: ``(our path, kind, torch weight shape)``.

  ``kind`` is ``conv`` (``[out, in, k, k]``), ``norm`` (``[C]``) or ``attn``
  (a 1×1 projection, ``[C, C]``). Written independently of the model code:
  ``keymap.load`` cross-checks the two.
  """
  out: list[Module] = []

  def conv(path, c_in, c_out, k=3):
    out.append((path, "conv", (c_out, c_in, k, k)))

  def norm(path, channels):
    out.append((path, "norm", (channels,)))

  def resnet(path, c_in, c_out):
    norm((*path, "norm1"), c_in)
    conv((*path, "conv1"), c_in, c_out)
    norm((*path, "norm2"), c_out)
    conv((*path, "conv2"), c_out, c_out)
    if c_in != c_out:
      conv((*path, "nin_shortcut"), c_in, c_out, 1)

  def mid(part, channels):
    resnet((part, "mid", "block_1"), channels, channels)
    norm((part, "mid", "attn_1", "norm"), channels)
    for name in ("q", "k", "v", "proj_out"):
      out.append(((part, "mid", "attn_1", name), "attn", (channels, channels)))
    resnet((part, "mid", "block_2"), channels, channels)

  chans, n = c.channels, len(c.channels)
  conv(("encoder", "conv_in"), c.in_channels, c.ch)
  for i in range(n):
    c_in = c.ch if i == 0 else chans[i - 1]
    for j in range(c.num_res_blocks):
      resnet(("encoder", "down", i, "block", j), c_in, chans[i])
      c_in = chans[i]
    if i != n - 1:
      conv(("encoder", "down", i, "downsample", "conv"), chans[i], chans[i])
  mid("encoder", chans[-1])
  norm(("encoder", "norm_out"), chans[-1])
  conv(("encoder", "conv_out"), chans[-1], 2 * c.z_channels)

  conv(("decoder", "conv_in"), c.z_channels, chans[-1])
  mid("decoder", chans[-1])
  for i in reversed(range(n)):
    c_in = chans[-1] if i == n - 1 else chans[i + 1]
    for j in range(c.num_res_blocks + 1):
      resnet(("decoder", "up", i, "block", j), c_in, chans[i])
      c_in = chans[i]
    if i != 0:
      conv(("decoder", "up", i, "upsample", "conv"), chans[i], chans[i])
  norm(("decoder", "norm_out"), chans[0])
  conv(("decoder", "conv_out"), chans[0], c.out_ch)
  return out


def bfl_key(path, n_levels: int) -> str:
  """BFL name of one of our modules: our path is BFL's key."""
  del n_levels
  return ".".join(str(p) for p in path)


_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {
  "norm": "group_norm",
  "q": "to_q",
  "k": "to_k",
  "v": "to_v",
  "proj_out": "to_out.0",
}


def diffusers_key(path, n_levels: int) -> str:
  """The diffusers ``AutoencoderKL`` name of one of our modules (§9.3)."""
  match path:
    case (part, "down", i, "block", j, leaf):
      return f"{part}.down_blocks.{i}.resnets.{j}.{_RESNET.get(leaf, leaf)}"
    case (part, "down", i, "downsample", "conv"):
      return f"{part}.down_blocks.{i}.downsamplers.0.conv"
    case (part, "up", i, "block", j, leaf):  # diffusers: deepest first
      i = n_levels - 1 - i
      return f"{part}.up_blocks.{i}.resnets.{j}.{_RESNET.get(leaf, leaf)}"
    case (part, "up", i, "upsample", "conv"):
      return f"{part}.up_blocks.{n_levels - 1 - i}.upsamplers.0.conv"
    case (part, "mid", "block_1" | "block_2" as block, leaf):
      j = int(block[-1]) - 1
      return f"{part}.mid_block.resnets.{j}.{_RESNET.get(leaf, leaf)}"
    case (part, "mid", "attn_1", leaf):
      return f"{part}.mid_block.attentions.0.{_ATTN[leaf]}"
    case (part, "norm_out"):
      return f"{part}.conv_norm_out"
    case (part, leaf):  # conv_in, conv_out
      return f"{part}.{leaf}"
  raise AssertionError(f"no diffusers name for {path}")


def _rules(c: AutoEncoderConfig, layout: str) -> list[Rule]:
  name = bfl_key if layout == "bfl" else diffusers_key
  n = len(c.ch_mult)
  rules = []
  for path, kind, shape in modules(c):
    key = name(path, n)
    if kind == "conv":
      kernel = (Src(f"{key}.weight", shape), keymap.conv2d())
    elif kind == "norm":
      kernel = (Src(f"{key}.weight", shape), keymap.identity())
    elif layout == "bfl":  # a 1×1 conv: squeeze, then transpose
      C = shape[0]
      kernel = (
        Src(f"{key}.weight", (C, C, 1, 1)),
        keymap.chain(keymap.conv2d(), keymap.reshape((C, C), (1, 1, C, C))),
      )
    else:
      kernel = (Src(f"{key}.weight", shape), keymap.linear(*shape))
    leaf = "scale" if kind == "norm" else "kernel"
    rules.append(Rule((*path, leaf), None, (kernel[0],), kernel[1]))
    bias = Src(f"{key}.bias", (shape[0],))
    rules.append(Rule((*path, "bias"), None, (bias,), keymap.identity()))
  return rules


def bfl_rules(c: AutoEncoderConfig) -> list[Rule]:
  """Key table for BFL ``ae.safetensors``."""
  return _rules(c, "bfl")


def diffusers_rules(c: AutoEncoderConfig) -> list[Rule]:
  """Key table for a diffusers ``AutoencoderKL`` folder (no quant convs)."""
  return _rules(c, "diffusers")


RULES = {"bfl": bfl_rules, "diffusers": diffusers_rules}


# --------------------------------------------------------------------------
# Finding and reading checkpoints.


def open_checkpoint(path: str) -> tuple[TensorSource, str, dict]:
  """Opens an autoencoder: a BFL file, a diffusers ``vae/`` or pipeline root.

  Returns:
    (tensors with ldm prefixes stripped, layout "bfl"|"diffusers", diffusers
    config dict or {}).
  """
  require_local(path)
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or folder")
  dcfg = {}
  if os.path.isdir(path):
    folder = path
    if os.path.isdir(os.path.join(path, "vae")):
      folder = os.path.join(path, "vae")
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
      try:
        with open(cfg_path) as f:
          dcfg = json.load(f)
      except (OSError, ValueError) as e:
        raise ConversionError(
          f"{cfg_path}: unreadable config ({e.__class__.__name__}); fix or "
          "delete it"
        ) from None
    try:
      source = open_folder(folder, "diffusion_pytorch_model")
    except ConversionError:
      singles = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
      if len(singles) != 1:
        raise
      source = TensorSource.from_files([os.path.join(folder, singles[0])])
  else:
    source = TensorSource.from_files([path])
  for prefix in BFL_PREFIXES:
    if source and all(k.startswith(prefix) for k in source):
      source = source.renamed(lambda k, p=prefix: k[len(p) :])
      break
  quant = [k for k in QUANT_KEYS if k in source]
  quant += [
    f"config.json {f}=true"
    for f in ("use_quant_conv", "use_post_quant_conv")
    if dcfg.get(f) is True
  ]
  if quant:
    raise ConversionError(
      f"{source.description}: has {name_some(quant)}, so it is an SD-style "
      "VAE; the Flux autoencoder has no quant_conv/post_quant_conv (pass "
      "Flux's ae.safetensors or a diffusers vae/ with use_quant_conv=False)"
    )
  if any(k.startswith("encoder.down_blocks.") for k in source):
    layout = "diffusers"
  elif any(k.startswith("encoder.down.") for k in source):
    layout = "bfl"
  else:
    raise ConversionError(
      f"{source.description}: holds no autoencoder weights (no "
      "'encoder.down.*' (BFL) or 'encoder.down_blocks.*' (diffusers) keys); "
      "pass ae.safetensors or a diffusers folder with vae/"
    )
  if dcfg.get("act_fn", "silu") != "silu":
    raise ConversionError(
      f"{source.description}: config.json act_fn={dcfg['act_fn']!r}, but the "
      "Flux autoencoder uses silu"
    )
  return source, layout, dcfg


def _count(keys, pattern: str) -> int:
  idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(idx) + 1 if idx else 0


def infer_arch(source: TensorSource, layout: str) -> dict:
  """The ``ARCH_FIELDS`` read off the tensor names and shapes."""
  down, block = (
    ("down", "block") if layout == "bfl" else ("down_blocks", "resnets")
  )

  def shape(key):
    if key not in source:
      raise ConversionError(
        f"{source.description}: missing {key!r}; the autoencoder checkpoint "
        "is incomplete"
      )
    return source.shape(key)

  ch, in_channels = shape("encoder.conv_in.weight")[:2]
  n = _count(source, rf"encoder\.{down}\.(\d+)\.")
  ch_mult = []
  for i in range(n):
    width = shape(f"encoder.{down}.{i}.{block}.0.conv1.weight")[0]
    if width % ch:
      raise ConversionError(
        f"{source.description}: encoder level {i} has {width} channels, not "
        f"a multiple of conv_in's {ch}; this is not a Flux-style autoencoder"
      )
    ch_mult.append(width // ch)
  return dict(
    in_channels=in_channels,
    ch=ch,
    out_ch=shape("decoder.conv_out.weight")[0],
    ch_mult=tuple(ch_mult),
    num_res_blocks=_count(source, rf"encoder\.{down}\.0\.{block}\.(\d+)\."),
    z_channels=shape("decoder.conv_in.weight")[1],
  )


def config_fields(dcfg: dict) -> dict:
  """The ``CONFIG_FIELDS`` a diffusers ``config.json`` records."""
  out = {}
  if "norm_num_groups" in dcfg:
    out["norm_groups"] = int(dcfg["norm_num_groups"])
  if "scaling_factor" in dcfg:
    out["scale_factor"] = float(dcfg["scaling_factor"])
  if "shift_factor" in dcfg:  # null (SD-style) means no shift
    out["shift_factor"] = float(dcfg["shift_factor"] or 0.0)
  return out


def infer_config(
  source: TensorSource,
  layout: str,
  dcfg: dict | None = None,
  norm_groups: int | None = None,
) -> AutoEncoderConfig:
  """The full architecture of a checkpoint.

  GroupNorm groups come from ``norm_groups``, the diffusers ``config.json``,
  or Flux's 32 (a BFL file does not record them); the scale and shift from
  ``config.json`` or Flux's constants.
  """
  fields = {**infer_arch(source, layout), **config_fields(dcfg or {})}
  if norm_groups is not None:
    fields["norm_groups"] = norm_groups
  if isinstance((dcfg or {}).get("sample_size"), int):
    fields["resolution"] = dcfg["sample_size"]
  try:
    return AutoEncoderConfig(**fields)
  except ValueError as e:
    hint = ""
    if "norm_groups" not in (dcfg or {}) and norm_groups is None:
      hint = (
        "; BFL files do not record the GroupNorm groups: pass "
        "config=AutoEncoderConfig(norm_groups=...) or --norm-groups"
      )
    raise ConversionError(f"{source.description}: {e}{hint}") from None


def check_matches(found: dict, wanted: AutoEncoderConfig, where: str) -> None:
  """Fails if the checkpoint's architecture differs from the requested one."""
  diffs = [
    f"{f}={v!r} (config: {getattr(wanted, f)!r})"
    for f, v in found.items()
    if v != getattr(wanted, f)
  ]
  if diffs:
    raise ConversionError(
      f"{where}: the weights do not fit the requested autoencoder config: "
      + ", ".join(diffs[:5])
      + "; pick the matching variant or omit config to auto-detect"
    )


def variant_name(config: AutoEncoderConfig) -> str | None:
  """The name of the ``VARIANTS`` entry with this architecture, if any."""
  fields = ARCH_FIELDS + CONFIG_FIELDS
  for name, v in VARIANTS.items():
    if all(getattr(v, f) == getattr(config, f) for f in fields):
      return name
  return None


def diffusers_config_dict(c: AutoEncoderConfig) -> dict:
  """The ``config.json`` diffusers needs to build this ``AutoencoderKL``."""
  if c.ch_mult[0] != 1:
    raise ConversionError(
      f"ch_mult {c.ch_mult} starts with {c.ch_mult[0]}, but diffusers' "
      "AutoencoderKL ties conv_in's width to the first level's (ch_mult[0] "
      "must be 1); export this model in the BFL layout"
    )
  n = len(c.ch_mult)
  return {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": list(c.channels),
    "down_block_types": ["DownEncoderBlock2D"] * n,
    "up_block_types": ["UpDecoderBlock2D"] * n,
    "force_upcast": True,
    "in_channels": c.in_channels,
    "out_channels": c.out_ch,
    "latent_channels": c.z_channels,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": c.num_res_blocks,
    "mid_block_add_attention": True,
    "norm_num_groups": c.norm_groups,
    "sample_size": c.resolution,
    "scaling_factor": c.scale_factor,
    "shift_factor": c.shift_factor,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
  }


# --------------------------------------------------------------------------
# Public entry points.


def load_autoencoder(
  path: str,
  *,
  config: AutoEncoderConfig | str | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  sharding=None,
  **runtime,
):
  """Loads the Flux autoencoder from a BFL file or a diffusers folder.

  Layout and architecture are detected from the tensor names and shapes
  (plus ``config.json`` for diffusers); with ``config`` (an
  ``AutoEncoderConfig`` or a ``VARIANTS`` name) the weights must match it.

  Args:
    path: ``ae.safetensors`` (optionally under an ldm ``first_stage_model.``
      or ``vae.`` prefix), a diffusers ``vae/`` folder, or a pipeline root
      containing one.
    config: expected architecture; None auto-detects.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters (default: ``dtype``).
    sharding: None, a ``Sharding`` for every parameter, or a pytree of them.
    **runtime: other runtime fields of ``AutoEncoderConfig`` (``remat``,
      ``remat_scope``).

  Returns:
    ``(config, model)``.
  """
  from flax import nnx

  from leapalign_jax.convert.loading import load_model, resolve_variant
  from leapalign_jax.models.autoencoder import AutoEncoder

  source, layout, dcfg = open_checkpoint(path)
  config = resolve_variant(config, VARIANTS, "autoencoder")
  if config is not None:
    found = {**infer_arch(source, layout), **config_fields(dcfg)}
    check_matches(found, config, source.description)
    base = config
  else:
    base = infer_config(source, layout, dcfg)
  cfg = dataclasses.replace(
    base, dtype=dtype, param_dtype=param_dtype or dtype, **runtime
  )
  rules = RULES[layout](cfg)
  keymap.validate(
    rules,
    source,
    f"autoencoder ({layout} layout)",
    "Is this a complete Flux-style (16-channel, no quant conv) autoencoder?",
  )
  model = load_model(
    lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)),
    rules,
    source,
    cfg.param_dtype,
    sharding,
  )
  return cfg, model


def export_autoencoder(
  model,
  path: str,
  layout: str = "bfl",
  *,
  config: AutoEncoderConfig | None = None,
  dtype: str | None = None,
) -> list[str]:
  """Writes an autoencoder (or its Param state) for PyTorch tools.

  Args:
    model: an ``AutoEncoder``, or its Param state / pure dict with ``config``.
    path: for ``bfl``, the ``.safetensors`` file to write (a folder gets
      ``ae.safetensors``); for ``diffusers``, the ``vae/`` folder
      (``config.json`` + ``diffusion_pytorch_model.safetensors``).
    layout: ``"bfl"`` or ``"diffusers"``.
    config: required when ``model`` is not a module.
    dtype: output dtype (default: the parameters' own).

  Returns:
    The paths written.
  """
  from leapalign_jax.convert.loading import export_tensors

  if layout not in RULES:
    raise ConversionError(
      f"unknown layout {layout!r}; use 'bfl' or 'diffusers'"
    )
  config = config or getattr(model, "config", None)
  if config is None:
    raise ConversionError(
      "export_autoencoder needs config= when given bare params"
    )
  if layout == "diffusers":
    diffusers_config_dict(config)  # fail before converting anything
  tensors = export_tensors(RULES[layout](config), model, dtype)
  return _write(tensors, path, layout, config)


def _write(tensors, path: str, layout: str, config) -> list[str]:
  """Writes tensors as one BFL file or a diffusers ``vae/`` folder."""
  from leapalign_jax.convert.loading import write_checkpoint

  if layout == "bfl":
    return write_checkpoint(tensors, path, single_file="ae.safetensors")
  config_json = diffusers_config_dict(config)  # fails before writing
  return write_checkpoint(tensors, path, config_json=config_json)


def convert_autoencoder(
  src: str,
  dst: str,
  layout: str = "bfl",
  dtype: str | None = None,
  norm_groups: int | None = None,
) -> list[str]:
  """Converts an autoencoder checkpoint between layouts, tensor by tensor.

  Args:
    src: any layout ``load_autoencoder`` reads.
    dst: the BFL file (a folder gets ``ae.safetensors``) or diffusers folder.
    layout: output layout.
    dtype: output dtype (default: as stored).
    norm_groups: GroupNorm groups for a diffusers ``config.json`` written
      from a BFL file (default 32, Flux's); ignored otherwise.
  """
  if layout not in RULES:
    raise ConversionError(
      f"unknown layout {layout!r}; use 'bfl' or 'diffusers'"
    )
  source, src_layout, dcfg = open_checkpoint(src)
  if norm_groups is None and layout == "bfl" and "norm_num_groups" not in dcfg:
    norm_groups = 1  # unrecorded and unused: any valid value will do
  config = infer_config(source, src_layout, dcfg, norm_groups)
  rules = RULES[src_layout](config)
  keymap.validate(rules, source, f"autoencoder ({src_layout} layout)")
  stored = source.infos[rules[0].srcs[0].key].dtype
  lazy = keymap.lazy_params(rules, source, dtype or stored)
  tensors = keymap.export(RULES[layout](config), lazy)
  return _write(tensors, dst, layout, config)
