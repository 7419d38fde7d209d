"""Diffusers' ``FluxTransformer2DModel`` forward time (``accelerator.py``'s worker).

  python bench/accel_torch.py --spec '<json>' --out torch.json

Runs in its own process, so PyTorch and JAX never share a CUDA context and
the parent can stop it at its deadline. Random weights (the module's own
init) in bf16 on the GPU (fp32 on a CPU), batch 1, eager; with
``"compile": true`` also ``torch.compile`` at the first resolution listed
in ``compile_at``. Writes its JSON after every measurement (atomically), so
a stopped worker leaves what it measured.
"""

import argparse
import json
import os
import statistics
import time


def flux_kwargs(c: dict) -> dict:
  """diffusers' constructor arguments for a ``FluxConfig`` (as a dict)."""
  return dict(
    patch_size=1,
    in_channels=c["in_channels"],
    num_layers=c["depth"],
    num_single_layers=c["depth_single_blocks"],
    attention_head_dim=c["hidden_size"] // c["num_heads"],
    num_attention_heads=c["num_heads"],
    joint_attention_dim=c["context_in_dim"],
    pooled_projection_dim=c["vec_in_dim"],
    guidance_embeds=c["guidance_embed"],
    axes_dims_rope=tuple(c["axes_dim"]),
  )


def median_seconds(torch, fn, warmup: int, repeats: int, cuda: bool) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    if cuda:
      start = torch.cuda.Event(enable_timing=True)
      end = torch.cuda.Event(enable_timing=True)
      start.record()
      fn()
      end.record()
      end.synchronize()
      times.append(start.elapsed_time(end) / 1e3)
    else:
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def write(path: str, record: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--spec", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  spec = json.loads(args.spec)
  record = {"results": [], "compiled": []}
  try:
    import diffusers
    import torch
  except ImportError as e:
    record["error"] = f"not measured: {e}"
    write(args.out, record)
    return
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  dtype = torch.bfloat16 if cuda else torch.float32
  record.update(
    torch=torch.__version__,
    diffusers=diffusers.__version__,
    device=torch.cuda.get_device_name() if cuda else "cpu",
    dtype=str(dtype).removeprefix("torch."),
  )
  torch.manual_seed(0)
  t0 = time.perf_counter()
  torch.set_default_dtype(dtype)  # build in bf16 on the GPU: half the memory
  with torch.device(device):
    model = diffusers.FluxTransformer2DModel(**flux_kwargs(spec["flux"]))
  torch.set_default_dtype(torch.float32)
  model = model.to(dtype).eval()
  record["build_s"] = time.perf_counter() - t0
  write(args.out, record)
  c = spec["flux"]

  def inputs(h: int, w: int) -> dict:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack(
      [torch.zeros(h * w), rows.flatten(), cols.flatten()], -1
    )
    n_txt = spec["txt"]
    return dict(
      hidden_states=torch.randn(1, h * w, c["in_channels"]),
      encoder_hidden_states=torch.randn(1, n_txt, c["context_in_dim"]),
      pooled_projections=torch.randn(1, c["vec_in_dim"]),
      timestep=torch.tensor([0.5]),
      img_ids=img_ids,
      txt_ids=torch.zeros(n_txt, 3),
      guidance=torch.tensor([3.5]) if c["guidance_embed"] else None,
    )

  def on_device(x):
    if not torch.is_tensor(x):
      return x
    is_ids = x.ndim == 2 and x.shape[-1] == 3
    return x.to(device, torch.float32 if is_ids else dtype)

  def run(fn, h, w):
    kw = {k: on_device(v) for k, v in inputs(h, w).items()}

    def call():
      with torch.inference_mode():
        return fn(**kw, return_dict=False)[0]

    return call

  for name, (h, w) in spec["resolutions"].items():
    sec = median_seconds(
      torch, run(model, h, w), spec["warmup"], spec["repeats"], cuda
    )
    record["results"].append(
      {"resolution": name, "tokens": h * w, "eager_s": sec}
    )
    write(args.out, record)
  if spec.get("compile"):
    compiled = torch.compile(model)
    for name in spec["compile_at"]:
      h, w = spec["resolutions"][name]
      call = run(compiled, h, w)
      t0 = time.perf_counter()
      call()
      if cuda:
        torch.cuda.synchronize()
      first = time.perf_counter() - t0
      sec = median_seconds(torch, call, spec["warmup"], spec["repeats"], cuda)
      record["compiled"].append(
        {"resolution": name, "compile_s": first, "compiled_s": sec}
      )
      write(args.out, record)
  record["done"] = True
  write(args.out, record)


if __name__ == "__main__":
  main()
