"""ImageReward (Xu et al. 2023): BLIP's encoders and a linear head.

``ImageReward.score_gard`` of the reference: the image through BLIP's ViT-L,
the prompt (BERT tokens, 35 at most) through BLIP's text encoder attending to
the image tokens, the first token's state through ``mlp`` (five linear
layers, dropout between them at training only: no nonlinearity), and the
result standardised with the reference's fixed mean and std. Names mirror
``ImageReward.py`` (``blip.visual_encoder``, ``blip.text_encoder``,
``mlp.layers.{0,2,4,6,7}``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from leapalign_jax.models.blip import (
  BertConfig,
  BertModel,
  VisionTransformer,
  ViTConfig,
)
from leapalign_jax.models.layers import Linear

MEAN = 0.16717362830052426  # the reference's reward normalisation
STD = 1.0333394966054072


@dataclasses.dataclass(frozen=True)
class ImageRewardConfig:
  """Architecture plus numerics knobs."""

  vision: ViTConfig = ViTConfig()
  text: BertConfig = BertConfig()
  mlp_dims: tuple[int, ...] = (1024, 128, 64, 16)  # then 1
  mean: float = MEAN
  std: float = STD
  text_length: int = 35  # the reference tokenizer's max_length
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention: str = "xla"  # the vision tower's kernel

  def __post_init__(self):
    if self.text.encoder_width != self.vision.hidden_size:
      raise ValueError(
        f"text.encoder_width {self.text.encoder_width} must equal the image "
        f"tokens' width {self.vision.hidden_size}"
      )


VARIANTS = {
  "imagereward": ImageRewardConfig(),
  "tiny": ImageRewardConfig(
    vision=ViTConfig(
      image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2
    ),
    text=BertConfig(
      vocab_size=64,
      hidden_size=24,
      num_layers=2,
      num_heads=2,
      intermediate_size=40,
      max_position_embeddings=40,
      encoder_width=32,
    ),
    mlp_dims=(20, 12, 8, 6),
  ),
}


def _identity(x):
  return x  # the reference's Dropout (inactive at inference)


class ImageReward(nnx.Module):
  """``score(pixels, ids, mask) -> [B]`` standardised rewards."""

  def __init__(self, config: ImageRewardConfig, *, rngs: nnx.Rngs):
    self.config = c = config
    kw = dict(
      dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), rngs=rngs
    )
    self.blip = nnx.Dict(
      visual_encoder=VisionTransformer(
        c.vision, remat=c.remat, attention_impl=c.attention, **kw
      ),
      text_encoder=BertModel(c.text, remat=c.remat, **kw),
    )
    dims = (c.text.hidden_size, *c.mlp_dims, 1)
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
      layers.append(Linear(a, b, kernel_axes=(None, None), **kw))
      if i < len(dims) - 3:  # dropout after all but the last two linears
        layers.append(_identity)
    self.mlp = nnx.Sequential(*layers)

  def score(
    self, pixels_BHWC: jax.Array, ids_BL: jax.Array, mask_BL: jax.Array
  ) -> jax.Array:
    """Rewards ``[B]`` (float32) of preprocessed images and BERT tokens."""
    c = self.config
    image = self.blip["visual_encoder"](pixels_BHWC)
    text = self.blip["text_encoder"](ids_BL, mask_BL, image)
    r = self.mlp(text[:, 0]).astype(jnp.float32)[:, 0]
    return (r - c.mean) / c.std
