"""Tiny random-weight run: the whole pipeline on a CPU in seconds.

  python -m leapalign_jax.main --config configs/tiny.py --workdir /tmp/tiny

Builds tiny random Flux / autoencoder / CLIP-L + T5 / CLIP-reward checkpoints
under the workdir (saved and loaded through the real converters), embeds a
few prompts, and runs two LeapAlign steps, a checkpoint and an evaluation.
Nothing is learned: use it to check an install, a code change or a method
(``--config.method=drtune``). Used by the tests.
"""

import ml_collections

from leapalign_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The tiny config; ``arg`` may name a method (``tiny.py:refl``)."""
  c = defaults.base()
  c.world = "random"
  c.world_options = ml_collections.ConfigDict(
    {
      "flux_hidden": 64,
      "text_hidden": 32,
      "num_train_prompts": 16,
      "num_eval_prompts": 4,
      "dir": "",  # share one world between runs (tests); "" = workdir/world
    }
  )
  if arg:
    c.method = arg
  # variants: the architectures `aot` compiles (the random world's own
  # sizes are set by world_options and read from its files).
  c.flux.update(variant="tiny", dtype="float32", remat="none")
  c.vae.update(variant="tiny", dtype="float32", remat="none")
  c.text.update(
    clip_max_length=16,
    t5_max_length=16,
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
  c.data.global_batch = 8
  c.sampling.update(height=32, width=32, num_steps=4, guidance=3.5)
  c.loss.lam = 1.0
  c.optim.lr = 1e-3
  c.train.update(num_steps=2, ckpt_every_steps=1, sample_every_steps=0)
  c.eval.update(
    num_prompts=4, images_per_prompt=1, num_steps=4, batch_size=4, grid_images=4
  )
  c.export.dtype = "float32"
  return c
