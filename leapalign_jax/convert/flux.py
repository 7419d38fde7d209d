"""Flux transformer weights: BFL single files and diffusers folders <-> ours.

Finding, reading (layout and architecture detection) and writing the files;
the key tables that map every tensor are ``convert.flux_keys`` (``RULES``:
layout -> table).
"""

from __future__ import annotations

import dataclasses
import re

from leapalign_jax.convert import keymap
from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.convert.flux_keys import RULES
from leapalign_jax.convert.safetensors_io import TensorSource
from leapalign_jax.convert.sources import open_transformer
from leapalign_jax.models.flux import VARIANTS, FluxConfig

BFL_PREFIXES = ("model.diffusion_model.",)
DIFFUSERS_PREFIXES = ("transformer.",)
ARCH_FIELDS = (
  "in_channels",
  "out_channels",
  "vec_in_dim",
  "context_in_dim",
  "hidden_size",
  "mlp_ratio",
  "num_heads",
  "depth",
  "depth_single_blocks",
  "axes_dim",
  "qkv_bias",
  "guidance_embed",
)


# --------------------------------------------------------------------------
# Finding and reading checkpoints.


def _strip_prefix(source: TensorSource, prefixes) -> TensorSource:
  for prefix in prefixes:
    if source and all(k.startswith(prefix) for k in source):
      return source.renamed(lambda k, p=prefix: k[len(p) :])
  return source


def open_checkpoint(path: str) -> tuple[TensorSource, str, dict]:
  """Opens a Flux checkpoint: a BFL file, or a diffusers folder / pipeline root.

  Returns:
    (tensors with prefixes stripped, layout "bfl"|"diffusers", diffusers
    config dict or {}).
  """
  source, diffusers_config = open_transformer(path)
  source = _strip_prefix(source, BFL_PREFIXES + DIFFUSERS_PREFIXES)
  if "img_in.weight" in source:
    layout = "bfl"
  elif "x_embedder.weight" in source:
    layout = "diffusers"
  else:
    raise ConversionError(
      f"{source.description}: holds no Flux transformer weights (neither "
      "'img_in.weight' (BFL) nor 'x_embedder.weight' (diffusers) is present); "
      "pass flux1-*.safetensors or a diffusers folder with transformer/"
    )
  return source, layout, diffusers_config


def _count(keys, pattern: str) -> int:
  idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(idx) + 1 if idx else 0


def infer_arch(source: TensorSource, layout: str) -> dict:
  """Architecture fields read off the tensor names and shapes.

  ``axes_dim`` is not recorded in the weights and is absent from the result.
  """
  keys = list(source)
  if layout == "bfl":
    n = {
      "img_in": "img_in.weight",
      "txt_in": "txt_in.weight",
      "vec": "vector_in.in_layer.weight",
      "guid": "guidance_in.in_layer.weight",
      "mlp": "double_blocks.0.img_mlp.0.weight",
      "qk": "double_blocks.0.img_attn.norm.query_norm.scale",
      "qkv_b": "double_blocks.0.img_attn.qkv.bias",
      "out": "final_layer.linear.weight",
    }
    depth = _count(keys, r"double_blocks\.(\d+)\.")
    single = _count(keys, r"single_blocks\.(\d+)\.")
  else:
    n = {
      "img_in": "x_embedder.weight",
      "txt_in": "context_embedder.weight",
      "vec": "time_text_embed.text_embedder.linear_1.weight",
      "guid": "time_text_embed.guidance_embedder.linear_1.weight",
      "mlp": "transformer_blocks.0.ff.net.0.proj.weight",
      "qk": "transformer_blocks.0.attn.norm_q.weight",
      "qkv_b": "transformer_blocks.0.attn.to_q.bias",
      "out": "proj_out.weight",
    }
    depth = _count(keys, r"transformer_blocks\.(\d+)\.")
    single = _count(keys, r"single_transformer_blocks\.(\d+)\.")
  for k in ("img_in", "txt_in", "vec", "out"):
    if n[k] not in source:
      raise ConversionError(
        f"{source.description}: missing {n[k]!r}; the checkpoint is incomplete"
      )
  hidden, in_channels = source.shape(n["img_in"])
  head_dim = source.shape(n["qk"])[0] if n["qk"] in source else 128
  mlp_hidden = source.shape(n["mlp"])[0] if n["mlp"] in source else 4 * hidden
  return dict(
    in_channels=in_channels,
    out_channels=source.shape(n["out"])[0],
    vec_in_dim=source.shape(n["vec"])[1],
    context_in_dim=source.shape(n["txt_in"])[1],
    hidden_size=hidden,
    mlp_ratio=mlp_hidden / hidden,
    num_heads=max(1, hidden // head_dim),
    depth=depth,
    depth_single_blocks=single,
    qkv_bias=n["qkv_b"] in source,
    guidance_embed=n["guid"] in source,
  )


def infer_config(
  source: TensorSource,
  layout: str,
  diffusers_config: dict | None = None,
  axes_dim: tuple[int, ...] | None = None,
) -> FluxConfig:
  """The full architecture of a checkpoint.

  ``axes_dim`` comes from the argument, the diffusers ``config.json``, or is
  Flux's (16, 56, 56) when the head dim is 128.
  """
  arch = infer_arch(source, layout)
  head_dim = arch["hidden_size"] // arch["num_heads"]
  if (
    axes_dim is None
    and diffusers_config
    and "axes_dims_rope" in diffusers_config
  ):
    axes_dim = tuple(diffusers_config["axes_dims_rope"])
  if axes_dim is None:
    if head_dim != 128:
      raise ConversionError(
        f"{source.description}: head dim {head_dim} is not Flux's 128 and a "
        "BFL file does not record axes_dim; pass the model's axes_dim "
        "(config=FluxConfig(...), or --axes-dim on the command line)"
      )
    axes_dim = (16, 56, 56)  # every released Flux checkpoint
  try:
    return FluxConfig(axes_dim=tuple(axes_dim), **arch)
  except ValueError as e:
    raise ConversionError(f"{source.description}: {e}") from None


def check_matches(found: dict, wanted: FluxConfig, where: str) -> None:
  """Fails if the checkpoint's architecture differs from the requested one."""
  diffs = [
    f"{f}={found[f]!r} (config: {getattr(wanted, f)!r})"
    for f in ARCH_FIELDS
    if f in found and found[f] != getattr(wanted, f)
  ]
  if diffs:
    hint = ""
    if found["guidance_embed"] != wanted.guidance_embed:
      hint = (
        " (a guidance-distilled dev-like checkpoint has guidance_in; schnell"
        " does not)"
      )
    raise ConversionError(
      f"{where}: the weights do not fit the requested Flux config: "
      + ", ".join(diffs[:5])
      + f"{hint}; pick the matching variant or omit config to auto-detect"
    )


def variant_name(config: FluxConfig) -> str | None:
  """The name of the ``VARIANTS`` entry with this architecture, if any."""
  for name, v in VARIANTS.items():
    if all(getattr(v, f) == getattr(config, f) for f in ARCH_FIELDS):
      return name
  return None


def with_runtime(arch: FluxConfig, **runtime) -> FluxConfig:
  """``arch`` with numerics/compilation fields replaced."""
  return dataclasses.replace(arch, **runtime)


def diffusers_config_dict(c: FluxConfig) -> dict:
  """The ``config.json`` diffusers needs to build ``FluxTransformer2DModel``."""
  return {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": c.in_channels,
    "out_channels": c.out_channels,
    "num_layers": c.depth,
    "num_single_layers": c.depth_single_blocks,
    "attention_head_dim": c.head_dim,
    "num_attention_heads": c.num_heads,
    "joint_attention_dim": c.context_in_dim,
    "pooled_projection_dim": c.vec_in_dim,
    "guidance_embeds": c.guidance_embed,
    "axes_dims_rope": list(c.axes_dim),
  }


# --------------------------------------------------------------------------
# Public entry points.


def load_flux(
  path: str,
  *,
  config: FluxConfig | str | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  sharding=None,
  **runtime,
):
  """Loads Flux weights from a BFL file or a diffusers folder.

  Layout and architecture are detected from the tensor names and shapes; with
  ``config`` (a ``FluxConfig`` or a ``VARIANTS`` name) the weights must match
  it. Tensors are memory-mapped and copied once, straight into their
  (optionally sharded) device arrays.

  Args:
    path: ``flux1-*.safetensors`` (with or without the
      ``model.diffusion_model.`` prefix), a diffusers ``transformer/`` folder,
      or a pipeline root containing one.
    config: expected architecture; None auto-detects.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters (default: ``dtype``).
    sharding: None, a ``Sharding`` for every parameter, or a pytree of them.
    **runtime: other runtime fields of ``FluxConfig`` (``remat``,
      ``attention``, ``scan_layers``, ...).

  Returns:
    ``(config, model)``.
  """
  from flax import nnx

  from leapalign_jax.convert.loading import load_model, resolve_variant
  from leapalign_jax.models.flux import Flux

  source, layout, dcfg = open_checkpoint(path)
  config = resolve_variant(config, VARIANTS, "Flux")
  if config is not None:
    check_matches(infer_arch(source, layout), config, source.description)
    base = config
  else:
    base = infer_config(source, layout, dcfg)
  cfg = with_runtime(
    base, dtype=dtype, param_dtype=param_dtype or dtype, **runtime
  )
  rules = RULES[layout](cfg)
  keymap.validate(
    rules,
    source,
    f"Flux ({layout} layout)",
    "Is this a complete, unquantised Flux transformer checkpoint?",
  )
  model = load_model(
    lambda: Flux(cfg, rngs=nnx.Rngs(0)),
    rules,
    source,
    cfg.param_dtype,
    sharding,
  )
  return cfg, model


def export_flux(
  model,
  path: str,
  layout: str = "bfl",
  *,
  config: FluxConfig | None = None,
  dtype: str | None = None,
) -> list[str]:
  """Writes a Flux model (or its Param state) for PyTorch tools.

  A model with LoRA adapters is refused: ``export_flux_lora`` writes the
  adapters, ``export_flux_merged`` the fused weights.

  Args:
    model: a ``Flux`` module, or its Param state / pure dict with ``config``.
    path: for ``bfl``, the ``.safetensors`` file to write (a folder gets
      ``flux1.safetensors``); for ``diffusers``, the ``transformer/`` folder
      (``config.json`` + weights; sharded past 10 GB, with an index).
    layout: ``"bfl"`` or ``"diffusers"``.
    config: required when ``model`` is not a module.
    dtype: output dtype (default: the parameters' own).

  Returns:
    The paths written.
  """
  from leapalign_jax.convert.loading import export_tensors, refuse_adapters

  if layout not in RULES:
    raise ConversionError(
      f"unknown layout {layout!r}; use 'bfl' or 'diffusers'"
    )
  refuse_adapters(
    model,
    "export_flux",
    "export_flux_lora (the adapters, a diffusers/PEFT LoRA file) or "
    "export_flux_merged (full weights with the adapters fused in)",
  )
  config = config or getattr(model, "config", None)
  if config is None:
    raise ConversionError("export_flux needs config= when given bare params")
  return _write(
    export_tensors(RULES[layout](config), model, dtype), path, layout, config
  )


def _write(tensors, path: str, layout: str, config: FluxConfig) -> list[str]:
  """Writes source-layout tensors: one BFL file, or a diffusers folder."""
  from leapalign_jax.convert.loading import write_checkpoint

  if layout == "bfl":
    return write_checkpoint(tensors, path, single_file="flux1.safetensors")
  return write_checkpoint(
    tensors, path, config_json=diffusers_config_dict(config)
  )


def convert_flux(
  src: str,
  dst: str,
  layout: str = "bfl",
  dtype: str | None = None,
  axes_dim: tuple[int, ...] | None = None,
) -> list[str]:
  """Converts a Flux checkpoint between layouts, streaming tensor by tensor.

  Nothing is loaded onto a device and at most one tensor is in host memory
  beyond the memory maps, so a 24 GB checkpoint converts on a laptop.
  """
  if layout not in RULES:
    raise ConversionError(
      f"unknown layout {layout!r}; use 'bfl' or 'diffusers'"
    )
  source, src_layout, dcfg = open_checkpoint(src)
  if axes_dim is None and layout == "bfl" and not dcfg:
    # Neither a BFL source nor a BFL output records axes_dim: any split of
    # the head dim describes the same tensors.
    arch = infer_arch(source, src_layout)
    axes_dim = (arch["hidden_size"] // arch["num_heads"],)
  config = infer_config(source, src_layout, dcfg, axes_dim)
  rules = RULES[src_layout](config)
  keymap.validate(rules, source, f"Flux ({src_layout} layout)")
  stored = source.infos[rules[0].srcs[0].key].dtype
  lazy = keymap.lazy_params(rules, source, dtype or stored)
  return _write(keymap.export(RULES[layout](config), lazy), dst, layout, config)
