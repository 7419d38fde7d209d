"""The LAION "improved aesthetic predictor" head in Flax NNX.

A stack of five Linear layers (768 -> 1024 -> 128 -> 64 -> 16 -> 1) applied to
the L2-normalised OpenAI CLIP ViT-L/14 image embedding. The released
``sac+logos+ava1-l14-linearMSE.pth`` has no activations at all (its ReLUs are
commented out in the upstream ``MLP``; the Dropouts between the layers are the
identity at inference), so the head is one affine map written as five
matrices. The ``*-reluMSE`` heads put a ReLU after each of the first four
layers; ``activation="relu"`` reproduces them.

Parameter names: ``layers.{j}`` for the ``j``-th Linear; the upstream
``nn.Sequential`` indices of the same layers (which count the Dropouts and
ReLUs) are mapped by ``leapalign_jax.convert.aesthetic``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from leapalign_jax.models.layers import Linear

ACTIVATIONS = ("none", "relu")


@dataclasses.dataclass(frozen=True)
class AestheticConfig:
  """Layer widths, input first, and the activation between layers."""

  widths: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)
  activation: str = "none"  # "none": linearMSE heads; "relu": reluMSE heads
  param_dtype: str = "float32"

  def __post_init__(self):
    if len(self.widths) < 2 or self.widths[-1] != 1:
      raise ValueError(
        f"aesthetic head widths {self.widths} must end in a single output"
      )
    if self.activation not in ACTIVATIONS:
      raise ValueError(
        f"unknown aesthetic head activation {self.activation!r}; use one of "
        f"{ACTIVATIONS}"
      )

  @property
  def embed_dim(self) -> int:
    return self.widths[0]


class AestheticHead(nnx.Module):
  """Embedding ``[B, D]`` -> score ``[B]``, computed in float32."""

  def __init__(self, config: AestheticConfig, *, rngs: nnx.Rngs):
    self.config = config
    w, pd = config.widths, jnp.dtype(config.param_dtype)
    self.layers = nnx.List(
      [
        # The head is ~1M parameters: replicated everywhere.
        Linear(
          a,
          b,
          kernel_axes=(None, None),
          dtype=jnp.float32,
          param_dtype=pd,
          rngs=rngs,
        )
        for a, b in zip(w[:-1], w[1:])
      ]
    )

  def __call__(self, emb_BD: jax.Array) -> jax.Array:
    x = emb_BD.astype(jnp.float32)
    last = len(self.layers) - 1
    # Full fp32 matmuls even where the default is one bf16 pass (TPU): the
    # head is tiny and the scores are reported to two decimals.
    with jax.default_matmul_precision("highest"):
      for j, layer in enumerate(self.layers):
        x = layer(x)
        if self.config.activation == "relu" and j < last:
          x = jax.nn.relu(x)
    return x[:, 0]
