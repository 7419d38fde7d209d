"""Weight conversion between PyTorch checkpoints and our Flax NNX models.

``load_flux`` / ``export_flux`` for the transformer; errors are always a
``ConversionError`` with a one-line message.
"""

from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.convert.flux import export_flux, load_flux

__all__ = ["ConversionError", "export_flux", "load_flux"]
