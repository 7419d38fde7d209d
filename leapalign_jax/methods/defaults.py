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
  # The GRPO family (methods/grpo.py); None: the method's own default
  # (grpo.VARIANTS: SDE form, noise scale, last step, step selection).
  cfg.grpo = ml_collections.ConfigDict(
    {
      "group_size": 4,  # G images per prompt (references: 12 / 24)
      "same_noise": True,  # one initial noise per group (DanceGRPO)
      "sde": config_dict.placeholder(str),  # "flow_grpo" | "dance_grpo"
      "noise_level": config_dict.placeholder(float),  # a or η
      "ignore_last": config_dict.placeholder(bool),  # never train step T-1
      "select": config_dict.placeholder(str),  # "first"|"random"|"window"
      "timestep_fraction": 0.6,  # share of steps trained ("first"/"random")
      "num_updates": 1,  # optimizer updates per rollout (minibatches)
      "clip_range": 1e-4,  # PPO ε
      "adv_clip_max": 5.0,
      "std_eps": 1e-8,  # advantage denominator floor
      "std_ddof": 1,  # 1: torch's unbiased std (Dance/Mix); 0: Flow-GRPO
      "kl_beta": 0.0,  # KL to the reference (LoRA off); needs LoRA
      "window_size": 4,  # MixGRPO: SDE/trained steps per iteration
      "window_interval": 25,  # iterations before the window moves
      "window_stride": 1,  # steps it moves by
      "window_roll_back": True,  # back to step 0 past T - 2
    }
  )
  return cfg
