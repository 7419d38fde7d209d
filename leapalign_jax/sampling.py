"""Rectified-flow sampling: shifted sigma schedule, latent packing, Euler rollouts.

Function names mirror BFL's ``flux/sampling.py`` where an upstream
counterpart exists (``time_shift``, ``get_lin_function``, ``get_schedule``,
``get_noise``, ``pack``, ``unpack``, ``denoise``). Conventions (method.md §1,
flux.md §4–5):

* t = 1 is pure noise, t = 0 the clean latent; the model predicts the velocity
  v = noise - data and a step is ``x <- x + (t_next - t_cur) * v``.
* The schedule is computed on the host in float64 and stored as float32
  ``sigmas_T1`` with ``T + 1`` entries, ``sigmas[0] = 1`` and ``sigmas[T] = 0``.
* Latents are NHWC ``[B, H/8, W/8, 16]`` before packing and ``[B, L, 64]``
  after; the packed feature order is ``c * 4 + ph * 2 + pw`` as in torch.
* A velocity function has the signature
  ``velocity_fn(params, x_BLC, t_B) -> v_BLC`` (fp32 latents, per-sample time).

Rollouts keep latents and Euler updates in fp32 whatever dtype the model
computes in. ``rollout`` and ``rollout_capture`` are gradient-free: they stop
the gradient of their inputs, so they may sit inside a differentiated function
(their traced loop bounds make them while loops, which JAX cannot reverse).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

VelocityFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
IntLike = int | jax.Array


# ---------------------------------------------------------------------------
# Schedule (host side, float64).
# ---------------------------------------------------------------------------


def time_shift(mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
  """Exponential time shift ``e^mu / (e^mu + (1/t - 1)^sigma)`` in float64.

  Args:
    mu: shift parameter (log of the shift factor).
    sigma: exponent applied to ``1/t - 1`` (1.0 for Flux).
    t: times in [0, 1]; t = 0 maps to 0 and t = 1 to 1 exactly.

  Returns:
    The shifted times, float64, same shape as ``t``.
  """
  t = np.asarray(t, dtype=np.float64)
  with np.errstate(divide="ignore"):
    ratio = np.where(t > 0, 1.0 / np.where(t > 0, t, 1.0) - 1.0, np.inf)
  e_mu = math.exp(mu)
  return np.where(t > 0, e_mu / (e_mu + ratio**sigma), 0.0)


def get_lin_function(
  x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15
) -> Callable[[float], float]:
  """Returns the line through ``(x1, y1)`` and ``(x2, y2)`` (μ vs. tokens)."""
  slope = (y2 - y1) / (x2 - x1)
  intercept = y1 - slope * x1
  return lambda x: slope * x + intercept


def get_schedule(
  num_steps: int,
  image_seq_len: int,
  base_shift: float = 0.5,
  max_shift: float = 1.15,
  shift: bool = True,
) -> np.ndarray:
  """Flux sigma grid: ``linspace(1, 0, T + 1)``, shifted by μ(L) if ``shift``.

  Args:
    num_steps: number of Euler steps T.
    image_seq_len: packed image token count L (2025 at 720x720).
    base_shift: μ at L = 256.
    max_shift: μ at L = 4096.
    shift: apply the resolution-dependent shift (dev); False for schnell.

  Returns:
    ``sigmas_T1``, float32 ``[T + 1]``, from exactly 1 down to exactly 0.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  t_T1 = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
  if shift:
    mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
    t_T1 = time_shift(mu, 1.0, t_T1)
  t_T1[0], t_T1[-1] = 1.0, 0.0
  return t_T1.astype(np.float32)


# ---------------------------------------------------------------------------
# Latents: noise, packing, position ids.
# ---------------------------------------------------------------------------


def get_noise(
  key: jax.Array,
  num_samples: int,
  height: int,
  width: int,
  dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
  """Standard normal VAE-latent noise, NHWC ``[B, 2⌈H/16⌉, 2⌈W/16⌉, 16]``."""
  shape = (num_samples, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
  return jax.random.normal(key, (*shape, 16), dtype=dtype)


# Seeds name images: ``jax.random.key(seed)`` takes any 32-bit unsigned int.
MAX_SEED = 2**32 - 1


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
  """Key data ``[N, 2]`` uint32 of ``jax.random.key(seed)`` per seed.

  Raises:
    ValueError: for a seed outside ``[0, MAX_SEED]``.
  """
  bad = [s for s in seeds if not 0 <= int(s) <= MAX_SEED]
  if bad:
    raise ValueError(f"seeds must lie in [0, {MAX_SEED}]; got {bad[:3]}")
  keys = [jax.random.key_data(jax.random.key(int(s))) for s in seeds]
  return np.asarray(keys, np.uint32).reshape(len(keys), -1)


def seed_noise(
  keys_N2: jax.Array, latent_shape: tuple[int, int, int]
) -> jax.Array:
  """Packed initial noise ``[N, L, 4C]``, one image per key.

  Row ``n`` is ``pack(normal(key_n, [1, h, w, C]))[0]`` for the latent
  ``latent_shape = (h, w, C)``: a function of the image's seed alone
  (``seed_keys``), whatever its prompt, its place in a list or the batch.
  ``leapalign_jax.sample`` and evaluation draw noise only through here.
  """

  def one(key_data):
    key = jax.random.wrap_key_data(key_data)
    return pack(jax.random.normal(key, (1, *latent_shape), jnp.float32))[0]

  return jax.vmap(one)(jnp.asarray(keys_N2))


def pack(z_BHWC: jax.Array) -> jax.Array:
  """Packs 2x2 latent patches into tokens: ``[B, H, W, C] -> [B, HW/4, 4C]``.

  The feature index is ``c * 4 + ph * 2 + pw``, i.e. the order of the torch
  layout ``b c (h ph) (w pw) -> b (h w) (c ph pw)`` used by BFL and diffusers.
  """
  B, H, W, C = z_BHWC.shape
  if H % 2 or W % 2:
    raise ValueError(f"Latent height/width must be even, got {(H, W)}.")
  z = z_BHWC.reshape(B, H // 2, 2, W // 2, 2, C)  # b h ph w pw c
  z = z.transpose(0, 1, 3, 5, 2, 4)  # b h w c ph pw
  return z.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(x_BLC: jax.Array, height: int, width: int) -> jax.Array:
  """Exact inverse of :func:`pack`; ``height``/``width`` are in pixels.

  Args:
    x_BLC: packed latent ``[B, ⌈H/16⌉ * ⌈W/16⌉, 4C]``.
    height: image height in pixels.
    width: image width in pixels.

  Returns:
    NHWC latent ``[B, 2⌈H/16⌉, 2⌈W/16⌉, C]``.
  """
  return unpack_tokens(x_BLC, math.ceil(height / 16), math.ceil(width / 16))


def unpack_tokens(x_BLC: jax.Array, h_tokens: int, w_tokens: int) -> jax.Array:
  """Inverse of :func:`pack` for an ``h_tokens x w_tokens`` token grid.

  Unlike :func:`unpack` it does not assume Flux's 8x autoencoder, so it also
  serves smaller autoencoders (the digits world's 4x one).
  """
  B, L, C4 = x_BLC.shape
  h, w = h_tokens, w_tokens
  if h * w != L or C4 % 4:
    raise ValueError(
      f"Cannot unpack {x_BLC.shape} to a {h}x{w} token grid"
      " (4*C features per token expected)."
    )
  z = x_BLC.reshape(B, h, w, C4 // 4, 2, 2)  # b h w c ph pw
  z = z.transpose(0, 1, 4, 2, 5, 3)  # b h ph w pw c
  return z.reshape(B, 2 * h, 2 * w, C4 // 4)


def img_ids(batch: int, h_tokens: int, w_tokens: int) -> jax.Array:
  """Image position ids ``(0, row, col)``, row-major, float32 ``[B, hw, 3]``."""
  rows, cols = jnp.meshgrid(
    jnp.arange(h_tokens, dtype=jnp.float32),
    jnp.arange(w_tokens, dtype=jnp.float32),
    indexing="ij",
  )
  ids_L3 = jnp.stack([jnp.zeros_like(rows), rows, cols], axis=-1)
  ids_L3 = ids_L3.reshape(h_tokens * w_tokens, 3)
  return jnp.broadcast_to(ids_L3, (batch, *ids_L3.shape))


def txt_ids(batch: int, seq: int) -> jax.Array:
  """Text position ids: all zeros, float32 ``[B, seq, 3]``."""
  return jnp.zeros((batch, seq, 3), jnp.float32)


# ---------------------------------------------------------------------------
# Euler integration.
# ---------------------------------------------------------------------------


def euler_step(
  x_BLC: jax.Array, v_BLC: jax.Array, s_cur: jax.Array, s_next: jax.Array
) -> jax.Array:
  """One Euler step ``x + (s_next - s_cur) * v`` in fp32 (s_next < s_cur)."""
  dt = (s_next - s_cur).astype(jnp.float32)
  return x_BLC.astype(jnp.float32) + dt * v_BLC.astype(jnp.float32)


def time_batch(s: jax.Array, batch: int) -> jax.Array:
  """Broadcasts a scalar sigma to the per-sample time vector ``t_B`` (fp32)."""
  return jnp.full((batch,), s, dtype=jnp.float32)


def velocity_at(
  velocity_fn: VelocityFn,
  params: Any,
  x_BLC: jax.Array,
  sigmas_T1: jax.Array,
  i: IntLike,
) -> jax.Array:
  """Model velocity at loop index ``i`` (dynamic index into the grid)."""
  return velocity_fn(params, x_BLC, time_batch(sigmas_T1[i], x_BLC.shape[0]))


def step_at(
  velocity_fn: VelocityFn,
  params: Any,
  x_BLC: jax.Array,
  sigmas_T1: jax.Array,
  i: IntLike,
) -> jax.Array:
  """Euler step number ``i``: from ``sigmas[i]`` to ``sigmas[i + 1]``."""
  v_BLC = velocity_at(velocity_fn, params, x_BLC, sigmas_T1, i)
  return euler_step(x_BLC, v_BLC, sigmas_T1[i], sigmas_T1[i + 1])


def denoise(
  velocity_fn: VelocityFn,
  params: Any,
  x_BLC: jax.Array,
  sigmas_T1: jax.Array,
) -> jax.Array:
  """Integrates all T steps (``lax.scan``) from ``sigmas[0]`` to ``sigmas[T]``.

  Differentiable (plain reverse mode keeps one set of residuals per step; wrap
  ``velocity_fn`` in ``jax.checkpoint`` to keep only the latents).

  Returns:
    The final latent x0, fp32 ``[B, L, C]``.
  """

  def body(x, s_2):
    v = velocity_fn(params, x, time_batch(s_2[0], x.shape[0]))
    return euler_step(x, v, s_2[0], s_2[1]), None

  s_T2 = jnp.stack([sigmas_T1[:-1], sigmas_T1[1:]], axis=-1)
  x0_BLC, _ = jax.lax.scan(body, x_BLC.astype(jnp.float32), s_T2)
  return x0_BLC


def rollout(
  velocity_fn: VelocityFn,
  params: Any,
  x_BLC: jax.Array,
  sigmas_T1: jax.Array,
  start: IntLike,
  stop: IntLike,
) -> jax.Array:
  """Gradient-free Euler segment: runs steps ``start, ..., stop - 1``.

  ``x_BLC`` is the latent at ``sigmas[start]``; the result is the latent at
  ``sigmas[stop]``. The bounds may be traced ints (a while loop); an empty
  range (``stop <= start``) returns ``x_BLC`` unchanged.
  """
  params = jax.lax.stop_gradient(params)
  x_BLC = jax.lax.stop_gradient(x_BLC).astype(jnp.float32)

  def body(i, x):
    return step_at(velocity_fn, params, x, sigmas_T1, i)

  return jax.lax.fori_loop(start, stop, body, x_BLC)


def rollout_capture(
  velocity_fn: VelocityFn,
  params: Any,
  x_BLC: jax.Array,
  sigmas_T1: jax.Array,
  capture_N: jax.Array,
  stop: IntLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Gradient-free rollout from ``sigmas[0]`` that records a few latents.

  Only the running latent and the N captured ones are kept (memory does not
  depend on T). ``capture_N`` holds loop indices; entry n of the result is the
  latent *at* ``sigmas[capture_N[n]]`` (the input of step ``capture_N[n]``).

  Args:
    velocity_fn: ``(params, x_BLC, t_B) -> v_BLC``.
    params: model parameters (no gradient flows to them).
    x_BLC: the noise x1 at ``sigmas[0]``.
    sigmas_T1: the grid, ``[T + 1]``.
    capture_N: int32 ``[N]`` loop indices in ``[0, stop]`` (may be traced).
    stop: stop after step ``stop - 1`` (traced int allowed; a while loop);
      None runs all T steps with a fixed-length scan.

  Returns:
    ``(x_stop_BLC, x_NBLC)``: the latent at ``sigmas[stop]`` (x0 when ``stop``
    is None) and the captured latents. Indices beyond ``stop`` capture zeros.
  """
  params = jax.lax.stop_gradient(params)
  x_BLC = jax.lax.stop_gradient(x_BLC).astype(jnp.float32)
  capture_N = jnp.asarray(capture_N, jnp.int32)

  def record(i, x, xs_NBLC):
    hit_N111 = (capture_N == i)[:, None, None, None]
    return jnp.where(hit_N111, x[None], xs_NBLC)

  def body(i, carry):
    x, xs_NBLC = carry
    xs_NBLC = record(i, x, xs_NBLC)
    return step_at(velocity_fn, params, x, sigmas_T1, i), xs_NBLC

  num_steps = sigmas_T1.shape[0] - 1
  stop = num_steps if stop is None else stop
  xs_NBLC = jnp.zeros((capture_N.shape[0], *x_BLC.shape), jnp.float32)
  x_BLC, xs_NBLC = jax.lax.fori_loop(0, stop, body, (x_BLC, xs_NBLC))
  return x_BLC, record(stop, x_BLC, xs_NBLC)


def rollout_with_grad(
  velocity_fn: VelocityFn,
  params: Any,
  x_BLC: jax.Array,
  sigmas_T1: jax.Array,
  start: IntLike,
  num_steps: int,
  *,
  skip_before: IntLike | None = None,
  remat: bool = True,
) -> jax.Array:
  """Differentiable Euler segment: steps ``start, ..., start + num_steps - 1``.

  A ``lax.scan`` of static length with a traced ``start``; the gradient flows
  through the whole chain (model inputs are not detached). With ``remat`` each
  step is a ``jax.checkpoint``, so reverse mode stores one latent per step and
  recomputes the model call.

  Args:
    velocity_fn: ``(params, x_BLC, t_B) -> v_BLC``.
    params: model parameters.
    x_BLC: latent at ``sigmas[start]`` (or at ``sigmas[skip_before]``).
    sigmas_T1: the grid, ``[T + 1]``.
    start: first loop index (traced allowed).
    num_steps: number of steps (static).
    skip_before: optional traced loop index; steps before it are skipped (the
      identity), so ``x_BLC`` must then be the latent at
      ``sigmas[skip_before]``. Gives a traced-length segment without a while
      loop (a backward pass skips those steps too).
    remat: checkpoint every step.

  Returns:
    The latent at ``sigmas[start + num_steps]``, fp32.
  """

  def full_step(p, x, i):
    return step_at(velocity_fn, p, x, sigmas_T1, i)

  def skipping_step(p, x, i):
    return jax.lax.cond(i >= skip_before, full_step, _skip_step, p, x, i)

  step = full_step if skip_before is None else skipping_step
  if remat:
    step = jax.checkpoint(step, prevent_cse=False)

  def body(x, i):
    return step(params, x, i), None

  idx_N = jnp.asarray(start, jnp.int32) + jnp.arange(num_steps, dtype=jnp.int32)
  x_BLC, _ = jax.lax.scan(body, x_BLC.astype(jnp.float32), idx_N)
  return x_BLC


def _skip_step(params: Any, x_BLC: jax.Array, i: jax.Array) -> jax.Array:
  del params, i
  return x_BLC


def make_sampler(
  graphdef: Any,
  velocity: Callable[..., jax.Array],
  decode: Callable,
  token_grid: tuple[int, int],
  with_latents: bool = False,
) -> Callable:
  """A jitted ``(states, vae_params, cond, x1, sigmas) -> images``.

  Args:
    graphdef: the flow model's ``nnx`` graph.
    velocity: ``(model, x_BLC, t_B, cond) -> v_BLC`` (a family's velocity
      with its guidance bound).
    decode: ``(vae_params, z_BHWC) -> images``.
    token_grid: the packed latent's ``(h, w)`` token grid.
    with_latents: also return the denoised NHWC latents.

  The returned function takes the model's state (or a tuple of states to
  merge, e.g. LoRA + base), the conditioning dict, packed noise
  ``[B, L, C]`` and the sigma grid; images are NHWC in ``[-1, 1]``.
  """
  from flax import nnx

  h_tok, w_tok = token_grid

  @jax.jit
  def sample(states, vae_params, cond, x1, sigmas):
    states = states if isinstance(states, tuple) else (states,)
    model = nnx.merge(graphdef, *states)
    x0 = denoise(lambda _, x, t: velocity(model, x, t, cond), None, x1, sigmas)
    z = unpack_tokens(x0, h_tok, w_tok)
    imgs = jnp.clip(decode(vae_params, z), -1.0, 1.0)
    return (imgs, z) if with_latents else imgs

  return sample
