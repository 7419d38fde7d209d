"""LeapAlign on FLUX.1-dev with the PickScore reward (paper Table 3).

  python -m leapalign_jax.main \
      --config configs/leap_pickscore_flux_dev.py:flux=/ckpt/FLUX.1-dev,pickscore=/ckpt/PickScore_v1,train=/data/hpdv2_train,eval=/data/hpdv2_test \
      --workdir gs://bucket/leap_pickscore

As the HPSv2.1 run but α 0.1 and λ 0.4. The paper's λ = 0.4 only makes sense
on the raw cosine (PickScore's ×100 logit scale puts every score far above
λ, so the hinge would never be active): training uses ``scale: "cosine"``,
and evaluation also reports the usual ×100 PickScore (a weight-0 entry).

Expected (paper, Table 3): PickScore 22.79 (FLUX.1-dev) → 25.76; DRTune
25.10, DRaFT-LV 24.96, ReFL 25.24.

Hardware: as ``leap_hpsv2_flux_dev.py`` (same DiT, VAE, batch, mesh
``(1, -1, 1)`` FSDP and ``remat="full"``; a ViT-H/14 reward of the same size,
which is 0.1 % of the step's FLOPs): measured there, peak 29.58 GiB per chip
on a v5p-32 and 15.78 GiB on a v5p-64. ``:lora=1`` as there.
"""

import ml_collections

from leapalign_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """PickScore run; ``arg``: flux=, pickscore=, train=, eval=, lora=0|1."""
  args = defaults.parse_arg(
    arg, flux="", pickscore="", train="", eval="", lora="0"
  )
  c = defaults.base()
  defaults.flux_dev_paths(c, args)
  defaults.flux_dev_lora(c, args["lora"])
  c.leap.alpha = 0.1
  c.loss.lam = 0.4
  path = args["pickscore"]
  c.rewards = ml_collections.ConfigDict(
    {
      "pickscore": {
        "weight": 1.0,
        "path": path,
        "variant": "vit-h-14",
        "scale": "cosine",
        "dtype": "bfloat16",
        "remat": "full",
      },
      "pickscore_x100": {
        "weight": 0.0,
        "kind": "pickscore",
        "path": path,
        "variant": "vit-h-14",
        "scale": "logit",
        "dtype": "bfloat16",
        "remat": "full",
      },
    }
  )
  return c
