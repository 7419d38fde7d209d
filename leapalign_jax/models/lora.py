"""Low-rank adapters on any ``Linear`` of a model, selected by path regex.

``add_lora`` attaches ``nnx.LoRAParam`` s ``A [*in, r]`` (random) and
``B [r, *out]`` (zeros) so the adapted model starts equal to the base; the
trainer then splits ``nnx.LoRAParam`` (trainable) from ``nnx.Param`` (frozen).
Stacked (scanned) layers get stacked adapters with the same leading axis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from leapalign_jax.models.layers import Linear, fan_in_normal

# Attention (qkv, out) and MLP linears of every Flux block: the usual
# targets of Flux LoRA training.
FLUX_TARGETS = (
  r"double_blocks/(img|txt)_attn/(qkv|proj)",
  r"double_blocks/(img|txt)_mlp/layers/[02]",
  r"single_blocks/linear1/(qkv|mlp)",
  r"single_blocks/linear2/(attn|mlp)",
)


def module_path(path: Sequence) -> str:
  """``('double_blocks', 'img_attn', 'qkv')`` -> ``'double_blocks/img_attn/qkv'``."""
  return "/".join(str(p) for p in path)


def lora_targets(model: nnx.Module, targets: Sequence[str]) -> list[str]:
  """Paths of the ``Linear`` s whose path fully matches one of ``targets``."""
  patterns = [re.compile(t) for t in targets]
  return [
    module_path(path)
    for path, m in nnx.iter_modules(model)
    if isinstance(m, Linear)
    and any(p.fullmatch(module_path(path)) for p in patterns)
  ]


def add_lora(
  model: nnx.Module,
  targets: Sequence[str],
  rank: int,
  alpha: float,
  *,
  rngs: nnx.Rngs,
  param_dtype=jnp.float32,
) -> list[str]:
  """Attaches LoRA adapters in place; returns the adapted module paths.

  Raises:
    ValueError: if no ``Linear`` matches ``targets`` (a misspelled target).
  """
  if rank < 1:
    raise ValueError(f"lora rank must be >= 1, got {rank}")
  patterns = [re.compile(t) for t in targets]
  adapted = []
  for path, m in list(nnx.iter_modules(model)):
    name = module_path(path)
    if not isinstance(m, Linear) or not any(
      p.fullmatch(name) for p in patterns
    ):
      continue
    kernel = m.kernel[...]
    lead = kernel.shape[: kernel.ndim - len(m.in_shape) - len(m.out_shape)]
    names = m.kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
    n_lead, n_in = len(lead), len(m.in_shape)
    in_names = tuple(names[: n_lead + n_in])
    out_names = tuple(names[n_lead + n_in :])
    init = fan_in_normal(math.prod(m.in_shape))
    a = init(rngs.params(), lead + m.in_shape + (rank,), param_dtype)
    b = jnp.zeros(lead + (rank,) + m.out_shape, param_dtype)
    # nnx.data: Linear initialises these to None, which NNX records as static
    # attributes; the adapters are data (pytree leaves).
    m.lora_a = nnx.data(nnx.LoRAParam(a, out_sharding=in_names + (None,)))
    m.lora_b = nnx.data(
      nnx.LoRAParam(b, out_sharding=tuple(names[:n_lead]) + (None,) + out_names)
    )
    m.lora_scale = alpha / rank
    adapted.append(name)
  if not adapted:
    raise ValueError(
      f"no Linear matches the LoRA targets {list(targets)}; targets are "
      "regexes over module paths such as 'double_blocks/img_attn/qkv'"
    )
  return adapted


def merge_lora(model: nnx.Module) -> None:
  """Folds every adapter into its base kernel (in place) and removes it."""
  for _, m in nnx.iter_modules(model):
    if not isinstance(m, Linear) or m.lora_a is None:
      continue
    a, b = m.lora_a[...], m.lora_b[...]
    n_lead = a.ndim - len(m.in_shape) - 1
    lead = "".join(chr(ord("a") + i) for i in range(n_lead))
    ins = "".join(chr(ord("i") + i) for i in range(len(m.in_shape)))
    outs = "".join(chr(ord("s") + i) for i in range(len(m.out_shape)))
    delta = jnp.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}", a, b)
    kernel = m.kernel[...]
    m.kernel[...] = (kernel + m.lora_scale * delta).astype(kernel.dtype)
    m.lora_a = m.lora_b = None
    m.lora_scale = 0.0


def count(tree) -> int:
  """Number of scalars in a pytree."""
  return sum(x.size for x in jax.tree.leaves(tree))
