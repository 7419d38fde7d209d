"""Cost of one HPSv2.1-shaped reward forward+backward on this machine.

ViT-H-14 widths (vision 1280 × 32 layers, text 1024 × 24 layers) at reduced
depth, loaded through ``rewards.get("hpsv2")`` from an OpenCLIP-layout file
with random weights; 720² images in [-1, 1] -> ``hps_preprocess`` -> 224².
The gradient is w.r.t. the images only (no weight gradients: the backward of
a block costs about one forward). Per-layer costs come from two depths of
each tower (the blocks are identical, so cost is linear in depth); the
full-depth estimate is ``fixed + 32 · vision_layer + 24 · text_layer``.

  python bench/reward_cost.py [--batch 1] [--repeats 3] [--remat none]
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leapalign_jax import rewards
from leapalign_jax.convert import export_clip
from leapalign_jax.models import clip

FULL = clip.VARIANTS["vit-h-14"]
FULL_DEPTH = (FULL.vision.num_hidden_layers, FULL.text.num_hidden_layers)


def checkpoint(folder: str, vision_layers: int, text_layers: int) -> str:
  cfg = dataclasses.replace(
    FULL,
    vision=dataclasses.replace(FULL.vision, num_hidden_layers=vision_layers),
    text=dataclasses.replace(FULL.text, num_hidden_layers=text_layers),
  )
  path = os.path.join(
    folder, f"h14_v{vision_layers}_t{text_layers}.safetensors"
  )
  model = nnx.eval_shape(lambda: clip.CLIP(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  state = jax.tree.map(
    lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)),
    state,
  )
  export_clip(nnx.merge(graphdef, state), path, layout="openclip")
  return path


def timed(fn, args, repeats: int) -> tuple[float, float]:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - t0)
  return first, statistics.median(runs)


def measure(path: str, batch: int, repeats: int, remat: str) -> dict:
  r = rewards.get("hpsv2", path=path, remat=remat)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-1, 1, (batch, 720, 720, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 49407, (batch, 77)), jnp.int32)
  fwd = jax.jit(r.score)
  grad = jax.jit(
    jax.value_and_grad(lambda p, im, t: r.score(p, im, t).sum(), 1)
  )
  fwd_first, fwd_s = timed(fwd, (r.params, x, ids), repeats)
  grad_first, grad_s = timed(grad, (r.params, x, ids), repeats)
  return dict(
    forward_s=fwd_s,
    forward_backward_s=grad_s,
    compile_and_first_forward_s=fwd_first,
    compile_and_first_fwd_bwd_s=grad_first,
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--remat", default="none")
  args = parser.parse_args()
  depths = [(2, 2), (4, 2), (2, 4)]
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    for v, t in depths:
      path = checkpoint(tmp, v, t)
      rows[(v, t)] = measure(path, args.batch, args.repeats, args.remat)
      os.remove(path)
      print(f"vision {v:2d} / text {t:2d} layers: {rows[(v, t)]}", flush=True)
  out = {}
  # The text tower runs forward only in both programs (no gradient reaches
  # it), so its per-layer cost is the forward slope; the fwd+bwd slope is
  # within noise of it (2 shared cores) and sometimes negative.
  per_t_fwd = (rows[(2, 4)]["forward_s"] - rows[(2, 2)]["forward_s"]) / 2
  for key in ("forward_s", "forward_backward_s"):
    base, dv = rows[(2, 2)][key], rows[(4, 2)][key]
    per_v, per_t = (dv - base) / 2, per_t_fwd
    fixed = base - 2 * per_v - 2 * per_t
    full = fixed + FULL_DEPTH[0] * per_v + FULL_DEPTH[1] * per_t
    out[key] = dict(
      measured_v2_t2=base,
      per_vision_layer=per_v,
      per_text_layer=per_t,
      fixed=fixed,
      estimate_v32_t24=full,
    )
    print(
      f"{key}: 2+2 layers {base:.3f} s; per vision layer {per_v:.3f} s, "
      f"per text layer {per_t:.3f} s, rest {fixed:.3f} s -> full ViT-H-14 "
      f"(32 + 24 layers) ≈ {full:.2f} s at batch {args.batch}"
    )
  result = dict(
    batch=args.batch,
    remat=args.remat,
    image="720x720 -> hps_preprocess -> 224x224, fp32",
    machine=f"{platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
    jax=jax.__version__,
    rows={f"v{v}_t{t}": r for (v, t), r in rows.items()},
    scaled=out,
  )
  os.makedirs("bench/results", exist_ok=True)
  name = f"bench/results/reward_cost_b{args.batch}_{args.remat}.json"
  with open(name, "w") as f:
    json.dump(result, f, indent=2)
  print(name)


if __name__ == "__main__":
  main()
