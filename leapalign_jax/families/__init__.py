"""Model families behind one flow-model interface (``base.Family``).

``of(config)`` is the family that ``config.model.family`` names (``flux``, ``sd3``);
``get(name)`` looks one up. Each family is one module here (its model,
conditioning, schedule, text encoders, FLOP model and export) over its
``models/`` and ``convert/`` code; the harness above sees only ``Family``.
"""

from __future__ import annotations

from leapalign_jax.errors import ConfigError
from leapalign_jax.families import flux, sd3
from leapalign_jax.families.base import Family, Geometry

_FAMILIES: dict[str, Family] = {f.name: f for f in (flux.FAMILY, sd3.FAMILY)}

__all__ = ["Family", "Geometry", "get", "names", "of", "section"]


def names() -> list[str]:
  """The registered family names."""
  return sorted(_FAMILIES)


def get(name: str) -> Family:
  """The family called ``name``; a one-line ``ConfigError`` otherwise."""
  if name not in _FAMILIES:
    raise ConfigError(
      f"config.model.family={name!r} is not a model family; use one of "
      f"{names()}"
    )
  return _FAMILIES[name]


def of(config) -> Family:
  """The family of a run config (``config.model.family``, default flux)."""
  model = config.get("model")
  return get(model.get("family", "flux") if model is not None else "flux")


def section(config):
  """The config section of the run's model settings (``config.flux``)."""
  return config[of(config).section]
