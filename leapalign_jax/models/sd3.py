"""The SD3 / SD3.5 MMDiT(-X) rectified-flow transformer in Flax NNX.

Module names mirror Stability's reference ``mmditx.py`` (``MMDiTX``:
``x_embedder``, ``t_embedder``, ``y_embedder``, ``context_embedder``,
``joint_blocks``, ``final_layer``); ``convert/sd3.py`` maps diffusers'
``SD3Transformer2DModel`` and Stability's single files onto them.

Differences of layout, not of function:

* the model reads and writes **packed latent tokens** ``[B, L, 4C]`` in the
  Flux packing (2x2 patches, feature ``c * 4 + ph * 2 + pw``): the patch
  convolution is the linear map of that packing, and the converter permutes
  the final linear's outputs from the reference's ``(ph, pw, c)`` order, so
  the samplers, methods and latent geometry serve SD3 and Flux alike;
* ``timesteps`` are the flow time ``t`` in ``[0, 1]`` (the reference takes
  ``1000 t``), as in the Flux port;
* the ``pos_embed`` buffer (the 2-D sin-cos table, 384² x 1536 for Medium) is
  not stored: the centre crop a resolution needs is built from the config,
  and the converter checks a checkpoint's table against it;
* identical blocks are stacked and scanned (``lax.scan`` + remat) in three
  groups: ``dual_blocks`` (the first ``num_dual`` blocks, whose image stream
  has the extra self-attention ``attn2``: SD3.5 Medium's 0-12), ``joint_blocks``
  (the plain ones) and ``last_block`` (its context stream stops after the
  attention). The adaLN modulations of every block are computed in one
  batched matmul before the scans.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from leapalign_jax.models.flux_layers import timestep_embedding
from leapalign_jax.models.layers import (
  ACT_BLD,
  Linear,
  constrain,
  remat_policy,
  run_layers,
  stack_layers,
)
from leapalign_jax.models.sd3_layers import (
  Embedder,
  FinalLayer,
  JointBlock,
  PatchEmbed,
  cropped_pos_embed,
)


@dataclasses.dataclass(frozen=True)
class SD3Config:
  """Architecture (``MMDiTX`` arguments) plus numerics / compilation knobs."""

  in_channels: int = 16  # latent channels (the model sees 4x, packed)
  out_channels: int = 16
  patch_size: int = 2
  depth: int = 24
  num_heads: int = 24
  head_dim: int = 64
  num_dual: int = 13  # leading blocks with dual attention (MMDiT-X)
  qk_norm: bool = True  # RMS QK-norm (SD3.5); False for SD3.0
  mlp_ratio: float = 4.0
  context_in_dim: int = 4096  # T5 width (CLIP states are zero-padded to it)
  pooled_dim: int = 2048  # CLIP-L 768 + CLIP-G 1280
  pos_embed_max_size: int = 384
  sample_size: int = 128  # latent side the pos-embed grid is scaled to
  # Numerics / compilation (not part of the checkpoint).
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots | names
  scan_layers: bool = True
  attention: str = "xla"  # auto | xla | cudnn | splash
  zero_init: bool = True  # adaLN-Zero init of modulations and final layer

  def __post_init__(self):
    if self.patch_size != 2:
      raise ValueError(
        f"patch_size {self.patch_size}: the packed-token layout is 2x2"
      )
    if not 0 <= self.num_dual < self.depth:
      raise ValueError(
        f"num_dual={self.num_dual} must be in [0, depth - 1 = "
        f"{self.depth - 1}] (the last block has no dual attention)"
      )

  @property
  def hidden_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def in_features(self) -> int:
    return self.in_channels * self.patch_size**2

  @property
  def out_features(self) -> int:
    return self.out_channels * self.patch_size**2

  @property
  def num_plain(self) -> int:
    """Blocks between the dual ones and the last."""
    return self.depth - 1 - self.num_dual


VARIANTS: dict[str, SD3Config] = {
  # stabilityai/stable-diffusion-3.5-medium: 2,243,171,520 parameters.
  "sd35_medium": SD3Config(),
  # stabilityai/stable-diffusion-3.5-large: 8,056,627,520 parameters.
  "sd35_large": SD3Config(
    depth=38, num_heads=38, num_dual=0, pos_embed_max_size=192
  ),
  # stabilityai/stable-diffusion-3-medium (3.0): no QK-norm, no dual blocks.
  "sd3_medium": SD3Config(num_dual=0, qk_norm=False, pos_embed_max_size=192),
  # CPU-sized: one dual, one plain and the last block.
  "tiny": SD3Config(
    depth=3,
    num_heads=2,
    head_dim=32,
    num_dual=1,
    context_in_dim=32,
    pooled_dim=32,
    pos_embed_max_size=16,
    sample_size=16,
  ),
}


def _mods(blocks, c_BD):
  """Every stacked block's (context, x) modulations, one batched matmul."""
  graphdef, state = nnx.split(blocks)
  return jax.vmap(lambda s: nnx.merge(graphdef, s).modulations(c_BD))(state)


def _checkpointed(module, remat: str, *args):
  """``module(*args)`` under the ``remat`` policy (an unstacked block)."""
  graphdef, state = nnx.split(module)

  def call(state, *args):
    return nnx.merge(graphdef, state)(*args)

  policy = remat_policy(remat)
  if policy is not None:
    call = jax.checkpoint(call, policy=policy)
  return call(state, *args)


class SD3(nnx.Module):
  """MMDiT(-X) over packed latent tokens (see the module docstring)."""

  def __init__(self, config: SD3Config, *, rngs: nnx.Rngs):
    self.config = c = config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    D = c.hidden_size
    self.x_embedder = PatchEmbed(c.in_features, D, rngs=rngs, **kw)
    self.t_embedder = Embedder(256, D, rngs=rngs, **kw)
    self.y_embedder = Embedder(c.pooled_dim, D, rngs=rngs, **kw)
    self.context_embedder = Linear(
      c.context_in_dim, D, kernel_axes=(None, "embed"), rngs=rngs, **kw
    )
    block = dict(
      qk_norm=c.qk_norm, attn_impl=c.attention, zero_init=c.zero_init, **kw
    )

    def stack(n, **extra):
      if not n:
        return None
      return stack_layers(
        lambda r: JointBlock(
          D, c.num_heads, c.mlp_ratio, rngs=r, **block, **extra
        ),
        n,
        rngs,
      )

    self.dual_blocks = stack(c.num_dual, dual=True)
    self.joint_blocks = stack(c.num_plain)
    self.last_block = JointBlock(
      D, c.num_heads, c.mlp_ratio, pre_only=True, rngs=rngs, **block
    )
    self.final_layer = FinalLayer(
      D, c.out_features, zero_init=c.zero_init, rngs=rngs, **kw
    )

  def __call__(
    self,
    img: jax.Array,
    hw: tuple[int, int],
    context: jax.Array,
    y: jax.Array,
    timesteps: jax.Array,
  ) -> jax.Array:
    """Predicts the velocity ``[B, L, 4 * out_channels]`` (packed tokens).

    Args:
      img: packed latents ``[B, L, 4 * in_channels]``, ``L = h * w``.
      hw: the token grid ``(h, w)`` (static).
      context: text states ``[B, S, context_in_dim]`` (CLIP-L/G and T5).
      y: pooled CLIP-L/G ``[B, pooled_dim]``.
      timesteps: ``[B]`` flow time in ``[0, 1]`` (1 = noise).
    """
    c = self.config
    dtype = jnp.dtype(c.dtype)
    h, w = hw
    if img.ndim != 3 or img.shape[1] != h * w:
      raise ValueError(
        f"img must be [B, h * w, C] for the grid {hw}; got {img.shape}"
      )
    pos = cropped_pos_embed(
      h,
      w,
      c.hidden_size,
      c.pos_embed_max_size,
      c.sample_size // c.patch_size,
    )
    x = self.x_embedder(img).astype(jnp.float32) + jnp.asarray(pos)[None]
    x = constrain(x.astype(dtype), ACT_BLD)
    t_emb = timestep_embedding(timesteps).astype(dtype)
    cond = self.t_embedder(t_emb) + self.y_embedder(y)
    ctx = constrain(self.context_embedder(context), ACT_BLD)

    remat_policy(c.remat)  # fail early on an unknown policy name
    carry = (ctx, x)
    for blocks in (self.dual_blocks, self.joint_blocks):
      if blocks is not None:
        carry = run_layers(
          blocks,
          carry,
          lambda blk, cx, mods: blk(cx[0], cx[1], mods),
          xs=_mods(blocks, cond),
          remat=c.remat,
          scan=c.scan_layers,
        )
    mods = self.last_block.modulations(cond)
    _, x = _checkpointed(self.last_block, c.remat, *carry, mods)
    return self.final_layer(x, cond).astype(jnp.float32)
