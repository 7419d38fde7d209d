"""Flux DiT layers, named after BFL's ``flux/modules/layers.py``.

Layout differences from the PyTorch checkpoint (all exact re-arrangements,
mapped by ``leapalign_jax.convert.flux``):
- fused qkv kernels are stored as ``[embed, 3, heads, head_dim]`` and attention
  output projections as ``[heads, head_dim, embed]``, so heads can be sharded;
- the single block's ``linear1`` holds separate qkv and MLP-in kernels, and
  its ``linear2`` separate attention-out and MLP-out kernels with one bias
  (``linear2(cat(a, m)) == a @ W_a + m @ W_m + b``).
Activations are ``[B, L, H, D]`` inside attention (``x_BLHD``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from leapalign_jax.models.attention import attention
from leapalign_jax.models.layers import (
  ACT_BLD,
  Linear,
  RMSNorm,
  bcast,
  constrain,
  gelu_tanh,
  heads_out_linear,
  layer_norm,
  qkv_linear,
)


def timestep_embedding(
  t_B: jax.Array,
  dim: int = 256,
  max_period: float = 10000.0,
  time_factor: float = 1000.0,
) -> jax.Array:
  """Sinusoidal embedding of ``time_factor * t``, cos first, in float32.

  The arguments are ``1000 t`` (up to 3500 for guidance 3.5), so one ulp of a
  frequency moves an angle by ~2e-4 rad. The frequencies are therefore built
  as the references build them (exponent rounded to float32) and then
  exponentiated exactly (float64, rounded once), which reproduces PyTorch's
  table to the last bit in all but a few entries.
  """
  t_B = time_factor * t_B.astype(jnp.float32)
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(
    half, dtype=np.float32
  )
  exponent = exponent / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args_BH = t_B[:, None] * jnp.asarray(freqs)[None, :]
  emb = jnp.concatenate([jnp.cos(args_BH), jnp.sin(args_BH)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def rope(pos_BL: jax.Array, dim: int, theta: float) -> jax.Array:
  """Rotation angles ``pos * theta^(-2m/dim)`` for one axis: ``[B, L, dim/2]``.

  The frequencies are computed in float64 on the host (as the references do)
  and the product in float32.
  """
  if dim % 2:
    raise ValueError(f"RoPE axis width must be even, got {dim}")
  scale = np.arange(0, dim, 2, dtype=np.float64) / dim
  omega = jnp.asarray(1.0 / theta**scale, jnp.float32)
  return pos_BL.astype(jnp.float32)[..., None] * omega[None, None, :]


class EmbedND(nnx.Module):
  """Multi-axis RoPE: returns ``(cos, sin)``, each ``[B, L, head_dim / 2]``."""

  def __init__(self, dim: int, theta: float, axes_dim: Sequence[int]):
    if sum(axes_dim) != dim:
      raise ValueError(f"axes_dim {tuple(axes_dim)} must sum to head_dim {dim}")
    self.dim = dim
    self.theta = theta
    self.axes_dim = tuple(axes_dim)

  def __call__(self, ids_BLA: jax.Array) -> tuple[jax.Array, jax.Array]:
    angles = jnp.concatenate(
      [
        rope(ids_BLA[..., i], d, self.theta)
        for i, d in enumerate(self.axes_dim)
      ],
      axis=-1,
    )
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BLHD: jax.Array, pe: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotates interleaved pairs ``(2m, 2m+1)`` of the head dim, in float32."""
  cos, sin = pe  # [B, L, D/2]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x = x_BLHD.astype(jnp.float32).reshape(*x_BLHD.shape[:-1], -1, 2)
  x0, x1 = x[..., 0], x[..., 1]
  out = jnp.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
  return out.reshape(x_BLHD.shape).astype(x_BLHD.dtype)


def joint_attention(q, k, v, pe, impl: str) -> jax.Array:
  """RoPE on q and k, then attention; returns ``[B, L, H, D]``."""
  q, k = apply_rope(q, pe), apply_rope(k, pe)
  return attention(q, k, v, impl=impl)


class MLPEmbedder(nnx.Module):
  """``out_layer(silu(in_layer(x)))``: time, guidance and vector embedders."""

  def __init__(self, in_dim: int, hidden_dim: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_layer = Linear(
      in_dim, hidden_dim, kernel_axes=(None, "embed"), **kw
    )
    self.out_layer = Linear(
      hidden_dim, hidden_dim, kernel_axes=("mlp", "embed"), **kw
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out_layer(jax.nn.silu(self.in_layer(x)))


class QKNorm(nnx.Module):
  """Separate RMSNorms for queries and keys; outputs cast to v's dtype."""

  def __init__(self, dim: int, *, param_dtype, rngs):
    self.query_norm = RMSNorm(dim, param_dtype=param_dtype, rngs=rngs)
    self.key_norm = RMSNorm(dim, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, q, k, v):
    return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


class ModulationOut(NamedTuple):
  """One (shift, scale, gate) triple, each ``[B, 1, D]``."""

  shift: jax.Array  # [B, 1, D]
  scale: jax.Array
  gate: jax.Array


class Modulation(nnx.Module):
  """``lin(silu(vec))`` chunked as (shift, scale, gate) [× 2 when double]."""

  def __init__(
    self, dim: int, double: bool, *, zero_init, dtype, param_dtype, rngs
  ):
    self.multiplier = 6 if double else 3
    self.lin = Linear(
      dim,
      self.multiplier * dim,
      kernel_axes=("embed", "mod"),
      zero_init=zero_init,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, vec_BD: jax.Array) -> jax.Array:
    """Returns the raw modulation vector ``[B, multiplier * D]``."""
    return self.lin(jax.nn.silu(vec_BD))


def split_modulation(mod_BM: jax.Array, n: int) -> list[ModulationOut]:
  """Chunks a raw modulation vector into ``n`` (shift, scale, gate) triples."""
  chunks = jnp.split(mod_BM[:, None, :], 3 * n, axis=-1)
  return [ModulationOut(*chunks[3 * i : 3 * i + 3]) for i in range(n)]


def modulate(x, mod: ModulationOut):
  """``(1 + scale) * LN(x) + shift`` with an affine-free LayerNorm."""
  return (1 + mod.scale) * layer_norm(x) + mod.shift


class SelfAttention(nnx.Module):
  """Fused qkv (``[D, 3, H, Dh]``), QK-norm and output projection."""

  def __init__(self, dim, num_heads, qkv_bias, *, dtype, param_dtype, rngs):
    head_dim = dim // num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = qkv_linear(dim, num_heads, head_dim, use_bias=qkv_bias, **kw)
    self.norm = QKNorm(head_dim, param_dtype=param_dtype, rngs=rngs)
    self.proj = heads_out_linear(num_heads, head_dim, dim, **kw)

  def qkv_normed(self, x_BLD):
    qkv = checkpoint_name(self.qkv(x_BLD), "qkv")  # [B, L, 3, H, Dh]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = self.norm(q, k, v)
    return q, k, v


def mlp(
  in_dim: int, hidden: int, *, dtype, param_dtype, rngs
) -> nnx.Sequential:
  """``Linear, GELU(tanh), Linear`` as ``layers.{0,2}`` (BFL ``*_mlp.{0,2}``)."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  return nnx.Sequential(
    Linear(in_dim, hidden, kernel_axes=("embed", "mlp"), **kw),
    gelu_tanh,
    Linear(
      hidden, in_dim, kernel_axes=("mlp", "embed"), bias_axes=("bias",), **kw
    ),
  )


class DoubleStreamBlock(nnx.Module):
  """Separate img/txt weights, one joint attention over ``[txt, img]``."""

  def __init__(
    self,
    hidden_size: int,
    num_heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    *,
    attn_impl: str = "xla",
    zero_init: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    mlp_hidden = int(hidden_size * mlp_ratio)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_impl = attn_impl
    self.img_mod = Modulation(hidden_size, True, zero_init=zero_init, **kw)
    self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, **kw)
    self.img_mlp = mlp(hidden_size, mlp_hidden, **kw)
    self.txt_mod = Modulation(hidden_size, True, zero_init=zero_init, **kw)
    self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, **kw)
    self.txt_mlp = mlp(hidden_size, mlp_hidden, **kw)

  def modulations(self, vec_BD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Raw (img, txt) modulation vectors; hoisted out of the block scan."""
    return self.img_mod(vec_BD), self.txt_mod(vec_BD)

  def __call__(self, img, txt, mods, pe):
    img_mod1, img_mod2 = split_modulation(mods[0], 2)
    txt_mod1, txt_mod2 = split_modulation(mods[1], 2)
    img_q, img_k, img_v = self.img_attn.qkv_normed(modulate(img, img_mod1))
    txt_q, txt_k, txt_v = self.txt_attn.qkv_normed(modulate(txt, txt_mod1))
    q = jnp.concatenate([txt_q, img_q], axis=1)
    k = jnp.concatenate([txt_k, img_k], axis=1)
    v = jnp.concatenate([txt_v, img_v], axis=1)
    attn = checkpoint_name(
      joint_attention(q, k, v, pe, self.attn_impl), "attn_out"
    )
    n_txt = txt.shape[1]
    txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]
    img = img + img_mod1.gate * self.img_attn.proj(img_attn)
    img = img + img_mod2.gate * self.img_mlp(modulate(img, img_mod2))
    txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
    txt = txt + txt_mod2.gate * self.txt_mlp(modulate(txt, txt_mod2))
    return constrain(img, ACT_BLD), constrain(txt, ACT_BLD)


class Linear1(nnx.Module):
  """The single block's ``linear1`` split into its qkv and MLP-in parts."""

  def __init__(self, dim, num_heads, mlp_hidden, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = qkv_linear(dim, num_heads, dim // num_heads, **kw)
    self.mlp = Linear(dim, mlp_hidden, kernel_axes=("embed", "mlp"), **kw)


class Linear2(nnx.Module):
  """The single block's ``linear2`` as attention-out + MLP-out, one bias."""

  def __init__(self, dim, num_heads, mlp_hidden, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn = heads_out_linear(
      num_heads, dim // num_heads, dim, use_bias=False, **kw
    )
    self.mlp = Linear(
      mlp_hidden, dim, kernel_axes=("mlp", "embed"), use_bias=False, **kw
    )
    self.bias = nnx.Param(
      jnp.zeros((dim,), param_dtype), out_sharding=("bias",)
    )
    self.dtype = dtype

  def __call__(self, attn_BLHD, mlp_BLF):
    out = self.attn(attn_BLHD) + self.mlp(mlp_BLF)
    return out + bcast(self.bias[...].astype(self.dtype), out.ndim)


class SingleStreamBlock(nnx.Module):
  """Parallel attention + MLP over the joint ``[txt, img]`` sequence."""

  def __init__(
    self,
    hidden_size: int,
    num_heads: int,
    mlp_ratio: float,
    *,
    attn_impl: str = "xla",
    zero_init: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    mlp_hidden = int(hidden_size * mlp_ratio)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_impl = attn_impl
    self.linear1 = Linear1(hidden_size, num_heads, mlp_hidden, **kw)
    self.linear2 = Linear2(hidden_size, num_heads, mlp_hidden, **kw)
    self.norm = QKNorm(
      hidden_size // num_heads, param_dtype=param_dtype, rngs=rngs
    )
    self.modulation = Modulation(hidden_size, False, zero_init=zero_init, **kw)

  def modulations(self, vec_BD: jax.Array) -> jax.Array:
    return self.modulation(vec_BD)

  def __call__(self, x, mods, pe):
    (mod,) = split_modulation(mods, 1)
    x_mod = modulate(x, mod)
    qkv = checkpoint_name(self.linear1.qkv(x_mod), "qkv")
    mlp_in = checkpoint_name(self.linear1.mlp(x_mod), "mlp_in")
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = self.norm(q, k, v)
    attn = checkpoint_name(
      joint_attention(q, k, v, pe, self.attn_impl), "attn_out"
    )
    out = self.linear2(attn, gelu_tanh(mlp_in))
    return constrain(x + mod.gate * out, ACT_BLD)


class LastLayer(nnx.Module):
  """adaLN (shift, scale) modulation, affine-free LayerNorm, linear."""

  def __init__(
    self,
    hidden_size: int,
    patch_size: int,
    out_channels: int,
    *,
    zero_init: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear = Linear(
      hidden_size,
      patch_size * patch_size * out_channels,
      kernel_axes=("embed", None),
      zero_init=zero_init,
      **kw,
    )
    # ``adaLN_modulation.1`` in BFL (index 0 is the SiLU).
    self.adaLN_modulation = nnx.Sequential(
      jax.nn.silu,
      Linear(
        hidden_size,
        2 * hidden_size,
        kernel_axes=("embed", "mod"),
        zero_init=zero_init,
        **kw,
      ),
    )

  def __call__(self, x_BLD, vec_BD):
    shift, scale = jnp.split(self.adaLN_modulation(vec_BD), 2, axis=-1)
    x = (1 + scale[:, None, :]) * layer_norm(x_BLD) + shift[:, None, :]
    return self.linear(x)
