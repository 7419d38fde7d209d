"""A (prompt, seed) names one image: in ``sample`` and in evaluation alike.

On the tiny random world (``configs/tiny.py``): the held-out images that
evaluation draws are drawn again by ``generation.Sampler`` and by the
``python -m leapalign_jax.sample`` entry point from their prompt and the
seed ``samples.jsonl`` gives, whatever the order of the prompts, the batch
size, and from initial latents instead of seeds.
"""

import re

import jax
import numpy as np
import pytest

from leapalign_jax import (
  components,
  configs_io,
  errors,
  evaluation,
  generation,
  sample,
  sampling,
  sharding,
  worlds,
)

PER = 2  # images per held-out prompt
ATOL = 1e-5  # another batch composition may round differently


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  jax.config.update("jax_disable_most_optimizations", True)
  folder = str(tmp_path_factory.mktemp("world"))
  overrides = [
    f"world_options.dir={folder!r}",
    "mesh.num_devices=1",
    "eval.num_prompts=3",
    f"eval.images_per_prompt={PER}",
    "eval.batch_size=4",
  ]
  config = configs_io.load_config("configs/tiny.py", overrides)
  config = worlds.prepare(config, folder)
  comps = components.load(config, sharding.mesh_from_config(config.mesh))
  cache = comps.eval_cache
  imgs = evaluation.generate(
    comps,
    comps.params,
    cache,
    [0, 1, 2],
    seed=config.eval.seed,
    num_steps=config.eval.num_steps,
    images_per_prompt=PER,
  )
  prompts = [cache.records[i]["prompt"] for i in range(3)]
  yield {
    "overrides": overrides,
    "config": config,
    "images": (imgs + 1.0) / 2.0,  # [0, 1], as the sampler returns them
    "prompts": [p for p in prompts for _ in range(PER)],
    "seeds": [
      evaluation.image_seed(config.eval.seed, i, j, PER)
      for i in range(3)
      for j in range(PER)
    ],
  }
  jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="module")
def sampler(world):
  return generation.Sampler(world["config"])


def test_sampler_draws_the_evaluation_images(world, sampler):
  prompts, seeds = world["prompts"], world["seeds"]
  out = sampler(prompts, seeds)
  np.testing.assert_allclose(out.images, world["images"], atol=ATOL)
  assert np.abs(out.images[0] - out.images[1]).max() > 0.05  # seeds matter
  # Reversed list, another batch size: each image is the same.
  rev = sampler(prompts[::-1], seeds[::-1], batch_size=3)
  np.testing.assert_allclose(rev.images[::-1], out.images, atol=ATOL)
  # One image alone.
  one = sampler([prompts[3]], [seeds[3]], batch_size=1)
  np.testing.assert_allclose(one.images[0], out.images[3], atol=ATOL)
  # The same noise given as initial latents.
  lh, lw, c = sampler.latent_shape(32, 32)
  z = generation.noise_for(seeds, (lh, lw, c))
  lat = np.asarray(sampling.unpack_tokens(z, lh // 2, lw // 2))
  again = sampler(prompts, latents=lat)
  np.testing.assert_allclose(again.images, out.images, atol=ATOL)
  # A seed's noise does not depend on the other seeds of the call.
  np.testing.assert_array_equal(
    generation.noise_for([seeds[3]], (lh, lw, c))[0], z[3]
  )


def test_sample_command_draws_the_evaluation_images(world, tmp_path):
  out = tmp_path / "out"
  p = world["prompts"]
  s = world["seeds"]
  # Prompts in another order than evaluation's; every prompt x every seed.
  argv = ["--config", "configs/tiny.py", "--out", str(out), "--save-npy"]
  argv += ["--prompt", p[4], "--prompt", p[0], "--seed", str(s[0])]
  argv += ["--seed", str(s[5]), *world["overrides"]]
  assert sample.main(argv) == 0
  got_0 = np.load(out / f"prompt001_seed{s[0]}.npy")  # (p[0], s[0])
  got_5 = np.load(out / f"prompt000_seed{s[5]}.npy")  # (p[4], s[5])
  np.testing.assert_allclose(got_0, world["images"][0], atol=ATOL)
  np.testing.assert_allclose(got_5, world["images"][5], atol=ATOL)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"seeds": [0]}, "1 seeds for 2 prompts"),
    ({"seeds": [-1, 0]}, "seeds must lie in"),
    ({"seeds": [0, 1], "height": 20}, "multiples of 8"),
    ({"seeds": [0, 1], "num_steps": 0}, "at least 1 step"),
    ({}, "either seeds or initial latents"),
    ({"latents": np.zeros((2, 4, 4, 16))}, "need (2, 8, 8, 16)"),
  ],
)
def test_bad_requests_are_one_line_errors(sampler, world, kwargs, match):
  with pytest.raises(errors.UserError, match=re.escape(match)):
    sampler(world["prompts"][:2], **kwargs)
