"""Flux's text conditioning: CLIP-L pooled + T5 embeddings of prompts.

``TextEncoders`` loads the encoders and tokenizers of ``config.text`` and
embeds prompts into the fields of ``families.flux.TEXT_FIELDS`` (plus each
reward's own token ids), for the prompt cache (``prompts.embed``) and for
sampling without a cache (``generation.Sampler``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from leapalign_jax import data
from leapalign_jax.prompts import fingerprint, tokenizer_id


class TextEncoders:
  """Flux's CLIP-L text + T5 encoders and tokenizers (``config.text``).

  With ``rewards`` (``rewards.text.specs``) it also tokenises the prompts
  for each reward as that reward was trained (``reward_ids/<name>``).
  ``cache=True`` rounds the embeddings to ``text.cache_dtype`` (what the
  cache stores); ``False`` keeps them in float32 (sampling).
  """

  def __init__(self, text_cfg, rewards=None, *, cache: bool = True):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from leapalign_jax import tokenizers
    from leapalign_jax.convert import load_clip, load_t5

    self.cfg = text_cfg
    dtype = text_cfg.dtype
    clip_cfg, clip = load_clip(
      text_cfg.clip_path, towers=("text",), dtype=dtype
    )
    _, t5 = load_t5(text_cfg.t5_path, dtype=dtype)
    # The checkpoint's own tokenizer; the vendored BPE only without one.
    if text_cfg.clip_tokenizer:
      folder = tokenizers.resolve_clip_tokenizer(text_cfg.clip_tokenizer)
    else:
      folder = tokenizers.find_clip_tokenizer(text_cfg.clip_path)
    self.clip_tokenizer_folder = str(folder or "")
    self.clip_tok = tokenizers.load_clip_tokenizer(folder or None)
    tokenizers.check_vocab(
      len(self.clip_tok),
      clip_cfg.text.vocab_size,
      str(folder) if folder else "OpenAI BPE (vendored)",
      f"text.clip_path ({text_cfg.clip_path})",
    )
    self.t5_tok = tokenizers.load_t5_tokenizer(
      text_cfg.t5_tokenizer or text_cfg.t5_path
    )
    self.rewards = dict(rewards or {})
    self.reward_toks = {n: s.tokenizer() for n, s in self.rewards.items()}
    clip_def, clip_params = nnx.split(clip)
    t5_def, t5_params = nnx.split(t5)
    self._params = (clip_params, t5_params)
    out_dtype = jnp.dtype(text_cfg.cache_dtype if cache else jnp.float32)

    @jax.jit
    def encode(params, clip_ids, t5_ids):
      clip_m = nnx.merge(clip_def, params[0])
      t5_m = nnx.merge(t5_def, params[1])
      pooled = clip_m.text_features(clip_ids, project=False)
      return t5_m(t5_ids).astype(out_dtype), pooled.astype(out_dtype)

    self._encode = encode

  @classmethod
  def for_config(cls, config, cache: bool = True) -> TextEncoders:
    """The encoders of a run config, with its rewards' tokenizers."""
    from leapalign_jax.rewards import text

    specs = text.specs(config.rewards, config.text.reward_max_length)
    return cls(config.text, specs, cache=cache)

  def identity(self) -> dict[str, Any]:
    """What makes two caches compatible: encoders, tokenizers, lengths."""
    c = self.cfg
    return {
      "clip": fingerprint(c.clip_path),
      "t5": fingerprint(c.t5_path),
      "clip_tokenizer": tokenizer_id(self.clip_tokenizer_folder),
      "t5_tokenizer": fingerprint(c.t5_tokenizer or c.t5_path),
      "t5_max_length": int(c.t5_max_length),
      "clip_max_length": int(c.clip_max_length),
      "rewards": {
        n: {
          "style": s.style,
          "tokenizer": tokenizer_id(s.folder),
          "length": s.length,
        }
        for n, s in self.rewards.items()
      },
      "dtype": str(c.cache_dtype),
    }

  def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Embeds ``prompts`` (any count) in fixed-size batches."""
    from leapalign_jax import tokenizers

    c = self.cfg
    clip_ids = tokenizers.tokenize_clip(
      self.clip_tok, prompts, c.clip_max_length
    )
    t5_ids = tokenizers.tokenize_t5(self.t5_tok, prompts, c.t5_max_length)
    n, bs = len(prompts), int(c.batch_size)
    t5_out, clip_out = [], []
    for start in range(0, n, bs):
      sl = slice(start, start + bs)
      a, b = clip_ids[sl], t5_ids[sl]
      pad = bs - a.shape[0]
      if pad:  # keep one compiled shape
        a = np.concatenate([a, np.repeat(a[-1:], pad, 0)])
        b = np.concatenate([b, np.repeat(b[-1:], pad, 0)])
      t5_e, clip_e = self._encode(self._params, a, b)
      t5_out.append(np.asarray(t5_e)[: bs - pad])
      clip_out.append(np.asarray(clip_e)[: bs - pad])
    out = {
      "t5": np.concatenate(t5_out),
      "clip_pooled": np.concatenate(clip_out),
    }
    for name, tokenize in self.reward_toks.items():
      out[data.ids_field(name)] = tokenize(prompts).astype(np.int32)
    return out
