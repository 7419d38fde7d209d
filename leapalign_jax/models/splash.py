"""Pallas splash attention (TPU) for unmasked joint attention.

Flux attends over every text and image token, so the only mask this kernel
adds is for its own tile padding: the sequence is padded to a multiple of
the tile (2537 → 2560 at 720² with T5-512), and segment ids (1 = a real
token, 0 = padding) keep real queries off the padded keys. Padded query rows
only see padded keys (no empty rows, no NaNs) and are sliced off. T5 padding
tokens are real tokens here: they stay visible, as in the references.

Under a mesh the kernel runs inside ``jax.shard_map`` (a Pallas call cannot
be partitioned by XLA): batch and heads are split as the logical names
``activation_batch`` / ``activation_heads`` map under the active rules
(``sharding.under_rules``), sequence and head dim stay whole. Off TPU the
same kernel runs in Pallas interpret mode (slow; tests only).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_kernel as sk,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_mask as sm,
)

from leapalign_jax.models.platform import target_platform

# Logical names of [B, H, L, D] inside the kernel.
ACT_BHLD = ("activation_batch", "activation_heads", None, None)
LONG_TILE = 512  # sequences longer than 1024 (the DiT's 2537 tokens)
SHORT_TILE = 128  # short ones (a ViT's 257 tokens): less padding


def tile_for(length: int) -> int:
  """The kernel tile for a sequence of ``length`` tokens."""
  return LONG_TILE if length > 2 * LONG_TILE else SHORT_TILE


def padded_length(length: int, tile: int | None = None) -> int:
  """``length`` rounded up to a multiple of the tile."""
  tile = tile or tile_for(length)
  return -(-length // tile) * tile


def segment_ids(length: int, padded: int) -> jax.Array:
  """``[padded]`` int32: 1 for the ``length`` real tokens, 0 for padding."""
  return (jnp.arange(padded) < length).astype(jnp.int32)


def padding_mask(length: int, padded: int) -> jax.Array:
  """``[padded, padded]`` bool: what the segment ids let each query see."""
  seg = segment_ids(length, padded)
  return seg[:, None] == seg[None, :]


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, padded: int, tile: int, interpret: bool):
  """A splash kernel over ``heads`` heads of ``padded`` tokens (cached)."""
  block = min(tile, padded)
  sizes = sk.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  mask = sm.MultiHeadMask([sm.FullMask((padded, padded))] * heads)
  return sk.make_splash_mha(
    mask,
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )


def _local_attention(q_BHLD, k_BHLD, v_BHLD, length: int, interpret: bool):
  """Splash over padded ``[B, H, L_pad, D]`` (one shard); returns the same."""
  _, heads, padded, _ = q_BHLD.shape
  # Concrete mask metadata even when first built inside a trace (the kernel
  # is cached across traces).
  with jax.ensure_compile_time_eval():
    kernel = _kernel(heads, padded, tile_for(length), interpret)
  seg = sk.SegmentIds(
    q=segment_ids(length, padded), kv=segment_ids(length, padded)
  )
  return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=seg))(
    q_BHLD, k_BHLD, v_BHLD
  )


def splash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  interpret: bool | None = None,
) -> jax.Array:
  """Softmax attention of ``[B, L, H, D]`` inputs through the splash kernel.

  Args:
    q: queries ``[B, L, H, D]``; k, v: keys and values of the same shape.
    interpret: run the Pallas interpreter (default: when not compiling for
      TPU).

  Returns:
    ``[B, L, H, D]`` in ``v``'s dtype; equal to ``attention.xla_attention``
    up to the kernel's (online-softmax) rounding.
  """
  if interpret is None:
    interpret = target_platform() != "tpu"
  if not interpret:
    _check_precision(q.dtype)
  B, L, H, D = q.shape
  padded = padded_length(L)
  # The kernel does not scale the logits: fold 1/sqrt(D) into q (in fp32).
  q = (q.astype(jnp.float32) * (1.0 / math.sqrt(D))).astype(q.dtype)

  def to_bhld(x):
    x = jnp.pad(x, ((0, 0), (0, padded - L), (0, 0), (0, 0)))
    return jnp.transpose(x, (0, 2, 1, 3))

  q, k, v = to_bhld(q), to_bhld(k), to_bhld(v.astype(q.dtype))
  run = functools.partial(_local_attention, length=L, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  rules = core_spmd.get_logical_axis_rules()
  if not mesh.empty and rules:
    spec = jax.sharding.PartitionSpec(
      *core_spmd.from_sharding_rules(ACT_BHLD, rules)
    )
    _check_divisible((B, H), spec, mesh)
    run = jax.shard_map(
      run, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False
    )
  out_BHLD = run(q, k, v)
  return jnp.transpose(out_BHLD, (0, 2, 1, 3))[:, :L]


def _check_precision(dtype) -> None:
  """Mosaic rejects fp32-precision dots on bf16 operands; say so up front.

  The backward kernels are traced by ``jax.grad`` outside this module, so a
  local precision context cannot cover them: the global setting must allow
  bf16 passes.
  """
  precision = str(jax.config.jax_default_matmul_precision or "default")
  if dtype == jnp.bfloat16 and precision.lower() in ("highest", "float32"):
    raise ValueError(
      f"splash attention on bf16 inputs needs the default matmul precision "
      f"(jax_default_matmul_precision={precision!r}); unset it or use "
      "flux.attention='xla'"
    )


def _check_divisible(sizes: tuple[int, int], spec, mesh) -> None:
  for size, axes, what in zip(sizes, spec, ("batch", "heads")):
    axes = (
      () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    )
    n = math.prod(mesh.shape[a] for a in axes)
    if size % n:
      raise ValueError(
        f"splash attention: {what} {size} is not divisible by the {n} "
        f"devices of mesh axes {axes}; change mesh.shape or use "
        "flux.attention='xla'"
      )
