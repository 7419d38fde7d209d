"""Tiny random-weight SD3 run: the SD3 family end to end on a CPU.

  python -m leapalign_jax.main --config configs/tiny_sd3.py --workdir /tmp/t

Builds a tiny random SD3 world (``worlds/random_sd3.py``: MMDiT-X, the SD3
autoencoder's scaling, CLIP-L / bigG / T5 text encoders, a CLIP reward) under
the workdir, embeds a few prompts with the empty negative prompt, and runs
two LeapAlign steps with classifier-free guidance, a checkpoint, an
evaluation and the export. Nothing is learned: a plumbing check (used by the
tests). ``arg`` may name a method (``tiny_sd3.py:refl``).
"""

import ml_collections

from leapalign_jax import defaults
from leapalign_jax.families.sd3 import SD3_TARGETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The tiny SD3 config."""
  c = defaults.base()
  c.world = "random_sd3"
  c.model.family = "sd3"
  c.world_options = ml_collections.ConfigDict(
    {
      "num_train_prompts": 16,
      "num_eval_prompts": 4,
      "dir": "",  # share one world between runs (tests); "" = workdir/...
    }
  )
  if arg:
    c.method = arg
  # variant: the architecture `aot` compiles (the world's own sizes are
  # read from its files).
  c.sd3.update(variant="tiny", dtype="float32", remat="none")
  c.vae.update(variant="tiny", dtype="float32", remat="none")
  c.text.update(
    clip_max_length=16,
    t5_max_length=8,
    reward_max_length=16,
    batch_size=8,
    dtype="float32",
    cache_dtype="float32",
  )
  c.rewards = ml_collections.ConfigDict(
    {
      "clip": {
        "weight": 1.0,
        "path": "",
        "variant": "tiny",
        "dtype": "float32",
        "remat": "none",
        "attention": "auto",
      }
    }
  )
  c.lora.targets = SD3_TARGETS
  c.data.global_batch = 4
  c.sampling.update(height=32, width=32, num_steps=4, guidance=4.5)
  c.loss.lam = 1.0
  c.optim.lr = 1e-3
  c.train.update(num_steps=2, ckpt_every_steps=1, sample_every_steps=0)
  c.eval.update(
    num_prompts=4, images_per_prompt=1, num_steps=4, batch_size=4, grid_images=4
  )
  c.export.dtype = "float32"
  return c
