"""T5 v1.1 encoder weights: transformers ``T5EncoderModel`` <-> ours.

One key table, used in both directions. Ours differs by layout only: q, k and
v rows are concatenated into one ``[embed, 3, heads, d_kv]`` kernel, kernels
are transposed, and layer 0's relative-attention-bias table sits at the top
level because every layer shares it. Sizes (heads and ``d_kv`` included) are
read from the tensor shapes; ``relative_attention_max_distance`` and the norm
epsilon, which the weights do not record, come from ``config.json`` when
present (else T5's 128 and 1e-6).

Accepted inputs: Flux's ``text_encoder_2/`` (sharded safetensors with an
index), a pipeline root holding it, single files, PyTorch pickles, and full
``T5ForConditionalGeneration`` checkpoints (the decoder is skipped).
"""

from __future__ import annotations

import dataclasses
import re

from leapalign_jax.convert import keymap
from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.convert.keymap import Rule, Src, identity, linear
from leapalign_jax.convert.sources import open_weights, strip_prefix
from leapalign_jax.models.t5 import VARIANTS, T5EncoderConfig

ARCH_FIELDS = (
  "vocab_size",
  "d_model",
  "d_kv",
  "d_ff",
  "num_layers",
  "num_heads",
  "relative_attention_num_buckets",
)
_REL_BIAS = (
  "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
)
_EMBED = "encoder.embed_tokens.weight"


def hf_rules(c: T5EncoderConfig) -> list[Rule]:
  """Key table for the transformers layout."""
  D, H, Dk, F = c.d_model, c.num_heads, c.d_kv, c.d_ff
  rules = []

  def add(target, layer, srcs, transform):
    rules.append(Rule(tuple(target), layer, tuple(srcs), transform))

  add(
    ("shared", "embedding"),
    None,
    [Src("shared.weight", (c.vocab_size, D))],
    identity(),
  )
  add(
    ("relative_attention_bias",),
    None,
    [Src(_REL_BIAS, (c.relative_attention_num_buckets, H))],
    identity(),
  )
  for i in range(c.num_layers):
    b = f"encoder.block.{i}.layer"
    att = f"{b}.0.SelfAttention"
    add(
      ("blocks", "attn_norm", "scale"),
      i,
      [Src(f"{b}.0.layer_norm.weight", (D,))],
      identity(),
    )
    add(
      ("blocks", "attn", "qkv", "kernel"),
      i,
      [Src(f"{att}.{x}.weight", (H * Dk, D)) for x in "qkv"],
      linear(D, (3, H, Dk)),
    )
    add(
      ("blocks", "attn", "o", "kernel"),
      i,
      [Src(f"{att}.o.weight", (D, H * Dk))],
      linear((H, Dk), D),
    )
    add(
      ("blocks", "ff_norm", "scale"),
      i,
      [Src(f"{b}.1.layer_norm.weight", (D,))],
      identity(),
    )
    ff = f"{b}.1.DenseReluDense"
    for name, n_in, n_out in (("wi_0", D, F), ("wi_1", D, F), ("wo", F, D)):
      add(
        ("blocks", "ff", name, "kernel"),
        i,
        [Src(f"{ff}.{name}.weight", (n_out, n_in))],
        linear(n_in, n_out),
      )
  add(
    ("final_layer_norm", "scale"),
    None,
    [Src("encoder.final_layer_norm.weight", (D,))],
    identity(),
  )
  return rules


def open_checkpoint(path: str) -> tuple[object, dict]:
  """Opens T5 encoder weights: ``(normalised source, config.json dict)``.

  A shared key prefix is stripped, decoder / LM-head tensors are dropped, and
  the encoder's ``embed_tokens`` (when present, it is the table the encoder
  uses) is read as ``shared``.
  """
  source, cfg = open_weights(path, subfolders=("text_encoder_2",))
  source = strip_prefix(source, ("encoder.final_layer_norm.weight",))
  if not any(k.startswith("encoder.block.") for k in source):
    raise ConversionError(
      f"{source.description}: holds no T5 encoder weights (no "
      "'encoder.block.*' keys)"
    )
  has_embed = _EMBED in source

  def keep(key):
    if key.startswith("decoder.") or key == "lm_head.weight":
      return None
    if has_embed and key == "shared.weight":
      return None
    return "shared.weight" if key == _EMBED else key

  return source.renamed(keep), cfg


def _count(keys) -> int:
  pattern = r"encoder\.block\.(\d+)\."
  idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(idx) + 1 if idx else 0


def _need(source, key: str) -> tuple[int, ...]:
  if key not in source:
    raise ConversionError(
      f"{source.description}: missing {key!r}; the checkpoint is incomplete"
    )
  return tuple(source.shape(key))


def infer_config(source, cfg: dict | None = None) -> T5EncoderConfig:
  """The architecture of a T5 encoder checkpoint."""
  cfg, where = cfg or {}, source.description
  ff = "encoder.block.0.layer.1.DenseReluDense"
  proj = cfg.get("feed_forward_proj", "gated-gelu")
  if f"{ff}.wi.weight" in source or proj != "gated-gelu":
    raise ConversionError(
      f"{where}: a T5 with a non-gated or non-GELU feed-forward "
      f"({proj!r}); only T5 v1.1 encoders (gated-gelu) are supported"
    )
  V, D = _need(source, "shared.weight")
  buckets, H = _need(source, _REL_BIAS)
  inner = _need(source, "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
  try:
    return T5EncoderConfig(
      vocab_size=V,
      d_model=D,
      d_kv=inner // H,
      d_ff=_need(source, f"{ff}.wi_0.weight")[0],
      num_layers=_count(source),
      num_heads=H,
      relative_attention_num_buckets=buckets,
      relative_attention_max_distance=cfg.get(
        "relative_attention_max_distance", 128
      ),
      layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6),
    )
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from None


def check_matches(found: T5EncoderConfig, wanted: T5EncoderConfig, where):
  """Fails if the checkpoint's sizes differ from the requested config."""
  diffs = [
    f"{f}={getattr(found, f)!r} (config: {getattr(wanted, f)!r})"
    for f in ARCH_FIELDS
    if getattr(found, f) != getattr(wanted, f)
  ]
  if diffs:
    raise ConversionError(
      f"{where}: the weights do not fit the requested T5 config: "
      + ", ".join(diffs[:5])
      + "; pick the matching config or omit config to auto-detect"
    )


def load_t5(
  path: str,
  *,
  config: T5EncoderConfig | str | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
  sharding=None,
  **runtime,
):
  """Loads a T5 v1.1 encoder (auto-detected sizes).

  Args:
    path: a transformers folder (e.g. Flux's ``text_encoder_2/``, sharded
      with an index), a Flux pipeline root, a ``.safetensors`` file, or a
      PyTorch pickle (needs torch; read with ``weights_only=True``).
    config: expected architecture (``T5EncoderConfig`` or a ``VARIANTS``
      name); default inferred.
    dtype: compute dtype (bf16 or fp32; T5 overflows in fp16).
    param_dtype: storage dtype of the parameters (default: ``dtype``).
    sharding: None, a ``Sharding`` for every parameter, or a pytree of them.
    **runtime: ``remat``, ``scan_layers``.

  Returns:
    ``(config, model)``.
  """
  from flax import nnx

  from leapalign_jax.convert.loading import load_model
  from leapalign_jax.models.t5 import T5Encoder

  source, cfg = open_checkpoint(path)
  from leapalign_jax.convert.loading import resolve_variant

  config = resolve_variant(config, VARIANTS, "T5")
  found = infer_config(source, cfg)
  if config is not None:
    check_matches(found, config, source.description)
  config = dataclasses.replace(
    config or found, dtype=dtype, param_dtype=param_dtype or dtype, **runtime
  )
  rules = hf_rules(config)
  keymap.validate(
    rules,
    source,
    "T5 encoder (transformers layout)",
    "Is this a complete T5 v1.1 encoder checkpoint?",
  )
  model = load_model(
    lambda: T5Encoder(config, rngs=nnx.Rngs(0)),
    rules,
    source,
    config.param_dtype,
    sharding,
  )
  return config, model


def hf_config_dict(c: T5EncoderConfig) -> dict:
  """The transformers ``config.json`` of a ``T5EncoderModel``."""
  return {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "vocab_size": c.vocab_size,
    "d_model": c.d_model,
    "d_kv": c.d_kv,
    "d_ff": c.d_ff,
    "num_layers": c.num_layers,
    "num_heads": c.num_heads,
    "relative_attention_num_buckets": c.relative_attention_num_buckets,
    "relative_attention_max_distance": c.relative_attention_max_distance,
    "layer_norm_epsilon": c.layer_norm_epsilon,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "use_cache": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
  }


def _write(tensors, path: str, config: T5EncoderConfig, shard_bytes: int):
  from leapalign_jax.convert.loading import write_checkpoint

  return write_checkpoint(
    tensors,
    path,
    prefix="model",
    config_json=hf_config_dict(config),
    max_shard_bytes=shard_bytes,
  )


def export_t5(
  model,
  path: str,
  *,
  config: T5EncoderConfig | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 1024**3,
) -> list[str]:
  """Writes a ``T5EncoderModel`` folder (``config.json`` + safetensors).

  Args:
    model: a ``T5Encoder``, or its Param state / pure dict with ``config``.
    path: the output folder; shards past ``max_shard_bytes`` get an index.
    config: required when ``model`` is not a module.
    dtype: output dtype (default: the parameters' own).
    max_shard_bytes: shard size limit.

  Returns:
    The paths written.
  """
  from leapalign_jax.convert.loading import export_tensors

  config = config or getattr(model, "config", None)
  if config is None:
    raise ConversionError("export_t5 needs config= when given bare params")
  tensors = export_tensors(hf_rules(config), model, dtype)
  return _write(tensors, path, config, max_shard_bytes)


def convert_t5(
  src: str,
  dst: str,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 1024**3,
) -> list[str]:
  """Rewrites a T5 encoder checkpoint as a clean transformers folder.

  Streams one tensor at a time: e.g. a ``.bin`` or a full encoder-decoder
  checkpoint to an encoder-only safetensors folder, optionally re-typed.
  """
  source, cfg = open_checkpoint(src)
  config = infer_config(source, cfg)
  rules = hf_rules(config)
  keymap.validate(rules, source, "T5 encoder (transformers layout)")
  stored = source["shared.weight"].dtype
  lazy = keymap.lazy_params(rules, source, dtype or stored)
  return _write(keymap.export(rules, lazy), dst, config, max_shard_bytes)
