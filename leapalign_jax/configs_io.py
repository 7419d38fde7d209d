"""Loading ``configs/*.py`` files outside ``main.py`` (the other commands).

``load_config("configs/digits.py:fast", ["optim.lr=1e-4"])`` imports the
file, calls ``get_config("fast")`` (or ``get_config()``), applies overrides
and locks the result, as ``ml_collections.config_flags`` does for ``main``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence

import ml_collections

from leapalign_jax.errors import UserError


def load_config(
  spec: str, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
  """Loads ``path[:arg]`` and applies ``key=value`` overrides.

  Raises:
    UserError: for a missing file, a file without ``get_config``, or an
      override naming a key the config does not have.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such config file")
  module_spec = importlib.util.spec_from_file_location(
    "_leapalign_config", path
  )
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"{path}: defines no get_config()")
  config = module.get_config(arg) if arg else module.get_config()
  config = ml_collections.ConfigDict(config)
  config.lock()
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"override {item!r}: use key=value")
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    try:
      _set(config, key, parsed)
    except (AttributeError, KeyError):
      raise UserError(
        f"override {key!r}: the config has no such field (configs are locked; "
        "check the spelling)"
      ) from None
  return config


def _set(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  parts = dotted.split(".")
  node = config
  for p in parts[:-1]:
    node = node[p]
  if parts[-1] not in node:
    raise KeyError(dotted)
  node[parts[-1]] = value
