"""The SD3 family end to end on the tiny random SD3 world.

``python -m leapalign_jax.main`` trains ``configs/tiny_sd3.py`` (CFG 4.5)
through the real loaders, stops and resumes; ``generation.Sampler`` samples
with classifier-free guidance exactly as a hand-written guided Euler loop;
``embed_prompts`` writes an SD3 prompt cache.
"""

import json
import os
import subprocess
import sys

import crash_harness as ch
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leapalign_jax import configs_io, data, embed_prompts, generation, sampling
from leapalign_jax.convert.sd3 import load_sd3
from leapalign_jax.families import sd3 as sd3_family
from leapalign_jax.families import sd3_text
from leapalign_jax.worlds import random_sd3

CONFIG = str(ch.REPO / "configs" / "tiny_sd3.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The SD3 world (models + caches), built once."""
  folder = str(tmp_path_factory.mktemp("sd3_world"))
  config = configs_io.load_config(
    CONFIG, [f"world_options.dir={folder!r}", "mesh.num_devices=1"]
  )
  return folder, random_sd3.prepare(config, "")


def _main(workdir, world_dir, steps, env):
  cmd = [
    sys.executable,
    "-m",
    "leapalign_jax.main",
    "--config",
    CONFIG,
    "--workdir",
    workdir,
    f"--config.world_options.dir={world_dir}",
    "--config.mesh.num_devices=1",
    f"--config.train.num_steps={steps}",
    "--config.eval.num_prompts=0",
  ]
  out = subprocess.run(
    cmd, env=env, capture_output=True, text=True, timeout=900
  )
  assert out.returncode == 0, out.stderr[-4000:]


def test_main_trains_resumes_and_exports(world, tmp_path):
  folder, config = world
  env = ch.command_env(str(tmp_path / "jax_cache"))
  env["PYTHONPATH"] = str(ch.REPO)
  workdir = str(tmp_path / "run")
  _main(workdir, folder, 2, env)
  _main(workdir, folder, 3, env)  # resumes from step 2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [line["step"] for line in lines] == [1, 2, 3]
  for line in lines:
    assert np.isfinite(line["train/loss"]) and line["train/grad_norm"] > 0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "3"
  # The export is an SD3 diffusers folder that our loader (and diffusers'
  # config.json reader) accept, with trained weights.
  cfg, trained = load_sd3(os.path.join(workdir, "export", "transformer"))
  _, base = load_sd3(config.sd3.path)
  assert cfg.depth == 3 and cfg.num_dual == 1
  diffs = [
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(
      jax.tree.leaves(nnx.state(trained, nnx.Param)),
      jax.tree.leaves(nnx.state(base, nnx.Param)),
    )
  ]
  assert max(diffs) > 0


def test_sampler_is_a_guided_euler_loop(world):
  folder, config = world
  sampler = generation.Sampler(config)
  prompts = ["a red digit seven on the left", "a blue four at the top"]
  out = sampler(prompts, [3, 4], num_steps=3, guidance=4.5, return_latents=True)
  plain = sampler(prompts, [3, 4], num_steps=3, guidance=1.0)
  assert out.images.shape == (2, 32, 32, 3)
  assert np.abs(out.images - plain.images).max() > 1e-3  # CFG matters
  # By hand: two separate transformer calls per step, v_u + g (v_c - v_u).
  text = sampler.text(prompts)
  geo_hw = (4, 4)
  model = nnx.merge(sampler._graphdef, sampler._params)
  x = jnp.asarray(generation.noise_for([3, 4], (8, 8, 16)))
  sig = sd3_family.schedule(config, 3, 16)
  for i in range(3):
    t = jnp.full((2,), sig[i])
    v_c = model(x, geo_hw, text["sd3_context"], text["sd3_pooled"], t)
    v_u = model(x, geo_hw, text["sd3_neg_context"], text["sd3_neg_pooled"], t)
    x = x + (sig[i + 1] - sig[i]) * (v_u + 4.5 * (v_c - v_u))
  z = sampling.unpack_tokens(x, *geo_hw)
  np.testing.assert_allclose(out.latents, z, atol=2e-5)


def test_text_encoders_embed_negative_prompt_per_row(world):
  _, config = world
  enc = sd3_text.TextEncoders(config, cache=False)
  out = enc(["a red digit seven on the left", "a green two"])
  neg = enc([config.sd3.negative_prompt])
  L = config.text.clip_max_length + config.text.t5_max_length
  assert out["sd3_context"].shape == (2, L, 96)
  assert out["sd3_pooled"].shape == (2, 16 + 24)
  for k in ("context", "pooled"):
    np.testing.assert_array_equal(
      out[f"sd3_neg_{k}"], np.repeat(neg[f"sd3_{k}"], 2, 0)
    )
  assert np.abs(out["sd3_context"][0] - out["sd3_context"][1]).max() > 0
  ident = enc.identity()
  assert ident["family"] == "sd3" and ident["negative_prompt"] == ""


def test_embed_prompts_command_writes_an_sd3_cache(world, tmp_path):
  _, config = world
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red digit seven\na blue four\n")
  overrides = [
    f"text.clip_path={config.text.clip_path}",
    f"text.t5_path={config.text.t5_path}",
    f"text.t5_tokenizer={config.text.t5_tokenizer}",
    f"sd3.clip_g_path={config.sd3.clip_g_path}",
    f"rewards.clip.path={config.rewards.clip.path}",
  ]
  rc = embed_prompts.main(
    [
      "--config",
      CONFIG,
      "--prompts",
      str(prompts),
      "--out",
      str(tmp_path / "cache"),
      *overrides,
    ]
  )
  assert rc == 0
  cache = data.PromptCache(str(tmp_path / "cache"))
  assert len(cache) == 2
  assert set(sd3_family.TEXT_FIELDS) <= set(cache.fields)
  row = cache[1]
  enc = sd3_text.TextEncoders.for_config(config)
  ref = enc(["a blue four"])
  for k in sd3_family.TEXT_FIELDS:
    np.testing.assert_allclose(row[k], ref[k][0], atol=1e-6)
  model_cfg, _ = load_sd3(config.sd3.path)
  sd3_family.check_cache(cache, model_cfg)  # accepted for this model


@pytest.mark.torch
def test_sampler_matches_stable_diffusion_3_pipeline(world):
  """Our CFG sampler vs diffusers' pipeline: same weights (read by diffusers
  from our exports), embeddings, noise and steps; fp32."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  folder, config = world
  sampler = generation.Sampler(config)
  prompts = ["a red digit seven on the left", "a blue four at the top"]
  z = np.random.default_rng(5).standard_normal((2, 8, 8, 16), np.float32)
  ours = sampler(
    prompts, latents=z, num_steps=3, guidance=4.5, return_latents=True
  )
  text = sampler.text(prompts)
  pipe = diffusers.StableDiffusion3Pipeline(
    transformer=diffusers.SD3Transformer2DModel.from_pretrained(
      os.path.join(folder, "transformer")
    ),
    vae=diffusers.AutoencoderKL.from_pretrained(os.path.join(folder, "vae")),
    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    text_encoder=None,
    tokenizer=None,
    text_encoder_2=None,
    tokenizer_2=None,
    text_encoder_3=None,
    tokenizer_3=None,
  )

  def t(k):
    return torch.from_numpy(np.ascontiguousarray(text[k]))

  with torch.no_grad():
    ref = pipe(
      prompt_embeds=t("sd3_context"),
      pooled_prompt_embeds=t("sd3_pooled"),
      negative_prompt_embeds=t("sd3_neg_context"),
      negative_pooled_prompt_embeds=t("sd3_neg_pooled"),
      latents=torch.from_numpy(z.transpose(0, 3, 1, 2).copy()),
      num_inference_steps=3,
      guidance_scale=4.5,
      height=32,
      width=32,
      output_type="np",
    ).images
  assert ref.shape == ours.images.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(
    np.clip(ours.images, 0.0, 1.0), ref, rtol=0, atol=2e-5
  )
  assert np.abs(ref - ref.mean()).max() > 1e-3  # not a constant image
