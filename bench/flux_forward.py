"""Flux forward: our jitted JAX model vs diffusers' eager PyTorch model.

Same weights (the torch model is saved and loaded through ``load_flux``), same
inputs, same CPU; median of repeated runs after warm-up. Prints a table and
writes ``bench/results/flux_forward.json``.

  python bench/flux_forward.py [--repeats 20] [--configs tiny,medium]
"""

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from flax import nnx
from timing import median_time

from leapalign_jax.convert import load_flux

CONFIGS = {
  # name: (heads, layers, single layers, image tokens (h, w), text tokens)
  "tiny": dict(heads=2, layers=1, single=1, hw=(8, 8), txt=32),
  "medium": dict(heads=4, layers=2, single=4, hw=(16, 16), txt=64),
}


def build(spec, folder):
  torch.manual_seed(0)
  model = FluxTransformer2DModel(
    patch_size=1,
    in_channels=64,
    num_layers=spec["layers"],
    num_single_layers=spec["single"],
    attention_head_dim=128,
    num_attention_heads=spec["heads"],
    joint_attention_dim=256,
    pooled_projection_dim=128,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
  ).eval()
  model.save_pretrained(folder)
  return model


def inputs(spec, batch=2):
  rng = np.random.default_rng(0)
  h, w = spec["hw"]
  ids = np.stack(
    [np.zeros(h * w), np.repeat(np.arange(h), w), np.tile(np.arange(w), h)], -1
  ).astype(np.float32)
  return dict(
    img=rng.standard_normal((batch, h * w, 64), np.float32),
    txt=rng.standard_normal((batch, spec["txt"], 256), np.float32),
    y=rng.standard_normal((batch, 128), np.float32),
    t=np.full((batch,), 0.6, np.float32),
    g=np.full((batch,), 3.5, np.float32),
    img_ids=ids,
    txt_ids=np.zeros((spec["txt"], 3), np.float32),
  )


def run(name, spec, repeats):
  with tempfile.TemporaryDirectory() as tmp:
    tmodel = build(spec, tmp)
    _, jmodel = load_flux(tmp)
  x = inputs(spec)
  B = x["img"].shape[0]
  graphdef, params = nnx.split(jmodel, nnx.Param)

  @jax.jit
  def jax_forward(params, img, txt, y, t, g):
    model = nnx.merge(graphdef, params)
    return model(
      img=img,
      img_ids=jnp.broadcast_to(x["img_ids"], (B, *x["img_ids"].shape)),
      txt=txt,
      txt_ids=jnp.zeros((B, spec["txt"], 3)),
      timesteps=t,
      y=y,
      guidance=g,
    )

  jx = [jnp.asarray(x[k]) for k in ("img", "txt", "y", "t", "g")]
  t0 = time.perf_counter()
  out_j = jax_forward(params, *jx).block_until_ready()
  compile_s = time.perf_counter() - t0
  tx = {k: torch.from_numpy(v) for k, v in x.items()}

  def torch_forward():
    with torch.inference_mode():
      return tmodel(
        hidden_states=tx["img"],
        encoder_hidden_states=tx["txt"],
        pooled_projections=tx["y"],
        timestep=tx["t"],
        img_ids=tx["img_ids"],
        txt_ids=tx["txt_ids"],
        guidance=tx["g"],
        return_dict=False,
      )[0]

  out_t = torch_forward().numpy()
  err = float(np.max(np.abs(np.asarray(out_j) - out_t)) / np.max(np.abs(out_t)))
  jax_s = median_time(lambda: jax_forward(params, *jx), repeats, warmup=3)
  torch_s = median_time(torch_forward, repeats, warmup=3)
  n_params = sum(p.numel() for p in tmodel.parameters())
  return dict(
    config=name,
    params=n_params,
    batch=B,
    image_tokens=spec["hw"][0] * spec["hw"][1],
    text_tokens=spec["txt"],
    jax_ms=1e3 * jax_s,
    torch_ms=1e3 * torch_s,
    speedup=torch_s / jax_s,
    jax_compile_s=compile_s,
    max_rel_err=err,
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--configs", default="tiny,medium")
  parser.add_argument("--out", default="bench/results/flux_forward.json")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  rows = [run(n, CONFIGS[n], args.repeats) for n in args.configs.split(",")]
  header = (
    f"{'config':8} {'params':>10} {'tokens':>7} {'jax ms':>8} "
    f"{'torch ms':>9} {'torch/jax':>9} {'rel err':>8}"
  )
  print(header)
  for r in rows:
    print(
      f"{r['config']:8} {r['params']:>10,} "
      f"{r['image_tokens'] + r['text_tokens']:>7} {r['jax_ms']:>8.2f} "
      f"{r['torch_ms']:>9.2f} {r['speedup']:>8.2f}x {r['max_rel_err']:>8.1e}"
    )
  record = dict(
    machine=dict(
      platform=platform.platform(),
      cpus=os.cpu_count(),
      jax=jax.__version__,
      torch=torch.__version__,
      device=str(jax.devices()[0]),
    ),
    results=rows,
  )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
