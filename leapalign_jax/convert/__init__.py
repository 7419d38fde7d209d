"""Weight conversion between PyTorch checkpoints and our Flax NNX models.

``load_flux`` / ``export_flux`` for the transformer, ``load_autoencoder`` /
``export_autoencoder`` for its autoencoder; errors are always a
``ConversionError`` with a one-line message.
"""

from leapalign_jax.convert.autoencoder import (
  export_autoencoder,
  load_autoencoder,
)
from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.convert.flux import export_flux, load_flux

__all__ = [
  "ConversionError",
  "export_autoencoder",
  "export_flux",
  "load_autoencoder",
  "load_flux",
]
