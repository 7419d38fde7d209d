"""Shared defaults for every run config (the paper's settings, method.md §8).

Experiment configs (``configs/*.py``) start from ``base()`` and override.
Every field a run can read exists here, so configs can be locked and a
misspelled override fails. (It lives in the package, not in ``configs/``, so
config files import it the same way wherever the program runs from.)
"""

import ml_collections

from leapalign_jax import methods
from leapalign_jax.models.lora import FLUX_TARGETS
from leapalign_jax.sharding import DEFAULT_RULES


def base() -> ml_collections.ConfigDict:
  """All fields with the paper's defaults (FLUX.1-dev + HPSv2.1)."""
  c = methods.default_config()  # method, loss.lam, leap.*, baselines
  c.seed = 0
  # "" (use the paths below), "digits" (the embedded world: builds its own
  # models first), "random" (tiny random models; tests and smoke runs).
  c.world = ""
  c.world_options = ml_collections.ConfigDict()

  # The flow-model family (leapalign_jax/families/); its settings are the
  # section it names: flux -> c.flux.
  c.model = ml_collections.ConfigDict({"family": "flux"})
  c.flux = ml_collections.ConfigDict(
    {
      "path": "",  # BFL file or diffusers folder / FLUX.1-dev snapshot root
      # "" detects the architecture from the weights; "dev" / "schnell" /
      # "tiny" also requires it (other weights are refused) and is what
      # `aot` compiles (it needs one).
      "variant": "",
      "dtype": "bfloat16",  # compute
      "param_dtype": "float32",  # master weights
      "remat": "full",  # per-block: none | full | dots | names
      "attention": "auto",  # auto | xla | cudnn | splash (models/attention.py)
      "scan_layers": True,
    }
  )
  # config.model.family="sd3": Stable Diffusion 3 / 3.5 (families/sd3.py).
  c.sd3 = ml_collections.ConfigDict(
    {
      # Stability single file (sd3.5_medium.safetensors), diffusers
      # transformer/ folder or SD3.5 snapshot root.
      "path": "",
      # "" detects the architecture; "sd35_medium" / "sd35_large" /
      # "sd3_medium" / "tiny" also requires it (and is what `aot` compiles).
      "variant": "",
      "dtype": "bfloat16",
      "param_dtype": "float32",
      "remat": "full",
      "attention": "auto",
      "scan_layers": True,
      "shift": 3.0,  # the scheduler's static time shift
      # OpenCLIP bigG text encoder (SD3's text_encoder_2/); "" = the
      # text_encoder_2/ of text.clip_path's snapshot root.
      "clip_g_path": "",
      "clip_g_tokenizer": "",  # "" = tokenizer_2/ beside it
      "negative_prompt": "",  # the CFG branch's prompt (embedded per row)
    }
  )
  c.vae = ml_collections.ConfigDict(
    {"path": "", "variant": "flux", "dtype": "bfloat16", "remat": "full"}
  )
  # Text encoders for the prompt-embedding cache (embed_prompts) and sample.
  c.text = ml_collections.ConfigDict(
    {
      "clip_path": "",  # CLIP-L text encoder (or the snapshot root)
      "t5_path": "",  # T5-XXL encoder (or the snapshot root)
      # "" = the checkpoint's own (clip_path's tokenizer/), else the
      # vendored OpenAI BPE.
      "clip_tokenizer": "",
      "t5_tokenizer": "",  # "" = next to t5_path (tokenizer_2/)
      "clip_max_length": 77,
      "t5_max_length": 512,  # 256 for schnell
      # Reward ids' length (each reward's own tokenizer: rewards/text.py);
      # the reward text towers' context length.
      "reward_max_length": 77,
      "batch_size": 16,
      "dtype": "bfloat16",
      "cache_dtype": "bfloat16",  # embeddings in the prompt cache
    }
  )
  # name -> {weight, path, options}; see leapalign_jax.rewards.
  c.rewards = ml_collections.ConfigDict(
    {
      "hpsv2": {
        "weight": 1.0,
        "path": "",
        "variant": "vit-h-14",  # OpenCLIP ViT-H-14 (abstract builds, aot)
        "dtype": "bfloat16",
        "remat": "full",
        "attention": "auto",
      }
    }
  )
  c.data = ml_collections.ConfigDict(
    {
      "train_cache": "",  # embed_prompts output for the training prompts
      "eval_cache": "",  # held-out prompts
      "global_batch": 64,
    }
  )
  c.sampling = ml_collections.ConfigDict(
    {
      "height": 720,
      "width": 720,
      "num_steps": 25,  # training rollouts
      "guidance": 3.5,  # FLUX.1-dev distilled guidance (ignored by schnell)
      "shift": True,  # resolution-dependent shift (False for schnell)
    }
  )
  c.optim = ml_collections.ConfigDict(
    {
      "lr": 1e-5,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "weight_decay": 1e-4,
      "clip_norm": 1.0,
      "ema_decay": 0.995,
    }
  )
  c.lora = ml_collections.ConfigDict(
    {
      "enabled": False,  # the paper fine-tunes every weight
      "rank": 64,
      "alpha": 64.0,
      "targets": FLUX_TARGETS,
      "param_dtype": "float32",  # adapters (the base keeps flux.param_dtype)
    }
  )
  c.train = ml_collections.ConfigDict(
    {
      "num_steps": 300,
      "log_every_steps": 1,
      "ckpt_every_steps": 25,
      # Also checkpoint when this long has passed since the last save (0:
      # off): a preemption then loses at most this much work.
      "ckpt_every_secs": 1800.0,
      "keep_checkpoints": 3,
      "sample_every_steps": 50,  # fixed-seed EMA grids (0: off)
      "max_consecutive_nonfinite": 5,
      "overwrite": False,  # allow a different config in an existing workdir
    }
  )
  c.eval = ml_collections.ConfigDict(
    {
      "num_prompts": 400,  # from data.eval_cache
      "images_per_prompt": 4,
      "num_steps": 50,
      "batch_size": 8,
      "seed": 1234,
      "grid_images": 16,
      "before": False,  # also evaluate the base model (before/after table)
    }
  )
  c.mesh = ml_collections.ConfigDict(
    {
      # (data, fsdp, tensor) within a slice (ICI); -1 fills the devices.
      "shape": (1, -1, 1),
      # Factors across TPU slices (DCN; multi-slice jobs), or across
      # processes off TPU; the mesh is shape * dcn_shape.
      "dcn_shape": (1, 1, 1),
      "num_devices": 0,  # use only the first N devices (0: all of them)
      "rules": DEFAULT_RULES,
      "shard_frozen": False,  # shard VAE / reward params like Flux's
    }
  )
  c.export = ml_collections.ConfigDict(
    {
      "enabled": True,
      "layout": "diffusers",  # full weights: "diffusers" folder or "bfl" file
      # Full and fused weights; the LoRA file keeps the adapters' own
      # (training) precision.
      "dtype": "bfloat16",
      # LoRA runs always write a diffusers/PEFT LoRA file; True also writes
      # the adapters fused into full weights (in `layout`).
      "lora_merged": False,
    }
  )
  c.debug = ml_collections.ConfigDict({"nan_at_steps": ()})
  return c


def parse_arg(arg: str | None, **defaults_: str) -> dict[str, str]:
  """``"k1=v1,k2=v2"`` (a config's ``get_config(arg)``) over ``defaults_``.

  Raises:
    ValueError: for a key not in ``defaults_`` (a misspelled argument).
  """
  out = dict(defaults_)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in out:
      raise ValueError(
        f"config argument {item!r}: use key=value with key in {sorted(out)}"
      )
    out[key] = value
  return out


def flux_dev_paths(c: ml_collections.ConfigDict, args: dict[str, str]) -> None:
  """Points a config at a FLUX.1-dev snapshot and the prompt caches.

  ``args``: ``flux`` (the snapshot root: transformer/, vae/, text_encoder/,
  text_encoder_2/, tokenizer/, tokenizer_2/), ``train`` / ``eval`` (caches
  written by ``embed_prompts``).
  """
  root = args["flux"]
  c.flux.path = root
  c.flux.variant = "dev"
  c.vae.path = root
  c.text.update(
    clip_path=root, t5_path=root, clip_tokenizer=root, t5_tokenizer=root
  )
  c.data.train_cache = args["train"]
  c.data.eval_cache = args["eval"]


def flux_dev_lora(c: ml_collections.ConfigDict, lora: str) -> None:
  """``lora=1``: train LoRA adapters only, over bf16 base weights.

  The frozen 11.9 B base then takes 24 GB instead of 48 (fp32) and needs no
  optimizer state; the adapters keep fp32 (``lora.param_dtype``).
  """
  if lora not in ("0", "1"):
    raise ValueError(f"config argument lora={lora!r}: use lora=0 or lora=1")
  if lora == "1":
    c.lora.enabled = True
    c.flux.param_dtype = "bfloat16"
