"""Analytical FLOPs of a training step (for ``aot`` and MFU).

XLA's ``cost_analysis()`` counts a scanned layer stack once (and a loop with
traced bounds not at all), so the step's FLOPs are counted here from the
model configs: matmuls and convolutions as ``2 * MACs``, attention as
``4 * L^2 * width`` per layer (QK^T and PV); norms, activations and the
optimizer are left out. Flux's forward at 720² with T5-512 (L = 2537) is
about 37 TF per image (flux.md §11 item 15), the figure ``dit_forward``
reproduces.

Two counts (``StepFlops``):

* **model FLOPs** (``total``; the MFU convention): every forward, plus for
  each differentiated call its backward. A backward propagates the input
  gradient through every layer (1x the layer matmuls) and attention (2x),
  and computes weight gradients (another 1x) only for weights that train:
  all of them for a full fine-tune, the adapters alone for LoRA (whose
  frozen base needs no weight gradient). Frozen models (decoder, reward)
  cost forward + input gradient.
* **hardware FLOPs** (``hardware``): model FLOPs plus what rematerialisation
  recomputes (one more forward of each checkpointed call; "dots" / "names"
  recompute less, so this is an upper bound).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class DitFlops:
  """One Flux forward on one image, by kind of work."""

  linear: float  # token-wise matmuls (blocks, embedders, final layer)
  attention: float  # QK^T and PV
  vec: float  # per-image: modulations, time/guidance/vector embedders

  @property
  def total(self) -> float:
    return self.linear + self.attention + self.vec


def dit_parts(c: Any, n_img: int, n_txt: int) -> DitFlops:
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
  return DitFlops(float(matmul + embed), float(attention), float(vec))


def dit_forward(c: Any, n_img: int, n_txt: int) -> float:
  """Forward FLOPs of one Flux call on one image (``FluxConfig`` ``c``)."""
  return dit_parts(c, n_img, n_txt).total


def lora_forward(c: Any, n_img: int, n_txt: int, rank: int) -> float:
  """Forward FLOPs of rank-``rank`` adapters on every block linear.

  Counts the default targets (``models.lora.FLUX_TARGETS``: qkv, proj and
  both MLP matmuls of every block), ``2 r (in + out)`` per token each.
  """
  D, M = c.hidden_size, c.mlp_hidden
  per_stream = (D + 3 * D) + (D + D) + (D + M) + (M + D)
  single = (D + 3 * D) + (D + M) + (D + D) + (M + D)
  per_token = c.depth * 2 * per_stream + c.depth_single_blocks * single
  return float(2 * rank * per_token * (n_img + n_txt))


def sd3_parts(c: Any, n_img: int, n_txt: int) -> DitFlops:
  """Forward FLOPs of one SD3 / SD3.5 pass on one image (``SD3Config`` ``c``).

  Every block runs qkv, proj and the MLP on both streams, except the last
  block's context stream (qkv only); the first ``num_dual`` blocks add a
  second attention (qkv, proj) and a self-attention over the image tokens.
  A guided velocity makes two passes (``Family.calls_per_velocity``).
  """
  D, M = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
  stream = 4 * D * D + 2 * D * M  # qkv, proj, MLP
  img = c.depth * stream + c.num_dual * 4 * D * D
  txt = (c.depth - 1) * stream + 3 * D * D
  embed = (
    n_img * c.in_features * D
    + n_txt * c.context_in_dim * D
    + n_img * D * c.out_features
  )
  linear = 2 * (n_img * img + n_txt * txt + embed)
  L = n_img + n_txt
  attention = c.depth * 4 * L * L * D + c.num_dual * 4 * n_img * n_img * D
  mods = (
    c.depth * 6  # context streams but the last
    - 6
    + 2
    + (c.depth - c.num_dual) * 6  # image streams
    + c.num_dual * 9
    + 2  # final adaLN
  )
  vec = 2 * (mods * D * D + 256 * D + D * D + c.pooled_dim * D + D * D)
  return DitFlops(float(linear), float(attention), float(vec))


def sd3_lora_forward(c: Any, n_img: int, n_txt: int, rank: int) -> float:
  """Forward FLOPs of rank-``rank`` adapters on SD3's default targets.

  ``families.sd3.SD3_TARGETS``: qkv, proj (of both attentions) and both MLP
  matmuls of each stream, ``2 r (in + out)`` per token each.
  """
  D, M = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
  stream = 4 * D + 2 * D + 2 * (D + M)
  img = c.depth * stream + c.num_dual * (4 * D + 2 * D)
  txt = (c.depth - 1) * stream + 4 * D
  return float(2 * rank * (n_img * img + n_txt * txt))


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


def image_reward_forward(c: Any) -> tuple[float, float]:
  """``(vision, text)`` forward FLOPs of ImageReward on one image.

  BLIP's ViT like a CLIP tower; the BERT text tower adds, per layer, a
  cross-attention whose keys and values project the image tokens from the
  ViT's width (the MLP head is negligible).
  """
  v, t = c.vision, c.text
  patches = (v.image_size // v.patch_size) ** 2
  vision = (
    _tower(
      v.hidden_size, int(v.hidden_size * v.mlp_ratio), v.num_layers, patches + 1
    )
    + 2 * patches * v.patch_size**2 * 3 * v.hidden_size
  )
  L, D, n = c.text_length, t.hidden_size, patches + 1
  cross = (
    2 * 2 * L * D * D  # q and out projections
    + 2 * 2 * n * t.encoder_width * D  # k and v of the image tokens
    + 4 * L * n * D  # scores and weighted sum
  )
  text = _tower(D, t.intermediate_size, t.num_layers, L) + t.num_layers * cross
  return vision, float(text)


@dataclasses.dataclass(frozen=True)
class Calls:
  """DiT calls per image of one step.

  Upper bounds where a method stops at a drawn step (ReFL, DRTune): the
  rollout is counted in full.
  """

  forwards: int  # every forward, the differentiated calls' included
  grads: int  # differentiated calls (each adds a backward)
  recompute: int  # forwards rematerialisation adds per differentiated call


def images_per_prompt(config: ml_collections.ConfigDict) -> int:
  """Images one step generates per prompt: G for the GRPO family, else 1."""
  from leapalign_jax.methods import grpo

  if config.method in grpo.VARIANTS:
    return int(config.grpo.group_size)
  return 1


def dit_calls(config: ml_collections.ConfigDict, remat: bool) -> Calls:
  """How many DiT calls one step of ``config.method`` makes per image.

  ``remat``: the model rematerialises its blocks (``<section>.remat``).
  """
  from leapalign_jax.methods import grpo

  T, m = config.sampling.num_steps, config.method
  remat = int(remat)
  if m in grpo.VARIANTS:
    # A T-step rollout, then each image trains K recorded steps once
    # (spread over the inner updates); the KL adds a reference forward.
    g = grpo.options(config, m)
    k = grpo.num_trained(T, g)
    return Calls(T + k + k * (g["kl_beta"] > 0), k, remat)
  if m == "leapalign":
    n = config.leap.num_leaps
    extra = n if config.leap.grad_passes == "recompute" else 0
    return Calls(T + extra, n, remat)
  if m == "refl":
    return Calls(T, 1, remat)
  if m == "draft_lv":
    return Calls(T + config.draft.lv_n, 1 + config.draft.lv_n, remat)
  if m == "drtune":
    return Calls(T + config.drtune.k, config.drtune.k, remat)
  # The differentiated chains checkpoint every sampling step as well: their
  # backward reruns each step's forward, then each block's (remat).
  if m == "draft_k":
    return Calls(T, config.draft.k, 1 + remat)
  if m == "full_backprop":
    k = T
    if config.full_bp.truncation == "random":  # its expected K
      k = int(min(max(round(config.full_bp.mean_k), 1), T))
    return Calls(T, k, 1 + remat)
  raise ValueError(f"no FLOP model for method {m!r}")


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one training step over the global batch, by part.

  ``dit`` / ``vae`` / ``reward`` are model FLOPs; ``recompute`` is what
  rematerialisation adds on top of them (module doc).
  """

  dit: float
  vae: float
  reward: float
  recompute: float = 0.0

  @property
  def total(self) -> float:
    """Model FLOPs (the MFU numerator)."""
    return self.dit + self.vae + self.reward

  @property
  def hardware(self) -> float:
    """Model FLOPs plus rematerialisation."""
    return self.total + self.recompute


def reward_forward(config: ml_collections.ConfigDict) -> list[tuple]:
  """``(vision, text, remat)`` per weighted reward, from their ``variant``."""
  from leapalign_jax.models import clip

  out = []
  for name, entry in config.rewards.items():
    if float(entry.get("weight", 1.0)) == 0.0:
      continue  # evaluation-only: not computed in the training step
    kind = entry.get("kind") or name
    if kind in ("python", "digits_rule"):
      continue  # a host scorer: no accelerator FLOPs
    if kind == "image_reward":
      from leapalign_jax.models import image_reward

      ir = image_reward.VARIANTS[entry.get("variant") or "imagereward"]
      out.append((*image_reward_forward(ir), entry.get("remat", "none")))
      continue
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


def _grpo_names() -> tuple[str, ...]:
  from leapalign_jax.methods import grpo

  return tuple(grpo.VARIANTS)


def dit_backward(parts: DitFlops, lora_fwd: float, lora: bool) -> float:
  """Backward FLOPs of one differentiated DiT call (module doc)."""
  grad_input = parts.linear + 2 * parts.attention + parts.vec
  if lora:  # weight gradients for the adapters only
    return grad_input + 2 * lora_fwd
  return grad_input + parts.linear + parts.vec


def train_step(
  config: ml_collections.ConfigDict,
  family: Any,
  model_cfg: Any,
  ae_cfg: Any,
  latent_hw: tuple[int, int],
) -> StepFlops:
  """FLOPs of one step of ``config.method`` over the global batch.

  Args:
    config: the run config (method, batch, LoRA, rewards with variants).
    family: the run's model family (``families.Family``: its ``dit_flops``,
      ``adapter_flops``, ``text_tokens`` and config section).
    model_cfg, ae_cfg: the flow model's and the autoencoder's configs.
    latent_hw: the latent's height and width (packed tokens: a quarter).
  """
  B = config.data.global_batch * images_per_prompt(config)
  lh, lw = latent_hw
  n_img, n_txt = (lh // 2) * (lw // 2), family.text_tokens(config)
  calls = dit_calls(config, config[family.section].remat != "none")
  # A guided velocity (CFG) makes several passes per image.
  passes = family.calls_per_velocity(
    family.guidance(model_cfg, config.sampling.guidance)
  )
  one = family.dit_flops(model_cfg, n_img, n_txt)
  parts = DitFlops(
    one.linear * passes, one.attention * passes, one.vec * passes
  )
  lora = bool(config.lora.enabled)
  adapters = (
    family.adapter_flops(model_cfg, n_img, n_txt, config.lora.rank)
    * lora
    * passes
  )
  fwd = parts.total + adapters
  dit = B * (
    calls.forwards * fwd + calls.grads * dit_backward(parts, adapters, lora)
  )
  recompute = B * calls.grads * calls.recompute * fwd
  decodes = 1 + (config.draft.lv_n if config.method == "draft_lv" else 0)
  decode = vae_decode(ae_cfg, lh, lw)
  # Frozen decoder and reward: forward + input gradient (about as much);
  # the GRPO family needs no reward gradient: forward only, no remat.
  grad = config.method not in _grpo_names()
  vae = B * decodes * (1 + grad) * decode
  recompute += B * decodes * grad * (config.vae.remat != "none") * decode
  reward = 0.0
  for vision, text, remat in reward_forward(config):
    reward += B * decodes * ((1 + grad) * vision + text)
    recompute += B * decodes * grad * (remat != "none") * vision
  return StepFlops(float(dit), float(vae), float(reward), float(recompute))
