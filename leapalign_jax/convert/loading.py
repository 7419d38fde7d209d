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
