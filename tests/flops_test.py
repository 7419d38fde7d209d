"""The analytical FLOP model: every method, LoRA vs full, remat."""

import importlib.util
import pathlib

import pytest

from leapalign_jax import flops, methods
from leapalign_jax.families import flux as flux_family
from leapalign_jax.models import autoencoder, flux

CONFIG = (
  pathlib.Path(__file__).parents[1] / "configs" / "leap_hpsv2_flux_dev.py"
)
FLUX = flux_family.FAMILY
DEV = flux.VARIANTS["dev"]
AE = autoencoder.VARIANTS["flux"]
LATENT = (90, 90)  # 720²: 45 x 45 = 2025 tokens + T5-512


def paper_config(arg=""):
  spec = importlib.util.spec_from_file_location("paper_cfg", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_forward_at_720_matches_flux_md():
  assert flops.dit_forward(DEV, 2025, 512) == pytest.approx(37.28e12, rel=1e-3)


@pytest.mark.parametrize("method", methods.names())
def test_every_registered_method_has_a_model(method):
  c = paper_config("lora=1")
  c.method = method
  c.data.global_batch = 1
  f = flops.train_step(c, FLUX, DEV, AE, LATENT)
  calls = flops.dit_calls(c, c.flux.remat != "none")
  fwd = flops.dit_forward(DEV, 2025, 512)
  assert calls.forwards >= c.sampling.num_steps and calls.grads >= 1
  # Between "forwards only" and "every call a full fine-tune backward".
  g = flops.images_per_prompt(c)  # G images per prompt (GRPO family)
  lo, hi = calls.forwards * fwd, (calls.forwards + 3 * calls.grads) * fwd
  assert g * lo < f.dit < g * hi
  assert f.hardware > f.total > 0


def test_leapalign_closed_form():
  c = paper_config()
  c.data.global_batch = 2
  parts = flops.dit_parts(DEV, 2025, 512)
  f = flops.train_step(c, FLUX, DEV, AE, LATENT)
  # Full fine-tune: 25 forwards + 2 backwards (input grads: linear +
  # 2 x attention; weight grads: linear), remat adds one forward per call.
  backward = 2 * parts.linear + 2 * parts.attention + 2 * parts.vec
  assert f.dit == pytest.approx(2 * (25 * parts.total + 2 * backward))
  assert f.recompute == pytest.approx(
    2 * 2 * parts.total
    + 2 * flops.vae_decode(AE, *LATENT)
    + 2 * sum(v for v, _, _ in flops.reward_forward(c))
  )


def test_lora_backward_skips_frozen_weight_gradients():
  full, lora = paper_config(), paper_config("lora=1")
  for c in (full, lora):
    c.data.global_batch = 1
  f_full = flops.train_step(full, FLUX, DEV, AE, LATENT)
  f_lora = flops.train_step(lora, FLUX, DEV, AE, LATENT)
  parts = flops.dit_parts(DEV, 2025, 512)
  adapters = flops.lora_forward(DEV, 2025, 512, 64)
  assert 0.02 < adapters / parts.total < 0.05  # rank 64: ~3% of a forward
  # LoRA: adapter forwards added, frozen weight gradients (2 x linear) gone.
  expected = f_full.dit + 25 * adapters - 2 * (parts.linear + parts.vec)
  assert f_lora.dit == pytest.approx(expected + 2 * 2 * adapters)


def test_chains_recompute_each_step_twice_under_remat():
  c = paper_config("lora=1")
  c.method = "full_backprop"
  assert flops.dit_calls(c, c.flux.remat != "none") == flops.Calls(25, 25, 2)
  c.flux.remat = "none"
  assert flops.dit_calls(c, c.flux.remat != "none") == flops.Calls(25, 25, 1)
  c.full_bp.truncation = "random"
  assert flops.dit_calls(c, c.flux.remat != "none").grads == 4  # round(mean_k)


def test_grpo_counts_group_rollouts_and_trained_steps():
  c = paper_config("lora=1")
  c.data.global_batch = 2
  c.method = "dance_grpo"
  c.sampling.num_steps = 16
  c.grpo.update(group_size=12, timestep_fraction=0.6)
  calls = flops.dit_calls(c, c.flux.remat != "none")
  assert calls == flops.Calls(16 + 9, 9, calls.recompute)  # int(15 * 0.6)
  f = flops.train_step(c, FLUX, DEV, AE, LATENT)
  c.data.global_batch = 1
  c.grpo.group_size = 6
  # Linear in the images: 2 prompts x 12 = 4 x (1 prompt x 6).
  assert f.total == pytest.approx(
    4 * flops.train_step(c, FLUX, DEV, AE, LATENT).total
  )
