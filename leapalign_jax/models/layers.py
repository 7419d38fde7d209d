"""Building blocks shared by every model: dense layers, norms, activations.

Parameters carry logical axis names (see docs/architecture.md); kernels are
stored in ``param_dtype`` and cast to the compute ``dtype`` at use. Norm
statistics are always computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd

Names = tuple[str | None, ...]
# Logical names of [batch, length, embed] activations at block boundaries.
ACT_BLD = ("activation_batch", "activation_length", "activation_embed")


def as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  """Returns ``x`` as a tuple of ints."""
  return (x,) if isinstance(x, int) else tuple(x)


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """Constrains an activation to the mesh axes its logical ``names`` map to.

  A no-op unless logical-axis rules are active (``nnx.logical_axis_rules``,
  set by ``leapalign_jax.sharding`` under a mesh), so models run unchanged on
  one device.
  """
  rules = core_spmd.get_logical_axis_rules()
  if not rules:
    return x
  spec = jax.sharding.PartitionSpec(
    *core_spmd.from_sharding_rules(names, rules)
  )
  return jax.lax.with_sharding_constraint(x, spec)


def bcast(v: jax.Array, ndim: int) -> jax.Array:
  """Prepends unit axes so ``v`` broadcasts against a rank-``ndim`` array."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def fan_in_normal(fan_in: int, scale: float = 1.0):
  """Normal init with variance ``scale / fan_in`` (LeCun), any kernel rank."""

  def init(key, shape, dtype=jnp.float32):
    std = math.sqrt(scale / max(1, fan_in))
    return std * jax.random.normal(key, shape, dtype)

  return init


class Linear(nnx.Module):
  """A dense layer whose kernel is shaped ``(*in_shape, *out_shape)``.

  The trailing ``len(in_shape)`` axes of the input are contracted. Storing
  fused projections with their structure (e.g. ``(embed, 3, heads, head_dim)``
  for qkv) lets the heads axis be sharded without resharding a fused axis.
  """

  def __init__(
    self,
    in_features: int | Sequence[int],
    out_features: int | Sequence[int],
    *,
    kernel_axes: Names,
    bias_axes: Names | None = None,
    use_bias: bool = True,
    zero_init: bool = False,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.in_shape = as_tuple(in_features)
    self.out_shape = as_tuple(out_features)
    shape = self.in_shape + self.out_shape
    if len(kernel_axes) != len(shape):
      raise ValueError(f"kernel_axes {kernel_axes} do not match shape {shape}")
    self.dtype = dtype
    if zero_init:
      kernel = jnp.zeros(shape, param_dtype)
    else:
      init = fan_in_normal(math.prod(self.in_shape))
      kernel = init(rngs.params(), shape, param_dtype)
    self.kernel = nnx.Param(kernel, out_sharding=kernel_axes)
    if use_bias:
      if bias_axes is None:
        bias_axes = kernel_axes[len(self.in_shape) :]
      self.bias = nnx.Param(
        jnp.zeros(self.out_shape, param_dtype), out_sharding=bias_axes
      )
    else:
      self.bias = None
    # Optional low-rank adapter (see models/lora.py): y += s * (x A) B.
    self.lora_a = None
    self.lora_b = None
    self.lora_scale = 0.0

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
    if self.bias is not None:
      y = y + bcast(self.bias[...].astype(self.dtype), y.ndim)
    if self.lora_a is not None:
      a = self.lora_a[...].astype(self.dtype)  # [*in_shape, r]
      b = self.lora_b[...].astype(self.dtype)  # [r, *out_shape]
      h = jax.lax.dot_general(x, a, (contract, ((), ())))
      low = jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))
      y = y + self.lora_scale * low
    return y


def qkv_linear(dim: int, heads: int, head_dim: int, **kw) -> Linear:
  """A fused q/k/v projection ``[..., dim] -> [..., 3, heads, head_dim]``."""
  return Linear(
    dim,
    (3, heads, head_dim),
    kernel_axes=("embed", "qkv", "heads", "kv"),
    **kw,
  )


def heads_out_linear(heads: int, head_dim: int, dim: int, **kw) -> Linear:
  """An attention output ``[..., heads, head_dim] -> [..., dim]``.

  Its bias (if any) stays replicated, as every other bias.
  """
  kw.setdefault("bias_axes", ("bias",))
  return Linear(
    (heads, head_dim), dim, kernel_axes=("heads", "kv", "embed"), **kw
  )


class Embed(nnx.Module):
  """A ``[num_embeddings, features]`` lookup table (token embeddings).

  Rows are gathered first and cast to the compute ``dtype`` afterwards, so a
  large table is never cast as a whole.
  """

  def __init__(
    self,
    num_embeddings: int,
    features: int,
    *,
    axes: Names = ("vocab", "embed"),
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    table = jax.random.normal(
      rngs.params(), (num_embeddings, features), param_dtype
    )
    self.embedding = nnx.Param(0.02 * table, out_sharding=axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters; statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with a learned scale and bias; statistics and affine in fp32.

  The result is cast back to the input dtype once, after the affine, which is
  what PyTorch's fused LayerNorm kernels do for bf16 inputs.
  """

  def __init__(
    self,
    dim: int,
    *,
    eps: float = 1e-5,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(
      jnp.ones((dim,), param_dtype), out_sharding=("norm",)
    )
    self.bias = nnx.Param(
      jnp.zeros((dim,), param_dtype), out_sharding=("norm",)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    scale = bcast(self.scale[...].astype(jnp.float32), x.ndim)
    bias = bcast(self.bias[...].astype(jnp.float32), x.ndim)
    return (y * scale + bias).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale applied after casting back (BFL order)."""

  def __init__(
    self,
    dim: int,
    *,
    eps: float = 1e-6,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(
      jnp.ones((dim,), param_dtype), out_sharding=("norm",)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    rrms = jax.lax.rsqrt(
      jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps
    )
    scale = bcast(self.scale[...].astype(x.dtype), x.ndim)
    return (x32 * rrms).astype(x.dtype) * scale


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU with the tanh approximation (the DiT's activation)."""
  return jax.nn.gelu(x, approximate=True)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's ``x * sigmoid(1.702 x)``."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU: OpenCLIP's and HF ``"gelu"``."""
  return jax.nn.gelu(x, approximate=False)


def stack_layers(
  make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs
) -> nnx.Module:
  """Builds ``n`` identical modules with parameters stacked on a ``layers`` axis."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(
    in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}
  )
  def build(r):
    return make(r)

  return build(rngs)


def run_layers(
  layers: nnx.Module,
  carry,
  call: Callable,
  *,
  xs=None,
  remat: str = "none",
  scan: bool = True,
):
  """Threads ``carry`` through stacked ``layers``.

  ``call(layer, carry)``, or ``call(layer, carry, x)`` with ``x`` the layer's
  slice of ``xs`` (per-layer inputs stacked on axis 0, e.g. precomputed
  modulations). Each layer step is wrapped in ``jax.checkpoint`` with the
  ``remat`` policy; ``scan=False`` unrolls a Python loop (same numerics, for
  debugging).
  """
  graphdef, state = nnx.split(layers)

  def body(c, layer_xs):
    layer_state, x = layer_xs
    layer = nnx.merge(graphdef, layer_state)
    return (call(layer, c) if xs is None else call(layer, c, x)), None

  policy = remat_policy(remat)
  if policy is not None:
    body = jax.checkpoint(body, policy=policy, prevent_cse=not scan)
  if scan:
    carry, _ = jax.lax.scan(body, carry, (state, xs))
    return carry
  n = jax.tree.leaves(state)[0].shape[0]
  for i in range(n):
    carry, _ = body(carry, jax.tree.map(lambda a, i=i: a[i], (state, xs)))
  return carry


REMAT_POLICIES = ("none", "full", "dots", "names")


def remat_policy(name: str):
  """Maps a config remat name to a ``jax.checkpoint`` policy (None = no remat).

  ``names`` saves the intermediates tagged with ``checkpoint_name`` in the
  blocks (``qkv``, ``attn_out``, ``mlp_in``) and recomputes the rest.
  """
  policies = jax.checkpoint_policies
  if name == "none":
    return None
  if name == "full":
    return policies.nothing_saveable
  if name == "dots":
    return policies.dots_with_no_batch_dims_saveable
  if name == "names":
    return policies.save_only_these_names("qkv", "attn_out", "mlp_in")
  raise ValueError(
    f"unknown remat policy {name!r}; use one of {REMAT_POLICIES}"
  )


Padding2d = int | tuple[tuple[int, int], tuple[int, int]]


class Conv2d(nnx.Module):
  """A 2-D convolution over NHWC images with a ``[kh, kw, in, out]`` kernel.

  ``padding`` is symmetric (an int) or explicit ``((top, bottom), (left,
  right))``; explicit pairs express asymmetric zero padding inside the conv,
  so no padded copy of the activation is materialised.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: Padding2d | None = None,
    use_bias: bool = True,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    k = kernel_size
    self.stride = stride
    p = k // 2 if padding is None else padding
    self.padding = ((p, p), (p, p)) if isinstance(p, int) else p
    self.dtype = dtype
    init = fan_in_normal(k * k * in_features)
    self.kernel = nnx.Param(
      init(rngs.params(), (k, k, in_features, out_features), param_dtype),
      out_sharding=(None, None, "conv_in", "conv_out"),
    )
    self.bias = (
      nnx.Param(
        jnp.zeros((out_features,), param_dtype), out_sharding=("conv_out",)
      )
      if use_bias
      else None
    )

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    x_BHWC = x_BHWC.astype(self.dtype)
    y = jax.lax.conv_general_dilated(
      x_BHWC,
      self.kernel[...].astype(self.dtype),
      window_strides=(self.stride, self.stride),
      padding=self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.bias is not None:
      y = y + bcast(self.bias[...].astype(self.dtype), y.ndim)
    return y


class GroupNorm(nnx.Module):
  """GroupNorm over channels-last inputs; statistics and affine in float32.

  Groups are contiguous channel blocks (PyTorch's convention), and the
  statistics pool every non-batch axis of a group.
  """

  def __init__(
    self,
    num_groups: int,
    channels: int,
    *,
    eps: float = 1e-6,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    del rngs
    if channels % num_groups:
      raise ValueError(
        f"GroupNorm: {channels} channels are not divisible into {num_groups}"
        " groups; pick norm_groups that divides every channel count"
      )
    self.num_groups = num_groups
    self.eps = eps
    self.scale = nnx.Param(
      jnp.ones((channels,), param_dtype), out_sharding=("norm",)
    )
    self.bias = nnx.Param(
      jnp.zeros((channels,), param_dtype), out_sharding=("norm",)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    G = self.num_groups
    C = x.shape[-1]
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], G, C // G)
    axes = (*range(1, x.ndim - 1), x.ndim)  # all but batch and group
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    y = y * bcast(self.scale[...].astype(jnp.float32), y.ndim)
    y = y + bcast(self.bias[...].astype(jnp.float32), y.ndim)
    return y.astype(x.dtype)
