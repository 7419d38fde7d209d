"""The Flux 16-channel autoencoder (BFL ``flux/modules/autoencoder.py``) in NNX.

Images are NHWC in ``[-1, 1]``; latents are NHWC ``[B, H/f, W/f, z]`` with
``f = 2 ** (len(ch_mult) - 1)`` (8 for Flux) and ``z = z_channels`` (16).
Module and attribute names follow BFL, so a parameter path such as
``decoder/up/2/block/0/conv1/kernel`` is BFL's ``decoder.up.2.block.0.conv1``
(``up`` is in resolution order: ``up.0`` is the highest resolution).
Layout differences from the PyTorch checkpoint, mapped by
``leapalign_jax.convert.autoencoder``: conv kernels are ``[kh, kw, in, out]``,
the attention's 1×1 convs are dense ``[in, out]`` kernels, and GroupNorm
weights are called ``scale``.

The latent scale and shift (flux.md §6) are applied here, once:
``encode(x) = scale * (mean - shift)`` and ``decode(z) = decoder(z / scale +
shift)``. The encoder returns the posterior mean (Flux does not sample).

For jitted training code, ``decode_fn(model)`` returns a pure
``fn(params, z) -> image`` and the decoder's params; the function is
differentiable in both arguments and honours the config's remat policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from leapalign_jax.models.attention import xla_attention
from leapalign_jax.models.layers import (
  REMAT_POLICIES,
  Conv2d,
  GroupNorm,
  Linear,
  remat_policy,
)

# Flux's latent normalisation (BFL ``AutoEncoderParams``; diffusers'
# ``scaling_factor`` / ``shift_factor``). The only place they are written.
SCALE_FACTOR = 0.3611
SHIFT_FACTOR = 0.1159
REMAT_SCOPES = ("block", "level")


@dataclasses.dataclass(frozen=True)
class AutoEncoderConfig:
  """Architecture (BFL ``AutoEncoderParams``) plus numerics knobs."""

  resolution: int = 256  # informational only, as in BFL
  in_channels: int = 3
  ch: int = 128
  out_ch: int = 3
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 16
  scale_factor: float = SCALE_FACTOR
  shift_factor: float = SHIFT_FACTOR
  norm_groups: int = 32  # not stored in checkpoints; 32 in every Flux AE
  # Numerics / compilation (not part of the checkpoint).
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
  param_dtype: str = "float32"
  # Remat policy (layers.remat_policy). The AE tags no checkpoint names, so
  # "names" acts as "full"; "dots" keeps only the attention projections.
  remat: str = "none"
  remat_scope: str = "block"  # block: each Resnet/Attn block; level: a level

  def __post_init__(self):
    if not self.ch_mult:
      raise ValueError("ch_mult must name at least one level")
    bad = sorted({c for c in (self.ch, *self.channels) if c % self.norm_groups})
    if bad:
      raise ValueError(
        f"norm_groups {self.norm_groups} does not divide the channel counts "
        f"{bad}; pick norm_groups that divides ch and every ch * m"
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
    if self.remat_scope not in REMAT_SCOPES:
      raise ValueError(
        f"remat_scope {self.remat_scope!r} is not one of {REMAT_SCOPES}"
      )

  @property
  def channels(self) -> tuple[int, ...]:
    """Channels of each level, highest resolution first."""
    return tuple(self.ch * m for m in self.ch_mult)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    """``(h, w, z_channels)`` of the latent of a ``height × width`` image.

    Each downsample halves and floors (pad right/bottom by one, 3×3 stride 2),
    so ``h = height // f``; ``decode`` maps ``h`` back to ``h * f``.
    """
    f = self.downsample_factor
    return height // f, width // f, self.z_channels


VARIANTS: dict[str, AutoEncoderConfig] = {
  "flux": AutoEncoderConfig(),
  # SD3 / SD3.5's VAE: Flux's architecture (16 latent channels, no quant
  # convs) with its own latent normalisation (diffusers' vae/config.json).
  "sd3": AutoEncoderConfig(scale_factor=1.5305, shift_factor=0.0609),
  # CPU-sized: three levels (4x downsampling), one resnet per level, Flux's
  # 16 latent channels so that it feeds the tiny Flux (16 x 2 x 2 = 64).
  "tiny": AutoEncoderConfig(
    ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4
  ),
}


def _kw(c: AutoEncoderConfig) -> dict:
  return dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))


def _remat(c: AutoEncoderConfig, scope: str) -> str:
  """The remat policy name that applies at ``scope`` ("none" elsewhere)."""
  return c.remat if c.remat_scope == scope else "none"


def _call(module: nnx.Module, x: jax.Array, remat: str) -> jax.Array:
  """``module(x)``, rematerialised under the policy named ``remat``."""
  policy = remat_policy(remat)
  if policy is None:
    return module(x)
  graphdef, state = nnx.split(module)

  def run(state, x):
    return nnx.merge(graphdef, state)(x)

  return jax.checkpoint(run, policy=policy)(state, x)


class ResnetBlock(nnx.Module):
  """GroupNorm → swish → conv3×3, twice, plus a (1×1-projected) residual."""

  def __init__(
    self, in_channels: int, out_channels: int, c: AutoEncoderConfig, *, rngs
  ):
    g, kw = c.norm_groups, _kw(c)
    pdt = kw["param_dtype"]
    self.norm1 = GroupNorm(g, in_channels, param_dtype=pdt, rngs=rngs)
    self.conv1 = Conv2d(in_channels, out_channels, 3, rngs=rngs, **kw)
    self.norm2 = GroupNorm(g, out_channels, param_dtype=pdt, rngs=rngs)
    self.conv2 = Conv2d(out_channels, out_channels, 3, rngs=rngs, **kw)
    self.nin_shortcut = (
      Conv2d(in_channels, out_channels, 1, rngs=rngs, **kw)
      if in_channels != out_channels
      else None
    )

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.nin_shortcut is not None:
      x_BHWC = self.nin_shortcut(x_BHWC)
    return x_BHWC.astype(h.dtype) + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over the H·W positions, plus the residual."""

  def __init__(self, channels: int, c: AutoEncoderConfig, *, rngs):
    kw = _kw(c)
    self.norm = GroupNorm(
      c.norm_groups, channels, param_dtype=kw["param_dtype"], rngs=rngs
    )
    # BFL's 1×1 convs, stored as dense [in, out] kernels.
    lin = dict(kernel_axes=("conv_in", "conv_out"), rngs=rngs, **kw)
    self.q = Linear(channels, channels, **lin)
    self.k = Linear(channels, channels, **lin)
    self.v = Linear(channels, channels, **lin)
    self.proj_out = Linear(channels, channels, **lin)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    B, H, W, C = x_BHWC.shape
    h = self.norm(x_BHWC)
    q, k, v = (m(h).reshape(B, H * W, 1, C) for m in (self.q, self.k, self.v))
    a_BLHD = xla_attention(q, k, v)
    return x_BHWC.astype(a_BLHD.dtype) + self.proj_out(
      a_BLHD.reshape(B, H, W, C)
    )


class Downsample(nnx.Module):
  """Zero pad right and bottom by one, then a 3×3 stride-2 conv (BFL).

  The asymmetric pad is the conv's explicit padding ``((0, 1), (0, 1))``,
  which equals padding first and convolving with no padding.
  """

  def __init__(self, channels: int, c: AutoEncoderConfig, *, rngs):
    self.conv = Conv2d(
      channels,
      channels,
      3,
      stride=2,
      padding=((0, 1), (0, 1)),
      rngs=rngs,
      **_kw(c),
    )

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    return self.conv(x_BHWC)


class Upsample(nnx.Module):
  """Nearest-neighbour ×2, then a 3×3 conv."""

  def __init__(self, channels: int, c: AutoEncoderConfig, *, rngs):
    self.conv = Conv2d(channels, channels, 3, rngs=rngs, **_kw(c))

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
    return self.conv(x_BHWC)


class DownLevel(nnx.Module):
  """One encoder level: ``block`` resnets, then an optional ``downsample``."""

  def __init__(self, c_in, c_out, down: bool, c: AutoEncoderConfig, *, rngs):
    chans = [c_in] + [c_out] * c.num_res_blocks
    self.block = nnx.List(
      [ResnetBlock(a, b, c, rngs=rngs) for a, b in zip(chans, chans[1:])]
    )
    self.downsample = Downsample(c_out, c, rngs=rngs) if down else None
    self.remat = _remat(c, "block")

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    for blk in self.block:
      x_BHWC = _call(blk, x_BHWC, self.remat)
    if self.downsample is not None:
      x_BHWC = self.downsample(x_BHWC)
    return x_BHWC


class UpLevel(nnx.Module):
  """One decoder level: ``block`` resnets, then an optional ``upsample``."""

  def __init__(self, c_in, c_out, up: bool, c: AutoEncoderConfig, *, rngs):
    chans = [c_in] + [c_out] * (c.num_res_blocks + 1)
    self.block = nnx.List(
      [ResnetBlock(a, b, c, rngs=rngs) for a, b in zip(chans, chans[1:])]
    )
    self.upsample = Upsample(c_out, c, rngs=rngs) if up else None
    self.remat = _remat(c, "block")

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    for blk in self.block:
      x_BHWC = _call(blk, x_BHWC, self.remat)
    if self.upsample is not None:
      x_BHWC = self.upsample(x_BHWC)
    return x_BHWC


class Mid(nnx.Module):
  """BFL's ``mid``: ``block_1`` → ``attn_1`` → ``block_2`` at the bottom."""

  def __init__(self, channels: int, c: AutoEncoderConfig, *, rngs):
    self.block_1 = ResnetBlock(channels, channels, c, rngs=rngs)
    self.attn_1 = AttnBlock(channels, c, rngs=rngs)
    self.block_2 = ResnetBlock(channels, channels, c, rngs=rngs)
    self.remat = _remat(c, "block")

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    for m in (self.block_1, self.attn_1, self.block_2):
      x_BHWC = _call(m, x_BHWC, self.remat)
    return x_BHWC


class Encoder(nnx.Module):
  """Image ``[B, H, W, in_channels]`` → posterior mean ``[B, h, w, z]``."""

  def __init__(self, config: AutoEncoderConfig, *, rngs: nnx.Rngs):
    c, kw = config, _kw(config)
    chans = c.channels
    n = len(chans)
    self.conv_in = Conv2d(c.in_channels, c.ch, 3, rngs=rngs, **kw)
    c_ins = (c.ch, *chans[:-1])
    self.down = nnx.List(
      [
        DownLevel(c_ins[i], chans[i], i != n - 1, c, rngs=rngs)
        for i in range(n)
      ]
    )
    self.mid = Mid(chans[-1], c, rngs=rngs)
    self.norm_out = GroupNorm(
      c.norm_groups, chans[-1], param_dtype=kw["param_dtype"], rngs=rngs
    )
    self.conv_out = Conv2d(chans[-1], 2 * c.z_channels, 3, rngs=rngs, **kw)
    self.remat = _remat(c, "level")

  def moments(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior ``(mean, logvar)``, each ``[B, h, w, z]`` in float32."""
    h = self.conv_in(x_BHWC)
    for level in self.down:
      h = _call(level, h, self.remat)
    h = _call(self.mid, h, self.remat)
    h = self.conv_out(jax.nn.silu(self.norm_out(h))).astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    return self.moments(x_BHWC)[0]


class Decoder(nnx.Module):
  """Decoder-space latent ``[B, h, w, z]`` → image ``[B, h·f, w·f, out_ch]``."""

  def __init__(self, config: AutoEncoderConfig, *, rngs: nnx.Rngs):
    c, kw = config, _kw(config)
    chans = c.channels
    n = len(chans)
    self.conv_in = Conv2d(c.z_channels, chans[-1], 3, rngs=rngs, **kw)
    self.mid = Mid(chans[-1], c, rngs=rngs)
    # Level i receives the output of level i + 1 (the deepest gets mid's).
    c_ins = (*chans[1:], chans[-1])
    self.up = nnx.List(
      [UpLevel(c_ins[i], chans[i], i != 0, c, rngs=rngs) for i in range(n)]
    )
    self.norm_out = GroupNorm(
      c.norm_groups, chans[0], param_dtype=kw["param_dtype"], rngs=rngs
    )
    self.conv_out = Conv2d(chans[0], c.out_ch, 3, rngs=rngs, **kw)
    self.remat = _remat(c, "level")

  def __call__(self, z_BhwZ: jax.Array) -> jax.Array:
    h = self.conv_in(z_BhwZ)
    h = _call(self.mid, h, self.remat)
    for level in reversed(self.up):  # deepest (lowest resolution) first
      h = _call(level, h, self.remat)
    h = self.conv_out(jax.nn.silu(self.norm_out(h)))
    return h.astype(jnp.float32)


def scale_latents(mean: jax.Array, config: AutoEncoderConfig) -> jax.Array:
  """Encoder mean → Flux latent: ``scale * (mean - shift)`` in float32."""
  return config.scale_factor * (mean.astype(jnp.float32) - config.shift_factor)


def unscale_latents(z: jax.Array, config: AutoEncoderConfig) -> jax.Array:
  """Flux latent → decoder input: ``z / scale + shift`` in float32."""
  return z.astype(jnp.float32) / config.scale_factor + config.shift_factor


class AutoEncoder(nnx.Module):
  """Flux AE: ``encode`` images to scaled latents, ``decode`` them back."""

  def __init__(self, config: AutoEncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)

  def encode(self, x_BHWC: jax.Array) -> jax.Array:
    """Images in ``[-1, 1]`` → Flux latents ``[B, H/f, W/f, z]`` (float32)."""
    return scale_latents(self.encoder(x_BHWC), self.config)

  def decode(self, z_BhwZ: jax.Array) -> jax.Array:
    """Flux latents → images ``[B, h·f, w·f, out_ch]`` (float32, unclipped)."""
    return self.decoder(unscale_latents(z_BhwZ, self.config))

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    return self.decode(self.encode(x_BHWC))


Fn = Callable[[nnx.State, jax.Array], jax.Array]


def decode_fn(model: AutoEncoder) -> tuple[Fn, nnx.State]:
  """A pure ``fn(decoder_params, z) -> image`` and the decoder's params.

  Only the decoder's parameters are captured, so training code can keep the
  encoder off device. ``fn`` applies the latent unscaling, is differentiable
  in both arguments and rematerialises as configured; jit it as is:
  ``fn, params = decode_fn(ae); img = jax.jit(fn)(params, z)``.
  """
  graphdef, params = nnx.split(model.decoder)
  config = model.config

  def fn(params: nnx.State, z_BhwZ: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(unscale_latents(z_BhwZ, config))

  return fn, params


def encode_fn(model: AutoEncoder) -> tuple[Fn, nnx.State]:
  """A pure ``fn(encoder_params, x) -> latent`` and the encoder's params."""
  graphdef, params = nnx.split(model.encoder)
  config = model.config

  def fn(params: nnx.State, x_BHWC: jax.Array) -> jax.Array:
    return scale_latents(nnx.merge(graphdef, params)(x_BHWC), config)

  return fn, params
