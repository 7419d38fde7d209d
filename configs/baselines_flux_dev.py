"""The paper's baselines on FLUX.1-dev + HPSv2.1, in the same harness.

  python -m leapalign_jax.main \
      --config configs/baselines_flux_dev.py:method=drtune,flux=/ckpt/FLUX.1-dev,hps=/ckpt/HPS_v2.1_compressed.pt,train=/data/hpdv2_train,eval=/data/hpdv2_test \
      --workdir gs://bucket/drtune

``method``: refl | draft_lv | draft_k | drtune | full_backprop (method.md
§10). All share LeapAlign's rollout, the hinge with λ 0.55 and w = 1.
Expected HPSv2.1 (paper, Table 2): ReFL 0.3852, DRaFT-LV 0.3859, DRTune
0.3882 (LeapAlign 0.4092). DRaFT-K and full backprop were not run in the
paper; full backprop keeps every step's activations (memory grows with T).
"""

import ml_collections

from leapalign_jax import defaults, methods


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Baseline run; ``arg``: method=..., flux=..., hps=..., train=..., eval=..."""
  args = defaults.parse_arg(
    arg, method="drtune", flux="", hps="", train="", eval=""
  )
  c = defaults.base()
  if args["method"] not in methods.names():
    raise ValueError(
      f"unknown method {args['method']!r}; use one of {methods.names()}"
    )
  c.method = args["method"]
  defaults.flux_dev_paths(c, args)
  c.rewards.hpsv2.path = args["hps"]
  return c
