"""SD3 / SD3.5 transformer weights: Stability single files, diffusers <-> ours.

Two key tables, in both directions. Ours mirrors Stability's ``mmditx.py``
(``models/sd3.py``) and differs from it only by layout: kernels transposed,
fused qkv kernels kept as ``(3, heads, head_dim)``, the blocks stacked in
three groups (``dual_blocks``, ``joint_blocks``, ``last_block``), the patch
convolution as a linear map of packed tokens, and the final linear's outputs
in the packed order ``(c, ph, pw)`` instead of ``(ph, pw, c)``. diffusers
also splits q, k and v and stores the last block's context modulation and
the final modulation as ``(scale, shift)``.

The ``pos_embed`` buffer is not a parameter of ours (the model builds the
crop it needs); loading checks the checkpoint's table against ours, and
export writes ours, so diffusers and the reference find the key they expect.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from leapalign_jax.convert import keymap
from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.convert.safetensors_io import (
  LazyTensor,
  TensorSource,
)
from leapalign_jax.convert.sd3_keys import (
  RULES,
  diffusers_rules,
)
from leapalign_jax.convert.sources import open_transformer
from leapalign_jax.models.sd3 import VARIANTS, SD3Config
from leapalign_jax.models.sd3_layers import sincos_1d

SINGLE_FILE_PREFIX = "model.diffusion_model."
LAYOUTS = ("stability", "diffusers")
ARCH_FIELDS = (
  "hidden_size",
  "in_channels",
  "out_channels",
  "depth",
  "num_heads",
  "head_dim",
  "num_dual",
  "qk_norm",
  "mlp_ratio",
  "context_in_dim",
  "pooled_dim",
  "pos_embed_max_size",
)
POS_EMBED_TOL = 1e-5  # the table is float32 sin/cos: a few ulps of 1


POS_EMBED_KEY = {"stability": "pos_embed", "diffusers": "pos_embed.pos_embed"}


# --------------------------------------------------------------------------
# The pos_embed buffer.


def pos_embed_table(c: SD3Config) -> np.ndarray:
  """The reference's whole ``[1, max², D]`` sin-cos buffer, float32."""
  n, D = c.pos_embed_max_size, c.hidden_size
  grid = np.arange(n, dtype=np.float32) / np.float32(
    n / (c.sample_size // c.patch_size)
  )
  cols = np.broadcast_to(sincos_1d(grid, D // 2)[None], (n, n, D // 2))
  rows = np.broadcast_to(sincos_1d(grid, D // 2)[:, None], (n, n, D // 2))
  table = np.concatenate([cols, rows], axis=-1).reshape(1, n * n, D)
  return table.astype(np.float32)


def check_pos_embed(source, layout: str, c: SD3Config) -> None:
  """Fails if the checkpoint's table is not the one the model builds."""
  key = POS_EMBED_KEY[layout]
  if key not in source:
    return  # a bare transformer state dict without the buffer
  n, D = c.pos_embed_max_size, c.hidden_size
  if tuple(source.shape(key)) != (1, n * n, D):
    raise ConversionError(
      f"{source.description}: {key} has shape {tuple(source.shape(key))}, "
      f"expected (1, {n * n}, {D}) for pos_embed_max_size {n}"
    )
  stored = np.asarray(source[key], np.float32)
  err = float(np.max(np.abs(stored - pos_embed_table(c))))
  if err > POS_EMBED_TOL:
    raise ConversionError(
      f"{source.description}: its {key} differs from the 2-D sin-cos table "
      f"for sample_size {c.sample_size} by {err:.2e}; pass the model's "
      "sample_size (config=SD3Config(...)) or report the checkpoint"
    )


# --------------------------------------------------------------------------
# Opening checkpoints and reading their architecture.


def open_checkpoint(path: str) -> tuple[TensorSource, str, dict]:
  """``(transformer tensors, layout, diffusers config or {})`` of ``path``.

  Reads a Stability single file (``sd3.5_medium.safetensors``, with or
  without bundled text encoders and VAE: only ``model.diffusion_model.*`` is
  used), a diffusers ``transformer/`` folder or a pipeline root.
  """
  source, dcfg = open_transformer(path)
  if any(k.startswith(SINGLE_FILE_PREFIX) for k in source):
    n = len(SINGLE_FILE_PREFIX)
    source = source.renamed(
      lambda k: k[n:] if k.startswith(SINGLE_FILE_PREFIX) else None
    )
  if "x_embedder.proj.weight" in source:
    layout = "stability"
  elif "pos_embed.proj.weight" in source:
    layout = "diffusers"
  else:
    raise ConversionError(
      f"{source.description}: holds no SD3 transformer weights (neither "
      "'x_embedder.proj.weight' (Stability) nor 'pos_embed.proj.weight' "
      "(diffusers) is present); pass sd3.5_*.safetensors or a diffusers "
      "folder with transformer/"
    )
  return source, layout, dcfg


def _count(keys, pattern: str) -> int:
  idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(idx) + 1 if idx else 0


def infer_arch(source: TensorSource, layout: str) -> dict:
  """Architecture fields read off the tensor names and shapes."""
  keys = list(source)
  if layout == "stability":
    patch, ctx, y = "x_embedder.proj.weight", "context_embedder", "y_embedder"
    block = r"joint_blocks\.(\d+)\."
    dual_re = r"joint_blocks\.(\d+)\.x_block\.attn2\."
    qk = "joint_blocks.0.x_block.attn.ln_q.weight"
    out, fc1 = "final_layer.linear.weight", "joint_blocks.0.x_block.mlp.fc1"
    y_in = f"{y}.mlp.0.weight"
  else:
    patch, ctx = "pos_embed.proj.weight", "context_embedder"
    block = r"transformer_blocks\.(\d+)\."
    dual_re = r"transformer_blocks\.(\d+)\.attn2\."
    qk = "transformer_blocks.0.attn.norm_q.weight"
    out, fc1 = "proj_out.weight", "transformer_blocks.0.ff.net.0.proj"
    y_in = "time_text_embed.text_embedder.linear_1.weight"
  for k in (patch, f"{ctx}.weight", out, y_in):
    if k not in source:
      raise ConversionError(
        f"{source.description}: missing {k!r}; the checkpoint is incomplete"
      )
  hidden, in_channels = source.shape(patch)[:2]
  depth = _count(keys, block)
  duals = {int(m.group(1)) for k in keys if (m := re.match(dual_re, k))}
  num_dual = len(duals)
  if duals != set(range(num_dual)):
    raise ConversionError(
      f"{source.description}: dual-attention blocks {sorted(duals)} are not "
      "the leading blocks; only MMDiT-X layouts with leading dual blocks "
      "are supported"
    )
  pos = POS_EMBED_KEY[layout]
  arch = dict(
    in_channels=in_channels,
    out_channels=source.shape(out)[0] // 4,
    depth=depth,
    num_dual=num_dual,
    qk_norm=qk in source,
    mlp_ratio=source.shape(f"{fc1}.weight")[0] / hidden,
    context_in_dim=source.shape(f"{ctx}.weight")[1],
    pooled_dim=source.shape(y_in)[1],
  )
  if pos in source:
    arch["pos_embed_max_size"] = int(round(source.shape(pos)[1] ** 0.5))
  if qk in source:  # QK-norm scales are head-sized; else heads are unknown
    arch["head_dim"] = source.shape(qk)[0]
    arch["num_heads"] = hidden // arch["head_dim"]
  arch["hidden_size"] = hidden
  return arch


def _table_sample_size(source, layout: str, arch: dict) -> int | None:
  """``sample_size`` read off a stored ``pos_embed`` table, if there is one.

  Token ``(row 1, col 0)``'s first row channel is ``sin(1 / s)`` with grid
  scale ``s = max_size / (sample_size / 2)``; ``check_pos_embed`` then
  verifies the whole table.
  """
  key = POS_EMBED_KEY[layout]
  if key not in source or "pos_embed_max_size" not in arch:
    return None
  n = arch["pos_embed_max_size"]
  D = source.shape(key)[-1]
  value = float(np.asarray(source[key][0, n, D // 2], np.float64))
  if not 0.0 < value <= 1.0:
    return None
  return 2 * int(round(n * np.arcsin(value)))


def infer_config(source, layout: str, dcfg: dict | None = None) -> SD3Config:
  """The full architecture of a checkpoint.

  ``sample_size`` is not a weight: it comes from the diffusers config, else
  from the stored ``pos_embed`` table, else it is 128 (every released SD3
  model's); ``check_pos_embed`` verifies it against the table.
  """
  arch = infer_arch(source, layout)
  hidden = arch.pop("hidden_size")
  dcfg = dcfg or {}
  if dcfg.get("attention_head_dim"):  # diffusers records the head layout
    arch["head_dim"] = dcfg["attention_head_dim"]
  elif "head_dim" not in arch:  # the reference's rule: num_heads = depth
    arch["head_dim"] = hidden // max(arch["depth"], 1)
  arch["num_heads"] = hidden // arch["head_dim"]
  if "pos_embed_max_size" not in arch:
    arch["pos_embed_max_size"] = dcfg.get("pos_embed_max_size", 384)
  sample_size = dcfg.get("sample_size") or _table_sample_size(
    source, layout, arch
  )
  try:
    return SD3Config(sample_size=sample_size or 128, **arch)
  except ValueError as e:
    raise ConversionError(f"{source.description}: {e}") from None


def check_matches(found: dict, wanted: SD3Config, where: str) -> None:
  """Fails if the checkpoint's architecture differs from the requested one."""
  diffs = [
    f"{f}={found[f]!r} (config: {getattr(wanted, f)!r})"
    for f in ARCH_FIELDS
    if f in found and found[f] != getattr(wanted, f)
  ]
  if diffs:
    raise ConversionError(
      f"{where}: the weights do not fit the requested SD3 config: "
      + ", ".join(diffs[:5])
      + "; pick the matching variant or omit config to auto-detect"
    )


def diffusers_config_dict(c: SD3Config) -> dict:
  """The ``config.json`` diffusers needs to build ``SD3Transformer2DModel``."""
  return {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": c.sample_size,
    "patch_size": c.patch_size,
    "in_channels": c.in_channels,
    "num_layers": c.depth,
    "attention_head_dim": c.head_dim,
    "num_attention_heads": c.num_heads,
    "joint_attention_dim": c.context_in_dim,
    "caption_projection_dim": c.hidden_size,
    "pooled_projection_dim": c.pooled_dim,
    "out_channels": c.out_channels,
    "pos_embed_max_size": c.pos_embed_max_size,
    "dual_attention_layers": list(range(c.num_dual)),
    "qk_norm": "rms_norm" if c.qk_norm else None,
  }


# --------------------------------------------------------------------------
# Public entry points.


def load_sd3(
  path: str,
  *,
  config: SD3Config | str | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  sharding=None,
  **runtime,
):
  """Loads SD3 / SD3.5 transformer weights (see ``open_checkpoint``).

  Layout and architecture are detected from the tensor names and shapes;
  with ``config`` (an ``SD3Config`` or a ``VARIANTS`` name) the weights must
  match it. Tensors are memory-mapped and copied once, straight into their
  (optionally sharded) device arrays.

  Returns:
    ``(config, model)``.
  """
  from flax import nnx

  from leapalign_jax.convert.loading import load_model, resolve_variant
  from leapalign_jax.models.sd3 import SD3

  source, layout, dcfg = open_checkpoint(path)
  config = resolve_variant(config, VARIANTS, "SD3")
  if config is not None:
    check_matches(infer_arch(source, layout), config, source.description)
    base = config
  else:
    base = infer_config(source, layout, dcfg)
  cfg = dataclasses.replace(
    base, dtype=dtype, param_dtype=param_dtype or dtype, **runtime
  )
  check_pos_embed(source, layout, cfg)
  pos_key = POS_EMBED_KEY[layout]
  source = source.renamed(lambda k: None if k == pos_key else k)
  rules = RULES[layout](cfg)
  keymap.validate(
    rules,
    source,
    f"SD3 ({layout} layout)",
    "Is this a complete, unquantised SD3 / SD3.5 transformer checkpoint?",
  )
  model = load_model(
    lambda: SD3(cfg, rngs=nnx.Rngs(0)), rules, source, cfg.param_dtype, sharding
  )
  return cfg, model


def export_tensors(model, layout: str, config: SD3Config, dtype=None) -> dict:
  """Layout tensors (lazy) of ``model``, ``pos_embed`` included."""
  from leapalign_jax.convert.loading import export_tensors as from_rules

  if layout not in RULES:
    raise ConversionError(
      f"unknown layout {layout!r}; use one of {list(LAYOUTS)}"
    )
  tensors = dict(from_rules(RULES[layout](config), model, dtype))
  first = next(iter(tensors.values()))
  table_dtype = np.dtype(first.dtype) if dtype is None else np.dtype(dtype)
  n, D = config.pos_embed_max_size, config.hidden_size
  tensors[POS_EMBED_KEY[layout]] = LazyTensor(
    (1, n * n, D),
    table_dtype,
    lambda: pos_embed_table(config).astype(table_dtype),
  )
  return tensors


def export_sd3(
  model,
  path: str,
  layout: str = "diffusers",
  *,
  config: SD3Config | None = None,
  dtype: str | None = None,
) -> list[str]:
  """Writes an SD3 model (or its Param state) for PyTorch tools.

  A model with LoRA adapters is refused: ``export_sd3_lora`` writes the
  adapters, ``export_sd3_merged`` the fused weights.

  Args:
    model: an ``SD3`` module, or its Param state / pure dict with ``config``.
    path: ``diffusers``: the ``transformer/`` folder (``config.json`` +
      weights); ``stability``: the ``.safetensors`` file (keys under
      ``model.diffusion_model.``, as in Stability's releases).
    layout: ``"diffusers"`` or ``"stability"``.
    config: required when ``model`` is not a module.
    dtype: output dtype (default: the parameters' own).
  """
  from leapalign_jax.convert.loading import refuse_adapters, write_checkpoint

  refuse_adapters(
    model,
    "export_sd3",
    "export_sd3_lora (the adapters, a diffusers/PEFT LoRA file) or "
    "export_sd3_merged (full weights with the adapters fused in)",
  )
  config = config or getattr(model, "config", None)
  if config is None:
    raise ConversionError("export_sd3 needs config= when given bare params")
  tensors = export_tensors(model, layout, config, dtype)
  if layout == "stability":
    tensors = {SINGLE_FILE_PREFIX + k: v for k, v in tensors.items()}
    return write_checkpoint(tensors, path, single_file="sd3.safetensors")
  return write_checkpoint(
    tensors, path, config_json=diffusers_config_dict(config)
  )


def _adapted_sd3(model) -> SD3Config:
  from flax import nnx

  config = getattr(model, "config", None)
  if not isinstance(model, nnx.Module) or not isinstance(config, SD3Config):
    raise ConversionError(
      f"expected an SD3 module with LoRA adapters, got {type(model).__name__}"
      "; rebuild it with nnx.merge(graphdef, lora_params, base_params)"
    )
  return config


def export_sd3_lora(model, path: str, *, dtype=None) -> list[str]:
  """Writes an SD3 model's LoRA adapters as a diffusers-loadable LoRA file.

  Keys are ``transformer.<diffusers module>.lora_{A,B}.weight`` (PEFT), what
  ``StableDiffusion3Pipeline.load_lora_weights`` reads; ``lora_scale`` is
  folded into ``lora_B`` and no alphas are written, so the adapted weight is
  exactly ``W + lora_B @ lora_A`` (``convert.lora``). Our fused qkv maps to
  ``to_q`` / ``to_k`` / ``to_v`` (or ``add_{q,k,v}_proj``) sharing
  ``lora_A``.

  Args:
    model: an ``SD3`` module with adapters, addressable from this process.
    path: the ``.safetensors`` file; a folder (or a path without that
      suffix) gets ``pytorch_lora_weights.safetensors``.
    dtype: output dtype (default: the adapters' own).

  Returns:
    The paths written.
  """
  import os

  from leapalign_jax.convert import lora
  from leapalign_jax.convert.safetensors_io import save_file

  config = _adapted_sd3(model)
  tensors = lora.lora_tensors(model, diffusers_rules(config), dtype=dtype)
  if os.path.isdir(path) or not path.endswith(".safetensors"):
    path = os.path.join(path, lora.LORA_WEIGHT_NAME)
  save_file(tensors, path, {"format": "pt"})
  return [path]


def export_sd3_merged(
  model, path: str, layout: str = "diffusers", *, dtype=None
) -> list[str]:
  """Writes a LoRA-adapted SD3 with its adapters fused into the weights.

  The same files as ``export_sd3`` of a ``merge_lora``-ed model, without
  changing ``model`` (``convert.lora.merged_params``).
  """
  from leapalign_jax.convert import lora

  config = _adapted_sd3(model)
  if not lora.adapted_modules(model):
    raise ConversionError(
      "the model has no LoRA adapters; use export_sd3 for full weights"
    )
  return export_sd3(
    lora.merged_params(model), path, layout, config=config, dtype=dtype
  )
