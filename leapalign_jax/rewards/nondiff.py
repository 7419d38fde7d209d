"""Rewards without gradients: rule-based or host-side Python scorers.

The GRPO family (methods/grpo_step.py) only needs reward *values*, so it can
optimise scores that have no gradient: a detector's checks, OCR, a
classifier's argmax. Two ways in:

* ``no_gradient(fn)``: a jitted JAX scorer whose output is cut from the
  graph (``stop_gradient``); e.g. an argmax rule (digits world).
* ``host_scorer(fn)``: a plain numpy function on the host, called from
  inside the jitted step with ``jax.pure_callback`` (batched: one call per
  batch). It has no derivative rule, so a direct-gradient method could not
  trace through it at all; they are refused up front (``check_gradient``).

The ``python`` reward kind loads such a host scorer by import path:
``rewards.<name> = {kind: "python", fn: "package.module:function"}`` with
``function(images_BHWC float32 numpy in [-1, 1], ids or None) -> [B]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from leapalign_jax.errors import UserError
from leapalign_jax.rewards import base

HostFn = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def no_gradient(fn: base.ScoreFn) -> base.ScoreFn:
  """``fn`` with its output behind ``stop_gradient`` (no reward gradient)."""

  def score(params, images_BHWC, ids_BL):
    r_B = fn(params, jax.lax.stop_gradient(images_BHWC), ids_BL)
    return jax.lax.stop_gradient(r_B.astype(jnp.float32))

  return score


def host_scorer(fn: HostFn) -> base.ScoreFn:
  """A jit-able ScoreFn calling the numpy ``fn`` once per batch on the host."""

  def call(images, ids):
    return np.asarray(fn(np.asarray(images), ids), np.float32)

  def score(params, images_BHWC, ids_BL):
    del params
    out = jax.ShapeDtypeStruct((images_BHWC.shape[0],), jnp.float32)
    images = jax.lax.stop_gradient(images_BHWC.astype(jnp.float32))
    if ids_BL is None:
      return jax.pure_callback(
        lambda im: call(im, None), out, images, vmap_method="expand_dims"
      )
    return jax.pure_callback(
      call, out, images, ids_BL, vmap_method="expand_dims"
    )

  return score


def build_python(name: str, cfg: Mapping[str, Any], abstract: bool = False):
  """The ``python`` kind: a host scorer imported from ``fn`` ("mod:func")."""
  del abstract  # nothing to read: no parameters
  cfg = base.options(name, cfg, {"fn": ""})
  path = base.require_path(
    name, "fn", cfg["fn"], "name a host scorer as 'package.module:function'"
  )
  module, _, attr = path.partition(":")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError, ValueError) as e:
    raise UserError(
      f"rewards.{name}.fn={path!r} cannot be imported: {e}"
    ) from None
  return base.Loaded({}, host_scorer(fn), 0, differentiable=False)


def check_gradient(method: str, needs_gradient: bool, reward) -> None:
  """Refuses (one line) a direct-gradient method with a gradient-free reward.

  Args:
    method: the method's name (for the message).
    needs_gradient: whether it back-propagates through the reward.
    reward: a ``rewards.Reward``.
  """
  if not needs_gradient:
    return
  bad = [
    n
    for n, w in zip(reward.names, reward.weights)
    if w != 0.0 and not reward.differentiable.get(n, True)
  ]
  if bad:
    raise UserError(
      f"method {method!r} back-propagates through the reward, but "
      f"reward(s) {', '.join(bad)} have no gradient; use a GRPO method "
      "(flow_grpo, dance_grpo, mix_grpo) or give them weight 0"
    )
