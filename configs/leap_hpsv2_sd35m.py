"""LeapAlign on Stable Diffusion 3.5 Medium with HPSv2.1 (paper Table 4).

  # once: embed the prompts (prompt + empty negative prompt per row)
  python -m leapalign_jax.embed_prompts \
      --config configs/leap_hpsv2_sd35m.py:sd3=/ckpt/sd3.5-medium,hps=/ckpt/HPS_v2.1_compressed.pt \
      --prompts hpdv2_train.txt --out /data/hpdv2_train_sd3
  python -m leapalign_jax.embed_prompts \
      --config configs/leap_hpsv2_sd35m.py:sd3=/ckpt/sd3.5-medium,hps=/ckpt/HPS_v2.1_compressed.pt \
      --prompts hpdv2_test.txt --out /data/hpdv2_test_sd3
  # train (200 iterations), then evaluate the EMA weights
  python -m leapalign_jax.main \
      --config configs/leap_hpsv2_sd35m.py:sd3=/ckpt/sd3.5-medium,hps=/ckpt/HPS_v2.1_compressed.pt,train=/data/hpdv2_train_sd3,eval=/data/hpdv2_test_sd3 \
      --workdir gs://bucket/leap_hpsv2_sd35m

``sd3``: the stabilityai/stable-diffusion-3.5-medium diffusers snapshot root
(transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/ (OpenCLIP
bigG), text_encoder_3/ (T5-XXL), tokenizer/, tokenizer_2/, tokenizer_3/);
``sd3.path`` may instead be Stability's ``sd3.5_medium.safetensors``.
``method=refl|draft_lv|drtune|...`` runs a baseline in the same harness.

Settings (method.md §8.2, "SD3.5-Medium variant: 512×512, 200 iterations,
otherwise as for HPSv2.1"): full fine-tune of all 2.24 B MMDiT-X weights,
AdamW lr 1e-5 (wd 1e-4, clip 1.0), EMA 0.995, global batch 64, 200
iterations, 512×512, 25 training steps, LeapAlign α 0.3, λ 0.55, τ 0.1;
evaluation 400 HPDv2 test prompts × 4 images, 50 steps. Not stated by the
paper [U]: the CFG scale (4.5 here, the SD3.5-Medium model card's; a
third-party reproduction used 4.0, method.md §12.5) and the T5 length (256,
``StableDiffusion3Pipeline``'s default). Training uses the guided velocity
(``families/sd3.py``): each velocity is one transformer call on 2 x the
batch (unconditional and conditional rows).

Expected (paper, Table 4): HPSv2.1 0.2967 (SD3.5-M) -> 0.3915; ReFL 0.3833,
DRTune 0.3828, DRaFT-LV 0.3506.

Checked by shape only here (``abstract_run`` / ``aot``; no SD3.5 weights
were available to this project when it was written): the figures below are
only those actually measured.

Pod fit (``python -m leapalign_jax.aot --config configs/leap_hpsv2_sd35m.py
--topology v5p-32``, 2026-12-05, compiled on a 2-core CPU VM in 612 s):
16 chips, mesh fsdp 16; per chip arguments 4.24 GiB, outputs 2.29 (aliased),
temporaries 8.65, peak 10.44 GiB of 95.74: FITS. Model FLOPs per step
9.4 PFLOP (DiT 9.1 PFLOP, VAE 321.9 TFLOP, reward 45.8 TFLOP), 10.2 PFLOP
with rematerialisation.
"""

import ml_collections

from leapalign_jax import defaults, methods
from leapalign_jax.families.sd3 import SD3_TARGETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: sd3=, hps=, train=, eval=, method= (leapalign), lora=0|1."""
  args = defaults.parse_arg(
    arg, sd3="", hps="", train="", eval="", method="leapalign", lora="0"
  )
  if args["method"] not in methods.names():
    raise ValueError(
      f"unknown method {args['method']!r}; use one of {methods.names()}"
    )
  c = defaults.base()  # the paper's defaults (HPSv2.1 run)
  c.method = args["method"]
  c.model.family = "sd3"
  root = args["sd3"]
  c.sd3.update(path=root, variant="sd35_medium")
  c.vae.update(path=root, variant="sd3")
  # CLIP-L, bigG (text_encoder_2/ of the same root) and T5 of the snapshot.
  c.text.update(clip_path=root, t5_path=root, t5_max_length=256)
  c.rewards.hpsv2.path = args["hps"]
  c.data.train_cache = args["train"]
  c.data.eval_cache = args["eval"]
  c.sampling.update(height=512, width=512, num_steps=25, guidance=4.5)
  c.train.num_steps = 200
  c.lora.targets = SD3_TARGETS
  if args["lora"] not in ("0", "1"):
    raise ValueError(f"lora={args['lora']!r}: use lora=0 or lora=1")
  if args["lora"] == "1":
    c.lora.enabled = True
    c.sd3.param_dtype = "bfloat16"
  return c
