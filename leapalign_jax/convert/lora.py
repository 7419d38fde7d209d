"""Flux LoRA adapters -> PyTorch: a diffusers/PEFT LoRA file, or fused weights.

The LoRA mapping is derived from the Flux key tables (``convert/flux.py``),
not written by hand. A rule says that one of our kernels (one layer of it) is
the transposed concatenation of slices of torch weights. For an adapted kernel
with update ``s * A B`` (``A [*in, r]``, ``B [r, *out]``) the rule's torch
tensor changes by ``b @ a`` with ``a = A^T [r, n_in]`` and ``b = s B^T
[n_out, r]`` (``lora_scale`` is folded into ``b``). A slice of output rows
takes rows of ``b`` and keeps ``a`` (the fused qkv -> ``to_q``/``to_k``/
``to_v`` share ``lora_A``); a slice of input columns takes columns of ``a``.
When several adapted kernels land in one torch weight (our ``linear2.attn`` +
``linear2.mlp`` -> diffusers ``proj_out`` by columns, our ``linear1.qkv`` +
``linear1.mlp`` -> BFL ``linear1`` by rows), their pieces are zero-padded to
the full weight and stacked along the rank (flux.md §10 trap 8), so that
weight's rank is the sum of the pieces' ranks.

Files carry no alpha keys: with the scale in ``lora_B`` every loader that
follows PEFT's convention (no alpha: ``W + lora_B @ lora_A``) applies the
update exactly, whatever each module's rank.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.convert.keymap import Path, Rule, Src
from leapalign_jax.convert.loading import flat_params
from leapalign_jax.convert.safetensors_io import LazyTensor, save_file
from leapalign_jax.models.layers import Linear
from leapalign_jax.models.lora import module_path

LAYOUTS = ("diffusers",)
# What diffusers' ``load_lora_weights(folder)`` looks for in a folder.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The transforms whose torch weight is ``kernel.reshape(n_in, n_out).T``, up
# to a permutation of its output rows (the final layer's half swap).
_LINEAR = ("linear", "swap+linear")


@dataclasses.dataclass(frozen=True)
class _Piece:
  """One adapted kernel's share of one torch weight: ``lora_B @ lora_A``."""

  module: Linear
  name: str  # our module path, for messages
  layer: int | None
  rule: Rule
  src: int  # index into ``rule.srcs``

  @property
  def rank(self) -> int:
    return self.module.lora_a.shape[-1]

  def factors(self) -> tuple[np.ndarray, np.ndarray]:
    """``(a [r, in], b [out, r])`` over the whole torch weight, in fp32."""
    m, src = self.module, self.rule.srcs[self.src]
    a, b = _layer(m.lora_a, self.layer), _layer(m.lora_b, self.layer)
    r = a.shape[-1]
    a = a.reshape(-1, r).T.astype(np.float32)
    b = (np.float32(m.lora_scale) * b.reshape(r, -1).T).astype(np.float32)
    if self.rule.transform.name == "swap+linear":
      h = b.shape[0] // 2
      b = np.concatenate([b[h:], b[:h]])
    # The rule's torch tensor is ``b @ a``: cut out this source's slice.
    offset = sum(s.size for s in self.rule.srcs[: self.src])
    cut = slice(offset, offset + src.size)
    if src.axis == 0:
      b = b[cut]
    else:
      a = a[:, cut]
    # Place the slice in the full weight; zeros elsewhere.
    out_dim, in_dim = src.shape
    rows = slice(src.start, src.start + src.size)
    if src.axis == 0:
      full_b = np.zeros((out_dim, r), np.float32)
      full_b[rows] = b
      return a, full_b
    full_a = np.zeros((r, in_dim), np.float32)
    full_a[:, rows] = a
    return full_a, b


def _layer(variable, layer: int | None) -> np.ndarray:
  value = variable[...]
  return np.asarray(value if layer is None else value[layer])


def adapted_modules(model) -> dict[Path, Linear]:
  """Every ``Linear`` of ``model`` that holds a LoRA adapter, by path."""
  return {
    tuple(path): m
    for path, m in nnx.iter_modules(model)
    if isinstance(m, Linear) and m.lora_a is not None
  }


def _pieces(model, rules: Sequence[Rule], layout: str) -> dict[str, list]:
  """The pieces of every torch weight that the adapters change, by key.

  Pieces follow the table's order, so a combined weight stacks its ranks in
  the torch weight's own order (qkv before mlp, attn before mlp).
  """
  adapted = adapted_modules(model)
  if not adapted:
    raise ConversionError(
      "the model has no LoRA adapters (never added, or already folded by "
      "merge_lora); export the full weights with export_flux instead"
    )
  pieces: dict[str, list[_Piece]] = defaultdict(list)
  covered: dict[Path, list[int | None]] = defaultdict(list)
  for rule in rules:
    path, leaf = rule.target[:-1], rule.target[-1]
    if leaf != "kernel" or path not in adapted:
      continue
    name = module_path(path)
    if rule.transform.name not in _LINEAR:
      raise ConversionError(
        f"LoRA on {name!r}: its {layout} weight is not a plain linear "
        f"re-layout ({rule.transform.name}); a low-rank update cannot be "
        "expressed there, drop it from lora.targets"
      )
    covered[path].append(rule.layer)
    for i, src in enumerate(rule.srcs):
      _check_src(src, rule, name)
      pieces[src.key].append(_Piece(adapted[path], name, rule.layer, rule, i))
  for path, m in adapted.items():
    _check_covered(path, m, covered.get(path), layout)
  return pieces


def _check_covered(path: Path, m: Linear, layers, layout: str) -> None:
  """Every layer of an adapted kernel must map to some torch weight."""
  name = module_path(path)
  if not layers:
    raise ConversionError(
      f"LoRA on {name!r}: no {layout} weight corresponds to it; drop it "
      "from lora.targets or export fused weights (export_flux_merged)"
    )
  n_lead = m.lora_a.ndim - len(m.in_shape) - 1
  want = [None] if n_lead == 0 else list(range(m.lora_a.shape[0]))
  if sorted(layers, key=lambda x: -1 if x is None else x) != want:
    raise AssertionError(f"{name}: the key table covers layers {layers}")


def _check_src(src: Src, rule: Rule, name: str) -> None:
  if len(src.shape) != 2 or not src.key.endswith(".weight"):
    raise ConversionError(
      f"LoRA on {name!r}: maps to {src.key} {src.shape}, not a 2-D Linear "
      "weight; drop it from lora.targets"
    )
  if src.axis != rule.srcs[0].axis:
    raise AssertionError(f"{name}: sources concatenated on mixed axes")


def lora_tensors(
  model,
  rules: Sequence[Rule],
  *,
  prefix: str = "transformer.",
  layout: str = "diffusers",
  dtype=None,
) -> dict[str, LazyTensor]:
  """PEFT-keyed ``lora_A``/``lora_B`` tensors (lazy) for a key table.

  Args:
    model: a model holding LoRA adapters (``models.lora.add_lora``).
    rules: the key table of the torch layout (e.g. ``diffusers_rules(cfg)``).
    prefix: prepended to every torch module name.
    layout: the layout's name, for messages.
    dtype: output dtype (default: the adapters' own).

  Returns:
    ``{f"{prefix}{module}.lora_A.weight": [R, in], ...lora_B.weight: [out,
    R]}``; ``W + lora_B @ lora_A`` is the adapted weight.
  """
  out = {}
  for key, pieces in _pieces(model, rules, layout).items():
    module = prefix + key.removesuffix(".weight")
    np_dtype = np.dtype(jnp.dtype(dtype or pieces[0].module.lora_a[...].dtype))
    rank = sum(p.rank for p in pieces)
    out_dim, in_dim = pieces[0].rule.srcs[pieces[0].src].shape

    def produce(which, pieces=pieces, np_dtype=np_dtype):
      parts = [p.factors()[which] for p in pieces]
      axis = 0 if which == 0 else 1  # A stacks rows, B stacks columns
      return np.concatenate(parts, axis).astype(np_dtype)

    out[f"{module}.lora_A.weight"] = LazyTensor(
      (rank, in_dim), np_dtype, lambda f=produce: f(0)
    )
    out[f"{module}.lora_B.weight"] = LazyTensor(
      (out_dim, rank), np_dtype, lambda f=produce: f(1)
    )
  return out


def _check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ConversionError(
      f"unknown LoRA layout {layout!r}; use 'diffusers' (PEFT keys), or "
      "export_flux_merged(..., layout='bfl') for fused BFL weights"
    )


def _flux_config(model):
  config = getattr(model, "config", None)
  if config is None or not isinstance(model, nnx.Module):
    raise ConversionError(
      f"expected a Flux module with LoRA adapters, got {type(model).__name__}"
      "; rebuild it with nnx.merge(graphdef, lora_params, base_params)"
    )
  return config


def export_flux_lora(
  model, path: str, layout: str = "diffusers", *, dtype=None
) -> list[str]:
  """Writes a Flux model's LoRA adapters as a diffusers-loadable LoRA file.

  Keys are ``transformer.<diffusers module>.lora_{A,B}.weight`` (what
  ``FluxPipeline.load_lora_weights`` and
  ``FluxTransformer2DModel.load_lora_adapter`` read); ``lora_scale`` is folded
  into ``lora_B`` and no alphas are written, so the adapted weight is exactly
  ``W + lora_B @ lora_A``. Ranks can differ between modules (a single
  block's ``proj_out`` gets the sum of its two adapters' ranks).

  Args:
    model: a ``Flux`` module with adapters; arrays must be addressable from
      this process (``leapalign_jax.export.gather_to_host``).
    path: the ``.safetensors`` file to write; a folder (or a path without
      that suffix) gets ``pytorch_lora_weights.safetensors``.
    layout: ``"diffusers"`` (the only LoRA layout).
    dtype: output dtype (default: the adapters' own).

  Returns:
    The paths written.
  """
  _check_layout(layout)
  from leapalign_jax.convert.flux_keys import RULES

  config = _flux_config(model)
  tensors = lora_tensors(model, RULES[layout](config), dtype=dtype)
  if os.path.isdir(path) or not path.endswith(".safetensors"):
    path = os.path.join(path, LORA_WEIGHT_NAME)
  save_file(tensors, path, {"format": "pt"})
  return [path]


class _MergedKernel:
  """A kernel plus its LoRA update, computed one layer at a time on export."""

  def __init__(self, module: Linear):
    self.module = module
    self.dtype = np.dtype(module.kernel[...].dtype)

  def _merge(self, layer: int | None) -> np.ndarray:
    m = self.module
    kernel = _layer(m.kernel, layer)
    a, b = _layer(m.lora_a, layer), _layer(m.lora_b, layer)
    r = a.shape[-1]
    delta = a.reshape(-1, r).astype(np.float32) @ b.reshape(r, -1).astype(
      np.float32
    )
    merged = kernel.astype(np.float32) + np.float32(m.lora_scale) * (
      delta.reshape(kernel.shape)
    )
    return merged.astype(self.dtype)

  def __getitem__(self, layer: int) -> np.ndarray:
    return self._merge(layer)

  def __array__(self, dtype=None, copy=None):
    del copy
    arr = self._merge(None)
    return arr if dtype is None else arr.astype(dtype)


def merged_params(model) -> dict:
  """``model``'s Param dict with every adapter folded in lazily (no copy).

  The model is not changed (unlike ``models.lora.merge_lora``) and each
  kernel is merged only when the exporter reads it, one layer at a time.
  """
  flat: Mapping[Path, object] = dict(flat_params(model))
  for path, m in adapted_modules(model).items():
    flat[(*path, "kernel")] = _MergedKernel(m)
  return traverse_util.unflatten_dict(
    {k: v for k, v in flat.items() if k[-1] not in ("lora_a", "lora_b")}
  )


def export_flux_merged(
  model, path: str, layout: str = "diffusers", *, dtype=None
) -> list[str]:
  """Writes a LoRA-adapted Flux with its adapters fused into the weights.

  The alternative to ``export_flux_lora`` for tools without LoRA support:
  the same files as ``export_flux`` of a ``merge_lora``-ed model (a diffusers
  ``transformer/`` folder or a BFL single file), without changing ``model``.
  """
  from leapalign_jax.convert.flux import export_flux

  config = _flux_config(model)
  if not adapted_modules(model):
    raise ConversionError(
      "the model has no LoRA adapters; use export_flux for full weights"
    )
  return export_flux(
    merged_params(model), path, layout, config=config, dtype=dtype
  )
