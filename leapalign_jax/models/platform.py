"""The platform a computation is compiled for (kernel choice needs it)."""

from __future__ import annotations

import jax


def target_platform() -> str:
  """The platform being compiled for: the mesh's, else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()
