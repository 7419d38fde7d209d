"""Pretraining of the digits world's models: autoencoder, base Flux, reward.

Each trainer takes a freshly initialised NNX module, trains its parameters in
place with Adam and returns per-phase timing and final losses. They share one
loop (``fit``): a jitted ``(params, opt_state, batch, key) -> ...`` step fed
by a host function ``batch_fn(step) -> dict of numpy arrays``. The pipeline
(``digits_pipeline``) decides sizes, writes the results as real checkpoints
and skips a stage whose checkpoint exists.

* Autoencoder: L1 reconstruction (ink pixels weighted up: the canvas is mostly
  black) plus a small KL term; afterwards its latent scale and shift are set
  so that the Flux latents have zero mean and unit variance.
* Base Flux: the rectified-flow objective, ``x_t = (1 - t) x0 + t eps`` with
  velocity target ``eps - x0`` and logit-normal ``t`` (SD3/Flux), on packed
  latents of rendered images and the cached text embeddings of their
  prompts; an EMA (warmed up, so an early stop is not stuck near the random
  init) is what gets exported.
* Reward: a small CLIP trained with the symmetric contrastive loss on
  (rendered image, prompt tokens) pairs. Images are augmented (noise, blur,
  speckle) so that the reward is harder to satisfy with artefacts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from leapalign_jax.rewards import preprocess as pp

_LOG = logging.getLogger(__name__)


class CancelledError(Exception):
  """``fit`` stopped early because its ``stop`` event was set."""


LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, Any]]


def fit(
  params: Any,
  loss_fn: LossFn,
  batch_fn: Callable[[int], dict[str, np.ndarray]],
  *,
  steps: int,
  lr: float,
  seed: int,
  name: str,
  ema_decay: float | None = None,
  log_every: int = 100,
  stop: threading.Event | None = None,
) -> tuple[Any, dict[str, float]]:
  """Adam on ``loss_fn(params, batch, key) -> (loss, aux)`` for ``steps``.

  ``stop``: checked before each step; once set, ``CancelledError`` is raised
  (a stage running beside another that failed stops within a step).

  Returns:
    The trained params (the EMA when ``ema_decay`` is set) and a summary:
    ``loss`` (mean of the last 10% of steps), ``seconds``, ``steps``.
  """
  # Short warmup and cosine decay: these runs are a few hundred to a few
  # thousand steps, so the end of the schedule matters.
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, lr, min(100, steps // 10 + 1), max(steps, 2), lr * 0.05
  )
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt_state = tx.init(params)
  ema = jax.tree.map(jnp.copy, params) if ema_decay else None

  @jax.jit
  def step(params, opt_state, ema, batch, key, i):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch, key
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if ema is not None:
      # Warmed-up EMA: averages over ~i/10 steps early on, ema_decay later.
      d = jnp.minimum(ema_decay, (1.0 + i) / (10.0 + i))
      ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
    return params, opt_state, ema, loss

  root = jax.random.key(seed)
  losses = []
  start = time.perf_counter()
  for i in range(steps):
    if stop is not None and stop.is_set():
      raise CancelledError(name)
    batch = batch_fn(i)
    key = jax.random.fold_in(root, i)
    params, opt_state, ema, loss = step(
      params, opt_state, ema, batch, key, jnp.float32(i)
    )
    losses.append(loss)
    if log_every and (i + 1) % log_every == 0:
      _LOG.info("%s step %d/%d loss %.4f", name, i + 1, steps, float(loss))
  losses = np.asarray(jax.device_get(losses))
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"{name}: the pretraining loss became non-finite")
  summary = {
    "loss": float(losses[-max(1, steps // 10) :].mean()),
    "seconds": time.perf_counter() - start,
    "steps": steps,
  }
  return (ema if ema_decay else params), summary


# ---------------------------------------------------------------------------
# Autoencoder.
# ---------------------------------------------------------------------------


def autoencoder_loss(graphdef, kl_weight: float, ink_weight: float) -> LossFn:
  """Weighted L1 reconstruction + KL of the sampled posterior."""

  def loss_fn(params, batch, key):
    ae = nnx.merge(graphdef, params)
    x = batch["images"]
    mean, logvar = ae.encoder.moments(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    y = ae.decoder(z)
    # Ink (any channel above the black background) weighs ink_weight x.
    w = 1.0 + (ink_weight - 1.0) * (x.max(-1, keepdims=True) > -0.9)
    rec = jnp.mean(w * jnp.abs(y - x))
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    return rec + kl_weight * kl, (rec, kl)

  return loss_fn


def latent_stats(
  ae, images: np.ndarray, batch: int = 256
) -> tuple[float, float]:
  """Mean and std of the encoder means over ``images`` (for scale/shift)."""
  graphdef, params = nnx.split(ae.encoder)
  enc = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  means = [
    np.asarray(enc(params, images[i : i + batch]))
    for i in range(0, len(images), batch)
  ]
  z = np.concatenate(means)
  return float(z.mean()), float(z.std())


# ---------------------------------------------------------------------------
# Flux flow matching.
# ---------------------------------------------------------------------------


def logit_normal(key: jax.Array, shape, mean: float = 0.0, std: float = 1.0):
  """``sigmoid(N(mean, std))`` times in (0, 1) (SD3's logit-normal)."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape))


def flow_matching_loss(velocity: Callable[..., jax.Array]) -> LossFn:
  """Rectified-flow MSE; ``velocity(params, x_BLC, t_B, batch) -> v_BLC``.

  ``batch["x0"]`` holds the packed clean latents ``[B, L, C]``.
  """

  def loss_fn(params, batch, key):
    x0 = batch["x0"]
    k_t, k_eps = jax.random.split(key)
    t_B = logit_normal(k_t, (x0.shape[0],))
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = (1.0 - t_B[:, None, None]) * x0 + t_B[:, None, None] * eps
    v = velocity(params, x_t, t_B, batch)
    return jnp.mean((v - (eps - x0)) ** 2), None

  return loss_fn


def flux_velocity(graphdef, h_tokens: int, w_tokens: int):
  """``(params, x, t, batch) -> v`` for a Flux graph without guidance."""
  from leapalign_jax.families import flux

  def velocity(params, x_BLC, t_B, batch):
    model = nnx.merge(graphdef, params)
    return flux.call(model, x_BLC, t_B, batch, (h_tokens, w_tokens))

  return velocity


# ---------------------------------------------------------------------------
# Contrastive CLIP reward.
# ---------------------------------------------------------------------------


def augment(key: jax.Array, images_BHWC: jax.Array, strength: float):
  """Random Gaussian noise, blur and speckle on half the batch each.

  The reward must not be raised by artefacts a generator can produce under
  a reward gradient (noise, haze, isolated bright pixels), so it sees them
  on positives during training and learns to ignore them.
  """
  B = images_BHWC.shape[0]
  k = jax.random.split(key, 7)
  x = images_BHWC
  # Blur: a 3x3 binomial filter, mixed in with a random weight.
  kernel = jnp.outer(jnp.array([1.0, 2.0, 1.0]), jnp.array([1.0, 2.0, 1.0]))
  kernel = jnp.tile((kernel / 16.0)[:, :, None, None], (1, 1, 1, 3))
  blurred = jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=3,
  )
  w_blur = jax.random.uniform(k[0], (B, 1, 1, 1)) * (
    jax.random.uniform(k[1], (B, 1, 1, 1)) < 0.5
  )
  x = (1 - w_blur) * x + w_blur * blurred
  sigma = strength * jax.random.uniform(k[2], (B, 1, 1, 1))
  sigma = sigma * (jax.random.uniform(k[3], (B, 1, 1, 1)) < 0.5)
  x = x + sigma * jax.random.normal(k[4], x.shape)
  speck = jax.random.uniform(k[5], x.shape[:3] + (1,)) < 0.01
  on = jax.random.uniform(k[6], (B, 1, 1, 1)) < 0.5
  x = jnp.where(speck & on, 1.0, x)
  return jnp.clip(x, -1.0, 1.0)


def _box_blur(x_BHWC: jax.Array, size: int) -> jax.Array:
  """Depthwise ``size x size`` box filter (SAME padding)."""
  c = x_BHWC.shape[-1]
  kernel = jnp.full((size, size, 1, c), 1.0 / size**2)
  return jax.lax.conv_general_dilated(
    x_BHWC,
    kernel,
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=c,
  )


def hard_negatives(key: jax.Array, images_BHWC: jax.Array) -> jax.Array:
  """Corrupted renders no prompt should match: blobs and broken strokes.

  These are what a generator pushed by a reward gradient tends to produce
  (the strokes thickened into blobs, or cut into beads); the reward learns
  to rank them below the clean digit of the same colour and place.
  """
  B = images_BHWC.shape[0]
  k_mix, k_mask = jax.random.split(key)
  ink = (images_BHWC + 1.0) / 2.0  # [0, 1]
  blob = jnp.clip(3.0 * _box_blur(ink, 5), 0.0, 1.0)
  # Beads: keep the ink only on a coarse random checkerboard of 2x2 cells.
  H, W = ink.shape[1:3]
  cells = jax.random.uniform(k_mask, (B, H // 2, W // 2, 1)) < 0.5
  beads = ink * jnp.repeat(jnp.repeat(cells, 2, 1), 2, 2)
  pick = jax.random.uniform(k_mix, (B, 1, 1, 1)) < 0.5
  return jnp.where(pick, blob, beads) * 2.0 - 1.0


def clip_loss(graphdef, image_size: int, noise: float) -> LossFn:
  """Symmetric InfoNCE over the batch with the model's logit scale.

  Duplicate prompts in a batch are not negatives of each other: their
  targets share the probability mass. Each text also sees one corrupted
  copy of every image (``hard_negatives``) as an extra negative, and each
  image also sees every ``swap_ids`` text (the same prompt naming another
  digit): colour and position alone do not tell those apart, so the reward
  has to read the digit's shape.
  """

  def loss_fn(params, batch, key):
    clip = nnx.merge(graphdef, params)
    k_aug, k_neg = jax.random.split(key)
    x = augment(k_aug, batch["images"], noise)
    neg = hard_negatives(k_neg, batch["images"])
    both = pp.clip_preprocess(jnp.concatenate([x, neg]), size=image_size)
    img = clip.image_features(both)
    txt = clip.text_features(jnp.concatenate([batch["ids"], batch["swap_ids"]]))
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.clip(clip.logit_scale[...], 0.0, np.log(100.0)))
    B = batch["ids"].shape[0]
    logits = scale * txt @ img.T  # [2B texts, 2B images]
    combo = batch["combo"]
    # [B images, 2B texts]: a swapped text can name another image's combo.
    same = (
      combo[:, None] == jnp.concatenate([combo, batch["swap_combo"]])[None]
    ).astype(jnp.float32)
    t2i = jax.nn.log_softmax(logits[:B], 1)[:, :B]  # texts over 2B images
    i2t = jax.nn.log_softmax(logits[:, :B], 0).T  # images over 2B texts
    t2i = jnp.sum(same[:, :B] / same[:, :B].sum(1, keepdims=True) * t2i, 1)
    i2t = jnp.sum(same / same.sum(1, keepdims=True) * i2t, 1)
    return -0.5 * (jnp.mean(t2i) + jnp.mean(i2t)), None

  return loss_fn
