"""End-to-end sampling: our jitted sampler vs diffusers' FluxPipeline.

Both sample the same tiny random FLUX pipeline (saved with diffusers, loaded
through our converters): same prompts, same initial noise, same number of
steps, text encoding excluded (embeddings are precomputed on both sides), VAE
decode included. Median of repeated runs after warm-up; prints a table and
writes ``bench/results/sampler.json``.

  python bench/sampler.py [--steps 28] [--repeats 5]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch_refs  # noqa: E402
from timing import median_time  # noqa: E402

from leapalign_jax import defaults, sampling  # noqa: E402
from leapalign_jax.convert import load_autoencoder, load_flux  # noqa: E402
from leapalign_jax.families import flux as flux_family  # noqa: E402
from leapalign_jax.families import flux_text  # noqa: E402
from leapalign_jax.generation import noise_for  # noqa: E402
from leapalign_jax.models.autoencoder import decode_fn  # noqa: E402

PROMPTS = ["a red digit seven on the left", "a blue four at the top"]
CONFIGS = {
  # name: (image size, hidden, heads, double, single)
  "tiny": (32, 32, 2, 1, 1),
  "small": (64, 128, 2, 2, 2),
}


def run(name, steps, repeats):
  size, hidden, heads, layers, single = CONFIGS[name]
  with tempfile.TemporaryDirectory() as tmp:
    root, pipe = torch_refs.tiny_flux_pipeline(
      Path(tmp),
      PROMPTS,
      size=size,
      hidden=hidden,
      heads=heads,
      layers=layers,
      single_layers=single,
    )
    c = defaults.base().text
    c.update(
      clip_path=root,
      t5_path=root,
      clip_tokenizer=root,
      t5_tokenizer=root,
      t5_max_length=16,
      batch_size=2,
      dtype="float32",
      cache_dtype="float32",
    )
    text = flux_text.TextEncoders(c)(PROMPTS)
    _, flux = load_flux(root)
    ae_cfg, ae = load_autoencoder(root)
  decode, vae_params = decode_fn(ae)
  graphdef, params = nnx.split(flux, nnx.Param)
  lh, lw, zc = ae_cfg.latent_shape(size, size)
  grid = (lh // 2, lw // 2)
  sampler = sampling.make_sampler(
    graphdef,
    lambda m, x, t, c: flux_family.call(m, x, t, c, grid, 3.5),
    decode,
    grid,
  )
  sigmas = jnp.asarray(sampling.get_schedule(steps, (lh // 2) * (lw // 2)))
  x1 = noise_for([0, 1], (lh, lw, zc))
  args = (
    params,
    vae_params,
    {k: jnp.asarray(text[k]) for k in flux_family.TEXT_FIELDS},
    jnp.asarray(x1),
    sigmas,
  )
  t0 = time.perf_counter()
  ours = np.asarray(sampler(*args))
  compile_s = time.perf_counter() - t0
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    t5, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=16)

  def torch_run():
    with torch.inference_mode():
      return pipe(
        prompt_embeds=t5,
        pooled_prompt_embeds=pooled,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=3.5,
        latents=torch.from_numpy(np.array(x1)),
        output_type="np",
      ).images

  ref = torch_run()
  err = float(np.max(np.abs(np.clip((ours + 1) / 2, 0, 1) - ref)))
  jax_s = median_time(lambda: sampler(*args), repeats)
  torch_s = median_time(torch_run, repeats)
  return dict(
    config=name,
    image_size=size,
    steps=steps,
    batch=len(PROMPTS),
    transformer_params=sum(p.numel() for p in pipe.transformer.parameters()),
    jax_s=jax_s,
    torch_s=torch_s,
    speedup=torch_s / jax_s,
    jax_compile_s=compile_s,
    max_abs_err_01=err,
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=28)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--configs", default="tiny,small")
  parser.add_argument("--out", default="bench/results/sampler.json")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  rows = [run(n, args.steps, args.repeats) for n in args.configs.split(",")]
  print(
    f"{'config':6} {'size':>4} {'steps':>5} {'jax s':>8} {'torch s':>8} "
    f"{'torch/jax':>9} {'compile s':>9} {'max err':>8}"
  )
  for r in rows:
    print(
      f"{r['config']:6} {r['image_size']:>4} {r['steps']:>5} {r['jax_s']:>8.3f} "
      f"{r['torch_s']:>8.3f} {r['speedup']:>8.2f}x {r['jax_compile_s']:>9.2f} "
      f"{r['max_abs_err_01']:>8.1e}"
    )
  record = dict(
    machine=dict(
      platform=platform.platform(),
      cpus=os.cpu_count(),
      jax=jax.__version__,
      torch=torch.__version__,
    ),
    results=rows,
  )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
