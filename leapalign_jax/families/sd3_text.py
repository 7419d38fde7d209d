"""SD3's text conditioning: CLIP-L + OpenCLIP bigG + T5 embeddings of prompts.

``TextEncoders`` loads the three encoders and their tokenizers (offline) and
embeds prompts into the fields of ``families.sd3.TEXT_FIELDS`` with the
pipeline's rule (``models.sd3_text.sd3_conditioning``): the prompt's
``sd3_context`` / ``sd3_pooled`` and the negative prompt's
(``sd3.negative_prompt``, embedded once) in every row, plus each reward's
own token ids. For the prompt cache (``prompts.embed``) and for sampling
without a cache (``generation.Sampler``).

Paths: ``text.clip_path`` (CLIP-L), ``sd3.clip_g_path`` (bigG) and
``text.t5_path`` (T5-XXL) may each be a model folder or file, or all the
same SD3 / SD3.5 snapshot root, whose ``text_encoder/``, ``text_encoder_2/``,
``text_encoder_3/`` and ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``
are then used (``sd3.clip_g_path`` "" means the root of ``text.clip_path``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from leapalign_jax import data
from leapalign_jax.prompts import fingerprint, tokenizer_id


def _sub(path: str, name: str) -> str:
  """``path/name`` when ``path`` is a snapshot root holding it, else ``path``."""
  if path and os.path.isdir(os.path.join(path, name)):
    return os.path.join(path, name)
  return path


def _clip_tokenizer_folder(explicit: str, root: str, sub: str, weights: str):
  """One CLIP's tokenizer folder (``""``: the vendored OpenAI BPE).

  The given one, else the snapshot root's ``sub``, else one beside the
  weights.
  """
  from leapalign_jax import tokenizers

  if explicit:
    return str(tokenizers.resolve_clip_tokenizer(explicit))
  if root and os.path.isdir(os.path.join(root, sub)):
    return os.path.join(root, sub)
  return str(tokenizers.find_clip_tokenizer(weights) or "")


class TextEncoders:
  """SD3's three text encoders and tokenizers (``config.text`` / ``.sd3``).

  With ``rewards`` (``rewards.text.specs``) it also tokenises the prompts
  for each reward as that reward was trained (``reward_ids/<name>``).
  ``cache=True`` rounds the embeddings to ``text.cache_dtype`` (what the
  cache stores); ``False`` keeps them in float32 (sampling).
  """

  def __init__(self, config, rewards=None, *, cache: bool = True):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from leapalign_jax import tokenizers
    from leapalign_jax.convert import load_clip, load_t5
    from leapalign_jax.models.sd3_text import sd3_conditioning

    t, s = config.text, config.sd3
    self.cfg, self.sd3_cfg = t, s
    dtype = t.dtype
    root = t.clip_path
    self.paths = {
      "clip_l": _sub(t.clip_path, "text_encoder"),
      "clip_g": s.clip_g_path or _sub(root, "text_encoder_2"),
      "t5": _sub(t.t5_path, "text_encoder_3"),
    }
    if self.paths["clip_g"] == self.paths["clip_l"]:
      from leapalign_jax.errors import ConfigError

      raise ConfigError(
        f"text.clip_path={t.clip_path!r} is not an SD3 snapshot root (no "
        "text_encoder_2/); set sd3.clip_g_path to the OpenCLIP bigG text "
        "encoder"
      )
    l_cfg, clip_l = load_clip(
      self.paths["clip_l"], towers=("text",), dtype=dtype
    )
    g_cfg, clip_g = load_clip(
      self.paths["clip_g"], towers=("text",), dtype=dtype
    )
    t5_cfg, t5 = load_t5(self.paths["t5"], dtype=dtype)
    self.tokenizer_folders = {
      "clip_l": _clip_tokenizer_folder(
        t.clip_tokenizer, root, "tokenizer", self.paths["clip_l"]
      ),
      "clip_g": _clip_tokenizer_folder(
        s.clip_g_tokenizer,
        "" if s.clip_g_path else root,
        "tokenizer_2",
        self.paths["clip_g"],
      ),
      "t5": t.t5_tokenizer or _sub(t.t5_path, "tokenizer_3"),
    }
    self.toks = {}
    for name, cfg in (("clip_l", l_cfg), ("clip_g", g_cfg)):
      folder = self.tokenizer_folders[name]
      self.toks[name] = tokenizers.load_clip_tokenizer(folder or None)
      tokenizers.check_vocab(
        len(self.toks[name]),
        cfg.text.vocab_size,
        folder or "OpenAI BPE (vendored)",
        self.paths[name],
      )
    self.toks["t5"] = tokenizers.load_t5_tokenizer(self.tokenizer_folders["t5"])
    self.rewards = dict(rewards or {})
    self.reward_toks = {n: r.tokenizer() for n, r in self.rewards.items()}
    defs, params = zip(*(nnx.split(m) for m in (clip_l, clip_g, t5)))
    self._params = params
    out_dtype = jnp.dtype(t.cache_dtype if cache else jnp.float32)
    width = t5_cfg.d_model

    @jax.jit
    def encode(params, ids_l, ids_g, ids_t5):
      models = [nnx.merge(d, p) for d, p in zip(defs, params)]
      ctx, pooled = sd3_conditioning(
        *models, ids_l, ids_g, ids_t5, t5_width=width
      )
      return ctx.astype(out_dtype), pooled.astype(out_dtype)

    self._encode = encode
    self._negative = None

  @classmethod
  def for_config(cls, config, cache: bool = True) -> TextEncoders:
    """The encoders of a run config, with its rewards' tokenizers."""
    from leapalign_jax.rewards import text

    specs = text.specs(config.rewards, config.text.reward_max_length)
    return cls(config, specs, cache=cache)

  def identity(self) -> dict[str, Any]:
    """What makes two caches compatible: encoders, tokenizers, lengths."""
    c = self.cfg
    return {
      "family": "sd3",
      **{name: fingerprint(path) for name, path in self.paths.items()},
      **{
        f"{name}_tokenizer": tokenizer_id(folder)
        if name != "t5"
        else fingerprint(folder)
        for name, folder in self.tokenizer_folders.items()
      },
      "t5_max_length": int(c.t5_max_length),
      "clip_max_length": int(c.clip_max_length),
      "negative_prompt": str(self.sd3_cfg.negative_prompt),
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

  def _ids(self, prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
    from leapalign_jax import tokenizers

    c = self.cfg
    return (
      tokenizers.tokenize_clip(self.toks["clip_l"], prompts, c.clip_max_length),
      tokenizers.tokenize_clip(self.toks["clip_g"], prompts, c.clip_max_length),
      tokenizers.tokenize_t5(self.toks["t5"], prompts, c.t5_max_length),
    )

  def _embed(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(context, pooled)`` of ``prompts`` in fixed-size batches."""
    ids = self._ids(prompts)
    n, bs = len(prompts), int(self.cfg.batch_size)
    ctx_out, pooled_out = [], []
    for start in range(0, n, bs):
      chunk = [a[start : start + bs] for a in ids]
      pad = bs - chunk[0].shape[0]
      if pad:  # keep one compiled shape
        chunk = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in chunk]
      ctx, pooled = self._encode(self._params, *chunk)
      ctx_out.append(np.asarray(ctx)[: bs - pad])
      pooled_out.append(np.asarray(pooled)[: bs - pad])
    return np.concatenate(ctx_out), np.concatenate(pooled_out)

  def negative(self) -> tuple[np.ndarray, np.ndarray]:
    """The negative prompt's ``(context [S, W], pooled [P])`` (once)."""
    if self._negative is None:
      ctx, pooled = self._embed([str(self.sd3_cfg.negative_prompt)])
      self._negative = (ctx[0], pooled[0])
    return self._negative

  def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Embeds ``prompts`` (any count): ``TEXT_FIELDS`` and reward ids."""
    ctx, pooled = self._embed(prompts)
    neg_ctx, neg_pooled = self.negative()
    n = len(prompts)
    out = {
      "sd3_context": ctx,
      "sd3_pooled": pooled,
      "sd3_neg_context": np.broadcast_to(neg_ctx, (n, *neg_ctx.shape)).copy(),
      "sd3_neg_pooled": np.broadcast_to(
        neg_pooled, (n, *neg_pooled.shape)
      ).copy(),
    }
    for name, tokenize in self.reward_toks.items():
      out[data.ids_field(name)] = tokenize(prompts).astype(np.int32)
    return out
