"""The T5 v1.1 encoder (transformers ``T5EncoderModel``) in Flax NNX.

Flux conditions on ``last_hidden_state`` of the T5-v1.1-XXL encoder, run on
max-length padded tokens without an attention mask (flux.md §7). Numerics
follow the reference:
- pre-norm RMSNorm (variance in float32, no mean subtraction, no bias);
- a bidirectional relative position bias (bucketed offsets) computed once
  from the table stored in layer 0 and shared by every layer;
- attention logits are not scaled by 1/sqrt(d);
- gated-GELU feed-forward ``wo(gelu_tanh(wi_0 x) * wi_1 x)``; final RMSNorm.

Layout differences from the PyTorch checkpoint (mapped by
``leapalign_jax.convert.t5``): q, k and v are one ``[embed, 3, heads, d_kv]``
kernel, the output projection is ``[heads, d_kv, embed]``, and the bias table
of layer 0 lives at the top level (``relative_attention_bias``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from leapalign_jax.models.layers import (
  ACT_BLD,
  Embed,
  Linear,
  RMSNorm,
  constrain,
  gelu_tanh,
  heads_out_linear,
  qkv_linear,
  run_layers,
  stack_layers,
)


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """Encoder sizes (transformers ``T5Config`` names) and numerics knobs."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # Numerics / compilation (not part of the checkpoint).
  dtype: str = "float32"  # bf16 is fine; fp16 overflows in T5
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots | names
  scan_layers: bool = True

  def __post_init__(self):
    if self.relative_attention_num_buckets % 4:
      raise ValueError(
        "relative_attention_num_buckets must be a multiple of 4 (two "
        "directions, each half exact and half logarithmic); got "
        f"{self.relative_attention_num_buckets}"
      )


VARIANTS: dict[str, T5EncoderConfig] = {
  # google/t5-v1_1-xxl encoder = Flux's text_encoder_2/.
  "xxl": T5EncoderConfig(),
  "tiny": T5EncoderConfig(
    vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4
  ),
}


def relative_position_buckets(
  length: int, num_buckets: int, max_distance: int
) -> np.ndarray:
  """Bidirectional T5 bucket of every (query, key) offset: ``[L, L]`` int32.

  Host-side and static in ``length``. The logarithmic branch is evaluated in
  float32 with the reference's operation order and truncation, so bucket
  edges fall exactly where PyTorch puts them.
  """
  rel_LL = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2  # one half per direction
  buckets = (rel_LL > 0).astype(np.int64) * half
  dist = np.abs(rel_LL)
  max_exact = half // 2
  ratio = np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact)
  log_ratio = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(
    np.int64
  )
  large = np.minimum(large, half - 1)
  buckets = buckets + np.where(dist < max_exact, dist, large)
  return buckets.astype(np.int32)


class T5Attention(nnx.Module):
  """Unscaled multi-head self-attention plus an additive bias, no biases."""

  def __init__(self, c: T5EncoderConfig, *, dtype, param_dtype, rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = qkv_linear(c.d_model, c.num_heads, c.d_kv, **kw)
    self.o = heads_out_linear(c.num_heads, c.d_kv, c.d_model, **kw)

  def __call__(self, x_BLD: jax.Array, bias_BHLL: jax.Array) -> jax.Array:
    qkv = checkpoint_name(self.qkv(x_BLD), "qkv")  # [B, L, 3, H, Dk]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum(
      "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
    )
    probs = jax.nn.softmax(logits + bias_BHLL, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.o(checkpoint_name(out, "attn_out"))


class T5DenseGatedActDense(nnx.Module):
  """``wo(gelu_tanh(wi_0 x) * wi_1 x)``."""

  def __init__(self, c: T5EncoderConfig, *, dtype, param_dtype, rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi_0 = Linear(c.d_model, c.d_ff, kernel_axes=("embed", "mlp"), **kw)
    self.wi_1 = Linear(c.d_model, c.d_ff, kernel_axes=("embed", "mlp"), **kw)
    self.wo = Linear(c.d_ff, c.d_model, kernel_axes=("mlp", "embed"), **kw)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    gate = checkpoint_name(gelu_tanh(self.wi_0(x_BLD)), "mlp_in")
    return self.wo(gate * self.wi_1(x_BLD))


class T5Block(nnx.Module):
  """``x + attn(norm(x), bias)``, then ``x + ff(norm(x))``."""

  def __init__(self, c: T5EncoderConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm_kw = dict(eps=c.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(c.d_model, **norm_kw)
    self.attn = T5Attention(c, **kw)
    self.ff_norm = RMSNorm(c.d_model, **norm_kw)
    self.ff = T5DenseGatedActDense(c, **kw)

  def __call__(self, x_BLD: jax.Array, bias_BHLL: jax.Array) -> jax.Array:
    x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), bias_BHLL)
    x_BLD = x_BLD + self.ff(self.ff_norm(x_BLD))
    return constrain(x_BLD, ACT_BLD)


class T5Encoder(nnx.Module):
  """Token embedding, stacked T5 blocks, final RMSNorm."""

  def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs):
    self.config = c = config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.shared = Embed(
      c.vocab_size, c.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    table = jax.random.normal(
      rngs.params(), (c.relative_attention_num_buckets, c.num_heads)
    )
    self.relative_attention_bias = nnx.Param(
      table.astype(param_dtype), out_sharding=(None, "heads")
    )
    self.blocks = stack_layers(
      lambda r: T5Block(c, dtype=dtype, param_dtype=param_dtype, rngs=r),
      c.num_layers,
      rngs,
    )
    self.final_layer_norm = RMSNorm(
      c.d_model, eps=c.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs
    )

  def position_bias(self, length: int) -> jax.Array:
    """The shared relative position bias ``[1, H, L, L]`` in float32."""
    c = self.config
    buckets_LL = relative_position_buckets(
      length,
      c.relative_attention_num_buckets,
      c.relative_attention_max_distance,
    )
    table = self.relative_attention_bias[...].astype(jnp.float32)
    bias_LLH = jnp.take(table, jnp.asarray(buckets_LL), axis=0)
    return bias_LLH.transpose(2, 0, 1)[None]

  def __call__(
    self, ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None
  ) -> jax.Array:
    """Returns ``last_hidden_state`` ``[B, L, d_model]`` in float32.

    Args:
      ids_BL: token ids. Flux pads them to max length with id 0 and passes
        no mask, so padding tokens are attended to; that is the reference.
      attention_mask_BL: optional 1 (attend) / 0 (ignore) per key token.
    """
    c = self.config
    if ids_BL.ndim != 2:
      raise ValueError(f"ids must be [B, L]; got {ids_BL.shape}")
    bias_BHLL = self.position_bias(ids_BL.shape[1])
    if attention_mask_BL is not None:
      # As the reference: the most negative float added to masked keys.
      keep = attention_mask_BL.astype(jnp.float32)[:, None, None, :]
      bias_BHLL = bias_BHLL + (1.0 - keep) * jnp.finfo(jnp.float32).min
    x_BLD = constrain(self.shared(ids_BL), ACT_BLD)
    x_BLD = run_layers(
      self.blocks,
      x_BLD,
      lambda block, x: block(x, bias_BHLL),
      remat=c.remat,
      scan=c.scan_layers,
    )
    return self.final_layer_norm(x_BLD).astype(jnp.float32)
