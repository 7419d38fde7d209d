"""LAION aesthetic-predictor heads <-> ``models.aesthetic.AestheticHead``.

The released heads are PyTorch state dicts of an ``nn.Sequential`` named
``layers``; only its Linear layers hold weights, at the Sequential indices
that count the weightless Dropout (and ReLU) modules between them:

- ``*-linearMSE.pth`` (e.g. ``sac+logos+ava1-l14-linearMSE.pth``): Linears
  at 0, 2, 4, 6, 7; no activation.
- ``*-reluMSE.pth``: Linears at 0, 3, 6, 9, 11; a ReLU after each of the
  first four.

Our ``layers.{j}`` is the ``j``-th Linear. The variant is told from the
indices present and the widths from the weight shapes. ``.pth`` files are
read with ``torch.load(weights_only=True)``; ``.safetensors`` files with the
same keys natively (``convert_aesthetic`` writes one).
"""

from __future__ import annotations

import dataclasses
import re

from leapalign_jax.convert import keymap
from leapalign_jax.convert.errors import ConversionError
from leapalign_jax.convert.keymap import Rule, Src, linear
from leapalign_jax.convert.keymap import reshape as reshape_t
from leapalign_jax.convert.sources import open_weights, strip_prefix
from leapalign_jax.models.aesthetic import AestheticConfig

# Sequential indices of the Linear layers, per activation.
SEQUENTIAL_INDICES = {"none": (0, 2, 4, 6, 7), "relu": (0, 3, 6, 9, 11)}
_WEIGHT = re.compile(r"^layers\.(\d+)\.weight$")


def rules(config: AestheticConfig) -> list[Rule]:
  """The key table: our ``layers.{j}`` <-> ``layers.{index}`` of the file."""
  out = []
  widths = config.widths
  for j, idx in enumerate(SEQUENTIAL_INDICES[config.activation]):
    n_in, n_out = widths[j], widths[j + 1]
    w = Src(f"layers.{idx}.weight", (n_out, n_in))
    b = Src(f"layers.{idx}.bias", (n_out,))
    out.append(Rule(("layers", j, "kernel"), None, (w,), linear(n_in, n_out)))
    out.append(Rule(("layers", j, "bias"), None, (b,), reshape_t(n_out, n_out)))
  return out


def open_head(path: str):
  """Opens a head checkpoint: ``(source, inferred AestheticConfig)``.

  Raises:
    ConversionError: the file holds no head weights (e.g. a CLIP model) or
      Linear layers at indices of neither released variant.
  """
  source, _ = open_weights(path)
  source = strip_prefix(source, ("layers.0.weight",))
  found = {int(m.group(1)) for k in source if (m := _WEIGHT.match(k))}
  if not found:
    hint = (
      "it looks like CLIP weights, which belong in the reward's clip_path"
      if any(
        k.startswith(("visual.", "vision_model.", "text_model."))
        for k in source
      )
      else "is it the LAION aesthetic predictor (.pth state dict)?"
    )
    raise ConversionError(
      f"{source.description}: holds no aesthetic-head weights (no "
      f"'layers.<i>.weight' keys); {hint}"
    )
  matches = [
    act
    for act, indices in SEQUENTIAL_INDICES.items()
    if tuple(sorted(found)) == indices
  ]
  if not matches:
    raise ConversionError(
      f"{source.description}: Linear layers at Sequential indices "
      f"{sorted(found)}; a LAION aesthetic head has them at "
      f"{SEQUENTIAL_INDICES['none']} (linearMSE) or "
      f"{SEQUENTIAL_INDICES['relu']} (reluMSE)"
    )
  activation = matches[0]
  indices = SEQUENTIAL_INDICES[activation]
  shapes = [tuple(source.shape(f"layers.{i}.weight")) for i in indices]
  if any(len(s) != 2 for s in shapes):
    raise ConversionError(
      f"{source.description}: head weights must be 2-D Linear weights; got "
      f"shapes {shapes}"
    )
  widths = (shapes[0][1], *(s[0] for s in shapes))
  try:
    config = AestheticConfig(widths=widths, activation=activation)
  except ValueError as e:
    raise ConversionError(f"{source.description}: {e}") from None
  return source, config


def _validated(path: str):
  source, config = open_head(path)
  keymap.validate(
    rules(config),
    source,
    "aesthetic head",
    "Is this a LAION improved-aesthetic-predictor head?",
  )
  return source, config


def load_aesthetic_head(
  path: str, *, param_dtype: str = "float32", sharding=None
):
  """Loads a LAION aesthetic head (``.pth`` or ``.safetensors``).

  Args:
    path: the head's state dict file.
    param_dtype: storage dtype of the parameters (the head computes in fp32).
    sharding: as for ``convert.loading.load_model``.

  Returns:
    ``(config, AestheticHead)``.
  """
  from flax import nnx

  from leapalign_jax.convert.loading import load_model
  from leapalign_jax.models.aesthetic import AestheticHead

  source, config = _validated(path)
  config = dataclasses.replace(config, param_dtype=param_dtype)
  model = load_model(
    lambda: AestheticHead(config, rngs=nnx.Rngs(0)),
    rules(config),
    source,
    param_dtype,
    sharding,
  )
  return config, model


def export_aesthetic_head(
  model, path: str, dtype: str | None = None
) -> list[str]:
  """Writes a head as ``.safetensors`` with the upstream keys."""
  from leapalign_jax.convert.loading import export_tensors
  from leapalign_jax.convert.safetensors_io import save_file

  tensors = export_tensors(rules(model.config), model, dtype)
  save_file(tensors, path, {"format": "pt"})
  return [path]


def convert_aesthetic(
  src: str, dst: str, dtype: str | None = None
) -> list[str]:
  """Rewrites a head checkpoint (``.pth``) as ``.safetensors``, keys kept."""
  from leapalign_jax.convert.safetensors_io import save_file

  if not dst.endswith(".safetensors"):
    raise ConversionError(f"{dst}: the output must be a .safetensors file")
  source, config = _validated(src)
  table = rules(config)
  stored = source[table[0].srcs[0].key].dtype
  lazy = keymap.lazy_params(table, source, dtype or stored)
  save_file(keymap.export(table, lazy), dst, {"format": "pt"})
  return [dst]
