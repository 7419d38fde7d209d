"""Our sampler vs diffusers' FluxPipeline, built from the same tiny components.

The torch pipeline (transformer, autoencoder, CLIP-L / T5 encoders and their
tokenizers, scheduler) is saved with ``save_pretrained``; our side loads the
same folder through the converters and the tokenizer loaders. Same prompts,
same initial noise, same steps: the text embeddings and the final images
must agree.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import torch_refs  # noqa: E402

from leapalign_jax import defaults, generation, sampling  # noqa: E402
from leapalign_jax.convert import load_autoencoder, load_flux  # noqa: E402
from leapalign_jax.families import flux as flux_family  # noqa: E402
from leapalign_jax.families import flux_text  # noqa: E402
from leapalign_jax.generation import noise_for  # noqa: E402
from leapalign_jax.models.autoencoder import decode_fn  # noqa: E402

pytestmark = pytest.mark.torch

PROMPTS = ["a red digit seven on the left", "a blue four at the top"]
SIZE, STEPS, T5_LEN = 32, 4, 16


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  return torch_refs.tiny_flux_pipeline(
    tmp_path_factory.mktemp("flux_pipeline"), PROMPTS, size=SIZE
  )


def text_config(root):
  c = defaults.base()
  c.flux.update(path=root, dtype="float32", remat="none")
  c.vae.update(path=root, dtype="float32", remat="none")
  c.text.update(
    clip_path=root,
    t5_path=root,
    clip_tokenizer=root,
    t5_tokenizer=root,
    t5_max_length=T5_LEN,
    batch_size=2,
    dtype="float32",
    cache_dtype="float32",
  )
  c.sampling.update(height=SIZE, width=SIZE, guidance=3.5)
  return c


def test_text_embeddings_match_pipeline(pipeline_dir):
  root, pipe = pipeline_dir
  ours = flux_text.TextEncoders(text_config(root).text)(PROMPTS)
  with torch.no_grad():
    t5, pooled, _ = pipe.encode_prompt(
      PROMPTS, PROMPTS, max_sequence_length=T5_LEN
    )
  np.testing.assert_allclose(ours["t5"], t5.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    ours["clip_pooled"], pooled.numpy(), rtol=1e-5, atol=1e-5
  )


def test_images_match_pipeline(pipeline_dir):
  """The public call (``generation.Sampler``) against the pipeline."""
  root, pipe = pipeline_dir
  sampler = generation.Sampler(text_config(root))
  out = sampler(
    PROMPTS,
    seeds=[0, 1],
    num_steps=STEPS,
    guidance=3.5,
    return_latents=True,
    batch_size=2,
  )
  x1 = noise_for([0, 1], sampler.latent_shape(SIZE, SIZE))
  kwargs = dict(
    height=SIZE,
    width=SIZE,
    num_inference_steps=STEPS,
    guidance_scale=3.5,
    latents=torch.from_numpy(np.array(x1)),
    max_sequence_length=T5_LEN,
  )
  with torch.no_grad():
    ref = pipe(PROMPTS, output_type="np", **kwargs).images
    ref_z = pipe(PROMPTS, output_type="latent", **kwargs).images
  assert out.images.shape == ref.shape
  err = float(np.max(np.abs(out.images - ref)))
  assert err < 2e-5, err
  # The returned latents are the decoder's input (the pipeline's packed
  # "latent" output).
  z = np.asarray(sampling.pack(jnp.asarray(out.latents)))
  np.testing.assert_allclose(z, ref_z.numpy(), atol=2e-5, rtol=0)
  # The same images from sampling.make_sampler over the Flux family's
  # velocity, the jitted function evaluation uses.
  text = flux_text.TextEncoders(text_config(root).text)(PROMPTS)
  _, flux = load_flux(root)
  ae_cfg, ae = load_autoencoder(root)
  decode, vae_params = decode_fn(ae)
  graphdef, params = nnx.split(flux, nnx.Param)
  lh, lw, _ = ae_cfg.latent_shape(SIZE, SIZE)
  grid = (lh // 2, lw // 2)
  fn = sampling.make_sampler(
    graphdef,
    lambda m, x, t, c: flux_family.call(m, x, t, c, grid, 3.5),
    decode,
    grid,
  )
  sigmas = sampling.get_schedule(STEPS, (lh // 2) * (lw // 2))
  cond = {k: text[k] for k in flux_family.TEXT_FIELDS}
  ours = fn(params, vae_params, cond, x1, jnp.asarray(sigmas))
  np.testing.assert_allclose(
    (np.asarray(ours) + 1) / 2, out.images, atol=1e-6, rtol=0
  )


def test_sample_command_writes_pngs(pipeline_dir, tmp_path):
  root, _ = pipeline_dir
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
    textwrap.dedent(f"""
    from leapalign_jax import defaults

    def get_config():
      c = defaults.base()
      c.flux.update(path={root!r}, dtype="float32", remat="none")
      c.vae.update(path={root!r}, dtype="float32", remat="none")
      c.text.update(clip_path={root!r}, t5_path={root!r}, clip_tokenizer={root!r},
                    t5_tokenizer={root!r}, t5_max_length={T5_LEN}, batch_size=2,
                    dtype="float32", cache_dtype="float32")
      c.sampling.update(height={SIZE}, width={SIZE})
      return c
  """)
  )
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "leapalign_jax.sample",
      "--config",
      str(cfg),
      "--prompt",
      PROMPTS[0],
      "--prompt",
      PROMPTS[1],
      "--seed",
      "0",
      "--seed",
      "1",
      "--out",
      str(out),
      "--num-steps",
      "2",
      "--height",
      str(SIZE),
      "--guidance",
      "2.0",
      "--save-npy",
    ],
    capture_output=True,
    text=True,
    env=env,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  files = sorted(os.listdir(out))
  stems = [f"prompt{i:03d}_seed{s}" for i in (0, 1) for s in (0, 1)]
  assert files == sorted(
    ["grid.png", "samples.jsonl"]
    + [s + ".png" for s in stems]
    + [s + ".npy" for s in stems]
  )
  lines = [
    json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()
  ]
  assert lines[3] == {
    "file": "prompt001_seed1.png",
    "prompt": PROMPTS[1],
    "seed": 1,
    "height": SIZE,
    "width": SIZE,
    "num_steps": 2,
    "guidance": 2.0,
  }
  x = np.load(out / "prompt001_seed1.npy")
  png = np.asarray(Image.open(out / "prompt001_seed1.png"))
  assert x.dtype == np.float32 and x.shape == (SIZE, SIZE, 3)
  assert np.abs(np.rint(x * 255) - png).max() <= 1
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "leapalign_jax.sample",
      "--config",
      str(cfg),
      "--prompt",
      "x",
      "--out",
      str(out),
      "flux.path=/nonexistent",
    ],
    capture_output=True,
    text=True,
    env=env,
  )
  assert r.returncode == 2 and "/nonexistent" in r.stderr
