"""The ``Reward`` bundle, option parsing and the host-side image check.

A reward is a frozen parameter pytree plus pure functions
``(params, images_BHWC, ids_BL) -> r_B``. ``Reward`` holds one or more of
them under their config names and returns their weighted sum (``score``,
the training objective) or each of them (``score_each``, evaluation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from leapalign_jax.errors import UserError

# (params of one reward, images [B, H, W, 3] in [-1, 1], ids [B, L]) -> [B].
ScoreFn = Callable[[Any, jax.Array, jax.Array | None], jax.Array]

# Accepted overshoot of [-1, 1] in ``check_images``: decoders overshoot by a
# few 1e-3 before the final clamp; anything larger is a wrong value range.
IMAGE_RANGE_MARGIN = 1e-2


@dataclasses.dataclass(frozen=True)
class Loaded:
  """One loaded reward model: frozen params, pure score, text length."""

  params: Any
  fn: ScoreFn
  text_length: int  # 0: the reward reads no text
  tokenizer: str = ""  # its style (``rewards.text``); "" reads no text
  differentiable: bool = True  # False: values only (``rewards.nondiff``)
  ids_from: str = ""  # reads another reward's prompt ids ("" = its own)
  # (params, images, ids) -> (image_BP, text_BP) unit embeddings, for the
  # rewards that are a similarity of two embeddings (the CLIP family).
  embed: Callable | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Reward:
  """Named rewards with weights: ``score`` = sum of ``weight * r_name``.

  Attributes:
    names: the config names, in config order.
    weights: one per name. A weight of 0 keeps a reward out of ``score``
      (it is not even computed there) but in ``score_each``: an
      evaluation-only metric.
    params: ``{name: frozen pytree}``; pass it (placed on devices, sharded
      or replicated) as the first argument of ``score``.
    fns: ``{name: (params[name], images, ids) -> r_B}``.
    text_length: the shortest of the rewards' id lengths (CLIP's 77,
      ImageReward's 35), 0 when no reward reads text; ``lengths`` has each.
    tokenizers: ``{name: style}`` of the rewards that read text
      (``rewards.text``): whose ids the prompt cache must hold.
    lengths: ``{name: L}`` of the same rewards: the length of their ids.
  """

  names: tuple[str, ...]
  weights: tuple[float, ...]
  params: dict[str, Any]
  fns: Mapping[str, ScoreFn]
  text_length: int
  tokenizers: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # {name: False} for rewards without a gradient (absent: differentiable).
  differentiable: Mapping[str, bool] = dataclasses.field(default_factory=dict)
  lengths: Mapping[str, int] = dataclasses.field(default_factory=dict)
  # {name: other name}: a reward that reads another's prompt ids (e.g. the
  # digits world's rule reward reads the CLIP reward's ids).
  ids_of: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # {name: embed fn} of the rewards that give embeddings (``embed``).
  embed_fns: Mapping[str, Callable] = dataclasses.field(default_factory=dict)

  def embed(
    self, name: str, params, images_BHWC: jax.Array, ids_BL
  ) -> tuple[jax.Array, jax.Array]:
    """Reward ``name``'s unit image and text embeddings ``([B, P], [B, P])``.

    The same preprocessing, tokens and towers as its score, which is their
    row-wise dot product (times ``exp(logit_scale)`` for ``scale="logit"``).
    Arguments as ``score_each``; jit-able and differentiable.
    """
    if name not in self.embed_fns:
      raise UserError(
        f"reward {name!r} gives no embeddings; the CLIP-family rewards do "
        f"(here: {', '.join(self.embed_fns) or 'none'})"
      )
    if isinstance(ids_BL, Mapping):
      ids_BL = ids_BL.get(self.ids_of.get(name, name))
    return self.embed_fns[name](params[name], images_BHWC, ids_BL)

  def score_each(
    self, params, images_BHWC: jax.Array, ids_BL: jax.Array | None
  ) -> dict[str, jax.Array]:
    """Every reward separately, unweighted: ``{name: r_B}`` (float32).

    Args:
      params: ``self.params`` (or the same tree placed on devices).
      images_BHWC: decoded images in [-1, 1], NHWC, any size; values
        outside are clipped (as the references clamp).
      ids_BL: ``{name: ids_BL}``, each reward's own prompt ids padded to
        ``lengths[name]``; one array is given to every reward; None if no
        reward reads text.
    """
    return {n: self._one(n, params, images_BHWC, ids_BL) for n in self.names}

  def score(
    self, params, images_BHWC: jax.Array, ids_BL: jax.Array | None
  ) -> jax.Array:
    """The weighted sum ``sum_n weight_n * r_n`` ``[B]`` (float32)."""
    total_B = jnp.zeros((images_BHWC.shape[0],), jnp.float32)
    for name, weight in zip(self.names, self.weights):
      if weight != 0.0:
        total_B = total_B + weight * self._one(
          name, params, images_BHWC, ids_BL
        )
    return total_B

  def _one(self, name, params, images_BHWC, ids_BL) -> jax.Array:
    if images_BHWC.ndim != 4 or images_BHWC.shape[-1] != 3:
      raise ValueError(
        f"reward images must be [B, H, W, 3] (NHWC); got {images_BHWC.shape}"
      )
    if isinstance(ids_BL, Mapping):
      ids_BL = ids_BL.get(self.ids_of.get(name, name))
    r_B = self.fns[name](params[name], images_BHWC, ids_BL)
    return r_B.astype(jnp.float32)


def frozen(params):
  """``params`` behind ``stop_gradient``: no cotangent ever reaches them.

  Differentiating a score w.r.t. the images never needs parameter
  gradients; this also makes ``jax.grad`` w.r.t. (params, images) return
  zeros for the params instead of back-propagating into them.
  """
  return jax.tree.map(jax.lax.stop_gradient, params)


def unit(x_BD: jax.Array) -> jax.Array:
  """L2-normalised rows in float32 (``F.normalize``'s 1e-12 floor)."""
  x_BD = x_BD.astype(jnp.float32)
  norm_B1 = jnp.sqrt(jnp.sum(x_BD * x_BD, axis=-1, keepdims=True))
  return x_BD / jnp.maximum(norm_B1, 1e-12)


def options(name: str, cfg: Mapping[str, Any], defaults: Mapping[str, Any]):
  """``defaults`` updated by ``cfg``; unknown keys raise a one-line error."""
  unknown = sorted(set(cfg) - set(defaults))
  if unknown:
    raise UserError(
      f"rewards.{name}: unknown option(s) {', '.join(unknown)}; this reward "
      f"accepts weight, kind, {', '.join(sorted(defaults))}"
    )
  return {**defaults, **cfg}


def choice(name: str, field: str, value, allowed) -> None:
  """Raises a one-line error when ``value`` is not one of ``allowed``."""
  if value not in allowed:
    options = ", ".join(map(str, allowed))
    raise UserError(f"rewards.{name}.{field}={value!r}; use one of {options}")


def require_path(name: str, field: str, value, hint: str) -> str:
  """The configured file path; an empty one raises with ``hint``."""
  if not value:
    raise UserError(f"rewards.{name}.{field} is empty; {hint}")
  return str(value)


def check_images(images: Any, margin: float = IMAGE_RANGE_MARGIN) -> None:
  """Raises a one-line ``UserError`` unless ``images`` suit a reward.

  Host-side (reads the values), for the evaluation path and scripts: the
  rewards themselves clip to [-1, 1] silently inside jit, so a batch in
  [0, 1] or [0, 255] would be scored without complaint.

  Args:
    images: ``[B, H, W, 3]`` floats in [-1, 1] (numpy or a fully
      addressable jax array).
    margin: accepted overshoot of [-1, 1].
  """
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise UserError(
      f"reward images must be [B, H, W, 3] (NHWC); got shape {x.shape}"
    )
  if not np.issubdtype(x.dtype, np.floating):
    raise UserError(
      f"reward images must be floats in [-1, 1]; got {x.dtype} (map uint8 "
      "pixels with x / 127.5 - 1)"
    )
  x = x.astype(np.float32)
  bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
  if bad:
    raise UserError(f"reward images hold {bad} non-finite values (NaN/inf)")
  lo, hi = float(x.min()), float(x.max())
  if lo < -1.0 - margin or hi > 1.0 + margin:
    hint = (
      "; they look like [0, 255] pixels: pass x / 127.5 - 1"
      if lo >= 0.0 and hi > 2.0
      else "; pass decoded generator images (the decoder's [-1, 1] output)"
    )
    raise UserError(
      f"reward images must lie in [-1, 1]; got values in [{lo:.4g}, {hi:.4g}]"
      + hint
    )
