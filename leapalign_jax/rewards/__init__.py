"""Differentiable rewards: a registry of frozen, jit-able JAX reward models.

  reward = rewards.build(config.rewards)   # name -> {weight, path, ...}
  r_B = reward.score(reward.params, images_BHWC, ids_BL)   # weighted sum
  each = reward.score_each(reward.params, images_BHWC, ids_BL)  # {name: r_B}
  img_BP, txt_BP = reward.embed("hpsv2", reward.params, images_BHWC, ids_BL)

Images are decoded generator outputs in [-1, 1], NHWC, any size (clipped to
[-1, 1] inside, as the references clamp; ``check_images`` is the host-side
range check); ``ids`` are ``{name: ids_BL}``, each reward's prompt ids as
its own tokenizer makes them (``rewards.text``: OpenCLIP's pipeline for
``hpsv2``, transformers' ``CLIPTokenizer`` for ``pickscore``, BLIP's BERT
for ``image_reward``), padded to ``reward.lengths[name]``; one ``[B, L]``
array is given to every reward.
Scores are pure functions of ``(params, images, ids)``,
differentiable w.r.t. the images; the params are frozen (behind
``stop_gradient``) and may be passed to ``jax.jit`` sharded or replicated.

Registered rewards (``names()``); a config entry's ``kind`` field selects
one under another name (e.g. two ``clip`` rewards):

- ``hpsv2``: HPSv2.1 (OpenCLIP ViT-H-14), the cosine (``clip_score``).
- ``pickscore``: PickScore_v1 (CLIP ViT-H/14), ``exp(logit_scale)`` ×
  cosine, or the raw cosine with ``scale="cosine"`` (``clip_score``).
- ``clip``: the CLIP score of any CLIP: cosine, logit or clipscore
  (``clip_score``).
- ``digits_rule``: the digits world's rule-based reward, without gradient
  (``digits_rule``; GenEval's role): a classifier's argmax checked against
  the prompt's digit, colour and position.
- ``python``: a host-side numpy scorer, without gradient (``nondiff``).
- ``aesthetic``: the LAION aesthetic head on the unit OpenAI CLIP ViT-L/14
  image embedding; reads no text (``aesthetic``).
- ``image_reward``: ImageReward (BLIP ViT-L + cross-attention BERT + MLP
  head), standardised as the reference does; reads BLIP's 35 BERT ids
  (``image_reward``).

Options per entry: ``weight`` (default 1; 0 = evaluation only), ``kind``,
``path``, ``variant`` (the architecture of a file that does not record it,
e.g. an OpenCLIP state dict of a size other than L/H/g/bigG-14; see
``clip_score``), ``dtype`` / ``param_dtype`` (tower compute / storage; storage
defaults to ``dtype``, the logit scale stays fp32), ``remat``,
``scan_layers``, ``attention``, ``hidden_act``, ``resample`` / ``saturate``
/ ``crop`` (preprocessing, see ``preprocess``), ``scale`` and ``tokenizer``
(CLIP family: a style; ``image_reward``: the BERT vocabulary folder;
``rewards.text``) and ``clip_path`` (aesthetic). Unknown options raise.

Reward checkpoints (never downloaded by the code; fetch them once):

- ``hpsv2``: ``HPS_v2.1_compressed.pt``, an OpenCLIP ViT-H-14 state dict,
  from huggingface.co/xswu/HPSv2. ``path`` may name the ``.pt`` (read with
  torch) or, converted once (then no torch is needed)::

    python -m leapalign_jax.convert clip --src HPS_v2.1_compressed.pt \
        --dst hps_v2.1.safetensors --layout openclip

- ``pickscore``: a snapshot folder of huggingface.co/yuvalkirstain/PickScore_v1
  (``config.json`` + ``model.safetensors``); ``path`` = the folder, no
  conversion.
- ``clip``: e.g. a snapshot folder of
  huggingface.co/openai/clip-vit-large-patch14; ``path`` = the folder.
- ``aesthetic``: ``sac+logos+ava1-l14-linearMSE.pth`` from
  github.com/christophschuhmann/improved-aesthetic-predictor (``path``; read
  with torch, or converted once), plus the openai/clip-vit-large-patch14
  folder (``clip_path``)::

    python -m leapalign_jax.convert aesthetic \
        --src sac+logos+ava1-l14-linearMSE.pth --dst aesthetic_l14.safetensors

- ``image_reward``: ``ImageReward.pt`` from huggingface.co/THUDM/ImageReward
  (``path``; read with torch, or converted once with
  ``python -m leapalign_jax.convert image_reward --src ImageReward.pt
  --dst ImageReward.safetensors``), and in the same folder
  bert-base-uncased's ``vocab.txt`` (+ ``tokenizer_config.json``; or set
  ``tokenizer`` to their folder): BLIP's tokenizer, which ``embed_prompts``
  reads offline. The hub's ``med_config.json`` is not needed: the sizes
  are read off the weights.

Pickles are read with ``torch.load(weights_only=True)``; ``.safetensors``
files load without torch (TPU hosts) and are memory-mapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from leapalign_jax.errors import UserError
from leapalign_jax.rewards import (
  aesthetic,
  clip_score,
  digits_rule,
  image_reward,
  nondiff,
  text,
)
from leapalign_jax.rewards.base import Loaded, Reward, check_images

__all__ = ["Reward", "build", "check_images", "get", "names", "text"]

_BUILDERS = {
  "aesthetic": aesthetic.build,
  "clip": clip_score.build_clip,
  "digits_rule": digits_rule.build,  # the digits world's rule: no gradient
  "hpsv2": clip_score.build_hpsv2,
  "image_reward": image_reward.build,
  "pickscore": clip_score.build_pickscore,
  "python": nondiff.build_python,  # a host scorer: no gradient
}
# The tokenizer each reward was trained with, declared beside its scorer.
TOKENIZERS = text.TOKENIZERS
assert set(TOKENIZERS) == set(_BUILDERS)


def names() -> tuple[str, ...]:
  """The registered reward kinds."""
  return tuple(sorted(_BUILDERS))


def _plain(cfg: Any) -> dict[str, Any]:
  """A config entry (ConfigDict or mapping) as a plain dict."""
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


def _load(
  name: str, cfg: Mapping[str, Any], abstract: bool = False
) -> tuple[float, Loaded]:
  cfg = dict(cfg)
  kind = cfg.pop("kind", None) or name
  if kind not in _BUILDERS:
    raise UserError(
      f"unknown reward {kind!r} (rewards.{name}); registered: "
      f"{', '.join(names())}"
    )
  weight = cfg.pop("weight", 1.0)
  try:
    weight = float(weight)
  except (TypeError, ValueError):
    raise UserError(
      f"rewards.{name}.weight={weight!r} is not a number"
    ) from None
  return weight, _BUILDERS[kind](name, cfg, abstract)


def _bundle(entries: dict[str, tuple[float, Loaded]]) -> Reward:
  for name, (_, e) in entries.items():
    src = e.ids_from
    if src and (src not in entries or not entries[src][1].tokenizer):
      raise UserError(
        f"rewards.{name} reads the prompt ids of reward {src!r}, which is "
        f"not a configured text-reading reward ({', '.join(entries)}); add "
        "it (weight 0 keeps it out of the objective)"
      )
  lengths = [e.text_length for _, e in entries.values() if e.text_length]
  return Reward(
    names=tuple(entries),
    weights=tuple(w for w, _ in entries.values()),
    params={n: e.params for n, (_, e) in entries.items()},
    fns={n: e.fn for n, (_, e) in entries.items()},
    text_length=min(lengths) if lengths else 0,
    tokenizers={n: e.tokenizer for n, (_, e) in entries.items() if e.tokenizer},
    lengths={n: e.text_length for n, (_, e) in entries.items() if e.tokenizer},
    differentiable={n: e.differentiable for n, (_, e) in entries.items()},
    ids_of={n: e.ids_from for n, (_, e) in entries.items() if e.ids_from},
    embed_fns={n: e.embed for n, (_, e) in entries.items() if e.embed},
  )


def get(name: str, **cfg: Any) -> Reward:
  """Loads one reward (``cfg`` as a config entry: ``path=``, ``scale=``...).

  Raises:
    ValueError: (one line) unknown name or option, empty path; a
      ``ConversionError`` (a ValueError) for unreadable or wrong
      checkpoints.
  """
  return _bundle({name: _load(name, cfg)})


def build(config: Mapping[str, Any], abstract: bool = False) -> Reward:
  """Loads every reward of ``config.rewards`` (``name -> entry``).

  With ``abstract`` no checkpoint is read: each reward is built from its
  ``variant`` with abstract (``ShapeDtypeStruct``) parameters, for
  ahead-of-time compilation (``leapalign_jax.aot``).
  """
  items = list(config.items())
  if not items:
    raise UserError("config.rewards is empty; configure at least one reward")
  return _bundle({str(n): _load(str(n), _plain(c), abstract) for n, c in items})
