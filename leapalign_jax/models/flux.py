"""The Flux rectified-flow transformer (BFL ``flux/model.py``) in Flax NNX.

``Flux(config, rngs=...)`` builds the model; its call has BFL's signature:
``model(img, img_ids, txt, txt_ids, timesteps, y, guidance) -> [B, L, C]``.
Identical blocks are stacked on a leading ``layers`` axis and run with
``lax.scan`` (compile time flat in depth), each step wrapped in
``jax.checkpoint`` with the configured remat policy. The adaLN modulation of
every block only sees ``vec``, so it is computed for all blocks in one
batched matmul before the scan instead of once per block inside it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from leapalign_jax.models.flux_layers import (
  ACT_BLD,
  DoubleStreamBlock,
  EmbedND,
  LastLayer,
  MLPEmbedder,
  SingleStreamBlock,
  timestep_embedding,
)
from leapalign_jax.models.layers import (
  Linear,
  constrain,
  remat_policy,
  run_layers,
  stack_layers,
)


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  """Architecture (BFL ``FluxParams``) plus numerics and compilation knobs."""

  in_channels: int = 64
  out_channels: int = 64
  vec_in_dim: int = 768
  context_in_dim: int = 4096
  hidden_size: int = 3072
  mlp_ratio: float = 4.0
  num_heads: int = 24
  depth: int = 19
  depth_single_blocks: int = 38
  axes_dim: tuple[int, ...] = (16, 56, 56)
  theta: int = 10_000
  qkv_bias: bool = True
  guidance_embed: bool = True
  # Numerics / compilation (not part of the checkpoint).
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots | names
  scan_layers: bool = True  # False: a Python loop over blocks (debugging)
  attention: str = "xla"  # auto | xla | cudnn | splash
  round_timesteps: bool = False  # round t to `dtype` before x1000 (bit parity)
  zero_init: bool = True  # adaLN-Zero init of modulations and final layer

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not divisible by num_heads "
        f"{self.num_heads}"
      )
    head_dim = self.hidden_size // self.num_heads
    if sum(self.axes_dim) != head_dim:
      raise ValueError(
        f"axes_dim {self.axes_dim} sums to {sum(self.axes_dim)}, but the head"
        f" dim is {head_dim}: choose axes_dim that sum to the head dim"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)


VARIANTS: dict[str, FluxConfig] = {
  "dev": FluxConfig(),
  "schnell": FluxConfig(guidance_embed=False),
  # CPU-sized, keeps the real head_dim and axes split.
  "tiny": FluxConfig(
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=256,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
  ),
}


def _run_stack(blocks, carry, vec, call, remat: str, scan: bool):
  """Runs stacked ``blocks`` over ``carry``; ``call(block, carry, mods)``.

  Modulations of all blocks are computed up front (one batched matmul over
  the stacked kernels) and scanned over with the blocks.
  """
  graphdef, state = nnx.split(blocks)
  mods = jax.vmap(lambda s: nnx.merge(graphdef, s).modulations(vec))(state)
  return run_layers(blocks, carry, call, xs=mods, remat=remat, scan=scan)


class Flux(nnx.Module):
  """Flux transformer for flow matching on sequences of packed latents."""

  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
    self.config = c = config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.pe_embedder = EmbedND(c.head_dim, c.theta, c.axes_dim)
    self.img_in = Linear(
      c.in_channels, c.hidden_size, kernel_axes=(None, "embed"), rngs=rngs, **kw
    )
    self.time_in = MLPEmbedder(256, c.hidden_size, rngs=rngs, **kw)
    self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size, rngs=rngs, **kw)
    self.guidance_in = (
      MLPEmbedder(256, c.hidden_size, rngs=rngs, **kw)
      if c.guidance_embed
      else None
    )
    self.txt_in = Linear(
      c.context_in_dim,
      c.hidden_size,
      kernel_axes=(None, "embed"),
      rngs=rngs,
      **kw,
    )
    block_kw = dict(attn_impl=c.attention, zero_init=c.zero_init, **kw)
    self.double_blocks = (
      stack_layers(
        lambda r: DoubleStreamBlock(
          c.hidden_size,
          c.num_heads,
          c.mlp_ratio,
          c.qkv_bias,
          rngs=r,
          **block_kw,
        ),
        c.depth,
        rngs,
      )
      if c.depth
      else None
    )
    self.single_blocks = (
      stack_layers(
        lambda r: SingleStreamBlock(
          c.hidden_size, c.num_heads, c.mlp_ratio, rngs=r, **block_kw
        ),
        c.depth_single_blocks,
        rngs,
      )
      if c.depth_single_blocks
      else None
    )
    self.final_layer = LastLayer(
      c.hidden_size, 1, c.out_channels, zero_init=c.zero_init, rngs=rngs, **kw
    )

  def __call__(
    self,
    img: jax.Array,
    img_ids: jax.Array,
    txt: jax.Array,
    txt_ids: jax.Array,
    timesteps: jax.Array,
    y: jax.Array,
    guidance: jax.Array | None = None,
  ) -> jax.Array:
    """Predicts the velocity ``[B, L_img, out_channels]``.

    Args:
      img: packed latents ``[B, L_img, in_channels]``.
      img_ids: ``[B, L_img, 3]`` position ids ``(0, row, col)``.
      txt: text-encoder states ``[B, L_txt, context_in_dim]``.
      txt_ids: ``[B, L_txt, 3]`` (zeros for Flux).
      timesteps: ``[B]`` flow time ``t`` in ``[0, 1]`` (1 = noise).
      y: pooled vector ``[B, vec_in_dim]``.
      guidance: ``[B]`` distilled guidance (required iff ``guidance_embed``).
    """
    c = self.config
    dtype = jnp.dtype(c.dtype)
    if img.ndim != 3 or txt.ndim != 3:
      raise ValueError(
        f"img and txt must be [B, L, C]; got {img.shape} and {txt.shape}"
      )
    t = timesteps
    if c.round_timesteps:
      t = t.astype(dtype)
    vec = self.time_in(timestep_embedding(t).astype(dtype))
    if self.guidance_in is not None:
      if guidance is None:
        raise ValueError(
          "this Flux model is guidance-distilled (guidance_embed=True): pass"
          " guidance=[B] (e.g. 3.5 for FLUX.1-dev)"
        )
      g = guidance.astype(dtype) if c.round_timesteps else guidance
      vec = vec + self.guidance_in(timestep_embedding(g).astype(dtype))
    vec = vec + self.vector_in(y)
    img = constrain(self.img_in(img), ACT_BLD)
    txt = constrain(self.txt_in(txt), ACT_BLD)
    pe = self.pe_embedder(jnp.concatenate([txt_ids, img_ids], axis=1))

    remat_policy(c.remat)  # fail early on an unknown policy name
    if self.double_blocks is not None:
      img, txt = _run_stack(
        self.double_blocks,
        (img, txt),
        vec,
        lambda blk, carry, mods: blk(carry[0], carry[1], mods, pe),
        c.remat,
        c.scan_layers,
      )
    x = jnp.concatenate([txt, img], axis=1)
    if self.single_blocks is not None:
      x = _run_stack(
        self.single_blocks,
        x,
        vec,
        lambda blk, carry, mods: blk(carry, mods, pe),
        c.remat,
        c.scan_layers,
      )
    img = x[:, txt.shape[1] :]
    return self.final_layer(img, vec).astype(jnp.float32)
