"""Default method sub-config, shared by every experiment config.

``get_config()`` (re-exported as ``methods.default_config``) returns the
fields every method reads; an experiment config merges it
(``config.update(methods.default_config())``) and overrides fields.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Method defaults: LeapAlign for HPSv2.1 (method.md §8) and baselines."""
  cfg = ml_collections.ConfigDict()
  cfg.method = "leapalign"
  cfg.loss = ml_collections.ConfigDict({"lam": 0.55})  # hinge threshold λ
  cfg.leap = ml_collections.ConfigDict(
    {
      "alpha": 0.3,  # gradient discount of the nested term (0.1: PickScore)
      "tau": 0.1,  # distance floor of the similarity weight
      "num_leaps": 2,  # 1 / 2 / 3 (any n >= 1)
      "reward_on": "x0",  # "x0" (through the connector) | "leap" (x̂0)
      "weighting": "both",  # "both" | "d_j" | "d_0" | "none"
      "step_range": "all",  # "all" | "late_half_index" | "late_half_sigma"
      "pair_sampling": "random",  # "random" | "fixed_gap"
      "fixed_gap": config_dict.placeholder(int),  # None: T // 2
      "grad_passes": "reuse",  # "reuse" (T forwards) | "recompute" (T + n)
    }
  )
  # "last N steps" counts are stated for T = 25 and rescaled for other T.
  cfg.refl = ml_collections.ConfigDict({"last_steps": 11})
  cfg.draft = ml_collections.ConfigDict({"k": 1, "lv_n": 2})
  cfg.drtune = ml_collections.ConfigDict({"k": 2, "last_steps": 11})
  cfg.full_bp = ml_collections.ConfigDict(
    {"truncation": "none", "mean_k": 4.0, "std_k": 2.0}  # "none" | "random"
  )
  return cfg
