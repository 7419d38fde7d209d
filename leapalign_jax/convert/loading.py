"""Model-level loading and export on top of the key tables (any NNX model)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx, traverse_util

from leapalign_jax.convert import keymap
from leapalign_jax.convert.keymap import Path, Rule


def flat_params(tree) -> dict[Path, Any]:
  """``{path: leaf}`` of a model, an ``nnx.State`` or a nested pure dict."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  return traverse_util.flatten_dict(tree)


def refuse_adapters(params, what: str, instead: str) -> None:
  """Raises if ``params`` hold LoRA adapters, which a full export would drop.

  The key tables map base weights only, so an adapted model would otherwise
  be written as its base without a word.
  """
  adapted = sorted(
    {
      "/".join(map(str, p[:-1]))
      for p in flat_params(params)
      if p[-1] == "lora_a"
    }
  )
  if adapted:
    from leapalign_jax.convert.errors import ConversionError

    raise ConversionError(
      f"{what}: the model carries LoRA adapters ({len(adapted)} modules, e.g. "
      f"{adapted[0]}) that base weights would leave out; use {instead}"
    )


def abstract_model(ctor: Callable[[], nnx.Module]):
  """``(graphdef, abstract Param state)`` of ``ctor()`` without allocating."""
  model = nnx.eval_shape(ctor)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise AssertionError("models loaded from checkpoints hold only nnx.Param")
  return graphdef, params


def load_model(
  ctor: Callable[[], nnx.Module],
  rules: Sequence[Rule],
  source,
  param_dtype: Any,
  shardings: Any = None,
) -> nnx.Module:
  """Builds ``ctor()`` with its parameters read from ``source``.

  Args:
    ctor: builds the model (run abstractly: no random init is materialised).
    rules: the key table for ``source``'s layout.
    source: a validated ``TensorSource``.
    param_dtype: dtype the parameters are stored in.
    shardings: None (default device), one ``jax.sharding.Sharding`` for every
      parameter, a pytree of shardings matching the Param state / its pure
      dict, or a function of the abstract Param state returning one (e.g.
      ``lambda s: sharding.logical_to_mesh(s, mesh, rules)``).
  """
  graphdef, params = abstract_model(ctor)
  abstract = flat_params(params)
  flat_shardings = None
  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    shardings = shardings(params)  # e.g. logical rules over the abstract state
  if isinstance(shardings, jax.sharding.Sharding):
    flat_shardings = dict.fromkeys(abstract, shardings)
  elif shardings is not None:
    flat_shardings = flat_params(shardings)
  loaded = keymap.load(rules, source, abstract, param_dtype, flat_shardings)
  nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(loaded))
  return nnx.merge(graphdef, params)


def export_tensors(
  rules: Sequence[Rule], params: Any, dtype: Any | None = None
) -> Mapping[str, keymap.LazyTensor]:
  """Source-layout lazy tensors from a model / Param state / pure dict."""
  return keymap.export(rules, flat_params(params), dtype)


def resolve_variant(config, variants: Mapping[str, Any], what: str):
  """``config`` itself, or ``variants[config]`` when it is a name.

  Raises:
    ConversionError: for an unknown variant name.
  """
  if not isinstance(config, str):
    return config
  if config not in variants:
    from leapalign_jax.convert.errors import ConversionError

    raise ConversionError(
      f"unknown {what} variant {config!r}; use one of {sorted(variants)}"
    )
  return variants[config]


def write_checkpoint(
  tensors: Mapping[str, Any],
  path: str,
  *,
  single_file: str | None = None,
  prefix: str = "diffusion_pytorch_model",
  config_json: dict | None = None,
  max_shard_bytes: int = 10 * 1024**3,
) -> list[str]:
  """Writes a single safetensors file or a folder (shards + config.json).

  Args:
    tensors: name -> array or ``LazyTensor`` (produced one at a time).
    path: the file (single-file layouts) or folder to write.
    single_file: for single-file layouts, the file name used when ``path``
      is a folder (or does not end in ``.safetensors``).
    prefix: shard name prefix for folder layouts (``model`` for
      transformers, ``diffusion_pytorch_model`` for diffusers).
    config_json: the folder's ``config.json`` (written after the weights).
    max_shard_bytes: shard size of folder layouts.

  Returns:
    The paths written.
  """
  import os

  from leapalign_jax.convert.safetensors_io import (
    save_file,
    save_sharded,
    write_json_atomic,
  )

  metadata = {"format": "pt"}
  if single_file is not None:
    if os.path.isdir(path) or not path.endswith(".safetensors"):
      path = os.path.join(path, single_file)
    save_file(tensors, path, metadata)
    return [path]
  files = save_sharded(tensors, path, prefix, max_shard_bytes, metadata)
  written = [os.path.join(path, f) for f in files]
  if config_json is not None:
    write_json_atomic(os.path.join(path, "config.json"), config_json)
    written.append(os.path.join(path, "config.json"))
  return written
