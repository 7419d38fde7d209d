"""Attention kernels behind one switch.

All kernels take ``q, k, v`` shaped ``[B, L, H, D]`` and return ``[B, L, H, D]``
with no mask: Flux attends over every text and image token (text padding
included), so the only masking any kernel may add is for its own tile padding
(and CLIP's text tower is causal).

``impl``:

* ``xla``: plain softmax attention, logits in float32 (the reference);
* ``cudnn``: cuDNN flash attention (GPU, bf16/fp16). The sequence is padded
  to a multiple of ``CUDNN_MULTIPLE`` and only the padding is masked
  (``query_seq_lengths`` / ``key_value_seq_lengths``): jax's cuDNN wrapper
  rejects odd lengths in training (its gradient path always passes a bias
  operand and then requires even lengths), which ruled out 720² with T5-512
  (2537 tokens) before;
* ``splash``: Pallas splash attention (TPU), see ``splash.py``;
* ``auto``: ``cudnn`` on GPU and ``splash`` on TPU when the compute dtype is
  bf16/fp16, else ``xla`` (fp32 runs keep the reference numerics).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from leapalign_jax.models.platform import target_platform

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# cuDNN's flash kernels work in 64/128-token tiles; 64 keeps the padding of
# short sequences small (ViT-H's 257 tokens -> 320) and leaves the DiT's
# lengths tile-aligned (2537 -> 2560, 1536 and 4608 unchanged).
CUDNN_MULTIPLE = 64
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve(impl: str, dtype) -> str:
  """The kernel ``impl`` names for ``dtype`` inputs on the target platform."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown attention implementation {impl!r}; use one of {IMPLEMENTATIONS}"
    )
  if impl != "auto":
    return impl
  if jnp.dtype(dtype) not in _HALF:
    return "xla"
  platform = target_platform()
  if platform in ("gpu", "cuda"):
    return "cudnn"
  if platform == "tpu":
    return "splash"
  return "xla"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Plain softmax attention; logits and softmax in float32."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum(
    "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
  )
  probs = jax.nn.softmax(logits * scale, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def padded_length(length: int, multiple: int = CUDNN_MULTIPLE) -> int:
  """``length`` rounded up to a multiple of ``multiple``."""
  return -(-length // multiple) * multiple


def padded_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  implementation: str,
  multiple: int = CUDNN_MULTIPLE,
  is_causal: bool = False,
) -> jax.Array:
  """``jax.nn.dot_product_attention`` over a sequence padded to ``multiple``.

  The real length is passed as the query and key/value sequence lengths, so
  real queries never see the zero keys of the padding; the padded query rows
  are sliced off (their cotangent is zero). A length already on the multiple
  goes to the kernel unchanged. With ``implementation="xla"`` this is the
  same code path on any backend (what the CPU tests check).
  """
  B, L = q.shape[:2]
  padded = padded_length(L, multiple)
  if padded == L:
    return jax.nn.dot_product_attention(
      q, k, v, is_causal=is_causal, implementation=implementation
    )
  width = ((0, 0), (0, padded - L), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, width) for x in (q, k, v))
  lengths_B = jnp.full((B,), L, jnp.int32)
  out = jax.nn.dot_product_attention(
    q,
    k,
    v,
    is_causal=is_causal,
    query_seq_lengths=lengths_B,
    key_value_seq_lengths=lengths_B,
    implementation=implementation,
  )
  return out[:, :L]


def cudnn_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False
) -> jax.Array:
  """Flash attention through cuDNN at any length (GPU; bf16/fp16 inputs)."""
  return padded_attention(
    q, k, v.astype(q.dtype), implementation="cudnn", is_causal=is_causal
  )


def attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla"
) -> jax.Array:
  """Dispatches to the attention kernel named ``impl`` (see module doc)."""
  impl = resolve(impl, q.dtype)
  if impl == "xla":
    return xla_attention(q, k, v)
  if impl == "cudnn":
    return cudnn_attention(q, k, v)
  from leapalign_jax.models import splash  # TPU-only; imported on demand

  return splash.splash_attention(q, k, v)
