"""LeapAlign on FLUX.1-dev with the HPSv2.1 reward (paper Table 2, §8).

  # once: embed the prompts (HPDv2 train prompts / the 400 test prompts);
  # the HPSv2 ids are OpenCLIP's, as HPSv2 was trained (rewards/text.py)
  python -m leapalign_jax.embed_prompts \
      --config configs/leap_hpsv2_flux_dev.py:flux=/ckpt/FLUX.1-dev,hps=/ckpt/HPS_v2.1_compressed.pt \
      --prompts hpdv2_train.txt --out /data/hpdv2_train
  python -m leapalign_jax.embed_prompts \
      --config configs/leap_hpsv2_flux_dev.py:flux=/ckpt/FLUX.1-dev,hps=/ckpt/HPS_v2.1_compressed.pt \
      --prompts hpdv2_test.txt --out /data/hpdv2_test
  # train (300 iterations), then evaluate the EMA weights
  python -m leapalign_jax.main \
      --config configs/leap_hpsv2_flux_dev.py:flux=/ckpt/FLUX.1-dev,hps=/ckpt/HPS_v2.1_compressed.pt,train=/data/hpdv2_train,eval=/data/hpdv2_test \
      --workdir gs://bucket/leap_hpsv2

Settings (method.md §8): full fine-tune of all 11.9 B DiT weights, AdamW
lr 1e-5 (wd 1e-4, clip 1.0), EMA 0.995, global batch 64, 300 iterations,
720×720, 25 training steps, guidance 3.5; LeapAlign α 0.3, λ 0.55, τ 0.1.
Evaluation: 400 HPDv2 test prompts × 4 images, 50 steps.

Expected (paper, Table 2): HPSv2.1 0.3078 (FLUX.1-dev) → 0.4092; DRTune
0.3882, DRaFT-LV 0.3859, ReFL 0.3852 (select them with ``--config.method``).

Hardware: the paper used 16 GPUs (type not reported). The fp32 state (params,
EMA, Adam moments) is ~238 GB before activations, so the default mesh
(``mesh.shape=(1, -1, 1)``) shards everything FSDP over all devices, with
per-block remat (``flux.remat="full"``), the setting measured below.
Pod-fit check (``python -m leapalign_jax.aot --config <this> --topology
v5p-32``; TPU compiler's plan per chip, compiled on a CPU host):

  v5p-32 (16 chips): peak 29.58 GiB of 95.74 (arguments 13.08, temps 24.55)
  v5p-64 (32 chips): peak 15.78 GiB of 95.74 (arguments 7.53, temps 12.42)
  69.9 PFLOP per step (model FLOPs, analytical; 75.0 with rematerialisation;
  4.4 PFLOP per v5p-32 chip). Compiled with flux.attention=xla (before
  "auto", which now picks splash on TPU).

``:lora=1`` trains LoRA adapters (rank 64) over bf16 base weights instead
(an 80 GB GPU's budget, checked on one v5p chip as a proxy: ``--topology
v5p-2 --budget-gib 74.5 data.global_batch=4``: peak 47.49 GiB, arguments
27.68, temps 28.02; the GPU compiler plans memory differently).

Measured on one NVIDIA H200 (2026-12-04, jax 0.11.2, flax 0.12.10, cuDNN
9.19; ``python bench/accelerator.py``, random weights, attention "auto" =
cuDNN): ``:lora=1`` at 720², N = 25, one device, global batch 4: 8.75 s per
step (2.19 s per image; 4.25 PFLOP of model FLOPs, 49% MFU), compiler-planned
peak 39.9 GiB, compile 94 s; batch 1: 2.58 s, 31.5 GiB. With xla attention
the batch-4 step took 14.65 s. A full fine-tune does not fit one GPU: shard
it (mesh.shape) over several.
"""

import ml_collections

from leapalign_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Paper main run; ``arg``: flux=, hps=, train=, eval=, lora=0|1."""
  args = defaults.parse_arg(arg, flux="", hps="", train="", eval="", lora="0")
  c = defaults.base()  # the paper's defaults
  defaults.flux_dev_paths(c, args)
  defaults.flux_dev_lora(c, args["lora"])
  c.rewards.hpsv2.path = args["hps"]
  return c
