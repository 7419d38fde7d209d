"""Building blocks of the SD3 / SD3.5 MMDiT (Stability's ``mmditx.py``).

Names mirror the reference: ``SelfAttention`` (``qkv``, ``ln_q``, ``ln_k``,
``proj``), ``DismantledBlock`` (one stream of a joint block: ``norm1`` /
``norm2`` are affine-free LayerNorms, ``attn``, the optional ``attn2`` of
the image stream (SD3.5's "dual attention", MMDiT-X), ``mlp`` with ``fc1`` /
``fc2``, ``adaLN_modulation``), ``JointBlock`` (``context_block`` and
``x_block`` attending jointly over ``[context, x]``) and ``FinalLayer``.
Fused qkv kernels keep their ``[embed, 3, heads, head_dim]`` structure, as in
the Flux port. Activations are ``[B, L, D]``; inside attention ``[B, L, H,
Dh]``.
"""

from __future__ import annotations

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
  constrain,
  gelu_tanh,
  heads_out_linear,
  layer_norm,
  qkv_linear,
)


def sincos_1d(pos: np.ndarray, dim: int) -> np.ndarray:
  """``[sin(p ω), cos(p ω)]`` with ``ω = 10000^(-2i/dim)``: ``[len(pos), dim]``.

  float64 on the host, as the references build their tables.
  """
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000.0**omega
  out = np.asarray(pos, np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def cropped_pos_embed(
  h: int, w: int, dim: int, max_size: int, base_size: int
) -> np.ndarray:
  """The centre ``h x w`` crop of the ``max_size²`` 2-D sin-cos table.

  The reference stores the whole table (``pos_embed``, 384² x 1536 for
  SD3.5 Medium) and crops it per resolution; only the crop is built here, to
  the same values: grid coordinates ``index / (max_size / base_size)`` in
  float32, the first half of the channels encoding the column and the
  second the row. Returns float32 ``[h * w, dim]``.
  """
  if h > max_size or w > max_size:
    raise ValueError(
      f"a {h}x{w} token grid exceeds the model's pos_embed_max_size "
      f"{max_size}; use a smaller resolution"
    )
  scale = np.float32(max_size / base_size)
  top, left = (max_size - h) // 2, (max_size - w) // 2
  rows = np.arange(top, top + h, dtype=np.float32) / scale
  cols = np.arange(left, left + w, dtype=np.float32) / scale
  emb_cols = sincos_1d(cols, dim // 2)  # [w, D/2]
  emb_rows = sincos_1d(rows, dim // 2)  # [h, D/2]
  table = np.concatenate(
    [
      np.broadcast_to(emb_cols[None], (h, w, dim // 2)),
      np.broadcast_to(emb_rows[:, None], (h, w, dim // 2)),
    ],
    axis=-1,
  )
  return table.reshape(h * w, dim).astype(np.float32)


class Embedder(nnx.Module):
  """``mlp = Linear, SiLU, Linear`` (``t_embedder`` / ``y_embedder``)."""

  def __init__(self, in_dim: int, hidden: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = nnx.Sequential(
      Linear(in_dim, hidden, kernel_axes=(None, "embed"), **kw),
      jax.nn.silu,
      Linear(hidden, hidden, kernel_axes=("mlp", "embed"), **kw),
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.mlp(x)


class PatchEmbed(nnx.Module):
  """The 2x2 patch convolution as a linear map of packed latent tokens.

  Tokens use the Flux packing (feature ``c * 4 + ph * 2 + pw``), which is the
  order of torch's conv weight ``[D, C, ph, pw]`` flattened per output.
  """

  def __init__(self, in_features: int, dim: int, *, dtype, param_dtype, rngs):
    self.proj = Linear(
      in_features,
      dim,
      kernel_axes=(None, "embed"),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x_BLC: jax.Array) -> jax.Array:
    return self.proj(x_BLC)


class SelfAttention(nnx.Module):
  """Fused qkv, optional RMS QK-norm, output projection (unless pre-only)."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    qk_norm: bool,
    pre_only: bool,
    *,
    dtype,
    param_dtype,
    rngs,
  ):
    head_dim = dim // num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = qkv_linear(dim, num_heads, head_dim, **kw)
    norm = dict(eps=1e-6, param_dtype=param_dtype, rngs=rngs)
    self.ln_q = RMSNorm(head_dim, **norm) if qk_norm else None
    self.ln_k = RMSNorm(head_dim, **norm) if qk_norm else None
    self.proj = (
      None if pre_only else heads_out_linear(num_heads, head_dim, dim, **kw)
    )

  def pre_attention(self, x_BLD):
    qkv = checkpoint_name(self.qkv(x_BLD), "qkv")  # [B, L, 3, H, Dh]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.ln_q is not None:
      q, k = self.ln_q(q).astype(v.dtype), self.ln_k(k).astype(v.dtype)
    return q, k, v


class Mlp(nnx.Module):
  """``fc2(gelu_tanh(fc1(x)))``."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Linear(dim, hidden, kernel_axes=("embed", "mlp"), **kw)
    self.fc2 = Linear(
      hidden, dim, kernel_axes=("mlp", "embed"), bias_axes=("bias",), **kw
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(checkpoint_name(gelu_tanh(self.fc1(x)), "mlp_in"))


def ada_ln(dim: int, n: int, zero_init: bool, **kw) -> nnx.Sequential:
  """``adaLN_modulation``: SiLU then ``Linear(dim, n * dim)`` (index 1)."""
  return nnx.Sequential(
    jax.nn.silu,
    Linear(
      dim, n * dim, kernel_axes=("embed", "mod"), zero_init=zero_init, **kw
    ),
  )


def _modulate(x, shift, scale):
  """``LN(x) * (1 + scale) + shift`` (affine-free LayerNorm, eps 1e-6)."""
  return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


class DismantledBlock(nnx.Module):
  """One stream of a joint block, with gated adaLN conditioning.

  Modulation chunks, in the reference's order: ``(shift, scale, gate)`` for
  attention, then for the MLP, then (``dual``) for ``attn2``; a ``pre_only``
  stream (the context of the last block) has only ``(shift, scale)``.
  """

  def __init__(
    self,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    *,
    pre_only: bool = False,
    dual: bool = False,
    qk_norm: bool = True,
    zero_init: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if dual and pre_only:
      raise ValueError("a pre-only stream cannot have dual attention")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pre_only, self.dual = pre_only, dual
    self.n_mods = 9 if dual else (2 if pre_only else 6)
    self.adaLN_modulation = ada_ln(dim, self.n_mods, zero_init, **kw)
    self.attn = SelfAttention(dim, num_heads, qk_norm, pre_only, **kw)
    self.attn2 = (
      SelfAttention(dim, num_heads, qk_norm, False, **kw) if dual else None
    )
    self.mlp = None if pre_only else Mlp(dim, int(dim * mlp_ratio), **kw)

  def modulations(self, c_BD: jax.Array) -> jax.Array:
    """The raw modulation vector ``[B, n_mods * D]`` (hoisted out of scans)."""
    return self.adaLN_modulation(c_BD)

  def pre_attention(self, x_BLD, mods_BM):
    """``(q, k, v)``, the dual attention's ``(q, k, v)`` or None, the mods."""
    m = jnp.split(mods_BM, self.n_mods, axis=-1)
    qkv = self.attn.pre_attention(_modulate(x_BLD, m[0], m[1]))
    qkv2 = None
    if self.dual:
      qkv2 = self.attn2.pre_attention(_modulate(x_BLD, m[6], m[7]))
    return qkv, qkv2, m

  def post_attention(self, x_BLD, attn_BLHD, attn2_BLHD, m):
    """Residual attention (+ dual attention) and MLP updates."""
    x_BLD = x_BLD + m[2][:, None] * self.attn.proj(attn_BLHD)
    if self.dual:
      x_BLD = x_BLD + m[8][:, None] * self.attn2.proj(attn2_BLHD)
    mlp_out = self.mlp(_modulate(x_BLD, m[3], m[4]))
    return x_BLD + m[5][:, None] * mlp_out


class JointBlock(nnx.Module):
  """``context_block`` and ``x_block``: one attention over ``[context, x]``."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    *,
    pre_only: bool = False,
    dual: bool = False,
    qk_norm: bool = True,
    attn_impl: str = "xla",
    zero_init: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(
      qk_norm=qk_norm,
      zero_init=zero_init,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.attn_impl = attn_impl
    self.context_block = DismantledBlock(
      dim, num_heads, mlp_ratio, pre_only=pre_only, **kw
    )
    self.x_block = DismantledBlock(dim, num_heads, mlp_ratio, dual=dual, **kw)

  def modulations(self, c_BD: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.context_block.modulations(c_BD), self.x_block.modulations(c_BD)

  def __call__(self, context_BSD, x_BLD, mods):
    """Returns ``(context, x)``; the context is None after a pre-only block."""
    ctx_qkv, _, ctx_m = self.context_block.pre_attention(context_BSD, mods[0])
    x_qkv, x_qkv2, x_m = self.x_block.pre_attention(x_BLD, mods[1])
    q, k, v = (jnp.concatenate([a, b], axis=1) for a, b in zip(ctx_qkv, x_qkv))
    attn = checkpoint_name(attention(q, k, v, impl=self.attn_impl), "attn_out")
    n_ctx = context_BSD.shape[1]
    ctx_attn, x_attn = attn[:, :n_ctx], attn[:, n_ctx:]
    attn2 = None
    if x_qkv2 is not None:
      attn2 = attention(*x_qkv2, impl=self.attn_impl)
    x_BLD = self.x_block.post_attention(x_BLD, x_attn, attn2, x_m)
    if self.context_block.pre_only:
      return None, constrain(x_BLD, ACT_BLD)
    context_BSD = self.context_block.post_attention(
      context_BSD, ctx_attn, None, ctx_m
    )
    return constrain(context_BSD, ACT_BLD), constrain(x_BLD, ACT_BLD)


class FinalLayer(nnx.Module):
  """adaLN ``(shift, scale)``, affine-free LayerNorm, linear to the patches."""

  def __init__(
    self,
    dim: int,
    out_features: int,
    *,
    zero_init: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear = Linear(
      dim, out_features, kernel_axes=("embed", None), zero_init=zero_init, **kw
    )
    self.adaLN_modulation = ada_ln(dim, 2, zero_init, **kw)

  def __call__(self, x_BLD, c_BD):
    shift, scale = jnp.split(self.adaLN_modulation(c_BD), 2, axis=-1)
    return self.linear(_modulate(x_BLD, shift, scale))
