"""BLIP's ViT image encoder and BERT text encoder with cross-attention.

The two encoders of ImageReward (Xu et al. 2023), whose ``BLIP_Pretrain``
is salesforce BLIP's: a timm-style ``VisionTransformer`` (``vit.py``:
``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks`` of pre-LN
``norm1`` / ``attn`` (``qkv``, ``proj``) / ``norm2`` / ``mlp`` (``fc1``,
``fc2``), final ``norm``) and the BERT of ``med.py`` (post-LN layers whose
``crossattention`` attends to the image tokens; ``embeddings`` with word and
absolute position embeddings and no token types). Names mirror those files,
so a parameter path is its key in ``ImageReward.pt`` without the dots.
Attention logits and norm statistics are float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from leapalign_jax.models.attention import attention
from leapalign_jax.models.clip import CLIPMLP
from leapalign_jax.models.layers import (
  ACT_BLD,
  Embed,
  LayerNorm,
  Linear,
  constrain,
  gelu,
  heads_out_linear,
  qkv_linear,
  run_layers,
  stack_layers,
)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """``create_vit`` sizes (BLIP's ``large``: ViT-L/16 at 224)."""

  image_size: int = 224
  patch_size: int = 16
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  eps: float = 1e-6

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """``med_config.json`` (BERT-base with cross-attention, BLIP's tokens)."""

  vocab_size: int = 30524  # bert-base-uncased + [DEC] + [ENC]
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  eps: float = 1e-12
  encoder_width: int = 1024  # the image tokens' width (the ViT's)


def _kw(dtype, param_dtype, rngs):
  return dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ViTAttention(nnx.Module):
  """``attn``: fused ``qkv`` (with bias) and ``proj``."""

  def __init__(self, dim, heads, *, dtype, param_dtype, rngs):
    kw = _kw(dtype, param_dtype, rngs)
    self.qkv = qkv_linear(dim, heads, dim // heads, **kw)
    self.proj = heads_out_linear(heads, dim // heads, dim, **kw)

  def __call__(self, x_BLD, impl: str):
    qkv = checkpoint_name(self.qkv(x_BLD), "qkv")
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=impl)
    return self.proj(checkpoint_name(out, "attn_out"))


class Block(nnx.Module):
  """Pre-LN ViT block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

  def __init__(self, c: ViTConfig, *, dtype, param_dtype, rngs):
    D = c.hidden_size
    norm = dict(eps=c.eps, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = LayerNorm(D, **norm)
    self.attn = ViTAttention(
      D, c.num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.norm2 = LayerNorm(D, **norm)
    # timm's Mlp: the same fc1 / fc2 as CLIP's, with exact GELU.
    self.mlp = CLIPMLP(
      D,
      int(D * c.mlp_ratio),
      "gelu",
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x, impl: str):
    x = x + self.attn(self.norm1(x), impl)
    return constrain(x + self.mlp(self.norm2(x)), ACT_BLD)


class VisionTransformer(nnx.Module):
  """Image tokens ``[B, 1 + N, D]`` (class token first), final-LN'd."""

  def __init__(
    self,
    c: ViTConfig,
    *,
    remat: str = "none",
    attention_impl: str = "xla",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.config, self.remat, self.impl = c, remat, attention_impl
    kw = _kw(dtype, param_dtype, rngs)
    D, p = c.hidden_size, c.patch_size
    self.patch_embed = nnx.Dict(
      proj=Linear((p, p, 3), D, kernel_axes=(None, None, None, "embed"), **kw)
    )
    init = jax.nn.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(
      init(rngs.params(), (D,), param_dtype), out_sharding=("embed",)
    )
    self.pos_embed = nnx.Param(
      init(rngs.params(), (c.num_patches + 1, D), param_dtype),
      out_sharding=(None, "embed"),
    )
    self.blocks = stack_layers(
      lambda r: Block(c, **{**kw, "rngs": r}), c.num_layers, rngs
    )
    self.norm = LayerNorm(D, eps=c.eps, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
    c = self.config
    size, p = c.image_size, c.patch_size
    if pixels_BHWC.shape[1:] != (size, size, 3):
      raise ValueError(
        f"images must be [B, {size}, {size}, 3] (NHWC, preprocessed); got "
        f"{pixels_BHWC.shape}"
      )
    B, n = pixels_BHWC.shape[0], size // p
    patches = pixels_BHWC.reshape(B, n, p, n, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = self.patch_embed["proj"](patches.reshape(B, n * n, p, p, 3))
    cls = jnp.broadcast_to(
      self.cls_token[...].astype(x.dtype), (B, 1, x.shape[-1])
    )
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embed[...].astype(x.dtype)[None]
    x = run_layers(
      self.blocks,
      constrain(x, ACT_BLD),
      lambda blk, h: blk(h, self.impl),
      remat=self.remat,
    )
    return self.norm(x)


class BertSelfAttention(nnx.Module):
  """``self`` of a BERT attention: ``query``, ``key``, ``value``.

  With ``cross``, keys and values come from the image tokens (their width).
  """

  def __init__(self, c: BertConfig, cross: bool, *, dtype, param_dtype, rngs):
    kw = _kw(dtype, param_dtype, rngs)
    D, H = c.hidden_size, c.num_heads
    kv_in = c.encoder_width if cross else D
    shape = (H, D // H)
    self.query = Linear(D, shape, kernel_axes=("embed", "heads", "kv"), **kw)
    self.key = Linear(kv_in, shape, kernel_axes=("embed", "heads", "kv"), **kw)
    self.value = Linear(
      kv_in, shape, kernel_axes=("embed", "heads", "kv"), **kw
    )

  def __call__(self, x_BLD, kv_BSE, mask_BS):
    q, k, v = self.query(x_BLD), self.key(kv_BSE), self.value(kv_BSE)
    if mask_BS is None:
      return attention(q, k, v, impl="xla")
    logits = jnp.einsum(
      "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
    ) / math.sqrt(q.shape[-1])
    keep = mask_BS.astype(bool)[:, None, None, :]
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class BertOutputBlock(nnx.Module):
  """``dense`` then ``LayerNorm(dense(h) + residual)`` (post-LN)."""

  def __init__(self, c: BertConfig, in_shape, *, dtype, param_dtype, rngs):
    kw = _kw(dtype, param_dtype, rngs)
    axes = ("heads", "kv", "embed") if len(in_shape) == 2 else ("mlp", "embed")
    self.dense = Linear(
      in_shape, c.hidden_size, kernel_axes=axes, bias_axes=("bias",), **kw
    )
    self.LayerNorm = LayerNorm(
      c.hidden_size, eps=c.eps, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, h, residual):
    return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nnx.Module):
  """``attention`` / ``crossattention``: ``self`` then ``output``."""

  def __init__(self, c: BertConfig, cross: bool, *, dtype, param_dtype, rngs):
    kw = _kw(dtype, param_dtype, rngs)
    self.self = BertSelfAttention(c, cross, **kw)
    self.output = BertOutputBlock(
      c, (c.num_heads, c.hidden_size // c.num_heads), **kw
    )

  def __call__(self, x_BLD, kv_BSE, mask_BS):
    return self.output(self.self(x_BLD, kv_BSE, mask_BS), x_BLD)


class BertLayer(nnx.Module):
  """Self-attention, cross-attention to the image, feed-forward; post-LN."""

  def __init__(self, c: BertConfig, *, dtype, param_dtype, rngs):
    kw = _kw(dtype, param_dtype, rngs)
    self.attention = BertAttention(c, False, **kw)
    self.crossattention = BertAttention(c, True, **kw)
    self.intermediate = nnx.Dict(
      dense=Linear(
        c.hidden_size,
        c.intermediate_size,
        kernel_axes=("embed", "mlp"),
        **kw,
      )
    )
    self.output = BertOutputBlock(c, (c.intermediate_size,), **kw)

  def __call__(self, x_BLD, image_BSE, mask_BL):
    x_BLD = self.attention(x_BLD, x_BLD, mask_BL)
    x_BLD = self.crossattention(x_BLD, image_BSE, None)
    h = gelu(self.intermediate["dense"](x_BLD))
    return constrain(self.output(h, x_BLD), ACT_BLD)


class BertModel(nnx.Module):
  """``text_encoder``: BERT over the prompt tokens, attending to the image."""

  def __init__(
    self,
    c: BertConfig,
    *,
    remat: str = "none",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.config, self.remat = c, remat
    kw = _kw(dtype, param_dtype, rngs)
    init = jax.nn.initializers.normal(0.02)
    self.embeddings = nnx.Dict(
      word_embeddings=Embed(c.vocab_size, c.hidden_size, **kw),
      position_embeddings=nnx.Param(
        init(
          rngs.params(),
          (c.max_position_embeddings, c.hidden_size),
          param_dtype,
        ),
        out_sharding=(None, "embed"),
      ),
      LayerNorm=LayerNorm(
        c.hidden_size, eps=c.eps, param_dtype=param_dtype, rngs=rngs
      ),
    )
    self.encoder = nnx.Dict(
      layer=stack_layers(
        lambda r: BertLayer(c, **{**kw, "rngs": r}), c.num_layers, rngs
      )
    )

  def __call__(self, ids_BL, mask_BL, image_BSE) -> jax.Array:
    """Last hidden states ``[B, L, D]``; ``mask_BL`` 1 for real tokens."""
    c, emb = self.config, self.embeddings
    L = ids_BL.shape[1]
    if c.max_position_embeddings < L:
      raise ValueError(
        f"{L} text tokens exceed max_position_embeddings "
        f"{c.max_position_embeddings}"
      )
    words = emb["word_embeddings"](ids_BL)
    pos = emb["position_embeddings"][:L].astype(words.dtype)
    x = emb["LayerNorm"](words + pos[None])
    image = image_BSE.astype(x.dtype)
    return run_layers(
      self.encoder["layer"],
      constrain(x, ACT_BLD),
      lambda layer, h: layer(h, image, mask_BL),
      remat=self.remat,
    )
