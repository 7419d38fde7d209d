"""configs/grpo_flux_dev.py: published settings, host checks, FLOP model."""

import importlib.util
import pathlib

import pytest

from leapalign_jax import families, flops, methods
from leapalign_jax.methods import grpo
from leapalign_jax.models import autoencoder, flux

PATH = pathlib.Path(__file__).parents[1] / "configs" / "grpo_flux_dev.py"


def _config(arg):
  spec = importlib.util.spec_from_file_location("grpo_cfg", PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", ["dance_grpo", "mix_grpo", "flow_grpo"])
def test_published_settings_validate_and_have_flops(name):
  c = _config(f"method={name},rewards=multi")
  methods.get(name).sample_choice(None, c.sampling.num_steps, c)
  g = grpo.options(c, name)
  assert g["group_size"] in (12, 24) and g["clip_range"] == 1e-4
  side = c.sampling.height // 8
  f = flops.train_step(
    c,
    families.get("flux"),
    flux.VARIANTS["dev"],
    autoencoder.VARIANTS["flux"],
    (side, side),
  )
  assert f.total > 0 and set(c.rewards) == {
    "hpsv2",
    "pickscore",
    "image_reward",
  }


def test_dance_grpo_numbers():
  c = _config("method=dance_grpo")
  g = grpo.options(c, "dance_grpo")
  # 16 prompts x 12 images, 9 of 15 trainable steps, 3 updates per rollout.
  assert c.data.global_batch * g["group_size"] == 192
  assert grpo.num_trained(16, g) == 9 and g["num_updates"] == 3
  assert (g["sde"], g["noise_level"], g["ignore_last"]) == (
    "dance_grpo",
    0.3,
    True,
  )
  m = _config("method=mix_grpo")
  gm = grpo.options(m, "mix_grpo")
  assert list(grpo.host_window_starts(300, 25, gm)[::25]) == list(range(12))
