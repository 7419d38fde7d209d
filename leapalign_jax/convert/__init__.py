"""Weight conversion between PyTorch checkpoints and our Flax NNX models.

``load_flux`` / ``export_flux`` for the transformer (``export_flux_lora`` /
``export_flux_merged`` for its LoRA adapters), ``load_autoencoder`` /
``export_autoencoder`` for its autoencoder, ``load_clip`` / ``export_clip``
for the CLIP towers, ``load_t5`` / ``export_t5`` for the T5 encoder,
``load_aesthetic_head`` / ``export_aesthetic_head`` for the LAION aesthetic
head; errors are always a ``ConversionError`` with a one-line message.
"""

from leapalign_jax.convert.aesthetic import (
  export_aesthetic_head,
  load_aesthetic_head,
)
from leapalign_jax.convert.autoencoder import (
  export_autoencoder,
  load_autoencoder,
)
from leapalign_jax.convert.clip import export_clip, load_clip
from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.convert.flux import export_flux, load_flux
from leapalign_jax.convert.lora import export_flux_lora, export_flux_merged
from leapalign_jax.convert.t5 import export_t5, load_t5

__all__ = [
  "ConversionError",
  "export_aesthetic_head",
  "export_autoencoder",
  "export_clip",
  "export_flux",
  "export_flux_lora",
  "export_flux_merged",
  "export_t5",
  "load_aesthetic_head",
  "load_autoencoder",
  "load_clip",
  "load_flux",
  "load_t5",
]
