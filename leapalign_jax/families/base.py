"""The flow-model interface: what the harness needs from a model family.

LeapAlign and every baseline need only a velocity ``v(params, x_t, t, cond)``,
a latent geometry, a noise schedule, a decoder and a reward. A ``Family`` is
that contract for one kind of model (Flux; later SD3), as plain functions:
the assembly (``components``, ``abstract_run``), the sampler, ``aot``, the
FLOP model and the evaluation reach the model only through it, so a new
family is one module here plus its converters, not branches in the trainer.

A family's settings live in one config section (``Family.section``: Flux's
is ``config.flux``: ``path``, ``variant``, ``dtype``, ``param_dtype``,
``remat``, ``attention``, ``scan_layers``); ``config.model.family`` names the
family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from leapalign_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Image and latent sizes of a run (the autoencoder fixes the factor).

  The latent ``[latent_h, latent_w, channels]`` is packed into
  ``patch x patch`` tokens: a ``tokens`` grid of ``patch² * channels``
  features each.
  """

  height: int
  width: int
  latent_h: int
  latent_w: int
  channels: int
  patch: int = 2

  @property
  def tokens(self) -> tuple[int, int]:
    return self.latent_h // self.patch, self.latent_w // self.patch

  @property
  def seq_len(self) -> int:
    h, w = self.tokens
    return h * w


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family's functions (see the module doc).

  Attributes:
    name: the ``config.model.family`` value.
    section: the config section of the model's settings.
    variants: architecture name -> model config (``<section>.variant``).
    text_fields: the prompt-cache fields the velocity reads as conditioning.
    model_config: ``config -> model config`` of ``<section>.variant`` with
      the section's runtime options (dtypes, remat, attention); for shapes.
    build: ``(model config, rngs) -> nnx.Module`` with random weights.
    load: ``(config, sharding_fn) -> (model config, nnx.Module)`` from
      ``<section>.path`` (any layout its converter reads).
    velocity: ``(model, x_BLC, t_B, cond, geometry, guidance) -> v_BLC``;
      ``cond`` maps ``text_fields`` to batched arrays, ``guidance`` is what
      ``guidance`` returned.
    guidance: ``(model config, scale) -> value or None``: how the sampling
      guidance scale conditions this model (None: it does not).
    latent_channels: ``model config -> int``, the autoencoder latent
      channels the model expects (its input is ``patch²`` times that).
    schedule: ``(config, num_steps, seq_len) -> sigmas [T + 1]`` (numpy
      float32, ``sigmas[0] = 1``, ``sigmas[T] = 0``).
    text_shapes: ``(config, model config, batch) -> {field: (shape,
      dtype)}`` of the cached conditioning.
    text_tokens: ``config -> int``, the conditioning sequence length (FLOPs).
    check_cache: ``(cache, model config) -> None``; raises ``ConfigError``
      when a prompt cache was embedded for another model.
    text_encoders: ``(config, cache, rewards) -> encoders``:
      ``encoders(prompts) -> {field: array}`` (plus, with ``rewards``, each
      reward's ids) and ``encoders.identity()``. ``cache=True`` rounds to
      ``text.cache_dtype``.
    dit_flops: ``(model config, n_img, n_txt) -> flops.DitFlops``.
    adapter_flops: ``(model config, n_img, n_txt, rank) -> float``.
    export: ``(model, folder, layout, dtype) -> [paths]``, full weights.
    export_lora: ``(model, folder, dtype) -> [paths]``, PEFT adapters.
    export_merged: ``(model, folder, layout, dtype) -> [paths]``, adapters
      folded into the base.
    calls_per_velocity: ``guidance value -> int``, model passes per image
      in one velocity (2 under classifier-free guidance; for the FLOPs).
  """

  name: str
  section: str
  variants: Mapping[str, Any]
  text_fields: tuple[str, ...]
  model_config: Callable[..., Any]
  build: Callable[..., Any]
  load: Callable[..., tuple[Any, Any]]
  velocity: Callable[..., Any]
  guidance: Callable[[Any, float], Any]
  latent_channels: Callable[[Any], int]
  schedule: Callable[..., np.ndarray]
  text_shapes: Callable[..., dict[str, tuple]]
  text_tokens: Callable[[Any], int]
  check_cache: Callable[..., None]
  text_encoders: Callable[..., Any]
  dit_flops: Callable[..., Any]
  adapter_flops: Callable[..., float]
  export: Callable[..., list[str]]
  export_lora: Callable[..., list[str]]
  export_merged: Callable[..., list[str]]
  calls_per_velocity: Callable[[Any], int] = lambda guidance: 1


def variant_config(config, section: str, variants: Mapping, runtime):
  """A variant's architecture with its config section's runtime options."""
  s = config[section]
  if s.variant not in variants:
    raise ConfigError(
      f"config.{section}.variant={s.variant!r}: building the model without "
      f"its weights needs the architecture; set it to one of "
      f"{sorted(variants)}"
    )
  return dataclasses.replace(variants[s.variant], **{k: s[k] for k in runtime})
