"""Analytical model FLOPs of a training step (for ``aot`` and MFU).

XLA's ``cost_analysis()`` counts a scanned layer stack once (and a loop with
traced bounds not at all), so the step's FLOPs are counted here from the
model configs: matmuls and convolutions as ``2 * MACs``, attention as
``4 * L^2 * width`` per layer (QK^T and PV); norms, activations and the
optimizer are left out. Flux's forward at 720² with T5-512 (L = 2537) is
about 37 TF per image (flux.md §11 item 15), the figure ``dit_forward``
reproduces.

A differentiated call costs its forward, a backward of twice that, and one
more forward when rematerialised (``remat`` != "none"; "dots" / "names"
recompute less, so this is an upper bound).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections


def dit_forward(c: Any, n_img: int, n_txt: int) -> float:
  """Forward FLOPs of one Flux call on one image (``FluxConfig`` ``c``)."""
  D, M = c.hidden_size, c.mlp_hidden
  per_stream = D * 3 * D + D * D + 2 * D * M  # qkv, proj, MLP (double)
  single = D * (3 * D + M) + (D + M) * D  # linear1, linear2
  per_token = c.depth * per_stream + c.depth_single_blocks * single
  L = n_img + n_txt
  matmul = 2 * per_token * L
  embed = 2 * (n_txt * c.context_in_dim * D + n_img * 2 * c.in_channels * D)
  attention = (c.depth + c.depth_single_blocks) * 4 * L * L * D
  # Per image, not per token: modulations (hoisted), embedders, final adaLN.
  vec = 2 * (
    c.depth * 2 * 6 * D * D + c.depth_single_blocks * 3 * D * D + 2 * D * D
  ) + 2 * (3 * 256 * D + 3 * D * D)
  return float(matmul + embed + attention + vec)


def _conv(k: int, c_in: int, c_out: int, pixels: int) -> int:
  return 2 * k * k * c_in * c_out * pixels


def _resnet(c_in: int, c_out: int, pixels: int) -> int:
  flops = _conv(3, c_in, c_out, pixels) + _conv(3, c_out, c_out, pixels)
  return flops + (_conv(1, c_in, c_out, pixels) if c_in != c_out else 0)


def vae_decode(c: Any, latent_h: int, latent_w: int) -> float:
  """Forward FLOPs of the autoencoder's decoder on one latent."""
  chans = c.channels
  px = latent_h * latent_w
  C = chans[-1]
  flops = _conv(3, c.z_channels, C, px)
  # mid: resnet, single-head attention over the pixels, resnet.
  flops += 2 * _resnet(C, C, px) + 2 * 4 * C * C * px + 4 * px * px * C
  c_in = C
  for i in reversed(range(len(chans))):
    for _ in range(c.num_res_blocks + 1):
      flops += _resnet(c_in, chans[i], px)
      c_in = chans[i]
    if i:
      px *= 4
      flops += _conv(3, c_in, c_in, px)
  return float(flops + _conv(3, chans[0], c.out_ch, px))


def _tower(width: int, hidden: int, layers: int, tokens: int) -> float:
  per_token = layers * (4 * width * width + 2 * width * hidden)
  return float(2 * per_token * tokens + layers * 4 * tokens**2 * width)


def clip_forward(c: Any) -> tuple[float, float]:
  """``(vision, text)`` forward FLOPs of a CLIP score on one image."""
  v, t = c.vision, c.text
  vision = 0.0
  if v is not None:
    patches = (v.image_size // v.patch_size) ** 2
    vision = (
      _tower(
        v.hidden_size, v.intermediate_size, v.num_hidden_layers, patches + 1
      )
      + 2 * patches * v.patch_size**2 * v.num_channels * v.hidden_size
    )
  text = 0.0
  if t is not None:
    text = _tower(
      t.hidden_size,
      t.intermediate_size,
      t.num_hidden_layers,
      t.max_position_embeddings,
    )
  return vision, text


def dit_calls(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """``(forwards, differentiated)`` DiT calls per image of one step.

  Upper bounds where the method stops early at a drawn step (ReFL,
  DRTune): the rollout is counted in full.
  """
  T, m = config.sampling.num_steps, config.method
  if m == "leapalign":
    n = config.leap.num_leaps
    return T + (n if config.leap.grad_passes == "recompute" else 0), n
  if m == "refl":
    return T, 1
  if m == "draft_k":
    return T, config.draft.k
  if m == "draft_lv":
    return T + config.draft.lv_n, 1 + config.draft.lv_n
  if m == "drtune":
    return T + config.drtune.k, config.drtune.k
  if m == "full_bp":
    return T, T
  raise ValueError(f"no FLOP model for method {m!r}")


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one training step over the global batch, by part."""

  dit: float
  vae: float
  reward: float

  @property
  def total(self) -> float:
    return self.dit + self.vae + self.reward


def reward_forward(config: ml_collections.ConfigDict) -> list[tuple]:
  """``(vision, text, remat)`` per weighted reward, from their ``variant``."""
  from leapalign_jax.models import clip

  out = []
  for name, entry in config.rewards.items():
    if float(entry.get("weight", 1.0)) == 0.0:
      continue  # evaluation-only: not computed in the training step
    kind = entry.get("kind") or name
    variant = entry.get("variant") or (
      "vit-l-14" if kind == "aesthetic" else ""
    )
    if variant not in clip.VARIANTS:
      raise ValueError(f"rewards.{name}.variant={variant!r} is not a CLIP")
    c = clip.VARIANTS[variant]
    if kind == "aesthetic":
      c = c.with_towers(("vision",))
    vision, text = clip_forward(c)
    out.append((vision, text, entry.get("remat", "none")))
  return out


def train_step(
  config: ml_collections.ConfigDict,
  flux_cfg: Any,
  ae_cfg: Any,
  latent_hw: tuple[int, int],
) -> StepFlops:
  """Model FLOPs of one step of ``config.method`` (see module doc).

  Args:
    config: the run config (method, batch, remat, rewards with variants).
    flux_cfg, ae_cfg: the Flux and autoencoder configs.
    latent_hw: the latent's height and width (packed tokens: a quarter).
  """
  B = config.data.global_batch
  lh, lw = latent_hw
  n_img, n_txt = (lh // 2) * (lw // 2), config.text.t5_max_length
  forwards, grads = dit_calls(config)
  extra = 2 + (config.flux.remat != "none")
  dit = B * dit_forward(flux_cfg, n_img, n_txt) * (forwards + extra * grads)
  decodes = 1 + (config.draft.lv_n if config.method == "draft_lv" else 0)
  vae_x = 3 + (config.vae.remat != "none")
  vae = B * decodes * vae_x * vae_decode(ae_cfg, lh, lw)
  reward = sum(
    B * decodes * ((3 + (remat != "none")) * vision + text)
    for vision, text, remat in reward_forward(config)
  )
  return StepFlops(float(dit), float(vae), float(reward))
