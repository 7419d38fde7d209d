"""Attention kernels behind one switch.

All kernels take ``q, k, v`` shaped ``[B, L, H, D]`` and return ``[B, L, H, D]``
with no mask: Flux attends over every text and image token (text padding
included), so the only masking any kernel may add is for its own tile padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Plain softmax attention; logits and softmax in float32."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum(
    "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
  )
  probs = jax.nn.softmax(logits * scale, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Flash attention through cuDNN (GPU only; bf16/fp16 inputs)."""
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla"
) -> jax.Array:
  """Dispatches to the attention kernel named ``impl``."""
  if impl == "xla":
    return xla_attention(q, k, v)
  if impl == "cudnn":
    return cudnn_attention(q, k, v)
  if impl == "splash":
    from leapalign_jax.models import splash  # TPU-only; imported on demand

    return splash.splash_attention(q, k, v)
  raise ValueError(
    f"unknown attention implementation {impl!r}; use one of {IMPLEMENTATIONS}"
  )
