"""The embedded default: the digits world, end to end on a CPU.

  python -m leapalign_jax.main --config configs/digits.py --workdir runs/digits

The first run builds the world (leapalign_jax/worlds/digits_pipeline.py):
a T5 tokenizer and frozen tiny CLIP-L / T5 text encoders, prompt caches, a
tiny Flux autoencoder trained on the world's images, a base Flux trained
with the rectified-flow objective, a tiny CLIP reward trained contrastively,
and a held-out evaluator. It then aligns the base model with LeapAlign
against the CLIP reward, evaluates before and after, and prints a table and
the path of an image grid. Later runs with the same workdir (or the same
``world_options.dir``) reuse the built world.

Why this prompt mix tests the paper's claim. The base model's training data
makes the digits 5-9 ten times rarer than 0-4 (``rare_digits``), while the
alignment and evaluation prompts ask for every digit equally. The base model
therefore places and colours digits well (both are learnt first and are
decided by every step) but often draws the wrong or an illegible rare digit:
a structural error, fixed early in the trajectory (at high noise), which a
method that only updates the last denoising steps (ReFL, DRaFT-1) cannot
reach and LeapAlign's leaps from early steps can. The held-out evaluator,
which is never a training reward, reports digit / colour / position accuracy
so that reward hacking (reward up, accuracy down) is visible.

The reward has to read the digit. A tiny CLIP trained contrastively on
i.i.d. batches learns colour and position first (nearly every in-batch
negative differs in one of them) and, after 400 steps, ranked an image's own
digit above the nine others in only 27% of held-out renders (chance: 10%);
aligned against it, every method raised the reward and lowered digit
accuracy. The reward stage therefore builds each batch from a few
colour/position pairs (most negatives then differ only in the digit), adds
each prompt naming another digit as a text negative, and trains 1,200 steps:
digit ranking 68% (``stages.json``: ``reward.digit_rank_acc``).

``rewards.rule`` is a second, rule-based reward without gradient
(``rewards/digits_rule.py``, fitted by ``worlds/digits_rule.py``): a small
classifier's argmax checked against the prompt's digit, colour and position
(the fraction matched), GenEval's role in training. It is not the held-out
evaluator. At weight 0 it is only reported; the GRPO methods can train on it.

``get_config("fast")`` is a seconds-long version of the same pipeline (a few
steps per stage; nothing is learnt) for tests and smoke runs.
"""

import ml_collections

from leapalign_jax import defaults
from leapalign_jax.worlds import digits_pipeline


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The digits run; ``arg``: "" (the real run) or "fast" (CI sizes)."""
  c = defaults.base()
  c.world = "digits"
  # Every option and its default: digits_pipeline.DEFAULTS (sizes and steps
  # of each pretraining stage); the pretraining mix is this experiment's.
  c.world_options = ml_collections.ConfigDict(dict(digits_pipeline.DEFAULTS))
  c.world_options.update(rare_digits=(5, 6, 7, 8, 9), rare_factor=0.1)
  c.flux.update(dtype="float32", remat="none")
  c.vae.update(dtype="float32", remat="none")
  c.text.update(
    clip_max_length=16,
    t5_max_length=16,
    reward_max_length=16,
    batch_size=250,
    dtype="float32",
    cache_dtype="float32",
  )
  c.rewards = ml_collections.ConfigDict(
    {
      "clip": {
        "weight": 1.0,
        "path": "",
        "dtype": "float32",
        "remat": "none",
        "scale": "cosine",
      },
      # The rule-based reward (GenEval's role in training; no gradient):
      # weight 0 = reported at evaluation only. The GRPO family can
      # optimise it (rewards.rule.weight=1, rewards.clip.weight=0; the CLIP
      # entry stays, as the rule reads its prompt ids); direct-gradient
      # methods refuse it. Its path is set by the world (rule.npz).
      "rule": {
        "kind": "digits_rule",
        "weight": 0.0,
        "path": "",
        "ids": "clip",
        "score": "fraction",
      },
    }
  )
  c.mesh.num_devices = 1  # a CPU host: one device
  c.data.global_batch = 32
  c.sampling.update(height=32, width=32, num_steps=12, guidance=1.0)
  c.loss.lam = 1.0  # cosine reward < 1: the hinge is always active
  c.optim.update(lr=1e-4, weight_decay=0.0, ema_decay=0.9)
  c.train.update(
    num_steps=100, ckpt_every_steps=50, sample_every_steps=0, log_every_steps=10
  )
  c.eval.update(
    num_prompts=250,
    images_per_prompt=1,
    num_steps=12,
    batch_size=125,
    grid_images=40,
    before=True,
  )
  c.export.dtype = "float32"
  if arg == "fast":
    c.world_options.update(
      num_train_prompts=16,
      pretrain_images=64,
      ae_steps=2,
      ae_batch=8,
      flux_hidden=32,
      flux_heads=2,
      flux_depth=1,
      flux_single_depth=1,
      flux_steps=2,
      flux_batch=8,
      reward_hidden=32,
      reward_layers=1,
      reward_steps=2,
      reward_batch=8,
      text_hidden=32,
    )
    c.data.global_batch = 4
    c.sampling.num_steps = 4
    c.train.update(num_steps=2, ckpt_every_steps=1, log_every_steps=1)
    c.eval.update(num_prompts=8, num_steps=4, batch_size=8, grid_images=8)
  elif arg:
    raise ValueError(f"configs/digits.py takes '' or 'fast', not {arg!r}")
  return c
